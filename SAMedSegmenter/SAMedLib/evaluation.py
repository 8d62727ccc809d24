"""Score a predicted label map file against a reference label map file."""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from .classes import SegmentClass
from .metrics import score_label_maps
from .volume_io import VolumeError, read_volume, resample_to_reference

__all__ = ["evaluate_files"]


def _label_array(image: sitk.Image) -> np.ndarray:
    arr = sitk.GetArrayFromImage(image)
    # Some tools save label maps as float; compare class values on rounded integers.
    return np.rint(arr).astype(np.int64) if np.issubdtype(arr.dtype, np.floating) else arr


def evaluate_files(prediction_path: str | os.PathLike, reference_path: str | os.PathLike,
                   classes: Sequence[SegmentClass]) -> dict:
    """Dice/HD95 per class of a prediction file against a reference file.

    The reference is resampled (nearest neighbour, physical space) onto the prediction grid
    first, because files of the same scan may store the voxels in a different axis order
    or with flipped axes. HD95 uses the prediction grid's spacing.
    Returns ``score_label_maps`` output plus ``"prediction"`` and ``"reference"`` paths.
    Raises VolumeError if a file is unusable or the two grids do not overlap at all.
    """
    if not classes:
        raise ValueError("evaluate_files needs at least one class")
    prediction = read_volume(prediction_path, allow_constant=True)
    reference = read_volume(reference_path, allow_constant=True)
    ref_on_pred = _label_array(resample_to_reference(reference, prediction))
    values = [c.value for c in classes]
    if not np.isin(ref_on_pred, values).any() and np.isin(_label_array(reference), values).any():
        # All reference foreground fell outside the prediction grid: the files do not
        # describe the same region, and scoring would silently report zeros.
        raise VolumeError(f"{reference_path}: no labelled voxel of the reference lies inside the grid of "
                          f"{prediction_path} (different scans or wrong geometry?)")
    spacing_zyx = tuple(reversed(prediction.GetSpacing()))
    scores = score_label_maps(_label_array(prediction), ref_on_pred, classes, spacing_zyx)
    scores["prediction"] = str(prediction_path)
    scores["reference"] = str(reference_path)
    return scores
