"""The `extent` clean-up with and without its shared-slice extension (stop 24), on the same models.

Stop 23's `extent` cut each class at the first deep waist of its z-profile. On ct_dicom, where every organ is on
every slice, two scored runs lost an organ that way (sparse-20 seed 1234: the head found the aorta faintly on
three slices and `extent` kept the wrong side, aorta 0.35 -> 0.03; -60 HU seed 1234: liver 0.80 -> 0.65). The
extension (``SAMedLib.cleanup.extend_into_shared_slices``) grows each class back over the slices that most of the
other classes' extents cover. It was designed from those two scored failures, so this script also runs the
selection splits, which no scored case uses (``bench/transfer_selection.py``: the slab splits imitate the
reverse case's coverage change, where `extent` earns its keep; forward with training seeds 0-2), and reports
both.

Each job segments with the model card's full pipeline twice: ``stop23`` (the extension switched off) and
``shared`` (the default now). Scored jobs reuse the probe-start models of ``bench/head_start_matrix.py``
(out/head_start; forward and the phase shifts: the OpenVINO models); selection models are trained into
out/selection_stop24 with the CPU defaults.

Usage: ``python bench/extent_rescore.py --run scored selection`` (jobs already in the results are skipped), then
``python bench/extent_rescore.py`` re-renders ``bench/results/extent_rescore.md``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import transfer_benchmark as tb
import transfer_selection as ts
from head_start_matrix import SEEDS, machine_line
from SAMedLib import cleanup

RESULTS = tb.RESULTS / "extent_rescore.json"
SCORED = [*[(test, seed, "forward", ["--head-start", "probe", "--openvino"])
            for seed in SEEDS for test in ("forward", "phase-aorta+150", "phase-liver-spleen-60")],
          *[(case, seed, case, ["--head-start", "probe"]) for case in ("reverse", "sparse-10") for seed in SEEDS],
          *[(case, 1234, case, ["--head-start", "probe"]) for case in ("sparse-5", "sparse-20")]]
SELECTION = ["slab", "slab-to-bright", "slab-bright", "forward-seed0", "forward-seed1", "forward-seed2"]
VARIANTS = ("stop23", "shared")


def score_both(model_path: Path, image, reference) -> dict:
    """The card's full pipeline with stop 23's `extent` and with the shared-slice extension."""
    classes = tb.parse_class_list(tb.CLASSES)
    model = tb.load_model(model_path)
    extend = cleanup.extend_into_shared_slices
    row = {}
    try:
        for variant in VARIANTS:
            cleanup.extend_into_shared_slices = extend if variant == "shared" else (lambda extents, occupied: extents)
            start = time.perf_counter()
            s = tb.score(tb.segment_image(image, model, device="cpu"), reference, classes)
            dice = {o: round(s["classes"][o]["dice"], 4) for o in tb.ORGANS}
            row[variant] = {"mean": round(float(np.mean(list(dice.values()))), 4), "dice": dice,
                            "fp_outside": {o: s["classes"][o]["fp_outside"] for o in tb.ORGANS},
                            "seconds": round(time.perf_counter() - start, 1)}
    finally:
        cleanup.extend_into_shared_slices = extend
    training = model.card.training
    row["encoder_precision"] = ("OpenVINO " if training.get("view_encoder") == "openvino" else "") + str(
        training.get("encoder_precision"))
    row["machine"] = machine_line()
    return row


def selection_job(split: str, out: Path) -> tuple[Path, str]:
    """Train (once) the selection split's model with the CPU defaults; return it and its test scan's name.
    ``forward-seedN``: transfer_selection's forward split trained with seed N."""
    out.mkdir(parents=True, exist_ok=True)
    name, seed = (("forward-seed0", int(split.removeprefix("forward-seed"))) if split.startswith("forward-seed")
                  else (split, 0))
    image, labels, test = ts.split_training(out)[name]
    model = out / f"{Path(image).name.split('.')[0]}_seed{seed}.safetensors"
    if not model.exists() and tb.samed(["train", "--image", str(image), "--labels", str(labels), "--classes",
                                        tb.CLASSES, "--output", str(model), "--seed", str(seed), "--progress-json"]):
        raise SystemExit(f"training failed: {split}")
    return model, test


def run(groups: list[str]) -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"scored": {}, "selection": {}}
    if "scored" in groups:
        scans = {}
        for test, seed, case, extra in SCORED:
            key = f"{test}:{seed}"
            if key in results["scored"]:
                continue
            model, _ = tb.train(tb.REPO / "out" / "head_start", case, seed, extra, reuse=True)
            _, _, scan, shifts = tb.CASES[test]
            if scan not in scans:  # each scan read once
                scans[scan] = tb.load_scan(scan)
            image, reference = scans[scan]
            if shifts:
                image = tb.phase_shift(image, reference, shifts)
            results["scored"][key] = score_both(model, image, reference)
            save(results)
    if "selection" in groups:
        for split in SELECTION:
            if split in results["selection"]:
                continue
            model, test = selection_job(split, tb.REPO / "out" / "selection_stop24")
            image, reference = ts.load_test(test)
            results["selection"][split] = score_both(model, image, reference)
            save(results)


def save(results: dict) -> None:
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    (tb.RESULTS / "extent_rescore.md").write_text(render(results))


def render(results: dict) -> str:
    lines = ["# `extent` with and without its shared-slice extension (stop 24)", "",
             "Generated by `bench/extent_rescore.py` (the why and the protocol are in its docstring). Each row is one "
             "model segmented twice with its card's full pipeline (box refinement, `extent`, gap filling): `stop 23` "
             "cuts each class at its first deep waist, `shared` (the default since stop 24) grows it back over the "
             "slices most other classes' extents cover. Mean Dice over spleen, liver, stomach, aorta; fp = voxels "
             "predicted on slices beyond each organ's reference extent (sum over organs).", ""]
    machines = sorted({r["machine"] for group in results.values() for r in group.values()})
    lines += [f"Machine: {m}" for m in machines] + [""]
    header = ("| {} | encoder | stop 23: mean | shared: mean | change | " + " | ".join(tb.ORGANS)
              + " (stop 23 -> shared) | fp stop 23 / shared |")
    for group, title in (("selection", "split (not scored)"), ("scored", "scored case:seed")):
        rows = results.get(group, {})
        if not rows:
            continue
        lines += [f"## {'Selection splits' if group == 'selection' else 'Scored cases (probe-start models of stop 23)'}",
                  "", header.format(title), "|---|---|---|---|---|" + "---|" * len(tb.ORGANS) + "---|"]
        for key, r in rows.items():
            old, new = r["stop23"], r["shared"]
            organs = " | ".join(f"{old['dice'][o]:.3f}" + ("" if old["dice"][o] == new["dice"][o]
                                                             else f" -> {new['dice'][o]:.3f}") for o in tb.ORGANS)
            lines.append(f"| {key} | {r['encoder_precision']} | {old['mean']:.3f} | {new['mean']:.3f} | "
                         f"{new['mean'] - old['mean']:+.3f} | {organs} | "
                         f"{sum(old['fp_outside'].values())} / {sum(new['fp_outside'].values())} |")
        changes = [r["shared"]["mean"] - r["stop23"]["mean"] for r in rows.values()]
        lines += ["", f"{len(rows)} runs: {sum(c > 0.0005 for c in changes)} better, "
                      f"{sum(c < -0.0005 for c in changes)} worse, largest loss {min(changes):+.3f}, "
                      f"largest gain {max(changes):+.3f}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", nargs="*", choices=("scored", "selection"), default=[])
    args = parser.parse_args()
    if args.run:
        run(args.run)
    else:
        save(json.loads(RESULTS.read_text()))


if __name__ == "__main__":
    main()
