"""Training options and the ``samed train`` command line they make."""
from __future__ import annotations

import math
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from SAMedLib.classes import SegmentClass

from .pairs import TrainingPair
from .validation import TrainingInputError

__all__ = ["BASE_MODELS", "METHODS", "TrainingOptions", "check_options", "build_train_command", "default_python"]

BASE_MODELS = ("litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h")
# GUI method name -> (mode, head); mode None lets the trainer choose (LoRA on CUDA, frozen encoder on CPU)
METHODS = {
    "Automatic (SAMed LoRA on a GPU, frozen encoder on a CPU)": (None, "samed"),
    "SAMed (LoRA)": ("lora", "samed"),
    "Frozen encoder + SAMed decoder": ("frozen", "samed"),
    "Frozen encoder + AutoSAM ViT head": ("frozen", "autosam_vit"),
    "Frozen encoder + CNN head": ("frozen", "cnn"),
    "Frozen encoder + linear head": ("frozen", "linear"),
}


@dataclass
class TrainingOptions:
    model_name: str = "SAMed model"
    output_path: str | os.PathLike | None = None  # default: <models folder>/<model_name>.safetensors
    base: str = "litemedsam"
    base_checkpoint: str | os.PathLike | None = None  # official SAM checkpoint for sam_vit_*
    mode: str | None = None  # "lora", "frozen" or None (the trainer's default: lora on CUDA, frozen on CPU)
    head: str = "samed"  # samed | autosam_vit | cnn | linear
    lora_rank: int = 4
    iterations: int | None = None  # None: the trainer's default (CPU: minutes for one volume)
    learning_rate: float | None = None  # None: the trainer's default
    batch_size: int | None = None  # None: the trainer's default
    device: str = "auto"
    validation: TrainingPair | tuple | None = None
    register: bool = True
    overwrite: bool = False
    stop_timeout: float = 60.0  # seconds between the stop request (stop file, SIGTERM) and kill
    extra_args: list[str] = field(default_factory=list)


def check_options(options: TrainingOptions) -> None:
    """Refuse options the trainer would reject (``TrainingInputError`` lists every problem)."""
    problems = []
    if options.base not in BASE_MODELS:
        problems.append(f"unknown base model '{options.base}': expected one of {', '.join(BASE_MODELS)}")
    if options.base != "litemedsam" and not options.base_checkpoint:
        problems.append(f"base model {options.base} needs its official SAM checkpoint file")
    if options.base_checkpoint and not Path(options.base_checkpoint).is_file():
        problems.append(f"base checkpoint not found: {options.base_checkpoint}")
    if options.mode not in (None, "lora", "frozen"):
        problems.append(f"unknown method '{options.mode}': expected lora, frozen or None (automatic)")
    if options.head not in ("samed", "autosam_vit", "cnn", "linear"):
        problems.append(f"unknown head '{options.head}'")
    if options.mode in (None, "lora") and int(options.lora_rank) < 1:
        problems.append("LoRA rank must be at least 1")
    if options.iterations is not None and int(options.iterations) < 1:
        problems.append("iterations must be at least 1")
    if options.learning_rate is not None and not (0 < float(options.learning_rate) < 1 and
                                                  math.isfinite(float(options.learning_rate))):
        problems.append(f"learning rate must be between 0 and 1, got {options.learning_rate}")
    if problems:
        raise TrainingInputError(problems)


def build_train_command(python: str, images: Sequence[Path], labels: Sequence[Path], classes: Sequence[SegmentClass],
                        options: TrainingOptions, output: Path, validation: tuple[Path, Path] | None = None,
                        cli_module: str = "SAMedLib.cli", stop_file: Path | None = None) -> list[str]:
    """The ``samed train`` command line (``python -m SAMedLib.cli train ... --progress-json``)."""
    command = [python, "-m", cli_module, "train"]
    for image, label in zip(images, labels):
        command += ["--image", str(image), "--labels", str(label)]
    command += ["--classes", ",".join(f"{c.value}:{c.name}" for c in classes)]
    command += ["--base", options.base]
    if options.base_checkpoint:
        command += ["--base-checkpoint", str(options.base_checkpoint)]
    if options.mode:
        command += ["--mode", options.mode]
    command += ["--head", options.head]
    if options.mode in (None, "lora"):
        command += ["--lora-rank", str(int(options.lora_rank))]
    if options.iterations:
        command += ["--iterations", str(int(options.iterations))]
    if options.learning_rate:
        command += ["--lr", repr(float(options.learning_rate))]
    if options.batch_size:
        command += ["--batch-size", str(int(options.batch_size))]
    command += ["--device", options.device]
    if validation is not None:
        command += ["--val-image", str(validation[0]), "--val-labels", str(validation[1])]
    if stop_file is not None:
        command += ["--stop-file", str(stop_file)]
    command += [*options.extra_args, "--output", str(output), "--progress-json"]
    return command


def default_python() -> str:
    """Slicer's Python (PythonSlicer launcher) inside Slicer, else this interpreter."""
    slicer_module = sys.modules.get("slicer")
    if slicer_module is not None and hasattr(slicer_module, "app"):
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable
