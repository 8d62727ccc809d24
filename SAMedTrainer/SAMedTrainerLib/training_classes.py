"""Training classes: one per distinct segment name across the pairs, with label values 1..N."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from SAMedLib.classes import SegmentClass
from SAMedMRML.segmentations import SegmentCodes, parse_terminology

from .pairs import as_pairs, segments_of

__all__ = ["TrainingClass", "normalize_segment_name", "derive_classes", "to_training_classes",
           "assign_label_values"]


@dataclass
class TrainingClass:
    """A class to train: segments named ``segment_name`` (case/space-insensitive) in any pair.

    The user edits name, colour and ``enabled``; the label value is given per run (``assign_label_values``),
    which turns it into the model's ``SegmentClass``.
    """

    segment_name: str
    name: str
    color: tuple[int, int, int]
    codes: SegmentCodes | None = None  # SNOMED CT type (and laterality)
    enabled: bool = True

    @property
    def key(self) -> str:
        return normalize_segment_name(self.segment_name)


def normalize_segment_name(name: str) -> str:
    return " ".join(str(name).split()).casefold()


def derive_classes(pairs: Sequence) -> list[TrainingClass]:
    """One class per distinct segment name across the pairs (same name = same class), in order of
    first appearance. Colour from the first segment of that name; SNOMED CT codes from its
    terminology when present, else from the known organ table by name."""
    classes: dict[str, TrainingClass] = {}
    for pair in as_pairs(pairs):
        if pair.segmentation is None:
            continue
        for _, segment in segments_of(pair.segmentation):
            name = " ".join(segment.GetName().split())
            key = normalize_segment_name(name)
            if not key or key in classes:
                continue
            color = tuple(int(round(255 * max(0.0, min(1.0, c)))) for c in segment.GetColor())
            codes = parse_terminology(segment.GetTerminology()) if segment.HasTerminology() else None
            classes[key] = TrainingClass(name, name, color, codes or _codes_of(SegmentClass.named(1, name)))
    return list(classes.values())


def to_training_classes(classes: Sequence) -> list[TrainingClass]:
    out = []
    for c in classes:
        if isinstance(c, TrainingClass):
            out.append(c)
        elif isinstance(c, SegmentClass):
            out.append(TrainingClass(c.name, c.name, tuple(c.color), _codes_of(c)))
        else:
            raise TypeError(f"classes must be TrainingClass or SegmentClass, got {type(c).__name__}")
    return out


def assign_label_values(classes: Sequence[TrainingClass]) -> list[tuple[TrainingClass, SegmentClass]]:
    """Enabled classes with label values 1..N in list order (also the overlap priority order)."""
    out = []
    for value, c in enumerate([c for c in classes if c.enabled], start=1):
        code, meaning, laterality = (c.codes.code, c.codes.meaning, c.codes.laterality) if c.codes else (None,) * 3
        out.append((c, SegmentClass(value, c.name.strip(), tuple(int(v) for v in c.color), code, meaning, laterality)))
    return out


def _codes_of(segment_class: SegmentClass) -> SegmentCodes | None:
    if not segment_class.snomed_code:
        return None
    return SegmentCodes(segment_class.snomed_code, segment_class.snomed_meaning, segment_class.laterality)
