"""Missed slices inside an organ: prompted from the neighbouring slice, as box annotation propagates.

A one-volume head can find an organ on the slices above and below and miss it on one between: on the
``slab-bright`` selection split (bench/transfer_selection.py) the dark aorta of ct_3mm is found on slices 89, 91
and 93 and missed on 90 and 92. After the clean-up, such a *gap* slice (its cross-section below GAP_FRACTION of
the largest within GAP_WINDOW_MM on both sides) is prompted with the boxes of the nearest non-gap slice's mask,
grown by the propagation margin, and takes the decoder's mask where no other class is, unless the decoder
doubts it (the propagation stops of ``annotation.PropagationSettings``: predicted IoU, area ratio).
Only slices *between* found slices are filled: an organ's ends are the head's and the clean-up's to decide
(walking on past them followed the iliac arteries and the bowel on the selection splits).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .annotation import AnnotationError, Annotator, PropagationSettings, SliceBox
from .prompting import Prompt, clean_mask

__all__ = ["gap_slices", "fill_gaps", "GAP_FRACTION", "GAP_WINDOW_MM"]

GAP_FRACTION = 0.5
GAP_WINDOW_MM = 9.0  # the clean-up's profile window (cleanup.PROFILE_SMOOTHING_MM)


def gap_slices(area: np.ndarray, window: int) -> list[int]:
    """Slices whose area is below GAP_FRACTION of the smaller of the largest areas within ``window`` slices
    below and within ``window`` above (both sides must hold the organ)."""
    gaps = []
    for z in range(len(area)):
        below, above = area[max(0, z - window):z], area[z + 1:z + 1 + window]
        if len(below) and len(above):
            neighbours = min(below.max(), above.max())
            if neighbours > 0 and area[z] < GAP_FRACTION * neighbours:
                gaps.append(z)
    return gaps


def _island_boxes(mask: np.ndarray, z: int) -> list[SliceBox]:
    from scipy import ndimage

    islands, count = ndimage.label(clean_mask(mask))
    boxes = []
    for rows, cols in ndimage.find_objects(islands)[:count]:
        boxes.append(SliceBox(z, cols.start, rows.start, cols.stop - 1, rows.stop - 1))
    return boxes


def fill_gaps(labels: np.ndarray, annotator: Annotator, values: list[int],
              settings: PropagationSettings = PropagationSettings(),
              should_cancel: Callable[[], bool] | None = None) -> tuple[np.ndarray, dict[int, list[int]]]:
    """Fill each class's gap slices in a canonical (z, y, x) label array (the annotator's grid).

    Returns the filled labels and, per class value, the slices that were filled.
    """
    from .inference import Cancelled

    cancelled = should_cancel or (lambda: False)
    spacing_z = annotator.canonical.GetSpacing()[2]
    window = max(1, int(round(GAP_WINDOW_MM / spacing_z)))
    out, filled = labels.copy(), {}
    for value in values:
        mask = labels == value
        area = mask.reshape(len(mask), -1).sum(1)
        gaps = gap_slices(area, window)
        sources = [z for z in np.flatnonzero(area) if z not in gaps]
        for z in gaps:
            if cancelled():
                raise Cancelled("segmentation cancelled")
            source = min(sources, key=lambda s: (abs(s - z), -area[s]))
            prompts = []
            for box in _island_boxes(mask[source], z):
                try:
                    prompts.append(Prompt(annotator.model_box(annotator.grown(box, settings.margin_mm))))
                except AnnotationError:  # an island outside the model's field of view: nothing to prompt
                    continue
            if not prompts:
                continue
            logits, iou = annotator.decode(z, prompts)
            kept = clean_mask(logits.numpy() > 0)
            found = annotator.native_mask(logits, kept) & (out[z] == 0)
            if (float(iou.max()) < settings.min_iou or not found.any()
                    or not settings.min_area_ratio * area[source] <= found.sum() <= settings.max_area_ratio * area[source]):
                continue
            out[z][found] = value
            filled.setdefault(value, []).append(int(z))
    return out, filled
