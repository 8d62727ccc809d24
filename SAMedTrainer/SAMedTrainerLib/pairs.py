"""Training pairs: a volume node and the segmentation node annotating it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["TrainingPair", "as_pairs", "node_name", "segments_of"]


@dataclass
class TrainingPair:
    volume: Any  # vtkMRMLScalarVolumeNode
    segmentation: Any  # vtkMRMLSegmentationNode


def as_pairs(pairs) -> list[TrainingPair]:
    out = []
    for p in pairs or []:
        if isinstance(p, TrainingPair):
            out.append(p)
        else:
            volume, segmentation = p
            out.append(TrainingPair(volume, segmentation))
    return out


def node_name(node) -> str:
    return node.GetName() if node is not None and node.GetName() else "(unnamed)"


def segments_of(segmentation_node):
    """(segment ID, segment) of every segment, in node order."""
    segmentation = segmentation_node.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        yield segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i)
