"""Whole-volume, prompt-free segmentation with a fine-tuned checkpoint.

The volume is reoriented to the canonical orientation, cut into axial slices that stream through the
model a batch at a time (the volume is never held at model resolution), and the logits of each slice are
resampled back onto that slice before the argmax. The label map is then mapped back onto exactly the
input's grid (size, spacing, origin, direction).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from .acceleration import autocast, precision_name, prepare_encoder
from .checkpoint import LoadedModel
from .errors import SAMedError
from .preprocessing import from_model_grid, intensity_range, model_input, normalize_intensity, slice_to_model_theta
from .volume_io import to_canonical, validate_volume

__all__ = ["segment_image", "resolve_device", "Cancelled", "ProgressCallback", "keep_largest_component",
           "default_batch_size", "body_slice_indices"]

log = logging.getLogger(__name__)
ProgressCallback = Callable[[float, str], None]


class Cancelled(SAMedError):
    """Raised when ``should_cancel()`` returned True; nothing was written."""


def resolve_device(device: str = "auto") -> str:
    """``auto`` = CUDA, then Apple MPS, then CPU. An explicit device that is not available is an error."""
    device = (device or "auto").lower()
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if device.startswith("cuda") and not cuda:
        raise SAMedError("device 'cuda' requested but no CUDA GPU is available (use --device cpu or auto)")
    if device == "mps" and not mps:
        raise SAMedError("device 'mps' requested but Apple MPS is not available (use --device cpu or auto)")
    if device != "cpu" and not device.startswith(("cuda", "mps")):
        raise SAMedError(f"unknown device '{device}': expected auto, cpu, cuda or mps")
    return device


def default_batch_size(device: str) -> int:
    # CPU: one slice at a time was both faster and leaner than 4 (bench/results/inference.md:
    # 0.61 vs 0.71 s/slice, 245 vs 631 MB above the model on the 512x512 DICOM series).
    return 16 if device.startswith("cuda") else 4 if device == "mps" else 1


def keep_largest_component(labels: np.ndarray, values: list[int]) -> np.ndarray:
    """Per class, keep only its largest 3D connected component (26-connectivity)."""
    from scipy import ndimage

    out = labels.copy()
    for value in values:
        mask = labels == value
        components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
        if count > 1:
            sizes = np.bincount(components.ravel())[1:]
            out[mask & (components != 1 + int(np.argmax(sizes)))] = 0
    return out


def body_slice_indices(volume: np.ndarray, prep, value_range: tuple[float, float]) -> np.ndarray:
    """Indices of the axial slices (``volume[z]``) that hold anything inside the intensity window.

    The others are air only: their model input is exactly zero, so they skip the encoder and are background.
    """
    low = value_range[0]
    body = [z for z in range(volume.shape[0])
            if (((volume[z] > low) & (volume[z] != 0)) if prep.modality == "MR" else (volume[z] > low)).any()]
    return np.asarray(body, dtype=np.int64)


def segment_image(image: sitk.Image, model: LoadedModel, *, device: str = "auto", batch_size: int | None = None,
                  largest_component: bool = False, precision: str = "auto", progress: ProgressCallback | None = None,
                  should_cancel: Callable[[], bool] | None = None) -> sitk.Image:
    """Segment a 3D image; returns a label map on exactly the input grid with the card's label values.

    Args:
        image: a 3D scalar SimpleITK image (any orientation, spacing and direction).
        model: a LoadedModel (``SAMedLib.checkpoint.load_model``).
        device: ``auto``, ``cpu``, ``cuda[:N]`` or ``mps``.
        batch_size: slices per forward pass (default 16 on CUDA, 4 on MPS, 1 on CPU). Halved on CUDA out-of-memory;
            if even one slice does not fit, inference continues on the CPU with a warning.
        largest_component: keep only each class's largest 3D connected component.
        precision: ``auto`` (fp16 on CUDA, bf16 on CPUs with native bf16, else fp32) or ``fp32``.
        progress: called with (fraction done, message) after every batch.
        should_cancel: checked between batches; returning True raises ``Cancelled``.
    """
    validate_volume(image, "input volume")
    card = model.card
    prep = card.preprocessing
    device = resolve_device(device)
    batch = int(batch_size or default_batch_size(device))
    if batch < 1:
        raise SAMedError(f"batch size must be >= 1, got {batch}")
    compute = precision_name(device, precision)  # also rejects an unknown precision before any work
    net = model.model.to(device).eval()
    prepare_encoder(net.image_encoder)  # BatchNorm folded + channels-last: same outputs, faster
    report = progress or (lambda fraction, message: None)
    cancelled = should_cancel or (lambda: False)

    canonical, restore = to_canonical(image)
    volume = sitk.GetArrayViewFromImage(canonical)  # (z, y, x), a view: no copy of the volume
    depth, height, width = volume.shape
    spacing_x, spacing_y = canonical.GetSpacing()[:2]
    theta = slice_to_model_theta((height, width), (spacing_y, spacing_x), prep)
    value_range = intensity_range(volume, prep)
    values = torch.tensor([0] + [c.value for c in card.classes], dtype=torch.int32)
    out_dtype = np.uint8 if max(c.value for c in card.classes) < 256 else np.uint16
    labels = np.zeros(volume.shape, dtype=out_dtype)

    body = body_slice_indices(volume, prep, value_range)  # air-only slices stay background
    start, done = time.perf_counter(), 0
    report(0.0, f"segmenting {len(body)} of {depth} slices on {device} ({compute})")
    while done < len(body):
        if cancelled():
            raise Cancelled("segmentation cancelled")
        stop = min(len(body), done + batch)
        slices = torch.from_numpy(normalize_intensity(volume[body[done:stop]], prep, value_range))
        try:
            class_index = _predict_batch(net, slices, theta, (spacing_y, spacing_x), prep, device, precision)
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            if batch > 1:
                batch = max(1, batch // 2)
                log.warning("CUDA out of memory: retrying with batch size %d", batch)
            elif device != "cpu":
                log.warning("CUDA out of memory even for one slice: continuing on the CPU")
                device, net = "cpu", net.to("cpu")
            else:  # already on the CPU with one slice: retrying would loop forever
                raise SAMedError("out of memory even for one slice on the CPU") from exc
            continue
        labels[body[done:stop]] = values[class_index.cpu()].numpy().astype(out_dtype)
        done = stop
        elapsed = time.perf_counter() - start
        report(done / len(body), f"slice {done}/{len(body)}, {elapsed / done:.2f} s/slice")

    if largest_component:
        labels = keep_largest_component(labels, [c.value for c in card.classes])
    result = sitk.GetImageFromArray(labels)
    result.CopyInformation(canonical)
    result = restore(result)
    result.SetMetaData("SAMed_model", str(model.path.name if model.path else "in-memory"))
    result.SetMetaData("SAMed_largest_component", "1" if largest_component else "0")
    return result


def _predict_batch(net: torch.nn.Module, slices: torch.Tensor, theta: torch.Tensor, spacing_yx: tuple[float, float],
                   prep, device: str, precision: str) -> torch.Tensor:
    """(B,H,W) normalised slices -> (B,H,W) class indices (0 = background), logits resampled before argmax."""
    height, width = slices.shape[-2:]
    with torch.inference_mode():
        # Resampling stays fp32: in bf16 the sampling grid itself would be off by up to a model pixel.
        inputs = model_input(slices.to(device), theta.to(device), prep, spacing_yx)
        with autocast(device, precision):
            logits = net(inputs).float()
        native, inside = from_model_grid(logits, theta.to(device), (height, width))
        index = native.argmax(dim=1)
        index[:, ~inside] = 0  # outside the model's field of view: background
    return index
