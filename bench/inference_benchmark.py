"""Whole-volume inference on CPU: seconds per slice and peak memory above the model's own footprint.

Volumes: the 20-slice 512x512 DICOM sample, the 112-slice 3 mm sample and a synthetic 512x512x300 CT
(the DICOM slices repeated). Each volume is segmented in its own process so peak RSS is clean; the
model's footprint is the RSS after loading the model, before reading the volume.
Writes bench/results/inference.{json,md}.
"""
from __future__ import annotations

import argparse
import json
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


def measure(volume: str, model: str, batch_size: int) -> dict:
    """Runs in a child process: load model, segment, report times and memory."""
    from SAMedLib.checkpoint import load_model
    from SAMedLib.inference import segment_image
    from SAMedLib.volume_io import read_volume

    loaded = load_model(model)
    model_rss = rss_mb()
    image = read_volume(volume)
    start = time.perf_counter()
    segment_image(image, loaded, device="cpu", batch_size=batch_size)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    slices = image.GetSize()[2]
    return {"volume": Path(volume).name, "size": list(image.GetSize()), "batch_size": batch_size,
            "seconds": round(seconds, 1), "s_per_slice": round(seconds / slices, 3),
            "model_rss_mb": round(model_rss), "peak_rss_mb": round(peak),
            "peak_above_model_mb": round(peak - model_rss)}


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
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--child", nargs=2, metavar=("VOLUME", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.batch_size)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        volumes = [DATA / "ct_dicom", DATA / "ct_3mm.nii.gz", synthetic_volume(Path(tmp))]
        for volume in volumes:
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--batch-size",
                                  str(args.batch_size), "--child", str(volume), args.model],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": 2,
               "note": "2-core shared x86_64 VM, no GPU"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "inference.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    lines = [f"# Whole-volume inference (CPU)\n\nMachine: {machine['note']}. LiteMedSAM + SAMed head, "
             "streaming slices; peak RSS measured per volume in its own process.\n",
             "| volume | size | batch | s/slice | total s | model RSS MB | peak RSS MB | peak above model MB |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['volume']} | {'x'.join(map(str, r['size']))} | {r['batch_size']} | {r['s_per_slice']} | "
              f"{r['seconds']} | {r['model_rss_mb']} | {r['peak_rss_mb']} | {r['peak_above_model_mb']} |" for r in rows]
    (RESULTS / "inference.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
