"""3D clean-up of a label map: keep what is plausibly the organ, drop what is not.

Keeping only the largest component deletes true organs that appear in two pieces (a stomach cut by the
slice plane, a kidney with its pole); keeping everything leaves islands on slices far from the organ.
``keep_plausible_components`` scores each 3D component by its size and the head's mean confidence and
keeps the best one plus every other component that is comparable to it.

Components cannot remove false positives that touch the organ: a model trained on 40 mm of upper abdomen
predicts "liver" on every pelvic slice, 3D-connected to the true liver. ``keep_main_extent`` works on each
class's z-profile instead: an organ's cross-section grows and shrinks once along the body axis, so where
the profile falls to a deep waist and then rises again, what lies beyond the waist is something else --
unless the other organs carry on through those slices: then the waist is the head missing the organ, and the
extent grows back over the slices the class shares with most of the other classes.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .volume_io import to_canonical

__all__ = ["keep_largest_component", "keep_plausible_components", "keep_main_extent", "clean_labels",
           "clean_label_image", "USES_CONFIDENCE"]

CONNECTIVITY = np.ones((3, 3, 3), bool)  # 26-connected
# keep_main_extent's thresholds, chosen on the slab selection split (bench/transfer_selection.py; 0.2-0.3 and
# 1.5-2.0 gave the same result there): a waist is a fall to <= WAIST of the mode's peak, and what follows
# belongs to another structure once the profile climbs back to >= RISE x the waist (and by >= 5 % of the peak).
WAIST = 0.25
RISE = 1.5
# A median over ~9 mm of slices, repeated until it no longer changes (its root): one missed slice is not a
# waist, nor is a head that misses every other slice of a thin organ (the aorta on the slab-bright selection
# split: missed, found, missed), while a dip longer than half the window is kept (two slices at 3 mm; a
# closing filled those too and cut a true liver on slab-to-bright).
PROFILE_SMOOTHING_MM = 9.0
USES_CONFIDENCE = ("components", "extent")  # clean-ups that weigh voxels by the head's confidence


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
    boxes = ndimage.find_objects(labels)  # every label value's bounding box, one pass; None where absent
    for value in values:
        box = boxes[value - 1] if 0 < value <= len(boxes) else None
        if box is None:
            continue
        # Labelled and counted inside the class's bounding box only, by bincount (ndimage.sum_labels and mean over
        # the whole volume took 3x longer on the 512 x 512 DICOM series).
        mask = labels[box] == value
        components, count = ndimage.label(mask, structure=CONNECTIVITY)
        flat = components.ravel()
        voxels = np.bincount(flat, minlength=count + 1)[1:]
        volume = voxels * voxel_ml
        mean_conf = (np.bincount(flat, weights=confidence[box].ravel(), minlength=count + 1)[1:] / voxels / 255.0
                     if confidence is not None else np.ones(count))
        score = volume * mean_conf
        best = int(np.argmax(score))
        keep = (score >= keep_fraction * score[best]) & (mean_conf >= min_confidence) & (volume >= min_volume_ml)
        keep[best] = True
        out[box][mask & ~np.concatenate([[True], keep])[components]] = 0
    return out


def class_profiles(labels: np.ndarray, confidence: np.ndarray | None, values: list[int],
                   spacing_zyx: tuple[float, float, float]) -> dict[int, np.ndarray]:
    """Per class, its confidence-weighted cross-section area (mm^2) on each slice of axis 0, smoothed by the
    root of a median over PROFILE_SMOOTHING_MM."""
    from scipy import ndimage

    size = max(1, int(round(PROFILE_SMOOTHING_MM / spacing_zyx[0]))) | 1
    weight = (confidence.astype(np.float32) / 255.0) if confidence is not None else np.ones(labels.shape, np.float32)
    pixel_mm2 = spacing_zyx[1] * spacing_zyx[2]
    profiles = {}
    for value in values:
        area = np.where(labels == value, weight, 0).reshape(labels.shape[0], -1).sum(1) * pixel_mm2
        for _ in range(len(area) if size > 1 else 0):  # converges in a few passes; bounded all the same
            smoothed = ndimage.median_filter(area, size=size, mode="nearest")
            if np.array_equal(smoothed, area):
                break
            area = smoothed
        profiles[value] = area
    return profiles


def co_occurrence_slice(profiles: dict[int, np.ndarray]) -> int:
    """The slice where the classes are present together the most (sum of each non-empty profile over its peak).

    A one-volume model is trained where its classes lie side by side; false positives far from that
    region are one class at a time. Starting each class's walk here picks the true mode even when a false
    one is bigger (a stomach-shaped bowel loop larger than the true stomach, measured on the slab split).
    """
    return int(np.argmax(sum(p / p.max() for p in profiles.values())))


def main_extent(profile: np.ndarray, start: int) -> tuple[int, int]:
    """[first, last] slice of the mode of ``profile`` that holds ``start`` (its own peak if ``start`` is
    nearly empty), cut at the first deep waist on each side that the profile climbs out of again."""
    if profile[start] < 0.1 * profile.max():
        start = int(np.argmax(profile))
    ends = []
    for step in (-1, 1):
        peak = low = profile[start]
        low_at, z, end = start, start + step, (0 if step < 0 else len(profile) - 1)
        while 0 <= z < len(profile):
            value = profile[z]
            deep = low <= WAIST * peak
            if value < low:
                low, low_at = value, z
            elif deep and value >= RISE * low and value - low >= 0.05 * peak:
                end = low_at
                break
            elif not deep and value > peak:  # still climbing this mode
                peak = low = value
                low_at = z
            z += step
        ends.append(end)
    return ends[0], ends[1]


def occupied_extent(profile: np.ndarray, first: int, last: int) -> tuple[int, int]:
    """[first, last] shrunk to the slices where ``profile`` is non-zero (the class's own slices)."""
    occupied = np.flatnonzero(profile[first:last + 1] > 0)
    return (first + int(occupied[0]), first + int(occupied[-1])) if occupied.size else (first, last)


def extend_into_shared_slices(extents: dict[int, tuple[int, int]],
                              occupied: dict[int, tuple[int, int]]) -> dict[int, tuple[int, int]]:
    """Each class's [first, last] grown over the neighbouring slices that lie inside the occupied extents of at
    least half of the other classes (and at least one).

    A waist on slices where the other organs carry on is the head missing the organ (a weak head, or a phase
    it was not trained on), not the organ ending: on a 40 mm contrast series where every organ is on every
    slice, a liver found faintly on four slices and an aorta on three were cut to their smaller side (transfer
    benchmark, stop 24). False modes beyond the training coverage lie where at most a minority of the other
    classes reach, so they stay cut (the pelvic liver, the lone bowel loop of the tests).
    """
    out = {}
    for value, (first, last) in extents.items():
        others = [extent for other, extent in occupied.items() if other != value]
        needed = max(1, (len(others) + 1) // 2)

        def shared(z: int) -> bool:
            return sum(lo <= z <= hi for lo, hi in others) >= needed

        while others and first > 0 and shared(first - 1):
            first -= 1
        while others and shared(last + 1):  # False past every other extent, so it stops inside the volume
            last += 1
        out[value] = (first, last)
    return out


def keep_main_extent(labels: np.ndarray, confidence: np.ndarray | None, values: list[int],
                     spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """Per class, drop its voxels on slices (axis 0) outside its main extent, grown over the slices it shares
    with the other classes (module doc)."""
    profiles = class_profiles(labels, confidence, values, spacing_zyx)
    present = {v: p for v, p in profiles.items() if p.max() > 0}
    if not present:
        return labels
    start = co_occurrence_slice(present)
    extents = {value: main_extent(profile, start) for value, profile in present.items()}
    occupied = {value: occupied_extent(present[value], *extent) for value, extent in extents.items()}
    out = labels.copy()
    for value, (first, last) in extend_into_shared_slices(extents, occupied).items():
        for outside in (out[:first], out[last + 1:]):
            outside[outside == value] = 0
    return out


def clean_labels(labels: np.ndarray, confidence: np.ndarray | None, values: list[int],
                 spacing_zyx: tuple[float, float, float], cleanup: str) -> np.ndarray:
    """Apply the named clean-up (model_card.CLEANUPS) to a (z, y, x) label array whose axis 0 is the body axis."""
    if cleanup == "extent":
        labels = keep_main_extent(labels, confidence, values, spacing_zyx)
        return keep_plausible_components(labels, confidence, values, spacing_zyx)
    if cleanup == "largest":
        return keep_largest_component(labels, values)
    if cleanup == "components":
        return keep_plausible_components(labels, confidence, values, spacing_zyx)
    if cleanup != "none":
        raise ValueError(f"unknown clean-up '{cleanup}'")
    return labels


def clean_label_image(labels: sitk.Image, confidence: sitk.Image | None, values: list[int], cleanup: str) -> sitk.Image:
    """``clean_labels`` on a label image (and the confidence image ``segment_image`` returns), same grid out.

    Any orientation: like ``segment_image``, it cleans on the canonical grid (axis 0 = the body axis).
    """
    canonical, restore = to_canonical(labels)
    weight = None if confidence is None else sitk.GetArrayFromImage(to_canonical(confidence)[0])
    cleaned = sitk.GetImageFromArray(clean_labels(sitk.GetArrayFromImage(canonical), weight, values,
                                                  canonical.GetSpacing()[::-1], cleanup))
    cleaned.CopyInformation(canonical)
    return restore(cleaned)
