"""Training classes: one per distinct segment name across the pairs, with label values 1..N."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from SAMedLib.classes import SegmentClass
from SAMedMRML.segmentations import parse_terminology

from .pairs import as_pairs, segments_of

__all__ = ["TrainingClass", "normalize_segment_name", "derive_classes", "to_training_classes",
           "assign_label_values"]


@dataclass
class TrainingClass:
    """A class to train: segments named ``segment_name`` (case/space-insensitive) in any pair."""

    segment_name: str
    name: str
    color: tuple[int, int, int]
    snomed_code: str | None = None
    snomed_meaning: str | None = None
    laterality: tuple[str, str] | None = None
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
            if codes is not None:
                code, meaning, laterality = codes.code, codes.meaning, codes.laterality
            else:
                known = SegmentClass.named(1, name)
                code, meaning, laterality = known.snomed_code, known.snomed_meaning, known.laterality
            classes[key] = TrainingClass(name, name, color, code, meaning, laterality)
    return list(classes.values())


def to_training_classes(classes: Sequence) -> list[TrainingClass]:
    out = []
    for c in classes:
        if isinstance(c, TrainingClass):
            out.append(c)
        elif isinstance(c, SegmentClass):
            out.append(TrainingClass(c.name, c.name, tuple(c.color), c.snomed_code, c.snomed_meaning, c.laterality))
        else:
            raise TypeError(f"classes must be TrainingClass or SegmentClass, got {type(c).__name__}")
    return out


def assign_label_values(classes: Sequence[TrainingClass]) -> list[tuple[TrainingClass, SegmentClass]]:
    """Enabled classes with label values 1..N in list order (also the overlap priority order)."""
    out = []
    for value, c in enumerate([c for c in classes if c.enabled], start=1):
        out.append((c, SegmentClass(value, c.name.strip(), tuple(int(v) for v in c.color), c.snomed_code,
                                    c.snomed_meaning, c.laterality)))
    return out
