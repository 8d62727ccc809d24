"""Training volumes: (image, label map) pairs prepared exactly as inference prepares images.

Label maps are resampled onto their image's grid in physical space, label values are mapped to class
indices (1..C in class-list order; every other value is background) and both are reoriented to the
canonical orientation with the same code inference uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .classes import SegmentClass
from .errors import SAMedError
from .model_card import Preprocessing
from .preprocessing import normalize_intensity
from .volume_io import read_volume, resample_to_reference, to_canonical

__all__ = ["TrainingVolume", "TrainingDataError", "load_training_pair", "select_slices"]


class TrainingDataError(SAMedError, ValueError):
    """A training pair cannot be used (labels off the image, unknown class value, empty label map)."""


@dataclass
class TrainingVolume:
    name: str
    image: np.ndarray  # (z, y, x) float32 in [0, 1], canonical orientation
    labels: np.ndarray  # (z, y, x) uint8 class index, 0 = background
    spacing_yx: tuple[float, float]

    @property
    def foreground_slices(self) -> np.ndarray:
        return np.flatnonzero(self.labels.reshape(self.labels.shape[0], -1).any(axis=1))


def load_training_pair(image_path: str | Path, labels_path: str | Path, classes: list[SegmentClass],
                       prep: Preprocessing) -> TrainingVolume:
    """Read and check one pair. Errors name the file and what is wrong with it."""
    image = read_volume(image_path)
    labels = read_volume(labels_path, allow_constant=True)
    return prepare_training_pair(image, labels, classes, prep, name=Path(image_path).name,
                                 labels_name=str(labels_path))


def prepare_training_pair(image: sitk.Image, labels: sitk.Image, classes: list[SegmentClass], prep: Preprocessing,
                          name: str = "image", labels_name: str = "labels") -> TrainingVolume:
    original_values = np.unique(sitk.GetArrayViewFromImage(labels))
    if not np.any(original_values != 0):
        raise TrainingDataError(f"{labels_name}: label map is empty (only background)")
    missing = [c for c in classes if c.value not in original_values]
    if missing:
        raise TrainingDataError(f"{labels_name}: class value(s) {', '.join(f'{c.value} ({c.name})' for c in missing)} "
                                f"do not occur in the label map (values present: {original_values[:20].tolist()})")
    on_grid = sitk.GetArrayFromImage(resample_to_reference(labels, image))
    if not np.isin(on_grid, [c.value for c in classes]).any():
        raise TrainingDataError(f"{labels_name}: the labels do not overlap the image {name} in physical space "
                                "(check that they belong to this scan)")
    index = np.zeros(on_grid.shape, np.uint8)
    for i, c in enumerate(classes, start=1):
        index[on_grid == c.value] = i
    canonical, restore = to_canonical(image)
    canonical_labels = np.ascontiguousarray(_to_canonical_array(index, image, canonical, restore))
    spacing_x, spacing_y = canonical.GetSpacing()[:2]
    volume = normalize_intensity(sitk.GetArrayViewFromImage(canonical), prep)
    return TrainingVolume(name, volume, canonical_labels, (spacing_y, spacing_x))


def _to_canonical_array(index: np.ndarray, image: sitk.Image, canonical: sitk.Image, restore) -> np.ndarray:
    """Reorient a label array on ``image``'s grid exactly as the image was reoriented."""
    label_image = sitk.GetImageFromArray(index)
    label_image.CopyInformation(image)
    return sitk.GetArrayFromImage(to_canonical(label_image)[0])


def select_slices(volume: TrainingVolume, max_labeled: int | None = None, background_fraction: float = 0.15,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Slices to train on: foreground slices (evenly thinned to ``max_labeled``) plus some background slices."""
    rng = rng or np.random.default_rng(0)
    foreground = volume.foreground_slices
    if max_labeled is not None and 0 < max_labeled < len(foreground):
        foreground = foreground[np.round(np.linspace(0, len(foreground) - 1, max_labeled)).astype(int)]
    background = np.setdiff1d(np.arange(volume.labels.shape[0]), volume.foreground_slices)
    count = min(len(background), int(round(background_fraction * len(foreground))))
    chosen = rng.choice(background, size=count, replace=False) if count else np.array([], int)
    return np.sort(np.concatenate([foreground, chosen]).astype(int))
