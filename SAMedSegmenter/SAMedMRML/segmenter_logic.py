"""SegmenterLogic: volume node -> SAMed inference -> segmentation node, without Qt.

Threading model (the NNInteractive pattern):

* All torch work (importing torch, loading the model, inference) runs on **one persistent
  worker thread** (``TorchWorker``), shared by every ``SegmenterLogic`` in the process: cuDNN
  plans and other per-thread caches survive from one run to the next.
* The worker never touches MRML or Qt. The main thread copies the volume into a
  ``SimpleITK.Image`` before submitting and writes the result into the scene afterwards.
* While waiting, the main thread calls ``processEvents`` (Slicer passes
  ``slicer.app.processEvents``; headless it is a no-op) every ``pollInterval`` seconds and
  forwards the worker's latest progress to the caller's ``progress`` callback, so progress
  callbacks always run on the main thread.
* ``cancel()`` sets a flag that inference checks between batches. Cancel or any error leaves
  the scene exactly as it was: nothing is written until inference has finished. Closing the
  scene meanwhile cancels too (``SegmentationCancelled``; nothing is written into the new scene).

From the Slicer Python console::

    import SAMedSegmenter
    logic = SAMedSegmenter.SAMedSegmenterLogic()
    volume = slicer.util.getNode("CT")
    seg = logic.segment(volume, "/path/to/model.safetensors", device="auto")
    print(logic.lastStatistics)  # per class: voxels and volume in mL
"""
from __future__ import annotations

import concurrent.futures
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .segmentations import class_statistics, labelmap_to_segmentation
from .volumes import volume_to_sitk

__all__ = ["SegmenterLogic", "TorchWorker", "SegmentationCancelled", "MissingDependencyError", "shared_worker",
           "DEVICES"]

DEVICES = ("auto", "cuda", "cpu", "mps")
ProgressCallback = Callable[[float, str], None]


class SegmentationCancelled(RuntimeError):
    """The user cancelled; the scene was not changed."""


class MissingDependencyError(RuntimeError):
    """A Python package SAMed needs (torch, segment-anything, ...) is not installed."""


class TorchWorker:
    """A single persistent daemon thread that runs submitted callables in order."""

    def __init__(self, name: str = "SAMed-torch"):
        self._name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def submit(self, fn: Callable[..., Any], *args, **kwargs) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._queue.put((future, fn, args, kwargs))
        return future

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the main thread, which re-raises it
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self) -> None:
        """Let the thread finish its queue and exit (a later submit starts a new one)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                self._queue.put(None)
            self._thread = None


_SHARED_WORKER: TorchWorker | None = None


def shared_worker() -> TorchWorker:
    """The process-wide torch worker."""
    global _SHARED_WORKER
    if _SHARED_WORKER is None:
        _SHARED_WORKER = TorchWorker()
    return _SHARED_WORKER


def _missing_dependency(exc: ImportError) -> MissingDependencyError:
    name = getattr(exc, "name", None) or str(exc)
    return MissingDependencyError(
        f"SAMed cannot run because the Python package '{name}' is missing. In Slicer, open SAMedSegmenter and "
        "click 'Install dependencies' (PyTorch comes from the PyTorch Utils extension); elsewhere: "
        "pip install -r Resources/requirements.txt")


class SegmenterLogic:
    """Segment a volume node with a SAMed checkpoint (see the module docstring)."""

    def __init__(self, processEvents: Callable[[], None] | None = None, pollInterval: float = 0.03,
                 worker: TorchWorker | None = None):
        self.processEvents = processEvents or (lambda: None)
        self.pollInterval = pollInterval
        self.worker = worker or shared_worker()
        self.lastStatistics: list[dict] = []
        self.lastModelCard = None
        self.lastDevice: str | None = None
        self._cancel = threading.Event()
        self._running = False
        self._progress_lock = threading.Lock()
        self._progress_state: tuple[float, str] | None = None
        self._model_cache: tuple[tuple, Any] | None = None  # (key, LoadedModel); touched on the worker only

    # ------------------------------------------------------------------ public API

    @property
    def isRunning(self) -> bool:
        return self._running

    def cancel(self) -> None:
        """Ask a running ``segment`` to stop after the current batch (safe to call any time)."""
        self._cancel.set()

    def modelCard(self, model):
        """The model card of a checkpoint path (cheap: reads no weights) or of a loaded model."""
        if hasattr(model, "card"):
            return model.card
        from SAMedLib.checkpoint import read_model_card  # torch import happens here: call off hot paths

        return read_model_card(Path(model))

    def detectDevice(self) -> str:
        """What ``device="auto"`` resolves to here (``cuda``, ``mps`` or ``cpu``); runs on the worker."""

        def job():
            try:
                from SAMedLib.inference import resolve_device
            except ImportError as exc:
                raise _missing_dependency(exc) from exc
            return resolve_device("auto")

        return self._wait(self.worker.submit(job), None)

    def describeDevice(self) -> str:
        """What ``auto`` would use, for the GUI: e.g. ``cuda (NVIDIA H100 80GB HBM3)`` or ``cpu (4 threads)``."""

        def job():
            try:
                import torch
                from SAMedLib.inference import resolve_device
            except ImportError as exc:
                raise _missing_dependency(exc) from exc
            device = resolve_device("auto")
            if device.startswith("cuda"):
                return f"{device} ({torch.cuda.get_device_name(0)})"
            if device == "cpu":
                return f"cpu ({torch.get_num_threads()} threads)"
            return device

        return self._wait(self.worker.submit(job), None)

    def runOnWorker(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Run any torch-related callable on the worker thread and wait (pumping events) for it."""
        return self._wait(self.worker.submit(fn, *args, **kwargs), None)

    def segment(self, inputVolume, model, outputSegmentation=None, device: str = "auto",
                progress: ProgressCallback | None = None, batchSize: int | None = None,
                largestComponent: bool = False, baseCheckpoint: str | os.PathLike | None = None,
                openvino: bool = False):
        """Segment ``inputVolume`` with ``model`` and return the segmentation node.

        Args:
            inputVolume: a ``vtkMRMLScalarVolumeNode`` (a linear parent transform is followed, a
                non-linear one is refused; see ``SAMedMRML.volumes``).
            model: a checkpoint path (``.safetensors``) or a loaded ``SAMedLib.checkpoint.LoadedModel``.
            outputSegmentation: segmentation node whose segments are replaced; None creates a new node.
            device: ``auto``, ``cuda``, ``cpu`` or ``mps``.
            progress: ``progress(fraction, message)``, called on the calling (main) thread.
            batchSize: slices per forward pass (None: the core's default for the device).
            largestComponent: keep only each class's largest connected component.
            baseCheckpoint: the official SAM checkpoint, for models fine-tuned from ``sam_vit_*``.
            openvino: on the CPU, run the encoder and head with OpenVINO (the optional ``openvino`` package;
                converted once per loaded model, ~1.7x faster slices on a 2-core CPU). Ignored on a GPU.

        Raises:
            SegmentationCancelled: ``cancel()`` was called; the scene is unchanged.
            MissingDependencyError: torch or another required package is not installed.
            SAMedLib.errors.CheckpointError, ValueError, ...: with a message for the user; the
            scene is unchanged.
        """
        if self._running:
            raise RuntimeError("SAMed segmentation is already running; wait for it or cancel it first")
        if outputSegmentation is not None and not outputSegmentation.IsA("vtkMRMLSegmentationNode"):
            raise ValueError(f"output node '{outputSegmentation.GetName()}' is not a segmentation node")
        if device not in DEVICES and not str(device).startswith("cuda:"):
            raise ValueError(f"unknown device '{device}': expected one of {', '.join(DEVICES)}")
        if batchSize is not None and int(batchSize) < 1:
            batchSize = None  # 0 in the GUI means "automatic"
        if not hasattr(model, "card"):
            model = Path(model)
            if not model.is_file():
                raise FileNotFoundError(f"model file not found: {model}")
        image = volume_to_sitk(inputVolume)  # main thread: the only MRML read; raises clear errors
        scene = inputVolume.GetScene()
        if scene is None:
            raise ValueError(f"volume '{inputVolume.GetName()}' is not in a scene")

        self._running = True
        self._cancel.clear()
        self._progress_state = None
        # Closing the scene (or quitting Slicer) while waiting: stop inference and write nothing,
        # neither into the nodes being removed nor into the next scene.
        sceneClosed = threading.Event()

        def onSceneClose(caller, event):
            sceneClosed.set()
            self._cancel.set()

        closeObserver = scene.AddObserver(scene.StartCloseEvent, onSceneClose)
        try:
            report = progress or (lambda fraction, message: None)
            report(0.0, "Loading model…")
            future = self.worker.submit(self._inference_job, image, model, device, batchSize, largestComponent,
                                        baseCheckpoint, openvino)
            try:
                card, labels, self.lastDevice = self._wait(future, report)
            except SegmentationCancelled:
                if not sceneClosed.is_set():
                    raise
            if sceneClosed.is_set():
                raise SegmentationCancelled("the scene was closed during segmentation: nothing was written")
            if self._cancel.is_set():
                raise SegmentationCancelled("segmentation cancelled")
            report(0.97, "Writing segments…")
            node = labelmap_to_segmentation(labels, card.classes, inputVolume, outputSegmentation)
            self.lastStatistics = class_statistics(labels, card.classes)
            self.lastModelCard = card
            report(1.0, "Done")
            return node
        finally:
            scene.RemoveObserver(closeObserver)
            self._running = False

    # ------------------------------------------------------------------ worker side (no MRML, no Qt)

    def _set_progress(self, fraction: float, message: str) -> None:
        with self._progress_lock:
            self._progress_state = (0.05 + 0.9 * float(fraction), message)

    def _inference_job(self, image, model, device, batch_size, largest_component, base_checkpoint, openvino=False):
        try:
            from SAMedLib import checkpoint, inference
        except ImportError as exc:
            raise _missing_dependency(exc) from exc
        if self._cancel.is_set():
            raise SegmentationCancelled("segmentation cancelled")
        resolved = inference.resolve_device(device)
        openvino = openvino and resolved == "cpu"
        if hasattr(model, "card"):
            loaded = self._openvino(model) if openvino else model
        else:
            loaded = self._load(checkpoint, model, resolved, base_checkpoint, openvino)
        try:
            labels = inference.segment_image(image, loaded, device=resolved, batch_size=batch_size,
                                             largest_component=largest_component, progress=self._set_progress,
                                             should_cancel=self._cancel.is_set)
        except inference.Cancelled as exc:
            raise SegmentationCancelled(str(exc)) from exc
        return loaded.card, labels, resolved

    def _load(self, checkpoint, path: Path, device: str, base_checkpoint, openvino: bool = False):
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, device, str(base_checkpoint or ""), openvino)
        if self._model_cache is not None and self._model_cache[0] == key:
            return self._model_cache[1]
        self._model_cache = None  # free the previous model before loading the next one
        loaded = checkpoint.load_model(path, device=device, base_checkpoint=base_checkpoint)
        if openvino:
            loaded = self._openvino(loaded)
        self._model_cache = (key, loaded)
        return loaded

    def _openvino(self, loaded):
        from SAMedLib.acceleration import use_openvino

        self._set_progress(0.0, "Converting the model for OpenVINO (once per model)…")
        use_openvino(loaded.model)  # in place: a caller's loaded model, or the cached one, stays converted
        return loaded

    # ------------------------------------------------------------------ main-thread waiting

    def _wait(self, future: concurrent.futures.Future, report: ProgressCallback | None):
        last = None
        while True:
            done, _ = concurrent.futures.wait([future], timeout=self.pollInterval)
            with self._progress_lock:
                state = self._progress_state
            if report is not None and state is not None and state != last:
                last = state
                report(*state)
            if done:
                return future.result()  # re-raises the worker's exception here, on the main thread
            self.processEvents()
