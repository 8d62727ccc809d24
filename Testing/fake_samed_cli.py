"""A stand-in for ``python -m SAMedLib.cli train ... --progress-json`` to test the trainer's process handling.

Behaviour is chosen with the environment variable FAKE_SAMED_MODE:

* ``ok``: a few iterations, a validation and a checkpoint, then ``done`` (exit 0).
* ``slow``: iterations every 0.1 s for a long time; on SIGTERM or once the ``--stop-file`` exists
  writes the checkpoint, prints ``stopped`` and exits 0 (what the real trainer does).
* ``ignore_term``: like ``slow`` but ignores SIGTERM and the stop file (must be killed).
* ``fail``: some iterations, then ``{"event": "error"}`` and a traceback on stderr, exit 1.
* ``crash``: a Python traceback on stderr only, exit 1.
* ``leave_child``: like ``ok``, but leaves a process behind that holds the output pipes open.

FAKE_SAMED_RECORD (optional) names a JSON file where the arguments and what the label files
contained are written, so tests can check the exported data the trainer would have seen.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time


def emit(event: dict) -> None:
    print(json.dumps(event), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="samed")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train")
    train.add_argument("--image", action="append", required=True)
    train.add_argument("--labels", action="append", required=True)
    train.add_argument("--classes", required=True)
    train.add_argument("--output", required=True)
    train.add_argument("--iterations", type=int, default=5)
    train.add_argument("--progress-json", action="store_true")
    train.add_argument("--stop-file")
    args, unknown = parser.parse_known_args(argv)

    record = os.environ.get("FAKE_SAMED_RECORD")
    if record:
        import numpy as np
        import SimpleITK as sitk

        info = {"args": sys.argv[1:], "unknown": unknown, "cwd": os.getcwd(), "labels": []}
        for image_path, labels_path in zip(args.image, args.labels):
            image, labels = sitk.ReadImage(image_path), sitk.ReadImage(labels_path)
            values, counts = np.unique(sitk.GetArrayViewFromImage(labels), return_counts=True)
            info["labels"].append({"values": {int(v): int(c) for v, c in zip(values, counts)},
                                   "same_grid": image.GetSize() == labels.GetSize()
                                   and np.allclose(image.GetOrigin(), labels.GetOrigin())
                                   and np.allclose(image.GetDirection(), labels.GetDirection())
                                   and np.allclose(image.GetSpacing(), labels.GetSpacing())})
        with open(record, "w") as handle:
            json.dump(info, handle)

    mode = os.environ.get("FAKE_SAMED_MODE", "ok")
    stop = {"flag": False}
    if mode == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *a: stop.__setitem__("flag", True))

    def checkpoint(iteration: int) -> None:
        # A real safetensors file with a model card, as the real trainer writes (classes from --classes
        # get colours/codes from the known-organ table, exactly like SAMedLib.classes.parse_class_list).
        import numpy as np
        from safetensors.numpy import save_file

        from SAMedLib.classes import parse_class_list

        card = {"base_name": "litemedsam", "input_size": 256, "head": "linear", "mode": "frozen",
                "classes": [c.to_dict() for c in parse_class_list(args.classes)],
                "training": {"iterations": iteration, "fake": True}}
        save_file({"head.weight": np.full((2, 2), iteration, np.float32)}, args.output,
                  metadata={"samed_model_card": json.dumps(card)})
        emit({"event": "checkpoint", "path": args.output, "iteration": iteration})

    print("loading volumes (plain log line)", flush=True)
    total = args.iterations if mode in ("ok", "fail", "leave_child") else 100000
    for i in range(1, total + 1):
        if stop["flag"] or (mode != "ignore_term" and args.stop_file and os.path.exists(args.stop_file)):
            checkpoint(i - 1)
            emit({"event": "stopped", "path": args.output, "iteration": i - 1})
            return 0
        emit({"event": "iteration", "iteration": i, "iterations": total, "loss": 1.0 / i, "lr": 1e-3,
              "eta_s": float(total - i)})
        if i % 2 == 0:
            emit({"event": "validation", "iteration": i, "dice": {"liver": 0.5 + i / 100}, "mean_dice": 0.5 + i / 100})
            checkpoint(i)
        if mode == "fail" and i == 3:
            print("Traceback (most recent call last):\n  File \"trainer.py\", line 1\n"
                  "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", file=sys.stderr, flush=True)
            emit({"event": "error", "message": "CUDA out of memory: try a smaller batch size or --device cpu"})
            return 1
        if mode in ("slow", "ignore_term"):
            time.sleep(0.1)
    if mode == "crash":
        raise RuntimeError("simulated crash inside the trainer")
    emit({"event": "done", "path": args.output, "iteration": total})
    if mode == "leave_child":  # a helper process outlives the trainer and keeps its output pipes open
        import subprocess

        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", args.output])
    return 0


if __name__ == "__main__":
    if os.environ.get("FAKE_SAMED_MODE") == "crash":
        print("Traceback (most recent call last):\n  File \"cli.py\", line 9, in main\n"
              "ValueError: labels file pair1_labels.nrrd has values 9 not in the class list", file=sys.stderr)
        sys.exit(1)
    sys.exit(main())
