"""The model card: what a checkpoint is, stored as JSON inside it.

It names the base model (and the SHA-256 of its weights), LoRA settings, head, classes and the exact
preprocessing, so inference can never silently differ from training.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .backbones import BACKBONE_NAMES
from .classes import SegmentClass, classes_from_dicts
from .errors import CheckpointError
from .heads import HEAD_NAMES
from .model import MODES

__all__ = ["ModelCard", "Preprocessing", "Postprocessing", "FORMAT_VERSION", "CT_WINDOW", "REFINEMENTS", "CLEANUPS"]

FORMAT_VERSION = 1
CT_WINDOW = (-125.0, 275.0)  # SAMed's abdominal window (HU)


@dataclass
class Preprocessing:
    """How a volume becomes model input. Shared by training and inference (SAMedLib.preprocessing)."""

    modality: str = "CT"  # "CT": fixed HU window; "MR": percentiles of non-zero voxels
    window: tuple[float, float] = CT_WINDOW
    percentiles: tuple[float, float] = (0.5, 99.5)
    inplane: str = "spacing"  # "spacing": fixed mm per pixel centred on the slice; "stretch": slice -> input size
    pixel_spacing_mm: float = 1.6
    input_size: int = 256
    # In-plane resolution (FWHM, mm) the model was trained at: finer slices are smoothed to it before
    # resampling, so a model trained on a 3 mm scan sees a 0.98 mm scan as it saw its training data
    # (measured: that gap alone cost 0.2 mean Dice). Set by training; None: no smoothing (older cards).
    resolution_mm: float | None = None

    def __post_init__(self):
        self.window = tuple(float(v) for v in self.window)
        self.percentiles = tuple(float(v) for v in self.percentiles)
        if self.modality not in ("CT", "MR"):
            raise ValueError(f"modality must be CT or MR, got '{self.modality}'")
        if self.window[0] >= self.window[1]:
            raise ValueError(f"CT window must be (low, high) with low < high, got {self.window}")
        if not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(f"MR percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        if self.inplane not in ("spacing", "stretch"):
            raise ValueError(f"inplane must be 'spacing' or 'stretch', got '{self.inplane}'")
        if self.pixel_spacing_mm <= 0:
            raise ValueError(f"pixel_spacing_mm must be positive, got {self.pixel_spacing_mm}")
        if self.resolution_mm is not None and self.resolution_mm <= 0:
            raise ValueError(f"resolution_mm must be positive, got {self.resolution_mm}")


REFINEMENTS = ("none", "box", "box+point")
CLEANUPS = ("none", "components", "extent", "largest")


@dataclass
class Postprocessing:
    """What happens after the prompt-free head, at inference (SAMedLib.refinement, SAMedLib.cleanup)."""

    # Self-prompted refinement: each class's coarse mask on a slice gives a box (+ a point) that prompts the
    # base model's pretrained decoder, which draws the boundary. Chosen at training time on validation slices.
    refinement: str = "none"
    # Per class name, a choice that overrides ``refinement`` (written by ``samed train``: ``box`` unless validation
    # clearly prefers another, see trainer.REFINEMENT_MARGIN). Classes not named use ``refinement``.
    refinement_by_class: dict[str, str] = field(default_factory=dict)
    box_margin_mm: float = 8.0  # the head under-segments: a box grown by ~6-13 mm beat a tight one (probe)
    # 3D clean-up of each class: "components" keeps plausible components (size x confidence), "extent" first
    # cuts each class's z-profile at deep waists (false positives 3D-connected to the organ), then does
    # "components"; "largest" keeps only the largest component, "none" keeps everything (SAMedLib.cleanup).
    cleanup: str = "none"
    # After the clean-up, slices where the head missed a refined class between slices where it found it are
    # prompted from the neighbouring slice's boxes (SAMedLib.gap_fill). Needs refinement (the base decoder).
    fill_gaps: bool = True

    def class_refinements(self, class_names: list[str]) -> list[str]:
        """The refinement of each class, in class order."""
        return [self.refinement_by_class.get(name, self.refinement) for name in class_names]

    def __post_init__(self):
        for choice in (self.refinement, *self.refinement_by_class.values()):
            if choice not in REFINEMENTS:
                raise ValueError(f"refinement must be one of {', '.join(REFINEMENTS)}, got '{choice}'")
        if self.cleanup not in CLEANUPS:
            raise ValueError(f"cleanup must be one of {', '.join(CLEANUPS)}, got '{self.cleanup}'")
        if self.box_margin_mm < 0:
            raise ValueError(f"box_margin_mm must be >= 0, got {self.box_margin_mm}")


@dataclass
class ModelCard:
    base_name: str
    base_sha256: str
    input_size: int
    head: str
    mode: str
    classes: list[SegmentClass]
    preprocessing: Preprocessing
    lora_rank: int | None = None
    lora_alpha: float | None = None
    base_file_name: str | None = None
    encoder_config: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    # Cards written before post-processing existed read as none/none: inference does what they were tested with.
    postprocessing: Postprocessing = field(default_factory=Postprocessing)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.base_name not in BACKBONE_NAMES:
            raise CheckpointError(f"model card names unknown base model '{self.base_name}'")
        if self.head not in HEAD_NAMES:
            raise CheckpointError(f"model card names unknown head '{self.head}'")
        if self.mode not in MODES:
            raise CheckpointError(f"model card names unknown mode '{self.mode}'")
        if not self.classes:
            raise CheckpointError("model card has no classes")
        if self.preprocessing.input_size != self.input_size:
            raise CheckpointError("model card: preprocessing input size differs from the model's input size")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["classes"] = [c.to_dict() for c in self.classes]
        d["preprocessing"]["window"] = list(self.preprocessing.window)
        d["preprocessing"]["percentiles"] = list(self.preprocessing.percentiles)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelCard":
        try:
            version = int(d.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise CheckpointError(f"model card format version {version} is not supported "
                                      f"(this SAMed reads version {FORMAT_VERSION})")
            fields = dict(d)
            fields["classes"] = classes_from_dicts(d["classes"])
            fields["preprocessing"] = Preprocessing(**d["preprocessing"])
            fields["postprocessing"] = Postprocessing(**d.get("postprocessing", {}))
            return cls(**fields)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"invalid model card: {exc.__class__.__name__}: {exc}") from exc
