"""The one-volume benchmark (headline result).

Fine-tune on ct_3mm (+ labels) with the CPU defaults of ``samed train``, segment the ct_dicom series and
score it against ct_dicom_labels (resampled onto the series in physical space). In the same run:
- the prompted upper bound: pretrained LiteMedSAM given the reference label's bounding box on every slice;
- a label-efficiency curve: the same recipe using only 5, 10, 20 or all labeled slices.
Writes bench/results/one_volume.{json,md}.
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
import torch.nn.functional as F

from SAMedLib.acceleration import cpu_has_native_bf16
from SAMedLib.backbones import build_backbone
from SAMedLib.checkpoint import load_model
from SAMedLib.classes import parse_class_list
from SAMedLib.cli import main as samed
from SAMedLib.inference import segment_image
from SAMedLib.metrics import score_label_maps
from SAMedLib.model_card import Preprocessing
from SAMedLib.preprocessing import normalize_intensity
from SAMedLib.volume_io import read_volume, resample_to_reference, to_canonical

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "abdomen-ct"
RESULTS = Path(__file__).resolve().parent / "results"
CLASSES = "1:spleen,5:liver,6:stomach,52:aorta,7:pancreas"
HEADLINE = ("spleen", "liver", "stomach", "aorta")


def score(pred: sitk.Image, reference: sitk.Image, classes) -> dict:
    ref = resample_to_reference(reference, pred)
    return score_label_maps(sitk.GetArrayFromImage(pred), sitk.GetArrayFromImage(ref), classes,
                            tuple(reversed(pred.GetSpacing())))


def headline_mean(scores: dict) -> float:
    return float(np.mean([scores["classes"][n]["dice"] for n in HEADLINE]))


def fine_tune(out: Path, extra: list[str]) -> tuple[Path, float]:
    model = out / f"model{'_'.join([''] + [e.strip('-') for e in extra])}.safetensors"
    start = time.perf_counter()
    code = samed(["train", "--image", str(DATA / "ct_3mm.nii.gz"), "--labels", str(DATA / "ct_3mm_labels.nii.gz"),
                  "--classes", CLASSES, "--output", str(model), "--progress-json", *extra])
    if code != 0:
        raise SystemExit(f"training failed ({code})")
    return model, time.perf_counter() - start


def evaluate_model(model_path: Path, image: sitk.Image, reference: sitk.Image, classes) -> tuple[dict, float]:
    model = load_model(model_path)
    start = time.perf_counter()
    pred = segment_image(image, model, device="cpu")
    return score(pred, reference, classes), time.perf_counter() - start


def prompted_upper_bound(image: sitk.Image, reference: sitk.Image, classes) -> dict:
    """Pretrained LiteMedSAM, one box per organ and slice from the reference label (slice stretched to 256)."""
    backbone = build_backbone("litemedsam")
    encoder, prompt_encoder, decoder = (m.eval() for m in (backbone.image_encoder, backbone.prompt_encoder,
                                                           backbone.mask_decoder))
    canonical, restore = to_canonical(image)
    ref = sitk.GetArrayFromImage(to_canonical(resample_to_reference(reference, image))[0])
    volume = normalize_intensity(sitk.GetArrayViewFromImage(canonical), Preprocessing())
    depth, height, width = volume.shape
    pred = np.zeros(volume.shape, np.uint8)
    with torch.inference_mode():
        for z in range(depth):
            x = F.interpolate(torch.from_numpy(volume[z])[None, None], size=(256, 256), mode="bilinear",
                              align_corners=False).expand(-1, 3, -1, -1)
            embedding = encoder(x)
            for c in classes:
                ys, xs = np.nonzero(ref[z] == c.value)
                if len(ys) == 0:
                    continue
                box = torch.tensor([[xs.min() * 256 / width, ys.min() * 256 / height,
                                     (xs.max() + 1) * 256 / width, (ys.max() + 1) * 256 / height]])
                sparse, dense = prompt_encoder(points=None, boxes=box[:, None], masks=None)
                low_res, _ = decoder(image_embeddings=embedding, image_pe=prompt_encoder.get_dense_pe(),
                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                     multimask_output=False)
                mask = F.interpolate(low_res, size=(height, width), mode="bilinear", align_corners=False)[0, 0] > 0
                pred[z][mask.numpy()] = c.value
    result = sitk.GetImageFromArray(pred)
    result.CopyInformation(canonical)
    return score(restore(result), reference, classes)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO / "out" / "benchmark")
    parser.add_argument("--curve", default="5,10,20", help="labeled-slice counts for the label-efficiency curve")
    parser.add_argument("--seeds", default="1234", help="training seeds of the headline model (run-to-run spread)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    classes = parse_class_list(CLASSES)
    image = read_volume(DATA / "ct_dicom")
    reference = read_volume(DATA / "ct_dicom_labels.nii.gz", allow_constant=True)
    results: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                 "gpu": None, "torch": torch.__version__, "bf16_native": cpu_has_native_bf16()}}

    def save() -> None:  # after every stage, so a cut-short run still leaves what it measured
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "one_volume.json").write_text(json.dumps(results, indent=1, default=lambda v: None))
        (RESULTS / "one_volume.md").write_text(render(results, classes))

    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        model, train_seconds = fine_tune(args.out, ["--seed", str(seed)])
        scores, infer_seconds = evaluate_model(model, image, reference, classes)
        runs.append({"seed": seed, "train_seconds": round(train_seconds, 1), "inference_seconds": round(infer_seconds, 1),
                     "mean_dice_4": round(headline_mean(scores), 4), "scores": scores})
        print(json.dumps(runs[-1]), flush=True)
        results["fine_tuned"] = runs
        save()
    bound = prompted_upper_bound(image, reference, classes)
    results["prompted_upper_bound"] = {"mean_dice_4": round(headline_mean(bound), 4), "scores": bound}
    save()
    first = runs[0]
    curve = []
    for count in [int(c) for c in args.curve.split(",") if c]:
        m, seconds = fine_tune(args.out, ["--max-labeled-slices", str(count), "--seed", str(first["seed"])])
        s, _ = evaluate_model(m, image, reference, classes)
        curve.append({"labeled_slices": count, "train_seconds": round(seconds, 1), "mean_dice_4": round(headline_mean(s), 4),
                      "dice": {n: round(s["classes"][n]["dice"], 4) for n in HEADLINE}})
        print(json.dumps(curve[-1]), flush=True)
        results["label_efficiency"] = curve
        save()
    curve.append({"labeled_slices": "all", "train_seconds": first["train_seconds"], "mean_dice_4": first["mean_dice_4"],
                  "dice": {n: round(first["scores"]["classes"][n]["dice"], 4) for n in HEADLINE}})
    results["label_efficiency"] = curve
    save()
    print(render(results, classes))


def fmt(value, digits=3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def render(results: dict, classes) -> str:
    runs, ub = results.get("fine_tuned", []), results.get("prompted_upper_bound")
    machine = results["machine"]
    lines = ["# One-volume benchmark: fine-tune on ct_3mm, segment ct_dicom", "",
             f"Machine: {machine['cores']}-core x86_64 VM (bf16 native: {machine['bf16_native']}), no GPU, torch "
             f"{machine['torch']}; `samed train` CPU defaults (frozen LiteMedSAM encoder + SAMed head). "
             "Written by `bench/one_volume_benchmark.py` after each stage.", ""]
    if not runs:
        return "\n".join(lines + ["(no run finished yet)"]) + "\n"
    header = "| organ | " + " | ".join(f"Dice seed {r['seed']} | HD95 mm" for r in runs)
    lines += [header + (" | prompted upper bound Dice |" if ub else " |"),
              "|---|" + "---|---|" * len(runs) + ("---|" if ub else "")]
    for c in classes:
        cells = [f"{fmt(r['scores']['classes'][c.name]['dice'])} | {fmt(r['scores']['classes'][c.name]['hd95_mm'], 1)}"
                 for r in runs]
        bound = f" {fmt(ub['scores']['classes'][c.name]['dice'])} |" if ub else ""
        lines.append(f"| {c.name} | " + " | ".join(cells) + " |" + bound)
    means = "".join(f"**{r['mean_dice_4']:.3f}** | | " for r in runs)
    lines.append(f"| **mean (spleen, liver, stomach, aorta)** | {means}" + (f"{ub['mean_dice_4']:.3f} |" if ub else ""))
    lines += ["", "| seed | training s | inference s (20 slices of 512x512) |", "|---|---|---|"]
    lines += [f"| {r['seed']} | {r['train_seconds']:.0f} | {r['inference_seconds']:.0f} |" for r in runs]
    lines += ["", "Pancreas covers only a few voxels of ct_dicom's first slices; it is reported, not in the headline mean."]
    if results.get("label_efficiency"):
        lines += ["", "## Label efficiency (same recipe and seed, only N labeled slices of ct_3mm)", "",
                  "| labeled slices | mean Dice (4 organs) | spleen | liver | stomach | aorta | train s |",
                  "|---|---|---|---|---|---|---|"]
        lines.insert(-2, "One training seed per point, so single points are noisy (the curve need not be monotonic); "
                         "\"all\" is the headline run of the same seed.\n")
        for row in results["label_efficiency"]:
            d = row["dice"]
            lines.append(f"| {row['labeled_slices']} | {row['mean_dice_4']:.3f} | {d['spleen']:.3f} | {d['liver']:.3f} | "
                         f"{d['stomach']:.3f} | {d['aorta']:.3f} | {row['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
