"""Whole-volume inference on CPU: seconds per slice and peak memory above the model's own footprint.

Volumes: the 20-slice 512x512 DICOM sample, the 112-slice 3 mm sample and a synthetic 512x512x300 CT
(the DICOM slices repeated). Each volume is segmented in its own process so peak RSS is clean; the
model's footprint is the RSS after loading the model, before reading the volume.
Writes bench/results/inference.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "abdomen-ct"
RESULTS = Path(__file__).resolve().parent / "results"


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(volume: str, model: str, batch_size: int, precision: str) -> dict:
    """Runs in a child process: load model, segment, report times, memory and (for ct_dicom) Dice."""
    import SimpleITK as sitk

    from SAMedLib.acceleration import precision_name
    from SAMedLib.checkpoint import load_model
    from SAMedLib.inference import segment_image
    from SAMedLib.metrics import score_label_maps
    from SAMedLib.volume_io import read_volume, resample_to_reference

    loaded = load_model(model)
    model_rss = rss_mb()
    image = read_volume(volume)
    start = time.perf_counter()
    pred = segment_image(image, loaded, device="cpu", batch_size=batch_size, precision=precision)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    slices = image.GetSize()[2]
    row = {"volume": Path(volume).name, "size": list(image.GetSize()), "batch_size": batch_size,
           "precision": precision_name("cpu", precision), "seconds": round(seconds, 1),
           "s_per_slice": round(seconds / slices, 3), "model_rss_mb": round(model_rss), "peak_rss_mb": round(peak),
           "peak_above_model_mb": round(peak - model_rss)}
    if Path(volume).name == "ct_dicom":
        reference = resample_to_reference(read_volume(DATA / "ct_dicom_labels.nii.gz", allow_constant=True), pred)
        scores = score_label_maps(sitk.GetArrayFromImage(pred), sitk.GetArrayFromImage(reference),
                                  loaded.card.classes, tuple(reversed(pred.GetSpacing())))
        row["dice"] = {name: round(c["dice"], 4) for name, c in scores["classes"].items()}
    return row


def synthetic_volume(folder: Path, slices: int = 300) -> Path:
    import numpy as np
    import SimpleITK as sitk

    from SAMedLib.volume_io import read_volume

    dicom = sitk.GetArrayFromImage(read_volume(DATA / "ct_dicom"))
    array = np.concatenate([dicom] * (slices // len(dicom) + 1))[:slices]
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing((0.977, 0.977, 1.0))
    path = folder / "synthetic_512x512x300.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="a fine-tuned checkpoint (e.g. out/demo/one_volume.safetensors)")
    parser.add_argument("--child", nargs=4, metavar=("VOLUME", "MODEL", "BATCH", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        volume, model, batch, precision = args.child
        print(json.dumps(measure(volume, model, int(batch), precision)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # (volume, batch size, precision): batch 4 with precision auto on every volume, plus fp32 and batch 1
        # on the DICOM series to show what reduced precision and batching change (time, memory and Dice).
        runs = [(DATA / "ct_dicom", 4, "auto"), (DATA / "ct_dicom", 4, "fp32"), (DATA / "ct_dicom", 1, "auto"),
                (DATA / "ct_3mm.nii.gz", 4, "auto"), (synthetic_volume(Path(tmp)), 4, "auto")]
        for volume, batch, precision in runs:
            out = subprocess.run([sys.executable, __file__, "--model", args.model,
                                  "--child", str(volume), args.model, str(batch), precision],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "note": "2-core x86_64 VM (AVX512-BF16/AMX), no GPU; idle while measuring"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "inference.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    lines = [f"# Whole-volume inference (CPU)\n\nMachine: {machine['note']}. LiteMedSAM + SAMed head, "
             "streaming slices; peak RSS measured per volume in its own process.\n",
             "| volume | size | batch | precision | s/slice | total s | model RSS MB | peak RSS MB | peak above model MB "
             "| Dice vs reference |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['volume']} | {'x'.join(map(str, r['size']))} | {r['batch_size']} | {r['precision']} | "
              f"{r['s_per_slice']} | {r['seconds']} | {r['model_rss_mb']} | {r['peak_rss_mb']} | "
              f"{r['peak_above_model_mb']} | {', '.join(f'{k} {v:.3f}' for k, v in r.get('dice', {}).items())} |"
              for r in rows]
    (RESULTS / "inference.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
