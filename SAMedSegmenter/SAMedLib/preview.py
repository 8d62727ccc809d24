"""A picture to look at: a montage of a few axial slices with each segment filled and outlined in its colour
(and a reference's outlines dashed), for ``samed segment --preview``, ``samed evaluate --preview`` and the demo.

matplotlib (Agg backend: files only, no display) is imported only when a picture is drawn, so the core
imports without it; it is the optional extra ``samed-slicer[preview]``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .classes import SegmentClass
from .errors import SAMedError
from .volume_io import atomic_output_path, resample_to_reference, to_canonical

__all__ = ["PreviewError", "Montage", "montage_slices", "write_preview", "check_preview_path", "require_matplotlib"]

DEFAULT_SLICES = 4
FILL_OPACITY = 0.35  # the prediction's fill; outlines are opaque


class PreviewError(SAMedError, ValueError):
    """A preview cannot be drawn (matplotlib missing, not a .png path)."""


def require_matplotlib() -> None:
    """Fail before minutes of work if the picture could not be drawn at the end."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise PreviewError("--preview needs matplotlib: pip install matplotlib "
                           "(or pip install 'samed-slicer[preview]')") from exc


def check_preview_path(path: str | os.PathLike) -> None:
    if not Path(path).name.lower().endswith(".png"):
        raise PreviewError(f"{path}: a preview must be a .png file")


@dataclass
class Montage:
    """The slices to draw, all on the image's canonical (LPS) grid: rows run anterior to posterior and
    columns from the patient's right to left, so drawn as arrays they are in radiological view."""

    image: np.ndarray  # (n, H, W) intensities
    labels: np.ndarray  # (n, H, W) label values
    reference: np.ndarray | None  # (n, H, W) label values or None
    slice_indices: list[int]  # axial index in the canonical volume, inferior to superior
    depth: int
    spacing_yx: tuple[float, float]


def montage_slices(image: sitk.Image, labels: sitk.Image, reference: sitk.Image | None = None,
                   values: Sequence[int] | None = None, count: int = DEFAULT_SLICES) -> Montage:
    """Pick ``count`` axial slices spread over those that hold a label (of ``values``, in either map).

    Label maps are resampled onto the image in physical space: files of the same scan may store their voxels
    in another order or with flipped axes.
    """
    canonical, _ = to_canonical(image)
    on_image = [sitk.GetArrayFromImage(resample_to_reference(m, canonical))
                for m in (labels, reference) if m is not None]
    foreground = np.zeros(on_image[0].shape[0], bool)
    for array in on_image:
        present = np.isin(array, list(values)) if values is not None else array > 0
        foreground |= present.reshape(len(present), -1).any(1)
    depth = len(foreground)
    held = np.flatnonzero(foreground) if foreground.any() else np.arange(depth)
    count = max(1, min(count, len(held)))
    # Evenly over the labelled range, leaving out its first and last slice (often a sliver) when there is room.
    picks = (np.linspace(0, len(held) - 1, count + 2)[1:-1] if len(held) >= count + 2
             else np.linspace(0, len(held) - 1, count))
    indices = sorted({int(held[int(round(p))]) for p in picks})
    volume = sitk.GetArrayViewFromImage(canonical)
    spacing_x, spacing_y = canonical.GetSpacing()[:2]
    return Montage(image=np.asarray(volume[indices], dtype=np.float32), labels=on_image[0][indices],
                   reference=on_image[1][indices] if reference is not None else None, slice_indices=indices,
                   depth=depth, spacing_yx=(spacing_y, spacing_x))


def write_preview(image: sitk.Image, labels: sitk.Image, classes: Sequence[SegmentClass], path: str | os.PathLike,
                  reference: sitk.Image | None = None, window: tuple[float, float] | None = None,
                  count: int = DEFAULT_SLICES, title: str | None = None) -> Path:
    """Draw the montage to ``path`` (.png, written atomically) and return the path.

    ``window``: the intensity range shown from black to white (default: 0.5-99.5 percentiles of the slices).
    """
    check_preview_path(path)
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    montage = montage_slices(image, labels, reference, [c.value for c in classes], count)
    low, high = window if window is not None else np.percentile(montage.image, (0.5, 99.5))
    rows, cols = _crop(montage)
    n, height, width = montage.image[:, rows, cols].shape
    spacing_y, spacing_x = montage.spacing_yx
    extent = (0, width * spacing_x, height * spacing_y, 0)  # millimetres: pixels keep their true shape
    panel_height = 3.2 * (height * spacing_y) / (width * spacing_x)
    figure = Figure(figsize=(3.2 * n, panel_height + 0.9), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, n, squeeze=False)[0]
    for k, ax in enumerate(axes):
        predicted = montage.labels[k][rows, cols]
        ax.imshow(montage.image[k][rows, cols], cmap="gray", vmin=low, vmax=high, extent=extent,
                  interpolation="bilinear")
        fill = np.zeros((height, width, 4), np.float32)
        for cls in classes:
            fill[predicted == cls.value] = (*np.array(cls.color) / 255.0, FILL_OPACITY)
        ax.imshow(fill, extent=extent, interpolation="nearest")
        for cls in classes:
            colour = tuple(np.array(cls.color) / 255.0)
            _outline(ax, predicted == cls.value, colour, "solid", extent)
            if montage.reference is not None:
                _outline(ax, montage.reference[k][rows, cols] == cls.value, colour, (0, (2, 2)), extent)
            _name(ax, predicted == cls.value, cls.name, extent)
        ax.set_title(f"axial slice {montage.slice_indices[k] + 1} of {montage.depth}", fontsize=9, color="white")
        ax.text(0.02, 0.5, "R", color="yellow", fontsize=8, transform=ax.transAxes, va="center")
        ax.text(0.98, 0.5, "L", color="yellow", fontsize=8, transform=ax.transAxes, va="center", ha="right")
        ax.set_axis_off()
    handles = [Line2D([], [], color=tuple(np.array(c.color) / 255.0), lw=3, label=c.name) for c in classes]
    if montage.reference is not None:
        handles += [Line2D([], [], color="white", lw=1.5, label="prediction"),
                    Line2D([], [], color="white", lw=1.5, ls=(0, (2, 2)), label="reference")]
    legend = figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False,
                           labelcolor="white")
    legend.set_in_layout(True)
    if title:
        figure.suptitle(title, color="white", fontsize=10)
    figure.set_facecolor("black")
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    with atomic_output_path(path) as tmp:
        figure.savefig(tmp, format="png", facecolor="black")
    return Path(path)


def _outline(ax, mask: np.ndarray, colour, style, extent) -> None:
    if mask.any():
        height, width = mask.shape
        # Contour through pixel centres, in the same millimetre frame as the image.
        xs = (np.arange(width) + 0.5) * (extent[1] / width)
        ys = (np.arange(height) + 0.5) * (extent[2] / height)
        ax.contour(xs, ys, mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.3,
                   linestyles=[style])


def _crop(montage: Montage, margin: float = 0.25) -> tuple[slice, slice]:
    """Rows and columns around every drawn label (plus a margin for context); the whole slice if none."""
    maps = [montage.labels] + ([montage.reference] if montage.reference is not None else [])
    present = np.any([m > 0 for m in maps], axis=(0, 1))
    if not present.any():
        return slice(None), slice(None)
    spans = []
    for axis in (1, 0):
        hits = np.flatnonzero(present.any(axis))
        size, pad = present.shape[1 - axis], int(margin * (hits[-1] - hits[0] + 1))
        spans.append(slice(max(0, hits[0] - pad), min(size, hits[-1] + 1 + pad)))
    return spans[0], spans[1]


def _name(ax, mask: np.ndarray, name: str, extent) -> None:
    """The class name on the mask pixel nearest the mask's centroid (colours of organs can be alike)."""
    if mask.sum() < 20:
        return
    ys, xs = np.nonzero(mask)
    nearest = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    height, width = mask.shape
    ax.text((xs[nearest] + 0.5) * extent[1] / width, (ys[nearest] + 0.5) * extent[2] / height, name,
            color="white", fontsize=6, ha="center", va="center")
