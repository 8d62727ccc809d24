"""Training augmentation as one affine per view, composed with the native->model-grid affine.

Geometric changes (SAMed's random 90-degree rotation + flip, small rotations, random scale and shift)
only change the sampling affine, so image and labels are resampled once, together. Intensity jitter
(contrast, brightness, gamma, noise) then acts on the resampled image.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

__all__ = ["AugmentationConfig", "ViewAugmentation", "sample_view", "apply_intensity", "apply_class_levels",
           "apply_tissue_shift", "tissue_weight"]


@dataclass(frozen=True)
class AugmentationConfig:
    # SAMed's random rot90 + flip (its p=0.5) is off by default: volumes are reoriented to one canonical
    # orientation, so where an organ lies is a cue worth keeping. Measured on the one-volume benchmark
    # (seed 7): p=0.5 -> spleen 0.41 (taken for liver), p=0 -> spleen 0.91, mean Dice 0.71 -> 0.84.
    p_rot90_flip: float = 0.0
    p_small_rotation: float = 0.25  # SAMed: rotation in [-20, 20) degrees with p=0.25
    max_rotation_deg: float = 20.0
    scale_range: tuple[float, float] = (0.8, 1.25)  # zoom of the physical field of view
    max_shift: float = 0.08  # fraction of the model grid
    # Absent-organ views: a far shift moves part of the body (and whole organs) out of the model's field of
    # view, so the head also learns "this organ is not here" from a volume whose every slice shows it.
    p_far_shift: float = 0.2
    far_shift_range: tuple[float, float] = (0.35, 0.75)  # fraction of the model grid, in a random direction
    contrast_range: tuple[float, float] = (0.75, 1.35)
    brightness: float = 0.1
    gamma_range: tuple[float, float] = (0.7, 1.5)
    noise_std: float = 0.02
    # Extra Gaussian blur (model pixels) on some views: tolerance to scans smoother than the training scan.
    blur_sigma_range: tuple[float, float] = (0.3, 1.2)
    p_blur: float = 0.25
    # Per-class intensity level (window units: 0 = -125 HU, 1 = 275 HU on SAMed's window), drawn once per view
    # and class: the class's voxels are shifted so that their mean lands there. It imitates contrast phases
    # in both directions without knowing which class is a vessel: an aorta at ~40 HU without contrast, ~150 HU
    # portal-venous, 250-400 HU arterial (saturated at the top of the window); parenchyma shifted by tens of
    # HU. 0.35..1.0 = 15 HU..saturated. The plain view of every slice keeps the scan's own contrast.
    class_level_range: tuple[float, float] = (0.35, 1.0)
    p_class_level: float = 1.0  # measured (offsets, stop 8): 0.5 left the contrast-enhanced aorta unrecognised
    # Tissue shift: the unlabeled soft tissue (kidneys, bowel wall, muscle, vessels nobody labeled) moved by one
    # offset per view, in both directions. Contrast enhances the whole perfused body, not only the labeled
    # organs: class levels alone never show an organ darker than enhanced surroundings (ct_dicom's unlabeled
    # soft tissue: median 37 HU, 9 % above 100 HU; ct_3mm's: 18 HU, 1 %). Window units: -0.1..0.25 = -40..+100 HU.
    # Fat, air and bone keep their values (tissue_weight). Drawn after every other choice, so p = 0 leaves a
    # seed's views exactly as they were before the option existed.
    tissue_shift_range: tuple[float, float] = (-0.1, 0.25)
    p_tissue_shift: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ViewAugmentation:
    """The random choices for one training view (hashable: part of the embedding-cache key)."""

    matrix: tuple[float, float, float, float]  # 2x2 rotation/flip/scale in normalised model coordinates
    shift: tuple[float, float]
    contrast: float = 1.0
    brightness: float = 0.0
    gamma: float = 1.0
    noise_seed: int = -1  # -1: no noise
    class_levels: tuple[float, ...] = ()  # mean intensity each foreground class (index 1..C) is moved to
    blur_sigma: float = 0.0  # model pixels, after resampling
    tissue_shift: float = 0.0  # window units added to unlabeled soft tissue (apply_tissue_shift)

    @classmethod
    def identity(cls) -> "ViewAugmentation":
        return cls((1.0, 0.0, 0.0, 1.0), (0.0, 0.0))

    def compose(self, theta: torch.Tensor) -> torch.Tensor:
        """native<-model affine followed by this view's model-grid transform."""
        a = torch.tensor([[self.matrix[0], self.matrix[1], self.shift[0]],
                          [self.matrix[2], self.matrix[3], self.shift[1]], [0.0, 0.0, 1.0]])
        full = torch.cat([theta, torch.tensor([[0.0, 0.0, 1.0]])]) @ a
        return full[:2]


def sample_view(rng: np.random.Generator, config: AugmentationConfig, num_classes: int = 0) -> ViewAugmentation:
    matrix = np.eye(2)
    if rng.random() < config.p_rot90_flip:
        k = int(rng.integers(4))
        rot = np.array([[0.0, -1.0], [1.0, 0.0]])
        matrix = np.linalg.matrix_power(rot, k) @ matrix
        flip_axis = int(rng.integers(2))
        matrix = np.diag([-1.0, 1.0] if flip_axis == 0 else [1.0, -1.0]) @ matrix
    elif rng.random() < config.p_small_rotation / max(1e-9, 1.0 - config.p_rot90_flip):
        angle = math.radians(rng.uniform(-config.max_rotation_deg, config.max_rotation_deg))
        matrix = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]) @ matrix
    scale = math.exp(rng.uniform(math.log(config.scale_range[0]), math.log(config.scale_range[1])))
    matrix = matrix / scale  # sampling a smaller region = zooming in
    shift = rng.uniform(-config.max_shift, config.max_shift, size=2) * 2
    if rng.random() < config.p_far_shift:
        angle = rng.uniform(0, 2 * math.pi)
        shift = 2 * rng.uniform(*config.far_shift_range) * np.array([math.cos(angle), math.sin(angle)])
    view = ViewAugmentation(
        tuple(float(v) for v in matrix.ravel()), (float(shift[0]), float(shift[1])),
        contrast=float(rng.uniform(*config.contrast_range)),
        brightness=float(rng.uniform(-config.brightness, config.brightness)),
        gamma=float(math.exp(rng.uniform(math.log(config.gamma_range[0]), math.log(config.gamma_range[1])))),
        noise_seed=int(rng.integers(2**31)) if config.noise_std > 0 else -1,
        class_levels=tuple(float(v) for v in rng.uniform(*config.class_level_range, size=num_classes))
        if num_classes and rng.random() < config.p_class_level else (),
        blur_sigma=float(rng.uniform(*config.blur_sigma_range)) if rng.random() < config.p_blur else 0.0)
    if config.p_tissue_shift > 0 and rng.random() < config.p_tissue_shift:
        view = replace(view, tissue_shift=float(rng.uniform(*config.tissue_shift_range)))
    return view


def apply_class_levels(image: torch.Tensor, labels: torch.Tensor, view: ViewAugmentation) -> torch.Tensor:
    """Shift each class's voxels so that their mean is the view's level for it (native slice, before
    resampling; texture kept), clipped to [0, 1]."""
    if not view.class_levels:
        return image
    index = labels.long().clamp(max=len(view.class_levels))
    offsets = torch.zeros(len(view.class_levels) + 1, dtype=image.dtype)
    for c, level in enumerate(view.class_levels, start=1):
        inside = index == c
        if inside.any():
            offsets[c] = level - image[inside].mean()
    return (image + offsets[index]).clamp(0, 1)


def tissue_weight(image: torch.Tensor) -> torch.Tensor:
    """How much of a tissue shift each voxel takes (window units in, 0..1 out): 1 for soft tissue (-25..115 HU on
    SAMed's window), ramping to 0 at fat (-85 HU) and at dense bone (275 HU). The ramps are gentle enough that the
    remapping stays monotone for every shift in the default range (slopes 6.7 and 2.5 per window unit)."""
    rise = ((image - 0.10) / 0.15).clamp(0, 1)
    fall = ((1.0 - image) / 0.40).clamp(0, 1)
    return rise * fall


def apply_tissue_shift(image: torch.Tensor, labels: torch.Tensor, view: ViewAugmentation) -> torch.Tensor:
    """Add the view's tissue shift to the soft tissue outside every class (native slice, before resampling)."""
    if not view.tissue_shift:
        return image
    outside = (labels == 0).to(image.dtype)
    return (image + view.tissue_shift * tissue_weight(image) * outside).clamp(0, 1)


def apply_intensity(image: torch.Tensor, view: ViewAugmentation, noise_std: float) -> torch.Tensor:
    """Contrast about the mean, brightness shift, gamma and Gaussian noise on a [0,1] image, clipped to [0,1]."""
    if (view.contrast, view.brightness, view.gamma, view.noise_seed) == (1.0, 0.0, 1.0, -1):
        return image
    mean = image.mean()
    out = ((image - mean) * view.contrast + mean + view.brightness).clamp(0, 1) ** view.gamma
    if view.noise_seed >= 0 and noise_std > 0:
        gen = torch.Generator().manual_seed(view.noise_seed)
        out = out + noise_std * torch.randn(out.shape, generator=gen)
    return out.clamp(0, 1)
