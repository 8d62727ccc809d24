"""Whole-volume, prompt-free segmentation with a fine-tuned checkpoint.

The volume is reoriented to the canonical orientation, cut into axial slices that stream through the
model a batch at a time (the volume is never held at model resolution), and the logits of each slice are
resampled back onto that slice before the argmax. The label map is then mapped back onto exactly the
input's grid (size, spacing, origin, direction).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from .acceleration import autocast, precision_name, prepare_encoder
from .annotation import Annotator
from .checkpoint import LoadedModel
from .cleanup import USES_CONFIDENCE, clean_labels
from .errors import SAMedError
from .gap_fill import fill_gaps as fill_gap_slices
from .model_card import Postprocessing
from .prompting import PromptDecoder, mask_pixel_mm
from .refinement import refine_logits
from .preprocessing import from_model_grid, intensity_range, model_input, normalize_intensity, slice_to_model_theta
from .volume_io import to_canonical, validate_volume

__all__ = ["segment_image", "resolve_device", "Cancelled", "ProgressCallback", "default_batch_size",
           "body_slice_indices"]

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


def body_slice_indices(volume: np.ndarray, prep, value_range: tuple[float, float]) -> np.ndarray:
    """Indices of the axial slices (``volume[z]``) that hold anything inside the intensity window.

    The others are air only: their model input is exactly zero, so they skip the encoder and are background.
    """
    low = value_range[0]
    body = [z for z in range(volume.shape[0])
            if (((volume[z] > low) & (volume[z] != 0)) if prep.modality == "MR" else (volume[z] > low)).any()]
    return np.asarray(body, dtype=np.int64)


def segment_image(image: sitk.Image, model: LoadedModel, *, device: str = "auto", batch_size: int | None = None,
                  largest_component: bool = False, precision: str = "auto", refinement: str | None = None,
                  cleanup: str | None = None, fill_gaps: bool | None = None, progress: ProgressCallback | None = None,
                  should_cancel: Callable[[], bool] | None = None,
                  return_confidence: bool = False) -> sitk.Image | tuple[sitk.Image, sitk.Image]:
    """Segment a 3D image; returns a label map on exactly the input grid with the card's label values.

    Args:
        image: a 3D scalar SimpleITK image (any orientation, spacing and direction).
        model: a LoadedModel (``SAMedLib.checkpoint.load_model``).
        device: ``auto``, ``cpu``, ``cuda[:N]`` or ``mps``.
        batch_size: slices per forward pass (default 16 on CUDA, 4 on MPS, 1 on CPU). Halved on CUDA out-of-memory;
            if even one slice does not fit, inference continues on the CPU with a warning.
        largest_component: keep only each class's largest 3D connected component (same as ``cleanup="largest"``).
        refinement: ``none``, ``box`` or ``box+point`` (self-prompted refinement, SAMedLib.refinement);
            None: what the model card says.
        cleanup: 3D clean-up ``none``, ``components``, ``extent`` or ``largest`` (SAMedLib.cleanup); None: the card's.
        fill_gaps: prompt the slices a refined class was missed on between slices it was found on
            (SAMedLib.gap_fill); None: the card's. Nothing is filled without refinement.
        precision: ``auto`` (fp16 on CUDA, bf16 on CPUs with native bf16, else fp32) or ``fp32``.
        progress: called with (fraction done, message) after every batch.
        should_cancel: checked between batches; returning True raises ``Cancelled``.
        return_confidence: also return the head's probability of each voxel's class (uint8, 0..255, on the
            input grid), e.g. to compare clean-ups with ``SAMedLib.cleanup.clean_label_image`` without re-running.
    """
    validate_volume(image, "input volume")
    card = model.card
    prep = card.preprocessing
    device = resolve_device(device)
    batch = int(batch_size or default_batch_size(device))
    if batch < 1:
        raise SAMedError(f"batch size must be >= 1, got {batch}")
    compute = precision_name(device, precision)  # also rejects an unknown precision before any work
    post = Postprocessing(**{**asdict(card.postprocessing),
                             **({"refinement": refinement, "refinement_by_class": {}} if refinement is not None else {}),
                             **({"cleanup": cleanup} if cleanup is not None else {}),
                             **({"fill_gaps": fill_gaps} if fill_gaps is not None else {}),
                             **({"cleanup": "largest"} if largest_component else {})})
    refinements = post.class_refinements([c.name for c in card.classes])
    refined = any(choice != "none" for choice in refinements)
    decoder = model.prompt_decoder if refined else None
    if refined and decoder is None:
        raise SAMedError("refinement needs the base model's prompt decoder (load the model with load_model)")
    net = model.model.to(device).eval()
    if decoder is not None:
        decoder.to(device)
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
    with_confidence = post.cleanup in USES_CONFIDENCE or return_confidence
    confidence = np.zeros(volume.shape, dtype=np.uint8) if with_confidence else None
    predictor = SlicePredictor(net, theta, (spacing_y, spacing_x), prep, precision, decoder, post, refinements,
                                with_confidence)

    body = body_slice_indices(volume, prep, value_range)  # air-only slices stay background
    start, done = time.perf_counter(), 0
    report(0.0, f"segmenting {len(body)} of {depth} slices on {device} ({compute})")
    while done < len(body):
        if cancelled():
            raise Cancelled("segmentation cancelled")
        stop = min(len(body), done + batch)
        slices = torch.from_numpy(normalize_intensity(volume[body[done:stop]], prep, value_range))
        try:
            class_index, probability = predictor(slices, device)
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            if batch > 1:
                batch = max(1, batch // 2)
                log.warning("CUDA out of memory: retrying with batch size %d", batch)
            elif device != "cpu":
                log.warning("CUDA out of memory even for one slice: continuing on the CPU")
                device = "cpu"
                predictor.to(device)
            else:  # already on the CPU with one slice: retrying would loop forever
                raise SAMedError("out of memory even for one slice on the CPU") from exc
            continue
        labels[body[done:stop]] = values[class_index.cpu()].numpy().astype(out_dtype)
        if confidence is not None:
            confidence[body[done:stop]] = (255 * probability.cpu().numpy()).round().astype(np.uint8)
        done = stop
        elapsed = time.perf_counter() - start
        report(done / len(body), f"slice {done}/{len(body)}, {elapsed / done:.2f} s/slice")

    labels = clean_labels(labels, confidence, [c.value for c in card.classes], canonical.GetSpacing()[::-1],
                          post.cleanup)
    filled = {}
    if refined and post.fill_gaps:
        refined_values = [c.value for c, choice in zip(card.classes, refinements) if choice != "none"]
        report(1.0, "prompting slices an organ was missed on between slices it was found on")
        annotator = Annotator(canonical, net.image_encoder, decoder, prep, device, precision)
        labels, filled = fill_gap_slices(labels, annotator, refined_values, should_cancel=cancelled)
        if filled:
            log.info("filled missed slices: %s", {c.name: filled[c.value] for c in card.classes if c.value in filled})
    result = sitk.GetImageFromArray(labels)
    result.CopyInformation(canonical)
    result = restore(result)
    result.SetMetaData("SAMed_model", str(model.path.name if model.path else "in-memory"))
    result.SetMetaData("SAMed_refinement", ",".join(f"{c.name}:{r}" for c, r in zip(card.classes, refinements)))
    result.SetMetaData("SAMed_cleanup", post.cleanup)
    result.SetMetaData("SAMed_filled_slices", str(sum(len(slices) for slices in filled.values())))
    result.SetMetaData("SAMed_largest_component", "1" if post.cleanup == "largest" else "0")
    if not return_confidence:
        return result
    confidence_image = sitk.GetImageFromArray(confidence)
    confidence_image.CopyInformation(canonical)
    return result, restore(confidence_image)


class SlicePredictor:
    """(B,H,W) normalised native slices -> class indices (B,H,W) and the head's probability of that class.

    Logits are resampled back onto the slice before the argmax. With refinement, the head's coarse masks
    prompt the base model's decoder on the same embeddings (one encoder pass per slice).
    """

    def __init__(self, net: torch.nn.Module, theta: torch.Tensor, spacing_yx: tuple[float, float], prep,
                 precision: str, decoder: PromptDecoder | None, post: Postprocessing, refinements: list[str],
                 with_confidence: bool):
        self.net, self.theta, self.spacing_yx, self.prep = net, theta, spacing_yx, prep
        self.precision, self.decoder, self.post = precision, decoder, post
        self.refinements, self.with_confidence = refinements, with_confidence

    def to(self, device: str) -> "SlicePredictor":
        self.net.to(device)
        if self.decoder is not None:
            self.decoder.to(device)
        return self

    def margin_px(self, width: int, mask_size: int) -> float:
        return self.post.box_margin_mm / mask_pixel_mm(self.theta, width, self.spacing_yx[1], mask_size)

    def __call__(self, slices: torch.Tensor, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = slices.shape[-2:]
        theta = self.theta.to(device)
        with torch.inference_mode():
            # Resampling stays fp32: in bf16 the sampling grid itself would be off by up to a model pixel.
            inputs = model_input(slices.to(device), theta, self.prep, self.spacing_yx)
            with autocast(device, self.precision):
                if self.decoder is None:
                    logits = self.net(inputs).float()
                    final = logits
                else:
                    embeddings = self.net.image_encoder(inputs)
                    logits = self.net.head(embeddings).float()
                    final = refine_logits(logits, embeddings, self.decoder, self.refinements,
                                          self.margin_px(width, logits.shape[-1]))
            native, inside = from_model_grid(final, theta, (height, width))
            index = native.max(dim=1).indices  # = argmax (first maximum), 20x faster over channels on CPU
            index[:, ~inside] = 0  # outside the model's field of view: background
            probability = torch.zeros(index.shape, device=index.device)
            if self.with_confidence:
                head_native, _ = from_model_grid(logits.softmax(dim=1), theta, (height, width))
                probability = head_native.gather(1, index.unsqueeze(1))[:, 0]
        return index, probability
