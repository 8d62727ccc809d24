"""Export of a (volume, segmentation) pair to the files ``samed train`` reads: image and label map NRRD."""
from __future__ import annotations

import collections
from pathlib import Path

import SimpleITK as sitk

from SAMedLib.classes import SegmentClass
from SAMedMRML.segmentations import BINARY_LABELMAP, segmentation_to_labelmap
from SAMedMRML.volumes import volume_to_sitk

from .pairs import TrainingPair, node_name, segments_of
from .training_classes import TrainingClass, normalize_segment_name

__all__ = ["export_pair"]


def _segment_has_voxels(segment) -> bool:
    import numpy as np
    from vtk.util.numpy_support import vtk_to_numpy

    image = segment.GetRepresentation(BINARY_LABELMAP)
    if image is None:
        return True  # closed-surface-only segment: assume content, the export will tell
    e = image.GetExtent()
    if e[1] < e[0] or e[3] < e[2] or e[5] < e[4] or image.GetPointData().GetScalars() is None:
        return False
    return bool(np.any(vtk_to_numpy(image.GetPointData().GetScalars()) == segment.GetLabelValue()))


def _segment_values(pair: TrainingPair, valued: list[tuple[TrainingClass, SegmentClass]]) -> list[tuple[str, int]]:
    """(segment ID, value) in class priority order (then node order) for the segments of enabled classes."""
    by_key: dict[str, list[str]] = collections.defaultdict(list)
    for sid, segment in segments_of(pair.segmentation):
        by_key[normalize_segment_name(segment.GetName())].append(sid)
    return [(sid, sc.value) for tc, sc in valued for sid in by_key.get(tc.key, [])]


def export_pair(pair: TrainingPair, valued: list[tuple[TrainingClass, SegmentClass]], folder: Path,
                stem: str) -> tuple[Path, Path, dict[int, int], list[str]]:
    """Write ``<stem>_image.nrrd`` and ``<stem>_labels.nrrd``; returns paths, voxel count per value
    and problems (segments empty or outside the volume)."""
    import numpy as np
    from SAMedLib.volume_io import write_image

    segment_values = _segment_values(pair, valued)
    labels = segmentation_to_labelmap(pair.segmentation, pair.volume, segment_values)
    array = sitk.GetArrayViewFromImage(labels)
    counts = np.bincount(array.ravel(), minlength=max([v for _, v in segment_values], default=0) + 1)
    problems = []
    if segment_values and not counts[1:].any():
        has_content = any(_segment_has_voxels(pair.segmentation.GetSegmentation().GetSegment(sid))
                          for sid, _ in segment_values)
        if has_content:
            problems.append(f"segmentation '{node_name(pair.segmentation)}' does not overlap volume "
                            f"'{node_name(pair.volume)}': its segments lie outside the volume")
        else:
            problems.append(f"segmentation '{node_name(pair.segmentation)}' has only empty segments")
    image_path = write_image(volume_to_sitk(pair.volume), folder / f"{stem}_image.nrrd")
    labels_path = write_image(labels, folder / f"{stem}_labels.nrrd")
    return image_path, labels_path, {v: int(counts[v]) for v in range(1, len(counts))}, problems
