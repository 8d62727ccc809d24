"""TrainerLogic: fine-tune SAMed on (volume, segmentation) pairs from the scene, without Qt.

``train(pairs, classes, options, progress)``

1. checks the input and refuses bad input before anything starts (``TrainingInputError``
   lists every problem: no pairs, a segmentation with no segments, a pair whose segments lie
   outside its volume, a class present in no pair, ...);
2. exports every pair into a private temporary folder: the volume as NRRD, its segments as
   a label map on the volume's voxel grid with the class values (``SAMedMRML.segmentations.
   segmentation_to_labelmap``: segments are resampled from their own geometry; where
   segments overlap, the class listed first wins);
3. runs ``python -m SAMedLib.cli train ... --progress-json`` as a separate process (Slicer's
   Python inside Slicer), so the GUI stays responsive and a crash or out-of-memory cannot take
   Slicer down. Each JSON line on its stdout becomes a ``progress(event)`` call on the calling
   thread; other lines arrive as ``{"event": "log", ...}``;
4. ``stop()`` sends SIGTERM to the trainer's whole process tree (CTRL_BREAK on Windows): the
   trainer writes its last good checkpoint and exits; if the tree is not gone after
   ``TrainingOptions.stop_timeout`` seconds it is killed. ``train`` then raises
   ``TrainingStopped`` carrying that checkpoint. The run ends when the trainer's output has
   ended and no process of its tree is left (inside Slicer the started process is only the
   launcher, see ``TrainingProcess``); ``abort()`` kills the tree at once (Slicer quitting);
5. the temporary folder is removed in every case (success, stop, failure, bad input);
6. on success the model is registered (``SAMedLib.model_registry``) so SAMedSegmenter lists it.

From the Slicer Python console::

    import SAMedTrainer
    from SAMedTrainerLib.trainer_logic import TrainingOptions
    logic = SAMedTrainer.SAMedTrainerLogic()
    pairs = [(getNode("CT"), getNode("CT segmentation"))]
    path = logic.train(pairs, None, TrainingOptions(model_name="liver-spleen", iterations=300))
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from SAMedLib.classes import SegmentClass
from SAMedLib.model_registry import models_dir, register_model
from SAMedMRML.segmentations import BINARY_LABELMAP, parse_terminology, segmentation_to_labelmap
from SAMedMRML.volumes import VolumeNodeError, check_parent_transform, volume_array, volume_to_sitk

from .curves import TrainingCurves
from .process import TrainingProcess, parse_progress_line

__all__ = [
    "TrainingPair", "TrainingClass", "TrainingOptions", "TrainingInputError", "TrainingFailed", "TrainingStopped",
    "TrainerLogic", "TrainingProcess", "TrainingCurves", "parse_progress_line", "derive_classes",
    "assign_label_values", "validate_inputs", "export_pair", "build_train_command", "normalize_segment_name",
    "unique_model_path", "update_card_classes", "BASE_MODELS", "METHODS",
]

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
ProgressCallback = Callable[[dict], None]


# --------------------------------------------------------------------------- data types


@dataclass
class TrainingPair:
    volume: Any  # vtkMRMLScalarVolumeNode
    segmentation: Any  # vtkMRMLSegmentationNode


@dataclass
class TrainingClass:
    """A class to train: segments named ``segment_name`` (case/space-insensitive) in any pair."""

    segment_name: str
    name: str
    color: tuple[int, int, int]
    snomed_code: str | None = None
    snomed_meaning: str | None = None
    laterality: tuple[str, str] | None = None
    enabled: bool = True

    @property
    def key(self) -> str:
        return normalize_segment_name(self.segment_name)


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
    stop_timeout: float = 60.0  # seconds between SIGTERM and kill
    extra_args: list[str] = field(default_factory=list)


class TrainingInputError(ValueError):
    """Bad input found before training started; ``problems`` lists each one."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("Cannot start training:\n- " + "\n- ".join(self.problems))


class TrainingFailed(RuntimeError):
    """The training process failed; the message is the trainer's own error message."""

    def __init__(self, message: str, returncode: int | None = None, stderr: str = ""):
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(message)


class TrainingStopped(RuntimeError):
    """Training was stopped by the user; ``checkpoint`` is the last good model (None if none yet)."""

    def __init__(self, checkpoint: Path | None, iteration: int | None):
        self.checkpoint = checkpoint
        self.iteration = iteration
        where = f" at iteration {iteration}" if iteration is not None else ""
        kept = f"; the last good checkpoint is {checkpoint}" if checkpoint else "; no checkpoint had been written yet"
        super().__init__(f"Training stopped{where}{kept}")


# --------------------------------------------------------------------------- classes


def normalize_segment_name(name: str) -> str:
    return " ".join(str(name).split()).casefold()


def _segments(segmentation_node):
    segmentation = segmentation_node.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        yield segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i)


def derive_classes(pairs: Sequence) -> list[TrainingClass]:
    """One class per distinct segment name across the pairs (same name = same class), in order of
    first appearance. Colour from the first segment of that name; SNOMED CT codes from its
    terminology when present, else from the known organ table by name."""
    classes: dict[str, TrainingClass] = {}
    for pair in _as_pairs(pairs):
        if pair.segmentation is None:
            continue
        for _, segment in _segments(pair.segmentation):
            name = " ".join(segment.GetName().split())
            key = normalize_segment_name(name)
            if not key or key in classes:
                continue
            color = tuple(int(round(255 * max(0.0, min(1.0, c)))) for c in segment.GetColor())
            codes = parse_terminology(segment.GetTerminology()) if segment.HasTerminology() else None
            if codes is not None:
                code, meaning, laterality = codes.code, codes.meaning, codes.laterality
            else:
                known = SegmentClass.named(1, name)
                code, meaning, laterality = known.snomed_code, known.snomed_meaning, known.laterality
            classes[key] = TrainingClass(name, name, color, code, meaning, laterality)
    return list(classes.values())


def _to_training_classes(classes: Sequence) -> list[TrainingClass]:
    out = []
    for c in classes:
        if isinstance(c, TrainingClass):
            out.append(c)
        elif isinstance(c, SegmentClass):
            out.append(TrainingClass(c.name, c.name, tuple(c.color), c.snomed_code, c.snomed_meaning, c.laterality))
        else:
            raise TypeError(f"classes must be TrainingClass or SegmentClass, got {type(c).__name__}")
    return out


def assign_label_values(classes: Sequence[TrainingClass]) -> list[tuple[TrainingClass, SegmentClass]]:
    """Enabled classes with label values 1..N in list order (also the overlap priority order)."""
    out = []
    for value, c in enumerate([c for c in classes if c.enabled], start=1):
        out.append((c, SegmentClass(value, c.name.strip(), tuple(int(v) for v in c.color), c.snomed_code,
                                    c.snomed_meaning, c.laterality)))
    return out


# --------------------------------------------------------------------------- validation and export


def _as_pairs(pairs) -> list[TrainingPair]:
    out = []
    for p in pairs or []:
        if isinstance(p, TrainingPair):
            out.append(p)
        else:
            volume, segmentation = p
            out.append(TrainingPair(volume, segmentation))
    return out


def _name(node) -> str:
    return node.GetName() if node is not None and node.GetName() else "(unnamed)"


def _pair_problems(pair: TrainingPair, label: str) -> list[str]:
    problems = []
    if pair.volume is None:
        problems.append(f"{label}: no volume selected")
    else:
        try:
            volume_array(pair.volume)
            check_parent_transform(pair.volume)
        except VolumeNodeError as exc:
            problems.append(f"{label}: {exc}")
    if pair.segmentation is None:
        problems.append(f"{label}: no segmentation selected")
    elif not pair.segmentation.IsA("vtkMRMLSegmentationNode"):
        problems.append(f"{label}: '{_name(pair.segmentation)}' is not a segmentation")
    else:
        if pair.segmentation.GetSegmentation().GetNumberOfSegments() == 0:
            problems.append(f"{label}: segmentation '{_name(pair.segmentation)}' has no segments")
        try:
            check_parent_transform(pair.segmentation)
        except VolumeNodeError as exc:
            problems.append(f"{label}: {exc}")
    return problems


def validate_inputs(pairs: Sequence, classes: Sequence[TrainingClass], validation=None) -> None:
    """Structural checks that need no export (see ``TrainingInputError``)."""
    pairs = _as_pairs(pairs)
    problems = []
    if not pairs:
        problems.append("no training pairs: add at least one (volume, segmentation) pair")
    for i, pair in enumerate(pairs, start=1):
        problems += _pair_problems(pair, f"pair {i}")
    if validation is not None:
        problems += _pair_problems(_as_pairs([validation])[0], "validation pair")
    enabled = [c for c in classes if c.enabled]
    if not enabled:
        problems.append("no classes selected: tick at least one class")
    names = [normalize_segment_name(c.name) for c in enabled]
    for n in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"two classes have the display name '{n}': names must be unique")
    for c in enabled:
        if not c.name.strip():
            problems.append(f"class for segments '{c.segment_name}' has an empty name")
        elif any(ch in c.name for ch in ",:"):
            problems.append(f"class name '{c.name}' must not contain ',' or ':'")
    present = {normalize_segment_name(segment.GetName())
               for p in pairs if p.segmentation is not None and p.segmentation.IsA("vtkMRMLSegmentationNode")
               for _, segment in _segments(p.segmentation)}
    for c in enabled:
        if c.key not in present:
            problems.append(f"class '{c.name}' is present in no pair (no segment named '{c.segment_name}')")
    if problems:
        raise TrainingInputError(problems)


def _segment_has_voxels(segment) -> bool:
    import numpy as np
    from vtk.util.numpy_support import vtk_to_numpy

    image = segment.GetRepresentation(BINARY_LABELMAP)
    if image is None:
        return True  # closed-surface-only segment: assume content, the export will tell
    e = image.GetExtent()
    if e[1] < e[0] or e[3] < e[2] or e[5] < e[4] or image.GetPointData().GetScalars() is None:
        return False
    return bool(np.any(vtk_to_numpy(image.GetPointData().GetScalars()) == segment.GetLabelValue()))


def _segment_values(pair: TrainingPair, valued: list[tuple[TrainingClass, SegmentClass]]) -> list[tuple[str, int]]:
    """(segment ID, value) in class priority order (then node order) for the segments of enabled classes."""
    by_key: dict[str, list[str]] = collections.defaultdict(list)
    for sid, segment in _segments(pair.segmentation):
        by_key[normalize_segment_name(segment.GetName())].append(sid)
    return [(sid, sc.value) for tc, sc in valued for sid in by_key.get(tc.key, [])]


def export_pair(pair: TrainingPair, valued: list[tuple[TrainingClass, SegmentClass]], folder: Path,
                stem: str) -> tuple[Path, Path, dict[int, int], list[str]]:
    """Write ``<stem>_image.nrrd`` and ``<stem>_labels.nrrd``; returns paths, voxel count per value
    and problems (segments empty or outside the volume)."""
    import numpy as np
    from SAMedLib.volume_io import write_image

    segment_values = _segment_values(pair, valued)
    labels = segmentation_to_labelmap(pair.segmentation, pair.volume, segment_values)
    array = sitk.GetArrayViewFromImage(labels)
    counts = np.bincount(array.ravel(), minlength=max([v for _, v in segment_values], default=0) + 1)
    problems = []
    if segment_values and not counts[1:].any():
        has_content = any(_segment_has_voxels(pair.segmentation.GetSegmentation().GetSegment(sid))
                          for sid, _ in segment_values)
        if has_content:
            problems.append(f"segmentation '{_name(pair.segmentation)}' does not overlap volume "
                            f"'{_name(pair.volume)}': its segments lie outside the volume")
        else:
            problems.append(f"segmentation '{_name(pair.segmentation)}' has only empty segments")
    image_path = write_image(volume_to_sitk(pair.volume), folder / f"{stem}_image.nrrd")
    labels_path = write_image(labels, folder / f"{stem}_labels.nrrd")
    return image_path, labels_path, {v: int(counts[v]) for v in range(1, len(counts))}, problems


# --------------------------------------------------------------------------- command line


def build_train_command(python: str, images: Sequence[Path], labels: Sequence[Path], classes: Sequence[SegmentClass],
                        options: TrainingOptions, output: Path, validation: tuple[Path, Path] | None = None,
                        cli_module: str = "SAMedLib.cli") -> list[str]:
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
    command += [*options.extra_args, "--output", str(output), "--progress-json"]
    return command


def unique_model_path(folder: str | os.PathLike, name: str) -> Path:
    """``<folder>/<name>.safetensors``, with `` (2)``, `` (3)``... appended if that file exists."""
    safe = re.sub(r"[^\w\-. ()]+", "_", name).strip(" .") or "SAMed model"
    folder = Path(folder)
    path = folder / f"{safe}.safetensors"
    n = 2
    while path.exists():
        path = folder / f"{safe} ({n}).safetensors"
        n += 1
    return path


def update_card_classes(path: str | os.PathLike, classes: Sequence[SegmentClass]) -> bool:
    """Write the classes' colours and SNOMED codes into a checkpoint's model card.

    ``samed train --classes VALUE:NAME,...`` only carries values and names (colours and codes then
    come from the known-organ table), so after training the user's colours and the codes read from
    segment terminology are put back here. Values and names must match the card exactly; tensors
    are copied unchanged; the file is replaced atomically. Returns True if the card changed.
    Needs only ``safetensors`` and numpy (no torch).
    """
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    path = Path(path)
    with safe_open(str(path), framework="numpy") as handle:
        metadata = dict(handle.metadata() or {})
    key = "samed_model_card"
    card = json.loads(metadata[key])
    by_value = {c.value: c for c in classes}
    changed = False
    for entry in card.get("classes", []):
        wanted = by_value.get(int(entry["value"]))
        if wanted is None or wanted.name != entry["name"]:
            raise ValueError(f"{path.name}: class {entry['value']}:{entry['name']} is not in the training class list")
        update = wanted.to_dict()
        if any(entry.get(k) != update[k] for k in ("color", "snomed_code", "snomed_meaning", "laterality")):
            entry.update({k: update[k] for k in ("color", "snomed_code", "snomed_meaning", "laterality")})
            changed = True
    if not changed:
        return False
    metadata[key] = json.dumps(card, indent=1, sort_keys=True)
    tensors = load_file(str(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".safetensors.tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


# --------------------------------------------------------------------------- the logic


@dataclass
class _RunState:
    last_checkpoint: Path | None = None
    last_iteration: int | None = None
    done_path: Path | None = None
    stopped_path: Path | None = None
    error_message: str | None = None

    @property
    def finished(self) -> bool:
        """The trainer reported its end (done, stopped or error)."""
        return bool(self.done_path or self.stopped_path or self.error_message)


def _failure_message(state: _RunState, process: TrainingProcess, returncode: int | None) -> str:
    if state.error_message:
        return state.error_message
    tail = [line.strip() for line in process.stderr_tail if line.strip()]
    if tail:
        last = tail[-1]
        for prefix in ("samed: error: ", "samed train: error: "):  # the CLI's own (argparse) error format
            if last.startswith(prefix):
                return last[len(prefix):]
        return last
    if returncode is not None and returncode < 0:
        return (f"the training process was killed by signal {-returncode} "
                "(out of memory? try a smaller batch size or the CPU)")
    return f"the training process exited with code {returncode} without an error message"


def default_python() -> str:
    """Slicer's Python (PythonSlicer launcher) inside Slicer, else this interpreter."""
    slicer_module = sys.modules.get("slicer")
    if slicer_module is not None and hasattr(slicer_module, "app"):
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


class TrainerLogic:
    """Fine-tune SAMed from the scene (see the module docstring)."""

    def __init__(self, processEvents: Callable[[], None] | None = None, pollInterval: float = 0.05):
        self.processEvents = processEvents or (lambda: None)
        self.pollInterval = pollInterval
        self.pythonExecutable: str = default_python()
        self.cliModule = "SAMedLib.cli"
        self.extraPythonPath: list[str] = []
        self.baseEnvironment: dict | None = None  # None: this process's environment
        self.workRoot: str | None = None  # where the private temporary folder is made (None: system temp)
        self.lastCommand: list[str] | None = None
        self.lastStderr: str = ""
        self._process: TrainingProcess | None = None
        self._busy = False  # from the start of train() (export included) to its end
        self._stop_requested = False

    # ------------------------------------------------------------------ public API

    @property
    def isRunning(self) -> bool:
        return self._busy

    def stop(self) -> None:
        """Ask a running ``train`` to stop cleanly (safe to call any time)."""
        self._stop_requested = True

    def abort(self) -> None:
        """Kill a running trainer's process tree now, without its final checkpoint (Slicer is quitting)."""
        self._stop_requested = True
        if self._process is not None:
            self._process.kill()

    def deriveClasses(self, pairs) -> list[TrainingClass]:
        return derive_classes(pairs)

    def train(self, pairs: Sequence, classes: Sequence | None = None, options: TrainingOptions | None = None,
              progress: ProgressCallback | None = None) -> Path:
        """Train and return the new model's path (registered for SAMedSegmenter).

        Args:
            pairs: ``(volume node, segmentation node)`` tuples or ``TrainingPair``s.
            classes: ``TrainingClass``/``SegmentClass`` list (order = label values 1..N and overlap
                priority); None derives them from the segment names (``derive_classes``).
            options: ``TrainingOptions``.
            progress: called with every event dict, on the calling thread.

        Raises:
            TrainingInputError: bad input, found before anything started.
            TrainingStopped: ``stop()`` was called; carries the last good checkpoint.
            TrainingFailed: the trainer failed; the message is its error message.
        """
        if self._busy:
            raise RuntimeError("training is already running")
        self._busy = True
        try:
            return self._train(pairs, classes, options, progress)
        finally:
            self._busy = False

    def _train(self, pairs, classes, options, progress) -> Path:
        options = options or TrainingOptions()
        pairs = _as_pairs(pairs)
        training_classes = _to_training_classes(classes) if classes is not None else derive_classes(pairs)
        validation = _as_pairs([options.validation])[0] if options.validation is not None else None
        validate_inputs(pairs, training_classes, validation)
        self._check_options(options)
        output = self._output_path(options)
        valued = assign_label_values(training_classes)
        report = progress or (lambda event: None)
        self._stop_requested = False

        work = Path(tempfile.mkdtemp(prefix="samed-train-", dir=self.workRoot))  # mode 0700
        try:
            report({"event": "log", "stream": "logic", "message": f"Exporting {len(pairs)} training pair(s)…"})
            images, labels, problems = [], [], []
            totals: collections.Counter = collections.Counter()
            for i, pair in enumerate(pairs, start=1):
                image_path, labels_path, counts, pair_problems = export_pair(pair, valued, work, f"pair{i}")
                images.append(image_path)
                labels.append(labels_path)
                totals.update(counts)
                problems += [f"pair {i}: {p}" for p in pair_problems]
                self.processEvents()
            for tc, sc in valued:
                if totals[sc.value] == 0:
                    problems.append(f"class '{sc.name}' is present in no pair (its segments are empty or "
                                    "outside the volumes)")
            validation_files = None
            if validation is not None:
                v_image, v_labels, _, v_problems = export_pair(validation, valued, work, "validation")
                problems += [f"validation pair: {p}" for p in v_problems]
                validation_files = (v_image, v_labels)
            if problems:
                raise TrainingInputError(problems)
            if self._stop_requested:
                raise TrainingStopped(None, None)

            (work / "classes.json").write_text(json.dumps([sc.to_dict() for _, sc in valued], indent=1))
            command = build_train_command(self.pythonExecutable, images, labels, [sc for _, sc in valued], options,
                                          output, validation_files, self.cliModule)
            self.lastCommand = command
            return self._run(command, work, output, options, report, [sc for _, sc in valued])
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _check_options(options: TrainingOptions) -> None:
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

    @staticmethod
    def _output_path(options: TrainingOptions) -> Path:
        if options.output_path:
            output = Path(options.output_path).expanduser()
            if output.suffix != ".safetensors":
                raise TrainingInputError([f"output model file must end in .safetensors: {output}"])
            if output.exists() and not options.overwrite:
                raise TrainingInputError([f"output model already exists: {output} (choose another name)"])
        else:
            output = unique_model_path(models_dir(), options.model_name)
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrainingInputError([f"cannot create the output folder {output.parent}: {exc}"]) from exc
        return output.resolve()

    def _environment(self) -> dict:
        import SAMedLib

        env = dict(self.baseEnvironment if self.baseEnvironment is not None else os.environ)
        core_root = str(Path(SAMedLib.__file__).resolve().parents[1])  # folder that holds SAMedLib/
        paths = [*self.extraPythonPath, core_root]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        return env

    def _run(self, command: list[str], work: Path, output: Path, options: TrainingOptions,
             report: ProgressCallback, classes: Sequence[SegmentClass] = ()) -> Path:
        state = _RunState()
        process = TrainingProcess(command, env=self._environment(), cwd=work)
        self._process = process
        stop_sent_at = None
        leftover_since = None
        try:
            while not process.finished():  # the trainer's output ended and its whole tree is gone
                for stream, line in process.drain():
                    self._handle_line(stream, line, state, report)
                now = time.monotonic()
                if self._stop_requested and stop_sent_at is None:
                    stop_sent_at = now
                    process.request_stop()
                    report({"event": "log", "stream": "logic", "message": "Stopping: saving the last good checkpoint…"})
                if stop_sent_at is not None and now - stop_sent_at > options.stop_timeout:
                    report({"event": "log", "stream": "logic",
                            "message": f"The trainer did not stop within {options.stop_timeout:g} s: killing it."})
                    process.kill()
                    break
                # The launcher has exited and the trainer is done (output closed or its final event
                # read): whatever is left (a grandchild holding the pipes) must not hang us.
                if process.poll() is not None and (state.finished or process.streams_closed(0.0)):
                    leftover_since = leftover_since or now
                    if now - leftover_since > 5.0:
                        process.kill()
                        break
                self.processEvents()
                time.sleep(self.pollInterval)
            process.streams_closed(1.0)
            for stream, line in process.drain():
                self._handle_line(stream, line, state, report)
        finally:
            if not process.finished():  # an exception (e.g. in a progress callback): never leave it running
                process.kill()
            self._process = None
            self.lastStderr = "\n".join(process.stderr_tail)

        returncode = process.poll()
        if self._stop_requested or state.stopped_path is not None:
            checkpoint = state.stopped_path or state.last_checkpoint
            if checkpoint is not None and not checkpoint.is_file():
                checkpoint = state.last_checkpoint if state.last_checkpoint and state.last_checkpoint.is_file() else None
            if checkpoint is not None:
                self._restore_class_details(checkpoint, classes, report)
            raise TrainingStopped(checkpoint, state.last_iteration)
        if returncode == 0 and state.done_path is not None and state.done_path.is_file():
            path = state.done_path
            self._restore_class_details(path, classes, report)
            if options.register:
                register_model(path)
                report({"event": "registered", "path": str(path)})
            return path
        raise TrainingFailed(_failure_message(state, process, returncode), returncode, self.lastStderr)

    @staticmethod
    def _restore_class_details(path: Path, classes: Sequence[SegmentClass], report: ProgressCallback) -> None:
        if not classes:
            return
        try:
            update_card_classes(path, classes)
        except Exception as exc:  # the model itself is fine; only colours/codes would be the defaults
            report({"event": "log", "stream": "logic",
                    "message": f"Could not store class colours/codes in {path.name}: {exc}"})

    @staticmethod
    def _handle_line(stream: str, line: str, state: _RunState, report: ProgressCallback) -> None:
        event = parse_progress_line(line) if stream == "stdout" else None
        if event is None:
            if line.strip():
                report({"event": "log", "stream": stream, "message": line})
            return
        kind = event["event"]
        if isinstance(event.get("iteration"), (int, float)):
            state.last_iteration = int(event["iteration"])
        if kind == "checkpoint":
            state.last_checkpoint = Path(event["path"])
        elif kind == "done":
            state.done_path = Path(event["path"])
        elif kind == "stopped":
            state.stopped_path = Path(event["path"])
        elif kind == "error":
            state.error_message = str(event["message"])
        report(event)
