"""Segmentation classes: label value, name, colour and optional SNOMED CT code.

A class list travels inside every checkpoint's model card, so inference always writes
the same values, names and colours that training used.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["SegmentClass", "parse_class_list", "classes_from_dicts", "KNOWN_ORGANS", "ANATOMICAL_STRUCTURE"]

# SNOMED CT category for every organ below ("Anatomical Structure").
ANATOMICAL_STRUCTURE = ("123037004", "Anatomical Structure")

# name -> (RGB 0..255, SNOMED CT code, code meaning, laterality (code, meaning) or None)
# Colours follow Slicer's GenericAnatomyColors where it has the organ.
KNOWN_ORGANS: dict[str, tuple[tuple[int, int, int], str, str, tuple[str, str] | None]] = {
    "spleen": ((157, 108, 162), "78961009", "Spleen", None),
    "kidney_right": ((185, 102, 83), "64033007", "Kidney", ("24028007", "Right")),
    "kidney_left": ((185, 102, 83), "64033007", "Kidney", ("7771000", "Left")),
    "gallbladder": ((139, 150, 98), "28231008", "Gallbladder", None),
    "liver": ((221, 130, 101), "10200004", "Liver", None),
    "stomach": ((216, 132, 105), "69695003", "Stomach", None),
    "aorta": ((224, 97, 76), "15825003", "Aorta", None),
    "pancreas": ((249, 180, 111), "15776009", "Pancreas", None),
}

# Distinct fallback colours for classes the table above does not know.
_FALLBACK_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                     (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


@dataclass(frozen=True)
class SegmentClass:
    """One foreground class. ``value`` is the label value written into label maps."""

    value: int
    name: str
    color: tuple[int, int, int]
    snomed_code: str | None = None
    snomed_meaning: str | None = None
    laterality: tuple[str, str] | None = None

    def __post_init__(self):
        if not (0 < int(self.value) < 65536):
            raise ValueError(f"class '{self.name}': label value must be in 1..65535, got {self.value}")
        if not self.name or not self.name.strip():
            raise ValueError(f"class with value {self.value} has an empty name")
        if len(self.color) != 3 or not all(0 <= int(c) <= 255 for c in self.color):
            raise ValueError(f"class '{self.name}': colour must be three integers 0..255, got {self.color}")

    @classmethod
    def named(cls, value: int, name: str, color: tuple[int, int, int] | None = None) -> "SegmentClass":
        """A class with colour and SNOMED code filled in from KNOWN_ORGANS when the name is known."""
        key = name.strip().lower().replace(" ", "_")
        known = KNOWN_ORGANS.get(key)
        if known is not None:
            rgb, code, meaning, laterality = known
            return cls(int(value), name.strip(), tuple(color or rgb), code, meaning, laterality)
        rgb = color or _FALLBACK_COLOURS[int(value) % len(_FALLBACK_COLOURS)]
        return cls(int(value), name.strip(), tuple(rgb))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["color"] = list(self.color)
        d["laterality"] = list(self.laterality) if self.laterality else None
        return d


def classes_from_dicts(items: list[dict]) -> list[SegmentClass]:
    out = [SegmentClass(int(d["value"]), d["name"], tuple(d["color"]), d.get("snomed_code"), d.get("snomed_meaning"),
                        tuple(d["laterality"]) if d.get("laterality") else None) for d in items]
    _check_unique(out)
    return out


def parse_class_list(text: str) -> list[SegmentClass]:
    """Parse ``"1:spleen,5:liver,52:aorta"`` into classes (colours/codes from KNOWN_ORGANS)."""
    classes = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        value, sep, name = part.partition(":")
        if not sep or not value.strip().isdigit() or not name.strip():
            raise ValueError(f"bad class entry '{part}': expected VALUE:NAME, e.g. 1:spleen")
        classes.append(SegmentClass.named(int(value), name))
    if not classes:
        raise ValueError(f"no classes in '{text}': expected VALUE:NAME[,VALUE:NAME...]")
    _check_unique(classes)
    return classes


def _check_unique(classes: list[SegmentClass]) -> None:
    values = [c.value for c in classes]
    names = [c.name for c in classes]
    if len(set(values)) != len(values):
        raise ValueError(f"duplicate label values in class list: {values}")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate class names in class list: {names}")
