"""From a volume to model input and back: one implementation shared by training and inference.

Intensity: CT is clipped to a fixed HU window and scaled to [0, 1]; MR is scaled between percentiles of
its non-zero voxels. In-plane: each axial slice of the canonical (LPS) volume is resampled onto the
model's square grid, either at a fixed physical pixel size centred on the slice (``inplane="spacing"``, so
organs have the same size in pixels whatever the scanner's field of view) or stretched to fill it
(``"stretch"``, SAMed's behaviour). The mapping is an axis-aligned affine used by ``torch.grid_sample``
in both directions, so predictions go back onto exactly the slice they came from. Before resampling, a
slice finer than the model's training resolution is smoothed to it (Gaussian, FWHM arithmetic), which is
also the antialiasing of the downsampling.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .model_card import Preprocessing

__all__ = ["intensity_range", "normalize_intensity", "slice_to_model_theta", "to_model_grid", "from_model_grid",
           "model_input", "gaussian_blur", "smoothing_sigmas"]

FWHM_PER_SIGMA = 2.3548200450309493  # 2 * sqrt(2 * ln 2)


def intensity_range(volume: np.ndarray, prep: Preprocessing) -> tuple[float, float]:
    """The (low, high) raw intensities that map to 0 and 1 for this volume."""
    if prep.modality == "CT":
        return prep.window
    nonzero = np.asarray(volume)[np.asarray(volume) != 0]
    if nonzero.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(nonzero, prep.percentiles))
    return low, max(high, low + 1e-6)


def normalize_intensity(volume: np.ndarray, prep: Preprocessing,
                        value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Raw intensities -> float32 in [0, 1] (CT window or MR percentiles of the whole volume).

    Pass ``value_range`` (from ``intensity_range`` on the whole volume) when normalising part of it.
    """
    low, high = value_range or intensity_range(volume, prep)
    volume = np.asarray(volume, dtype=np.float32)
    out = (np.clip(volume, low, high) - low) / (high - low)
    if prep.modality == "MR":
        out[volume == 0] = 0.0  # background stays background
    return out.astype(np.float32, copy=False)


def slice_to_model_theta(slice_shape: tuple[int, int], spacing_yx: tuple[float, float],
                         prep: Preprocessing) -> torch.Tensor:
    """Affine (2x3, normalised coordinates) taking model-grid positions to positions in the native slice.

    With ``align_corners=False`` a normalised coordinate v on an axis of n pixels of size s is the
    physical offset v*n*s/2 from the centre, so the scale per axis is (model extent) / (slice extent).
    """
    height, width = slice_shape
    sy, sx = spacing_yx
    if prep.inplane == "stretch":
        scale_x = scale_y = 1.0
    else:
        extent = prep.input_size * prep.pixel_spacing_mm
        scale_x, scale_y = extent / (width * sx), extent / (height * sy)
    return torch.tensor([[scale_x, 0.0, 0.0], [0.0, scale_y, 0.0]], dtype=torch.float32)


def to_model_grid(slices: torch.Tensor, theta: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """(B,C,H,W) native slices -> (B,C,size,size) on the model grid (outside the slice: 0)."""
    grid = F.affine_grid(theta.to(slices).unsqueeze(0).expand(slices.shape[0], -1, -1),
                         [slices.shape[0], slices.shape[1], size, size], align_corners=False)
    return F.grid_sample(slices, grid, mode=mode, padding_mode="zeros", align_corners=False)


def from_model_grid(maps: torch.Tensor, theta: torch.Tensor, slice_shape: tuple[int, int],
                    mode: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor]:
    """(B,C,h,w) model-grid maps -> (B,C,H,W) on the native slice, plus a (H,W) mask of pixels the grid covers."""
    inverse = torch.zeros_like(theta)
    inverse[0, 0], inverse[1, 1] = 1.0 / theta[0, 0], 1.0 / theta[1, 1]
    inverse[:, 2] = -theta[:, 2] / torch.diagonal(theta[:, :2])
    height, width = slice_shape
    grid = F.affine_grid(inverse.to(maps).unsqueeze(0).expand(maps.shape[0], -1, -1),
                         [maps.shape[0], maps.shape[1], height, width], align_corners=False)
    inside = (grid[0].abs() <= 1.0).all(dim=-1)
    return F.grid_sample(maps, grid, mode=mode, padding_mode="border", align_corners=False), inside


def smoothing_sigmas(spacing_yx: tuple[float, float], prep: Preprocessing) -> tuple[float, float]:
    """Gaussian sigmas (native pixels, y and x) that bring a slice of this spacing to the model's resolution.

    Target FWHM = ``prep.resolution_mm`` (at least the model pixel); a pixel of size s counts as FWHM s,
    so sigma = sqrt(target^2 - s^2) / 2.355 / s, and 0 where the slice is already that coarse. A card
    without a resolution (trained before resolution matching, or an imported SAMed model) is not smoothed:
    inference does what its training did.
    """
    if prep.resolution_mm is None:
        return 0.0, 0.0
    target = max(prep.resolution_mm, prep.pixel_spacing_mm if prep.inplane == "spacing" else 0.0)
    return tuple(float(np.sqrt(max(target**2 - s**2, 0.0)) / FWHM_PER_SIGMA / s) for s in spacing_yx)


def gaussian_blur(images: torch.Tensor, sigma_y: float, sigma_x: float) -> torch.Tensor:
    """Separable Gaussian blur of (B,C,H,W) with sigmas in pixels (reflect padding; sigma < 0.2: unchanged)."""
    for axis, sigma in ((2, sigma_y), (3, sigma_x)):
        if sigma < 0.2:
            continue
        radius = min(int(np.ceil(3 * sigma)), images.shape[axis] - 1)
        taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device) / sigma) ** 2)
        kernel = (taps / taps.sum()).view(1, 1, -1, 1) if axis == 2 else (taps / taps.sum()).view(1, 1, 1, -1)
        padding = (0, 0, radius, radius) if axis == 2 else (radius, radius, 0, 0)
        channels = images.shape[1]
        images = F.conv2d(F.pad(images, padding, mode="reflect"), kernel.expand(channels, 1, -1, -1), groups=channels)
    return images


def model_input(normalized_slices: torch.Tensor, theta: torch.Tensor, prep: Preprocessing,
                spacing_yx: tuple[float, float]) -> torch.Tensor:
    """(B,H,W) normalised native slices -> (B,3,S,S) encoder input (grey copied into three channels).

    Smoothed to the model's resolution, then resampled onto the model grid by ``theta``.
    """
    smoothed = gaussian_blur(normalized_slices.unsqueeze(1), *smoothing_sigmas(spacing_yx, prep))
    resampled = to_model_grid(smoothed, theta, prep.input_size)
    return resampled.expand(-1, 3, -1, -1).contiguous()
