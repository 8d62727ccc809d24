"""Box annotation benchmark: a simulated annotator with SAM box prompts (SAMedLib.annotation).

For each organ of ct_3mm and the ct_dicom series: one box = the reference mask's bounding box on the organ's
middle slice, each side jittered by up to 5 voxels; propagate; 3D Dice and HD95 against the reference (resampled
onto the image in physical space). Then the interactive loop, one click at a time until the 3D Dice reaches
0.90 or 10 clicks: the click that removes most wrong voxels (``next_correction``), either a box (jittered the same
way) on the slice with the most wrong voxels among those the reference has the organ on, or an end mark on the
first slice past the organ's end where the mask runs on beyond it (a user would see the overshoot in a coronal
view and click once there).
Time per slice is split into encoder (once per slice, cached) and decoder. Optional (``--payoff``): ``samed
train`` on the box-annotated ct_3mm, one model per seed of the transfer matrix, scored on ct_dicom against that
matrix's forward models (the same training on the reference labels). Writes bench/results/box_annotation.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from SAMedLib.acceleration import cpu_has_native_bf16, precision_name
from SAMedLib.annotation import Annotator, SliceBox
from SAMedLib.errors import SAMedError
from SAMedLib.prompting import Prompt, PromptDecoder
from SAMedLib.metrics import dice, hd95
from SAMedLib.volume_io import read_volume, resample_to_reference, to_canonical, write_image

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "abdomen-ct"
RESULTS = Path(__file__).resolve().parent / "results"
ORGANS = {1: "spleen", 5: "liver", 6: "stomach", 52: "aorta", 2: "kidney_right", 3: "kidney_left",
          4: "gallbladder", 7: "pancreas"}
SCANS = {"ct_3mm": ("ct_3mm.nii.gz", "ct_3mm_labels.nii.gz"), "ct_dicom": ("ct_dicom", "ct_dicom_labels.nii.gz")}
MIN_SLICES = 3  # an organ on fewer reference slices is left out (ct_dicom's pancreas: a few voxels on 4 slices)


def jittered_box(mask: np.ndarray, z: int, rng: np.random.Generator, jitter: int = 5) -> SliceBox:
    ys, xs = np.nonzero(mask[z])
    height, width = mask.shape[1:]
    x0, y0, x1, y1 = (int(v) + int(rng.integers(-jitter, jitter + 1)) for v in (xs.min(), ys.min(), xs.max(), ys.max()))
    x0, x1 = sorted((int(np.clip(x0, 0, width - 1)), int(np.clip(x1, 0, width - 1))))
    y0, y1 = sorted((int(np.clip(y0, 0, height - 1)), int(np.clip(y1, 0, height - 1))))
    return SliceBox(z, x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))


def next_correction(pred: np.ndarray, ref: np.ndarray, boxed: set[int], ends: set[int]) -> tuple[str, int] | None:
    """The annotator's next click where it fixes most wrong voxels: ("box", z) on the slice (organ on it, not yet
    boxed) with the most wrong voxels, or ("end", z) on the first slice past the organ's end when the mask runs
    on beyond it (all those slices' voxels are wrong, and one end mark removes them).

    (The lowest slice Dice picked the organ's 1-voxel end slices, where a box cannot change the 3D Dice.)
    """
    present = np.flatnonzero(ref.any(axis=(1, 2)))
    errors = [(int((pred[z] != ref[z]).sum()), "box", z) for z in present if z not in boxed]
    below, above = int(present.min()) - 1, int(present.max()) + 1
    if below >= 0 and below not in ends:
        errors.append((int(pred[:below + 1].sum()), "end", below))
    if above < len(ref) and above not in ends:
        errors.append((int(pred[above:].sum()), "end", above))
    errors = [e for e in errors if e[0] > 0]
    return max(errors)[1:] if errors else None


def simulate(annotator: Annotator, ref: np.ndarray, rng: np.random.Generator, jitter: int, max_clicks: int) -> dict:
    """One organ: a jittered box on its middle slice, then ``next_correction`` clicks until Dice >= 0.90."""
    present = np.flatnonzero(ref.any(axis=(1, 2)))
    boxes = [jittered_box(ref, int(present[len(present) // 2]), rng, jitter)]
    t0 = time.perf_counter()
    one_box = pred = annotator.annotate(boxes)
    one_box_seconds = time.perf_counter() - t0
    curve, ends, clicks = [round(dice(pred, ref), 4)], set(), ["box"]
    t1 = time.perf_counter()
    while curve[-1] < 0.90 and len(boxes) + len(ends) < max_clicks:
        correction = next_correction(pred, ref, {b.slice for b in boxes}, ends)
        if correction is None:
            break
        kind, z = correction
        if kind == "box":
            boxes.append(jittered_box(ref, z, rng, jitter))
        else:
            ends.add(z)
        clicks.append(kind)
        pred = annotator.annotate(boxes, ends=sorted(ends))
        curve.append(round(dice(pred, ref), 4))
    return {"one_box": one_box, "pred": pred, "curve": curve, "clicks": clicks, "boxes": len(boxes), "ends": len(ends),
            "one_box_seconds": one_box_seconds, "extra_seconds": time.perf_counter() - t1}


def organ_rng(seed: int, value: int) -> np.random.Generator:
    """Each organ's jitter from its own stream: one organ's clicks never change the next organ's boxes (with one
    stream per seed, a change in the clicks of one organ moved the boxes of every organ after it)."""
    return np.random.default_rng([seed, value])


def run_scan(name: str, organs: list[int], max_boxes: int, seeds: list[int], jitter: int, out: Path | None) -> dict:
    """Every organ with the first seed's jitter in full (and its labels for the payoff); the other seeds' jitter
    draws are summarised (one-box Dice, clicks), on the same cached embeddings."""
    image_path, labels_path = SCANS[name]
    image = read_volume(DATA / image_path)
    reference = resample_to_reference(read_volume(DATA / labels_path, allow_constant=True), image)
    ref_canonical = sitk.GetArrayFromImage(to_canonical(reference)[0])
    start = time.perf_counter()
    annotator = Annotator.from_model(image, device="cpu")
    build_seconds = time.perf_counter() - start
    spacing_zyx = tuple(reversed(annotator.canonical.GetSpacing()))
    results = {"slices": int(ref_canonical.shape[0]), "jitter_voxels": jitter,
               "jitter_mm": round(jitter * annotator.canonical.GetSpacing()[0], 1),
               "model_build_seconds": round(build_seconds, 1), "organs": {}, "by_seed": {}}
    annotated = np.zeros(ref_canonical.shape, np.uint8)
    for value in organs:
        rng = organ_rng(seeds[0], value)
        ref = ref_canonical == value
        present = np.flatnonzero(ref.any(axis=(1, 2)))
        if len(present) < MIN_SLICES:
            continue
        enc0, encs0, dec0, decs0 = (annotator.encoder_runs, annotator.encoder_seconds, annotator.decoder_runs,
                                    annotator.decoder_seconds)
        run = simulate(annotator, ref, rng, jitter, max_boxes)
        one, pred, curve = run["one_box"], run["pred"], run["curve"]
        row = {"reference_slices": [int(present.min()), int(present.max())],
               "one_box": {"dice": curve[0], "hd95_mm": round(hd95(one, ref, spacing_zyx), 1),
                           "slices": int(one.any(axis=(1, 2)).sum()), "seconds": round(run["one_box_seconds"], 1)},
               "interactive": {"dice_per_box": curve, "clicks": run["clicks"], "boxes": run["boxes"],
                               "ends": run["ends"], "reached_0.90": curve[-1] >= 0.90,
                               "final_hd95_mm": round(hd95(pred, ref, spacing_zyx), 1),
                               "extra_seconds": round(run["extra_seconds"], 1)}}
        row["encoder_seconds_per_slice"] = round((annotator.encoder_seconds - encs0) / max(1, annotator.encoder_runs - enc0), 3)
        row["decoder_seconds_per_call"] = round((annotator.decoder_seconds - decs0) / max(1, annotator.decoder_runs - dec0), 3)
        results["organs"][ORGANS[value]] = row
        annotated[pred & (annotated == 0)] = value
        print(name, ORGANS[value], json.dumps(row), f"load {os.getloadavg()[0]:.1f}", flush=True)
    for seed in seeds[1:]:
        results["by_seed"][str(seed)] = by_organ = {}
        for value in organs:
            rng = organ_rng(seed, value)
            ref = ref_canonical == value
            if ref.any(axis=(1, 2)).sum() < MIN_SLICES:
                continue
            run = simulate(annotator, ref, rng, jitter, max_boxes)
            by_organ[ORGANS[value]] = {"one_box_dice": run["curve"][0], "final_dice": run["curve"][-1],
                                       "clicks": len(run["clicks"]), "ends": run["ends"],
                                       "reached_0.90": run["curve"][-1] >= 0.90}
            print(name, seed, ORGANS[value], json.dumps(by_organ[ORGANS[value]]), flush=True)
    results["encoder_seconds_per_slice"] = round(annotator.encoder_seconds / max(1, annotator.encoder_runs), 3)
    results["decoder_seconds_per_call"] = round(annotator.decoder_seconds / max(1, annotator.decoder_runs), 3)
    results["encoder_runs"], results["decoder_runs"] = annotator.encoder_runs, annotator.decoder_runs
    if out is not None:  # the box-annotated label map (first seed), for the training payoff
        write_image(_labels_image(annotator, annotated), out)
    return results


def _labels_image(annotator: Annotator, canonical_labels: np.ndarray) -> sitk.Image:
    labels = sitk.GetImageFromArray(canonical_labels)
    labels.CopyInformation(annotator.canonical)
    return annotator.restore(labels)


def payoff(out: Path, labels: Path, seeds: list[int]) -> dict:
    """``samed train`` (CPU defaults) on the box labels, one model per seed, scored on ct_dicom; the same seeds'
    forward models of the transfer matrix (the same command on the reference labels, the same scoring) are the
    comparison, read from bench/results/transfer.json."""
    from SAMedLib.checkpoint import load_model
    from SAMedLib.classes import parse_class_list
    from SAMedLib.cli import main as samed
    from SAMedLib.inference import segment_image
    # The matrix's classes, scan loading and scoring: its forward models are the comparison.
    from transfer_benchmark import CLASSES, load_scan, score

    classes = parse_class_list(CLASSES)
    image, reference = load_scan("ct_dicom")
    matrix = json.loads((RESULTS / "transfer.json").read_text())["cases"]["forward"]["runs"]
    rows = {"box_labels": {}, "reference_labels": {}}
    for seed in seeds:
        model = out / f"payoff_box_labels_seed{seed}.safetensors"
        start = time.perf_counter()
        if samed(["train", "--image", str(DATA / "ct_3mm.nii.gz"), "--labels", str(labels), "--classes",
                  CLASSES, "--output", str(model), "--seed", str(seed), "--device", "cpu"]) != 0:
            raise SystemExit("training failed")
        seconds = time.perf_counter() - start
        s = score(segment_image(image, load_model(model), device="cpu"), reference, classes)
        rows["box_labels"][seed] = {"train_seconds": round(seconds, 1),
                                    "dice": {c.name: round(s["classes"][c.name]["dice"], 4) for c in classes}}
        [run] = [r for r in matrix if r["seed"] == seed]
        rows["reference_labels"][seed] = {"train_seconds": run["train_seconds"], "dice": {
            c.name: round(run["on"]["scores"]["classes"][c.name]["dice"], 4) for c in classes}}
    for name, by_seed in rows.items():
        for row in by_seed.values():
            row["mean_dice_4"] = round(float(np.mean(list(row["dice"].values()))), 4)
    return {"seeds": seeds, "rows": rows}


def measure_timing(slices: int = 6) -> dict:
    """Encoder and decoder cost on ct_dicom slices: wall seconds (inflated by the machine's load) and this
    process's CPU seconds (what the work itself costs on the cores it got). The decoder on a 160 x 160 voxel box
    (a spleen-sized box), on its window of the embedding (the default) and on the whole embedding."""
    from SAMedLib.acceleration import autocast

    image = read_volume(DATA / "ct_dicom")
    annotator = Annotator.from_model(image, device="cpu")
    whole = PromptDecoder(annotator.decoder.prompt_encoder, annotator.decoder.mask_decoder, context_tokens=None)
    height, width = annotator.volume.shape[1:]
    box = SliceBox(0, width // 2 - 80, height // 2 - 80, width // 2 + 80, height // 2 + 80)
    rows = {"encoder": [], "decoder": [], "decoder_whole_embedding": []}
    for z in range(slices):
        prompt = Prompt(annotator.model_box(SliceBox(z, box.x0, box.y0, box.x1, box.y1)))
        for stage in rows:
            wall, cpu = time.perf_counter(), time.process_time()
            if stage == "encoder":
                annotator.embedding(z)
            elif stage == "decoder":
                annotator.decode(z, [prompt])
            else:
                with torch.inference_mode(), autocast("cpu"):
                    whole(annotator.embedding(z), [prompt])
            rows[stage].append((time.perf_counter() - wall, time.process_time() - cpu))
    result = {"slices": slices, "threads": torch.get_num_threads(), "load_average": round(os.getloadavg()[0], 1)}
    for stage, values in rows.items():
        walls, cpus = np.array(values[1:]).T if len(values) > 1 else np.array(values).T  # the first call warms up
        result[stage] = {"wall_seconds": round(float(np.median(walls)), 3), "cpu_seconds": round(float(np.median(cpus)), 3)}
    try:  # the same slices encoded through OpenVINO (samed annotate --openvino, the box effect's option)
        start = time.perf_counter()
        fast = Annotator.from_model(image, device="cpu", openvino=True)
        convert = time.perf_counter() - start
    except SAMedError as exc:  # openvino not installed
        result["encoder_openvino"] = {"error": str(exc)}
        return result
    walls = []
    for z in range(slices):
        wall = time.perf_counter()
        fast.embedding(z)
        walls.append(time.perf_counter() - wall)
    result["encoder_openvino"] = {"wall_seconds": round(float(np.median(walls[1:])), 3),
                                  "convert_seconds": round(convert, 1)}
    return result


def _seed_cell(one_box: float, clicks: int, reached: bool, final: float) -> str:
    return f"{one_box:.3f} / {clicks}" if reached else f"{one_box:.3f} / >{clicks} ({final:.3f})"


def render(results: dict) -> str:
    m = results["machine"]
    lines = ["# Box annotation benchmark (simulated annotator, pretrained LiteMedSAM)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, compute {m['compute']}; "
             f"load average at start {m['load_start']:.1f}, at end {m.get('load_end', float('nan')):.1f} "
             "(a shared machine: times are inflated by the load).", "",
             f"One box = the reference bounding box on the organ's middle slice, each side jittered by up to "
             f"{results.get('jitter_voxels', 5)} voxels (seed {results.get('seeds', [results.get('seed')])[0]}), propagated both ways. Interactive: "
             "the click that removes most wrong voxels - a jittered box on the slice (with the organ) with the most "
             "wrong voxels, or an end mark on the first slice past the organ's end when the mask runs on beyond it - "
             "until Dice >= 0.90 or 10 clicks.", "",
             "| scan | organ | ref. slices | 1 box Dice | 1 box HD95 mm | slices | clicks to 0.90 | Dice per click | s (1 box) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for scan, r in results["scans"].items():
        for organ, row in r["organs"].items():
            one, inter = row["one_box"], row["interactive"]
            clicks = inter["boxes"] + inter.get("ends", 0)
            boxes = (f"{clicks}" if inter["reached_0.90"] else f">{clicks} (not reached)") + (
                f" ({inter['boxes']} box + {inter['ends']} end)" if inter.get("ends") else "")
            first, last = row["reference_slices"]
            lines.append(f"| {scan} ({r.get('jitter_mm', '?')} mm) | {organ} | {first}-{last} | "
                         f"{one['dice']:.3f} | {one['hd95_mm']} | {one['slices']} | {boxes} | "
                         f"{' '.join(f'{d:.3f}' for d in inter['dice_per_box'])} | {one['seconds']} |")
    lines += ["", "Time per slice (measured under the load above): encoder once per slice (cached), decoder per call.", "",
              "| scan | slices | encoder s/slice | decoder s/call | encoder runs | decoder runs |", "|---|---|---|---|---|---|"]
    for scan, r in results["scans"].items():
        if "encoder_runs" not in r:  # a scan cut short: only its finished organs were kept
            lines.append(f"| {scan} | {r['slices']} | (partial run: see the organs' rows) | | | |")
            continue
        lines.append(f"| {scan} | {r['slices']} | {r['encoder_seconds_per_slice']} | {r['decoder_seconds_per_call']} | "
                     f"{r['encoder_runs']} | {r['decoder_runs']} |")
    extra_seeds = [seed for seed in results.get("seeds", [])[1:]]
    if extra_seeds:
        lines += ["", f"Over all {len(results['seeds'])} jitter draws (seeds {', '.join(map(str, results['seeds']))}): "
                      "one-box Dice median and worst, clicks to 0.90 median and most, draws that reached 0.90.", "",
                  "| scan | organ | 1 box median | 1 box worst | clicks median | clicks most | reached 0.90 |",
                  "|---|---|---|---|---|---|---|"]
        for scan, r in results["scans"].items():
            for organ, row in r["organs"].items():
                draws = [(row["one_box"]["dice"], len(row["interactive"]["dice_per_box"]),
                          row["interactive"]["reached_0.90"])]
                draws += [(o["one_box_dice"], o["clicks"], o["reached_0.90"])
                          for o in (r.get("by_seed", {}).get(str(seed), {}).get(organ) for seed in extra_seeds) if o]
                one_box, clicks, reached = (np.array(column) for column in zip(*draws))
                lines.append(f"| {scan} | {organ} | {np.median(one_box):.3f} | {one_box.min():.3f} | "
                             f"{np.median(clicks):.0f} | {clicks.max()} | {int(reached.sum())} of {len(draws)} |")
        lines += ["", f"Other jitter draws (seeds {', '.join(map(str, extra_seeds))}; same procedure): one-box Dice / "
                      "clicks to 0.90 (`>10` not reached, final Dice in brackets).", "",
                  "| scan | organ | " + " | ".join(f"seed {s}" for s in results["seeds"]) + " |",
                  "|---|---|" + "---|" * len(results["seeds"])]
        for scan, r in results["scans"].items():
            for organ, row in r["organs"].items():
                cells = [_seed_cell(row["one_box"]["dice"], len(row["interactive"]["dice_per_box"]),
                                    row["interactive"]["reached_0.90"], row["interactive"]["dice_per_box"][-1])]
                for seed in extra_seeds:
                    other = r.get("by_seed", {}).get(str(seed), {}).get(organ)
                    cells.append(_seed_cell(other["one_box_dice"], other["clicks"], other["reached_0.90"],
                                            other["final_dice"]) if other else "-")
                lines.append(f"| {scan} | {organ} | " + " | ".join(cells) + " |")
    if "timing" in results:
        t = results["timing"]
        lines += ["", f"Per-slice cost on ct_dicom ({t['slices']} slices, median after the first, {t['threads']} threads, "
                      f"load average {t['load_average']}): encoder {t['encoder']['wall_seconds']} s wall / "
                      f"{t['encoder']['cpu_seconds']} CPU-s, decoder {t['decoder']['wall_seconds']} s wall / "
                      f"{t['decoder']['cpu_seconds']} CPU-s"
                      + (f" on the box's window of the embedding, {t['decoder_whole_embedding']['wall_seconds']} s wall / "
                         f"{t['decoder_whole_embedding']['cpu_seconds']} CPU-s on the whole embedding"
                         if "decoder_whole_embedding" in t else "")
                      + " (a 160 x 160 voxel box). CPU-s / threads approximates the wall time on an idle machine."
                      + (f" With `--openvino` (the box effect's 'Faster CPU' option) the encoder takes "
                         f"{t['encoder_openvino']['wall_seconds']} s wall per slice after "
                         f"{t['encoder_openvino']['convert_seconds']} s of conversion."
                         if "wall_seconds" in t.get("encoder_openvino", {}) else "")]
    if "payoff" in results:
        p = results["payoff"]
        lines += ["", "Payoff: `samed train` (CPU defaults) on ct_3mm with the box labels vs the reference labels "
                      "(the transfer matrix's forward models of the same seeds), scored on ct_dicom.", "",
                  "| labels | seed | spleen | liver | stomach | aorta | mean | train s |", "|---|---|---|---|---|---|---|---|"]
        for name, by_seed in p["rows"].items():
            for seed, row in by_seed.items():
                d = row["dice"]
                lines.append(f"| {name} | {seed} | {d['spleen']:.3f} | {d['liver']:.3f} | {d['stomach']:.3f} | "
                             f"{d['aorta']:.3f} | {row['mean_dice_4']:.3f} | {row['train_seconds']} |")
            means = [row["mean_dice_4"] for row in by_seed.values()]
            lines.append(f"| {name} | mean ± std | | | | | {np.mean(means):.3f} ± {np.std(means):.3f} | |")
    if results.get("notes"):  # kept in the JSON, so a rerun's render keeps them
        lines += ["", "Notes:"] + [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scans", default="ct_dicom,ct_3mm")
    parser.add_argument("--organs", default="1,5,6,52,2,3,4,7", help="label values")
    parser.add_argument("--max-boxes", type=int, default=10)
    parser.add_argument("--seeds", default="1,2,3,4,5,6,7,8,9,10",
                        help="jitter seeds: the first in full, the others summarised")
    parser.add_argument("--jitter", type=int, default=5, help="voxels each box side may move (the issue's 5)")
    parser.add_argument("--payoff", action="store_true", help="also train on the box labels (minutes of CPU)")
    parser.add_argument("--payoff-seeds", default="1234,7,42", help="training seeds (the transfer matrix's)")
    parser.add_argument("--timing-only", action="store_true", help="add the per-slice timing to the saved results")
    parser.add_argument("--payoff-only", action="store_true",
                        help="add the payoff to the saved results, trained on the saved box labels")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "box_annotation")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "torch": torch.__version__, "threads": torch.get_num_threads(),
                           "bf16_native": cpu_has_native_bf16(), "compute": precision_name("cpu"),
                           "load_start": os.getloadavg()[0]}, "seeds": [int(v) for v in args.seeds.split(",")],
               "jitter_voxels": args.jitter,
               "scans": {}}
    previous_path = RESULTS / "box_annotation.json"
    previous = json.loads(previous_path.read_text()) if previous_path.exists() else {}
    for kept in ("payoff", "timing", "notes"):  # sections this run does not redo stay as they were
        if kept in previous and not (kept == "payoff" and args.payoff):
            results[kept] = previous[kept]

    def save() -> None:
        results["machine"]["load_end"] = os.getloadavg()[0]
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "box_annotation.json").write_text(json.dumps(results, indent=1))
        (RESULTS / "box_annotation.md").write_text(render(results))

    box_labels = args.out / "ct_3mm_box_labels.nii.gz"
    if args.timing_only or args.payoff_only:  # add one section to the saved results
        results = previous
        if args.timing_only:
            results["timing"] = measure_timing()
        else:
            results["payoff"] = payoff(args.out, box_labels, [int(v) for v in args.payoff_seeds.split(",")])
        (RESULTS / "box_annotation.json").write_text(json.dumps(results, indent=1))
        (RESULTS / "box_annotation.md").write_text(render(results))
        return
    for scan in args.scans.split(","):
        results["scans"][scan] = run_scan(scan, [int(v) for v in args.organs.split(",")], args.max_boxes,
                                          results["seeds"], args.jitter, box_labels if scan == "ct_3mm" else None)
        save()
    if args.payoff:
        results["payoff"] = payoff(args.out, box_labels, [int(v) for v in args.payoff_seeds.split(",")])
        save()


if __name__ == "__main__":
    main()
