"""The checks that refuse bad training input before anything starts."""
from __future__ import annotations

from collections.abc import Sequence

from SAMedMRML.volumes import VolumeNodeError, check_parent_transform, volume_array

from .pairs import TrainingPair, as_pairs, node_name, segments_of
from .training_classes import TrainingClass, normalize_segment_name

__all__ = ["TrainingInputError", "validate_inputs"]


class TrainingInputError(ValueError):
    """Bad input found before training started; ``problems`` lists each one."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("Cannot start training:\n- " + "\n- ".join(self.problems))


def _pair_problems(pair: TrainingPair, label: str) -> list[str]:
    problems = []
    if pair.volume is None:
        problems.append(f"{label}: no volume selected")
    else:
        try:
            volume_array(pair.volume)
            check_parent_transform(pair.volume)
        except VolumeNodeError as exc:
            problems.append(f"{label}: {exc}")
    if pair.segmentation is None:
        problems.append(f"{label}: no segmentation selected")
    elif not pair.segmentation.IsA("vtkMRMLSegmentationNode"):
        problems.append(f"{label}: '{node_name(pair.segmentation)}' is not a segmentation")
    else:
        if pair.segmentation.GetSegmentation().GetNumberOfSegments() == 0:
            problems.append(f"{label}: segmentation '{node_name(pair.segmentation)}' has no segments")
        try:
            check_parent_transform(pair.segmentation)
        except VolumeNodeError as exc:
            problems.append(f"{label}: {exc}")
    return problems


def validate_inputs(pairs: Sequence, classes: Sequence[TrainingClass], validation=None) -> None:
    """Structural checks that need no export (see ``TrainingInputError``)."""
    pairs = as_pairs(pairs)
    problems = []
    if not pairs:
        problems.append("no training pairs: add at least one (volume, segmentation) pair")
    for i, pair in enumerate(pairs, start=1):
        problems += _pair_problems(pair, f"pair {i}")
    if validation is not None:
        problems += _pair_problems(as_pairs([validation])[0], "validation pair")
    enabled = [c for c in classes if c.enabled]
    if not enabled:
        problems.append("no classes selected: tick at least one class")
    names = [normalize_segment_name(c.name) for c in enabled]
    for n in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"two classes have the display name '{n}': names must be unique")
    for c in enabled:
        if not c.name.strip():
            problems.append(f"class for segments '{c.segment_name}' has an empty name")
        elif any(ch in c.name for ch in ",:"):
            problems.append(f"class name '{c.name}' must not contain ',' or ':'")
    present = {normalize_segment_name(segment.GetName())
               for p in pairs if p.segmentation is not None and p.segmentation.IsA("vtkMRMLSegmentationNode")
               for _, segment in segments_of(p.segmentation)}
    for c in enabled:
        if c.key not in present:
            problems.append(f"class '{c.name}' is present in no pair (no segment named '{c.segment_name}')")
    if problems:
        raise TrainingInputError(problems)
