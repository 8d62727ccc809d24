"""3D clean-up of a label map: keep what is plausibly the organ, drop what is not.

Keeping only the largest component deletes true organs that appear in two pieces (a stomach cut by the
slice plane, a kidney with its pole); keeping everything leaves islands on slices far from the organ.
``keep_plausible_components`` scores each 3D component by its size and the head's mean confidence and
keeps the best one plus every other component that is comparable to it.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

__all__ = ["keep_largest_component", "keep_plausible_components", "clean_labels", "clean_label_image"]

CONNECTIVITY = np.ones((3, 3, 3), bool)  # 26-connected


def keep_largest_component(labels: np.ndarray, values: list[int]) -> np.ndarray:
    """Per class, keep only its largest 3D connected component (26-connectivity)."""
    from scipy import ndimage

    out = labels.copy()
    for value in values:
        mask = labels == value
        components, count = ndimage.label(mask, structure=CONNECTIVITY)
        if count > 1:
            sizes = np.bincount(components.ravel())[1:]
            out[mask & (components != 1 + int(np.argmax(sizes)))] = 0
    return out


def keep_plausible_components(labels: np.ndarray, confidence: np.ndarray | None, values: list[int],
                              spacing_zyx: tuple[float, float, float], keep_fraction: float = 0.1,
                              min_confidence: float = 0.5, min_volume_ml: float = 0.1) -> np.ndarray:
    """Per class, keep the 3D components that are plausibly the organ.

    Each component's score is its volume times its mean confidence (the head's probability of the class,
    0..255 in ``confidence``; 1 everywhere when None). The best-scoring component is kept, and so is any
    other whose score is at least ``keep_fraction`` of it, whose mean confidence is at least
    ``min_confidence`` and whose volume is at least ``min_volume_ml``.
    """
    from scipy import ndimage

    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    out = labels.copy()
    for value in values:
        mask = labels == value
        components, count = ndimage.label(mask, structure=CONNECTIVITY)
        if count == 0:
            continue
        index = np.arange(1, count + 1)
        volume = ndimage.sum_labels(np.ones_like(components, np.float32), components, index) * voxel_ml
        mean_conf = (ndimage.mean(confidence.astype(np.float32), components, index) / 255.0
                     if confidence is not None else np.ones(count))
        score = volume * mean_conf
        best = int(np.argmax(score))
        keep = (score >= keep_fraction * score[best]) & (mean_conf >= min_confidence) & (volume >= min_volume_ml)
        keep[best] = True
        out[mask & ~np.isin(components, index[keep])] = 0
    return out


def clean_labels(labels: np.ndarray, confidence: np.ndarray | None, values: list[int],
                 spacing_zyx: tuple[float, float, float], cleanup: str) -> np.ndarray:
    """Apply the named clean-up (model_card.CLEANUPS) to a (z, y, x) label array."""
    if cleanup == "largest":
        return keep_largest_component(labels, values)
    if cleanup == "components":
        return keep_plausible_components(labels, confidence, values, spacing_zyx)
    if cleanup != "none":
        raise ValueError(f"unknown clean-up '{cleanup}'")
    return labels


def clean_label_image(labels: sitk.Image, confidence: sitk.Image | None, values: list[int], cleanup: str) -> sitk.Image:
    """``clean_labels`` on a label image (and the confidence image ``segment_image`` returns), same grid out."""
    array = clean_labels(sitk.GetArrayFromImage(labels),
                         None if confidence is None else sitk.GetArrayFromImage(confidence), values,
                         tuple(reversed(labels.GetSpacing())), cleanup)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(labels)
    return out
