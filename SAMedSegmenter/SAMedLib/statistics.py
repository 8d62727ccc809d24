"""Per-class statistics of a label map over its image (TotalSegmentator's ``--statistics`` convention).

One row per case and class: voxel count, volume in mL, mean and standard deviation (population, ddof 0)
of the image intensity inside the class, and the model that produced the labels. Written as CSV or JSON
(a list of rows) by the output's extension, atomically.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .classes import SegmentClass
from .volume_io import VolumeError, atomic_output_path, read_volume, resample_to_reference

__all__ = ["STATISTICS_FIELDS", "STATISTICS_EXTENSIONS", "label_statistics", "statistics_for_files",
           "statistics_csv", "write_statistics", "check_statistics_path"]

STATISTICS_FIELDS = ("case", "class_value", "class_name", "voxels", "volume_ml", "intensity_mean", "intensity_std",
                     "model")
STATISTICS_EXTENSIONS = (".csv", ".json")


def label_statistics(image: sitk.Image, labels: sitk.Image, classes: Sequence[SegmentClass], case: str,
                     model: str = "") -> list[dict]:
    """Rows for ``classes`` (in order, also when a class has no voxel: intensities are then NaN).

    ``labels`` must be on ``image``'s grid (same size); resample it first otherwise (``statistics_for_files``).
    """
    if tuple(labels.GetSize()) != tuple(image.GetSize()):
        raise VolumeError(f"{case}: label map size {labels.GetSize()} differs from the image's {image.GetSize()}")
    label_array = sitk.GetArrayViewFromImage(labels)
    image_array = sitk.GetArrayViewFromImage(image)
    length = max((c.value for c in classes), default=0) + 1
    counts, sums, squares = np.zeros(length, np.int64), np.zeros(length), np.zeros(length)
    # A few slices at a time: counts, sums and sums of squares per label value for every class in one pass,
    # without a float64 copy of the whole volume.
    for z in range(0, label_array.shape[0], 16):
        index = np.asarray(label_array[z:z + 16]).ravel()
        if np.issubdtype(index.dtype, np.floating):
            index = np.rint(index)
        index = index.astype(np.int64)
        index[(index < 0) | (index >= length)] = 0  # values that are no listed class count as background
        values = np.asarray(image_array[z:z + 16], dtype=np.float64).ravel()
        counts += np.bincount(index, minlength=length)
        sums += np.bincount(index, weights=values, minlength=length)
        squares += np.bincount(index, weights=values * values, minlength=length)
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    rows = []
    for cls in classes:
        n = int(counts[cls.value])
        mean = sums[cls.value] / n if n else math.nan
        variance = max(squares[cls.value] / n - mean * mean, 0.0) if n else math.nan
        rows.append({"case": case, "class_value": int(cls.value), "class_name": cls.name, "voxels": n,
                     "volume_ml": n * voxel_ml, "intensity_mean": float(mean), "intensity_std": float(math.sqrt(variance)),
                     "model": model})
    return rows


def statistics_for_files(image_path: str | os.PathLike, labels_path: str | os.PathLike,
                         classes: Sequence[SegmentClass], case: str | None = None, model: str = "") -> list[dict]:
    """Statistics of an existing label map file over an image file.

    The label map is resampled onto the image grid in physical space first (nearest neighbour): files of the
    same scan may store voxels in another axis order or with flipped axes.
    """
    from .cohort import case_id

    image = read_volume(image_path)
    labels = read_volume(labels_path, allow_constant=True)
    on_image = resample_to_reference(labels, image)
    return label_statistics(image, on_image, classes, case or case_id(image_path), model)


def check_statistics_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() not in STATISTICS_EXTENSIONS:
        raise VolumeError(f"{path}: statistics must be written to a .csv or .json file")
    return path


def _json_value(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def statistics_csv(rows: Sequence[dict]) -> str:
    """CSV text with a header line; NaN (a class with no voxel) is an empty cell."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=STATISTICS_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if _json_value(row[k]) is None else row[k] for k in STATISTICS_FIELDS})
    return buffer.getvalue()


def write_statistics(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write rows as CSV (empty cells for NaN) or JSON (null for NaN), atomically."""
    path = check_statistics_path(path)
    if path.suffix.lower() == ".json":
        text = json.dumps([{k: _json_value(row[k]) for k in STATISTICS_FIELDS} for row in rows], indent=1) + "\n"
    else:
        text = statistics_csv(rows)
    with atomic_output_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
