"""The one-volume demo (README main job): fine-tune on one labeled CT, segment another scan, score it.

Runs exactly the commands a user would run (``samed train``, ``samed segment``, ``samed evaluate``) with
their CPU defaults: train on ``ct_3mm.nii.gz`` (3 mm, non-contrast), segment the ``ct_dicom`` series
(0.98 mm, contrast-enhanced, different orientation) and score against its reference labels.
Outputs go to ``out/demo/`` (label map, .seg.nrrd, checkpoint, scores JSON) and ``preview.png``: four slices
of ct_dicom with the predicted segments filled and outlined, the reference dashed (``samed evaluate --preview``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "abdomen-ct"
# As the one-volume benchmark: five organs trained, the mean reported over the four headline organs
# (pancreas covers only a few voxels of ct_dicom and is reported separately).
CLASSES = "1:spleen,5:liver,6:stomach,52:aorta,7:pancreas"
HEADLINE = ("spleen", "liver", "stomach", "aorta")


def run_cli(argv: list[str]) -> str:
    from SAMedLib.cli import main

    buffer = StringIO()
    with redirect_stdout(buffer):
        code = main(argv)
    if code != 0:
        raise SystemExit(f"samed {argv[0]} failed with exit status {code}")
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "demo")
    parser.add_argument("--extra-train-args", default="", help="extra `samed train` options, space separated")
    parser.add_argument("--no-preview", action="store_true", help="do not draw out/demo/preview.png (needs matplotlib)")
    args = parser.parse_args()
    if not (args.data / "ct_3mm.nii.gz").exists():
        print(f"demo data not found in {args.data}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.out / "one_volume.safetensors"
    label_map, seg_file = args.out / "ct_dicom_prediction.nii.gz", args.out / "ct_dicom_prediction.seg.nrrd"
    preview = [] if args.no_preview else ["--image", str(args.data / "ct_dicom"),
                                          "--preview", str(args.out / "preview.png")]

    start = time.perf_counter()
    run_cli(["train", "--image", str(args.data / "ct_3mm.nii.gz"), "--labels", str(args.data / "ct_3mm_labels.nii.gz"),
             "--classes", CLASSES, "--output", str(model), *args.extra_train_args.split()])
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    run_cli(["segment", str(args.data / "ct_dicom"), "--model", str(model), "--output", str(label_map),
             "--seg-nrrd", str(seg_file)])
    segment_seconds = time.perf_counter() - start
    table = run_cli(["evaluate", "--prediction", str(label_map), "--reference",
                     str(args.data / "ct_dicom_labels.nii.gz"), "--classes", CLASSES, *preview])
    scores = json.loads(run_cli(["evaluate", "--prediction", str(label_map), "--reference",
                                 str(args.data / "ct_dicom_labels.nii.gz"), "--classes", CLASSES, "--json"]))
    headline = [scores["classes"][name]["dice"] for name in HEADLINE]
    mean4 = sum(headline) / len(headline)
    summary = {"train_seconds": round(train_seconds, 1), "segment_seconds": round(segment_seconds, 1),
               "mean_dice_spleen_liver_stomach_aorta": round(mean4, 4), "scores": scores}
    (args.out / "scores.json").write_text(json.dumps(summary, indent=1))
    print("\nOne-volume fine-tuning: trained on ct_3mm (3 mm), segmented ct_dicom (0.98 mm, other scanner)")
    print(table)
    print(f"mean Dice over spleen, liver, stomach, aorta: {mean4:.3f}")
    print(f"training {train_seconds:.0f} s, segmentation {segment_seconds:.0f} s (20 slices)")
    print(f"wrote {label_map}, {seg_file}, {model}" + ("" if args.no_preview else f", {args.out / 'preview.png'}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
