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
4. ``stop()`` creates the trainer's stop file (``--stop-file`` in the private folder; the request that
   works on every platform) and sends SIGTERM to its whole process tree (CTRL_BREAK on Windows) as a
   backup: the trainer writes its last good checkpoint and exits; if the tree is not gone after
   ``TrainingOptions.stop_timeout`` seconds it is killed. ``train`` then raises
   ``TrainingStopped`` carrying that checkpoint. The run ends when the trainer's output has
   ended and no process of its tree is left (inside Slicer the started process is only the
   launcher, see ``TrainingProcess``); ``abort()`` kills the tree at once (Slicer quitting);
5. the temporary folder is removed in every case (success, stop, failure, bad input);
6. on success the model is registered (``SAMedLib.model_registry``) so SAMedSegmenter lists it.

One file per step; this one runs them in order: ``pairs`` and ``training_classes`` (the input),
``validation`` (1), ``export`` (2), ``command`` (options -> command line, 3), ``process`` (the
process tree, 3-4), ``progress`` (its JSON lines), ``model_files`` (output path, model card).

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
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from SAMedLib.classes import SegmentClass
from SAMedLib.model_registry import register_model

from .command import BASE_MODELS, METHODS, TrainingOptions, build_train_command, check_options, default_python
from .curves import TrainingCurves
from .export import export_pair
from .model_files import output_path, unique_model_path, update_card_classes
from .pairs import TrainingPair, as_pairs
from .process import TrainingProcess
from .progress import ProgressCallback, RunProgress, parse_progress_line
from .training_classes import (TrainingClass, assign_label_values, derive_classes, normalize_segment_name,
                               to_training_classes)
from .validation import TrainingInputError, validate_inputs

# The module's API in one place (the Slicer module and the console import from here).
__all__ = [
    "TrainingPair", "TrainingClass", "TrainingOptions", "TrainingInputError", "TrainingFailed", "TrainingStopped",
    "TrainerLogic", "TrainingProcess", "TrainingCurves", "parse_progress_line", "derive_classes",
    "assign_label_values", "validate_inputs", "export_pair", "build_train_command", "normalize_segment_name",
    "unique_model_path", "update_card_classes", "BASE_MODELS", "METHODS",
]


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
        pairs = as_pairs(pairs)
        training_classes = to_training_classes(classes) if classes is not None else derive_classes(pairs)
        validation = as_pairs([options.validation])[0] if options.validation is not None else None
        validate_inputs(pairs, training_classes, validation)
        check_options(options)
        output = output_path(options)
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
            stop_file = work / "stop"
            command = build_train_command(self.pythonExecutable, images, labels, [sc for _, sc in valued], options,
                                          output, validation_files, self.cliModule, stop_file)
            self.lastCommand = command
            return self._run(command, work, output, options, report, [sc for _, sc in valued], stop_file)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # ------------------------------------------------------------------ helpers

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
             report: ProgressCallback, classes: Sequence[SegmentClass] = (), stop_file: Path | None = None) -> Path:
        state = RunProgress()
        process = TrainingProcess(command, env=self._environment(), cwd=work, stop_file=stop_file)
        self._process = process
        stop_sent_at = None
        leftover_since = None
        try:
            while not process.finished():  # the trainer's output ended and its whole tree is gone
                process.refresh_tree(max_age=1.0)  # know the launcher's children before anything kills it
                for stream, line in process.drain():
                    state.read(stream, line, report)
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
                # The launcher has exited and the trainer is done (its final event read, output closed,
                # or nothing of the tree left): whatever remains (an escaped process holding the pipes)
                # must not hang us.
                if process.poll() is not None and (state.finished or process.streams_closed(0.0)
                                                   or not process.alive()):
                    leftover_since = leftover_since or now
                    if now - leftover_since > 5.0:
                        process.kill()
                        break
                self.processEvents()
                time.sleep(self.pollInterval)
            process.streams_closed(1.0)
            for stream, line in process.drain():
                state.read(stream, line, report)
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
        raise TrainingFailed(state.failure_message(process.stderr_tail, returncode), returncode, self.lastStderr)

    @staticmethod
    def _restore_class_details(path: Path, classes: Sequence[SegmentClass], report: ProgressCallback) -> None:
        if not classes:
            return
        try:
            update_card_classes(path, classes)
        except Exception as exc:  # the model itself is fine; only colours/codes would be the defaults
            report({"event": "log", "stream": "logic",
                    "message": f"Could not store class colours/codes in {path.name}: {exc}"})
