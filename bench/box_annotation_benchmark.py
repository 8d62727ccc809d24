"""Box annotation benchmark: a simulated annotator with SAM box prompts (SAMedLib.annotation).

For each organ of ct_3mm and the ct_dicom series: one box = the reference mask's bounding box on the organ's
middle slice, each side jittered by up to 5 voxels; propagate; 3D Dice and HD95 against the reference (resampled
onto the image in physical space). Then the interactive loop: a box (jittered the same way) on the slice with
the most wrong voxels (among those the reference has the organ on) until the 3D Dice reaches 0.90 or 10 boxes.
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
from SAMedLib.prompting import Prompt
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


def worst_slice(pred: np.ndarray, ref: np.ndarray, boxed: set[int]) -> int | None:
    """The slice (not yet boxed, the organ on it) with the most wrong voxels: where an annotator sees the error.

    (The lowest slice Dice picked the organ's 1-voxel end slices, where a box cannot change the 3D Dice.)
    """
    errors = [(int((pred[z] != ref[z]).sum()), z) for z in np.flatnonzero(ref.any(axis=(1, 2))) if z not in boxed]
    return max(errors)[1] if errors else None


def run_scan(name: str, organs: list[int], max_boxes: int, seed: int, jitter: int, out: Path | None) -> dict:
    image_path, labels_path = SCANS[name]
    image = read_volume(DATA / image_path)
    reference = resample_to_reference(read_volume(DATA / labels_path, allow_constant=True), image)
    ref_canonical = sitk.GetArrayFromImage(to_canonical(reference)[0])
    start = time.perf_counter()
    annotator = Annotator.from_model(image, device="cpu")
    build_seconds = time.perf_counter() - start
    spacing_zyx = tuple(reversed(annotator.canonical.GetSpacing()))
    rng = np.random.default_rng(seed)
    results = {"slices": int(ref_canonical.shape[0]), "jitter_voxels": jitter,
               "jitter_mm": round(jitter * annotator.canonical.GetSpacing()[0], 1),
               "model_build_seconds": round(build_seconds, 1), "organs": {}}
    annotated = np.zeros(ref_canonical.shape, np.uint8)
    for value in organs:
        ref = ref_canonical == value
        present = np.flatnonzero(ref.any(axis=(1, 2)))
        if len(present) < MIN_SLICES:
            continue
        middle = int(present[len(present) // 2])
        boxes = [jittered_box(ref, middle, rng, jitter)]
        enc0, encs0, dec0, decs0, t0 = (annotator.encoder_runs, annotator.encoder_seconds, annotator.decoder_runs,
                                        annotator.decoder_seconds, time.perf_counter())
        pred = annotator.annotate(boxes)
        one_box_seconds = time.perf_counter() - t0
        row = {"reference_slices": [int(present.min()), int(present.max())],
               "one_box": {"dice": round(dice(pred, ref), 4), "hd95_mm": round(hd95(pred, ref, spacing_zyx), 1),
                           "slices": int(pred.any(axis=(1, 2)).sum()), "seconds": round(one_box_seconds, 1),
                           "encoder_runs": annotator.encoder_runs - enc0, "decoder_runs": annotator.decoder_runs - dec0}}
        curve = [row["one_box"]["dice"]]
        t1 = time.perf_counter()
        while curve[-1] < 0.90 and len(boxes) < max_boxes:
            z = worst_slice(pred, ref, {b.slice for b in boxes})
            if z is None:
                break
            boxes.append(jittered_box(ref, z, rng, jitter))
            pred = annotator.annotate(boxes)
            curve.append(round(dice(pred, ref), 4))
        row["interactive"] = {"dice_per_box": curve, "boxes": len(boxes), "reached_0.90": curve[-1] >= 0.90,
                              "final_hd95_mm": round(hd95(pred, ref, spacing_zyx), 1),
                              "extra_seconds": round(time.perf_counter() - t1, 1)}
        row["encoder_seconds_per_slice"] = round((annotator.encoder_seconds - encs0) / max(1, annotator.encoder_runs - enc0), 3)
        row["decoder_seconds_per_call"] = round((annotator.decoder_seconds - decs0) / max(1, annotator.decoder_runs - dec0), 3)
        results["organs"][ORGANS[value]] = row
        annotated[pred & (annotated == 0)] = value
        print(name, ORGANS[value], json.dumps(row), f"load {os.getloadavg()[0]:.1f}", flush=True)
    results["encoder_seconds_per_slice"] = round(annotator.encoder_seconds / max(1, annotator.encoder_runs), 3)
    results["decoder_seconds_per_call"] = round(annotator.decoder_seconds / max(1, annotator.decoder_runs), 3)
    results["encoder_runs"], results["decoder_runs"] = annotator.encoder_runs, annotator.decoder_runs
    if out is not None:  # the box-annotated label map, for the training payoff
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
    process's CPU seconds (what the work itself costs on the cores it got)."""
    image = read_volume(DATA / "ct_dicom")
    annotator = Annotator.from_model(image, device="cpu")
    height, width = annotator.volume.shape[1:]
    box = SliceBox(0, width // 2 - 40, height // 2 - 40, width // 2 + 40, height // 2 + 40)
    rows = {"encoder": [], "decoder": []}
    for z in range(slices):
        for stage in ("encoder", "decoder"):
            wall, cpu = time.perf_counter(), time.process_time()
            if stage == "encoder":
                annotator.embedding(z)
            else:
                annotator.decode(z, [Prompt(annotator.model_box(SliceBox(z, box.x0, box.y0, box.x1, box.y1)))])
            rows[stage].append((time.perf_counter() - wall, time.process_time() - cpu))
    result = {"slices": slices, "threads": torch.get_num_threads(), "load_average": round(os.getloadavg()[0], 1)}
    for stage, values in rows.items():
        walls, cpus = np.array(values[1:]).T if len(values) > 1 else np.array(values).T  # the first call warms up
        result[stage] = {"wall_seconds": round(float(np.median(walls)), 3), "cpu_seconds": round(float(np.median(cpus)), 3)}
    return result


def render(results: dict) -> str:
    m = results["machine"]
    lines = ["# Box annotation benchmark (simulated annotator, pretrained LiteMedSAM)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, compute {m['compute']}; "
             f"load average at start {m['load_start']:.1f}, at end {m.get('load_end', float('nan')):.1f} "
             "(a shared machine: times are inflated by the load).", "",
             f"One box = the reference bounding box on the organ's middle slice, each side jittered by up to "
             f"{results.get('jitter_voxels', 5)} voxels (seed {results.get('seed', 0)}), propagated both ways. Interactive: "
             "a jittered box on the slice with the most wrong voxels until Dice >= 0.90 or 10 boxes.", "",
             "| scan | organ | ref. slices | 1 box Dice | 1 box HD95 mm | slices | boxes to 0.90 | Dice per box | s (1 box) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for scan, r in results["scans"].items():
        for organ, row in r["organs"].items():
            one, inter = row["one_box"], row["interactive"]
            boxes = str(inter["boxes"]) if inter["reached_0.90"] else f">{inter['boxes']} (not reached)"
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
    if "timing" in results:
        t = results["timing"]
        lines += ["", f"Per-slice cost on ct_dicom ({t['slices']} slices, median after the first, {t['threads']} threads, "
                      f"load average {t['load_average']}): encoder {t['encoder']['wall_seconds']} s wall / "
                      f"{t['encoder']['cpu_seconds']} CPU-s, decoder {t['decoder']['wall_seconds']} s wall / "
                      f"{t['decoder']['cpu_seconds']} CPU-s. CPU-s / threads approximates the wall time on an idle machine."]
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jitter", type=int, default=5, help="voxels each box side may move (the issue's 5)")
    parser.add_argument("--payoff", action="store_true", help="also train on the box labels (minutes of CPU)")
    parser.add_argument("--payoff-seeds", default="1234,7,42", help="training seeds (the transfer matrix's)")
    parser.add_argument("--timing-only", action="store_true", help="add the per-slice timing to the saved results")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "box_annotation")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "torch": torch.__version__, "threads": torch.get_num_threads(),
                           "bf16_native": cpu_has_native_bf16(), "compute": precision_name("cpu"),
                           "load_start": os.getloadavg()[0]}, "seed": args.seed, "jitter_voxels": args.jitter,
               "scans": {}}

    def save() -> None:
        results["machine"]["load_end"] = os.getloadavg()[0]
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "box_annotation.json").write_text(json.dumps(results, indent=1))
        (RESULTS / "box_annotation.md").write_text(render(results))

    if args.timing_only:
        results = json.loads((RESULTS / "box_annotation.json").read_text())
        results["timing"] = measure_timing()
        (RESULTS / "box_annotation.json").write_text(json.dumps(results, indent=1))
        (RESULTS / "box_annotation.md").write_text(render(results))
        return
    box_labels = args.out / "ct_3mm_box_labels.nii.gz"
    for scan in args.scans.split(","):
        results["scans"][scan] = run_scan(scan, [int(v) for v in args.organs.split(",")], args.max_boxes, args.seed,
                                          args.jitter, box_labels if scan == "ct_3mm" else None)
        save()
    if args.payoff:
        results["payoff"] = payoff(args.out, box_labels, [int(v) for v in args.payoff_seeds.split(",")])
        save()


if __name__ == "__main__":
    main()
