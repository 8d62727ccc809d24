"""Segmentation metrics: Dice and 95th-percentile Hausdorff distance (HD95) in millimetres.

Pure functions on numpy masks/label maps indexed ``[z, y, x]`` plus a small accumulator
that averages per-case scores.

Conventions (for one class; "empty" means no voxel of that class):

======================  ======  ======  =====================================
prediction / reference  Dice    HD95    meaning
======================  ======  ======  =====================================
both present            value   value   normal case
prediction empty        0.0     nan     missed organ: Dice penalises it, HD95
                                        is undefined and reported as missing
reference empty         0.0     nan     false positive organ
both empty              nan     nan     nothing to score: excluded
======================  ======  ======  =====================================

``mean_dice`` and ``mean_hd95_mm`` average only the values that are not nan, so a missed
organ lowers the mean Dice but does not appear in the mean HD95.

HD95 follows medpy's ``hd95``: surfaces are the mask voxels removed by one binary erosion
with a face-connected (6-neighbour) structure, voxels on the array edge count as surface,
and the result is the 95th percentile (numpy linear interpolation) of the pooled distances
from each prediction surface voxel to the nearest reference surface voxel and back.
Distances are Euclidean in millimetres using the voxel spacing.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .classes import SegmentClass

__all__ = ["dice", "hd95", "score_label_maps", "format_table", "ScoreAccumulator"]


def dice(pred_mask: np.ndarray, ref_mask: np.ndarray) -> float:
    """Dice coefficient 2|P∩R|/(|P|+|R|) of two boolean masks; nan when both are empty."""
    pred = np.asarray(pred_mask, dtype=bool)
    ref = np.asarray(ref_mask, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"mask shapes differ: prediction {pred.shape} vs reference {ref.shape}")
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return math.nan
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels that one face-connected erosion removes (array edges count as outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _crop_to_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus a one-voxel margin.

    Exact for surface distances: the one-voxel margin (or the array edge, where erosion
    already treats the outside as background) keeps every surface voxel a surface voxel,
    and all surface voxels - the only distance targets - lie inside the crop.
    """
    coords = np.nonzero(a | b)
    box = tuple(slice(max(int(c.min()) - 1, 0), int(c.max()) + 2) for c in coords)
    return a[box], b[box]


def hd95(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing_zyx: Sequence[float]) -> float:
    """Symmetric 95th-percentile surface distance in mm; nan if either mask is empty."""
    pred = np.asarray(pred_mask, dtype=bool)
    ref = np.asarray(ref_mask, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"mask shapes differ: prediction {pred.shape} vs reference {ref.shape}")
    if len(spacing_zyx) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing_zyx)} does not match {pred.ndim}D masks")
    if not pred.any() or not ref.any():
        return math.nan
    pred, ref = _crop_to_union(pred, ref)
    pred_surface = _surface(pred)
    ref_surface = _surface(ref)
    sampling = [float(s) for s in spacing_zyx]
    # Distance from every voxel to the nearest surface voxel of the other mask.
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)
    distances = np.concatenate([to_ref[pred_surface], to_pred[ref_surface]])
    return float(np.percentile(distances, 95))


def score_label_maps(pred: np.ndarray, ref: np.ndarray, classes: Sequence[SegmentClass],
                     spacing_zyx: Sequence[float]) -> dict:
    """Score two label maps on the same grid, class by class (see module docstring).

    Returns ``{"classes": {name: {"value", "dice", "hd95_mm", "pred_voxels", "ref_voxels"}},
    "mean_dice": float, "mean_hd95_mm": float}``; means skip nan values (nan if none left).
    Label values not in ``classes`` are treated as background.
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"label map shapes differ: prediction {pred.shape} vs reference {ref.shape}; "
                         "resample the reference onto the prediction grid first")
    per_class: dict[str, dict] = {}
    for cls in classes:
        p = pred == cls.value
        r = ref == cls.value
        per_class[cls.name] = {
            "value": int(cls.value),
            "dice": dice(p, r),
            "hd95_mm": hd95(p, r, spacing_zyx),
            "pred_voxels": int(p.sum()),
            "ref_voxels": int(r.sum()),
        }
    return {
        "classes": per_class,
        "mean_dice": _nanmean([s["dice"] for s in per_class.values()]),
        "mean_hd95_mm": _nanmean([s["hd95_mm"] for s in per_class.values()]),
    }


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(sum(kept) / len(kept)) if kept else math.nan


def _fmt(value: float, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def format_table(scores: dict, classes: Sequence[SegmentClass]) -> str:
    """Plain-text table: one row per class (Dice, HD95 mm, voxel counts) and a mean row."""
    rows = [("class", "Dice", "HD95 mm", "pred vox", "ref vox")]
    for cls in classes:
        s = scores["classes"].get(cls.name)
        if s is None:
            rows.append((cls.name, "n/a", "n/a", "", ""))
            continue
        rows.append((cls.name, _fmt(s["dice"], 4), _fmt(s["hd95_mm"], 2), str(s["pred_voxels"]), str(s["ref_voxels"])))
    rows.append(("mean", _fmt(scores["mean_dice"], 4), _fmt(scores["mean_hd95_mm"], 2), "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(r: tuple[str, ...]) -> str:
        return "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]).rstrip()

    rule = "-" * len(line(rows[0]))
    return "\n".join([line(rows[0]), rule, *map(line, rows[1:-1]), rule, line(rows[-1])])


class ScoreAccumulator:
    """Collects ``score_label_maps`` results of several cases and averages them per class.

    Per class, nan values (class absent / HD95 missing) are skipped, like in one case.
    """

    def __init__(self) -> None:
        self._cases: list[dict] = []

    def add(self, scores: dict) -> None:
        self._cases.append(scores)

    def __len__(self) -> int:
        return len(self._cases)

    def aggregate(self) -> dict:
        """Mean per class over cases, in the same shape as one ``score_label_maps`` result."""
        names: list[str] = []
        for case in self._cases:
            names += [n for n in case["classes"] if n not in names]
        per_class = {}
        for name in names:
            entries = [c["classes"][name] for c in self._cases if name in c["classes"]]
            per_class[name] = {
                "value": entries[0]["value"],
                "dice": _nanmean([e["dice"] for e in entries]),
                "hd95_mm": _nanmean([e["hd95_mm"] for e in entries]),
                "pred_voxels": sum(e["pred_voxels"] for e in entries),
                "ref_voxels": sum(e["ref_voxels"] for e in entries),
            }
        return {
            "classes": per_class,
            "mean_dice": _nanmean([s["dice"] for s in per_class.values()]),
            "mean_hd95_mm": _nanmean([s["hd95_mm"] for s in per_class.values()]),
            "cases": len(self._cases),
        }
