"""Reading, checking, reorienting, resampling and writing 3D medical volumes.

Everything here works on ``SimpleITK.Image`` objects, which carry the physical geometry
(spacing, origin, direction in ITK's LPS world). Numpy arrays from
``sitk.GetArrayFromImage`` are indexed ``[z, y, x]`` (reversed from ITK index order).

Conventions:

* ``read_volume`` accepts NIfTI, NRRD, MHA/MHD files and DICOM series folders and
  returns a validated single-component 3D image with its geometry untouched.
* ``to_canonical`` permutes/flips the voxel axes so that the direction matrix is as close
  to identity (LPS) as possible; the returned ``CanonicalRestore`` undoes it exactly.
* Label maps from different sources are compared only after ``resample_to_reference``
  (nearest neighbour in physical space): files of the same scan may store the same
  voxels with different axis orders or flips.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import SAMedError

__all__ = [
    "VolumeError",
    "read_volume",
    "read_image_header",
    "validate_volume",
    "to_canonical",
    "CanonicalRestore",
    "resample_to_reference",
    "write_image",
    "atomic_output_path",
    "remove_stale_temporaries",
    "WRITABLE_EXTENSIONS",
]

# Single-file formats only: .mhd/.nhdr write a second data file, which a rename of the
# header alone could not make atomic.
WRITABLE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")
_TOKEN_LENGTH = 8  # random part of a temporary output's name


class VolumeError(SAMedError, ValueError):
    """A volume cannot be used; the message names the file and the problem on one line."""


def _itk_reason(exc: Exception) -> str:
    """The informative last part of a (multi-line) SimpleITK/ITK exception message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        for marker in ("ITK ERROR:", "sitk::ERROR:"):
            if marker in ln:
                reason = ln.split(marker, 1)[1].strip()
                # Drop ITK's "ClassName(0x55d...): " prefix, it means nothing to users.
                if "): " in reason and reason.split("): ", 1)[0].count("(0x") == 1:
                    reason = reason.split("): ", 1)[1]
                return reason
    return lines[-1] if lines else type(exc).__name__


def validate_volume(image: sitk.Image, name: str, allow_constant: bool = False) -> None:
    """Raise VolumeError unless ``image`` is a usable single-component 3D volume.

    Rejected: dimension other than 3, a single slice (size 1 on any axis), zero size,
    vector/RGB pixels and, unless ``allow_constant`` (label maps with only background are
    valid), an image whose voxels all have the same value.
    """
    dim = image.GetDimension()
    size = image.GetSize()
    if dim == 2:
        raise VolumeError(f"{name}: is a 2D image (size {size[0]}x{size[1]}); a 3D volume is required")
    if dim != 3:
        raise VolumeError(f"{name}: is a {dim}D image (size {'x'.join(map(str, size))}); a 3D volume is required")
    if min(size) == 0:
        raise VolumeError(f"{name}: has zero size {'x'.join(map(str, size))}")
    if min(size) == 1:
        raise VolumeError(f"{name}: is a single slice (size {'x'.join(map(str, size))}); a 3D volume is required"
                          " (for DICOM, pass the folder of the series, not one file)")
    ncomp = image.GetNumberOfComponentsPerPixel()
    if ncomp != 1:
        raise VolumeError(f"{name}: has {ncomp} components per voxel (vector/RGB image); "
                          "a single-component (grayscale or label) volume is required")
    if not allow_constant:
        stats = sitk.MinimumMaximumImageFilter()
        stats.Execute(image)
        if stats.GetMinimum() == stats.GetMaximum():
            raise VolumeError(f"{name}: all voxels have the same value ({stats.GetMinimum():g}); "
                              "the volume is empty or blank")


def _read_dicom_series(folder: Path) -> sitk.Image:
    """Read the DICOM series with the most files in ``folder`` (slices sorted by position)."""
    reader = sitk.ImageSeriesReader()
    try:
        series_ids = reader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as exc:
        raise VolumeError(f"{folder}: cannot scan folder for DICOM files: {_itk_reason(exc)}") from exc
    if not series_ids:
        raise VolumeError(f"{folder}: folder contains no DICOM series")
    # GDCM sorts each series' files by image position along the slice normal,
    # which is the order ITK needs to compute a correct z spacing and direction.
    file_lists = [reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids]
    files = max(file_lists, key=len)
    if not files:
        raise VolumeError(f"{folder}: folder contains no readable DICOM series")
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise VolumeError(f"{folder}: cannot read DICOM series ({len(files)} files): {_itk_reason(exc)}") from exc


def read_image_header(path: str | os.PathLike) -> sitk.ImageFileReader:
    """A reader for ``path`` with its header (size, geometry, metadata) read and no voxels loaded yet."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise VolumeError(f"{path}: not a readable image file: {_itk_reason(exc)}") from exc
    return reader


def _read_file(path: Path) -> sitk.Image:
    # Header first: reject 4D/vector files before loading a possibly large pixel buffer.
    reader = read_image_header(path)
    dim = reader.GetDimension()
    if dim != 3:
        raise VolumeError(f"{path}: is a {dim}D image (size {'x'.join(map(str, reader.GetSize()))}); "
                          "a 3D volume is required")
    if reader.GetNumberOfComponents() != 1:
        raise VolumeError(f"{path}: has {reader.GetNumberOfComponents()} components per voxel (vector/RGB image); "
                          "a single-component (grayscale or label) volume is required")
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise VolumeError(f"{path}: cannot read image data: {_itk_reason(exc)}") from exc


def read_volume(path: str | os.PathLike, allow_constant: bool = False) -> sitk.Image:
    """Read a 3D volume from a NIfTI/NRRD/MHA/MHD file or a DICOM series folder.

    Spacing, origin and direction are kept as stored. float64 voxels become float32
    (values, e.g. HU, are kept); other pixel types are returned unchanged.
    Raises VolumeError (one line naming the file) for anything that is not a usable
    single-component 3D volume; see ``validate_volume``.
    """
    p = Path(path)
    if not p.exists():
        raise VolumeError(f"{p}: no such file or folder")
    if p.is_dir():
        image = _read_dicom_series(p)
    else:
        if p.stat().st_size == 0:
            raise VolumeError(f"{p}: file is empty (0 bytes)")
        image = _read_file(p)
    if image.GetPixelID() == sitk.sitkFloat64:
        image = sitk.Cast(image, sitk.sitkFloat32)
    validate_volume(image, str(p), allow_constant=allow_constant)
    return image


# --------------------------------------------------------------------------- orientation


@dataclass(frozen=True)
class CanonicalRestore:
    """Maps images/arrays on the canonical grid made by ``to_canonical`` back to the original grid.

    Canonical ITK axis ``j`` is original axis ``perm[j]``, reversed when ``flip[j]``.
    Calling it with a ``sitk.Image`` returns an image with exactly the original size,
    spacing, origin and direction (copied, so no floating-point drift); ``array`` does the
    same for numpy arrays ``[z, y, x, ...]`` (extra trailing axes such as channels are kept).
    """

    perm: tuple[int, ...]
    flip: tuple[bool, ...]
    canonical_size: tuple[int, ...]
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def array(self, canonical: np.ndarray) -> np.ndarray:
        """Voxel-exact inverse permutation/flip of a canonical ``[z, y, x, ...]`` array."""
        expected = tuple(reversed(self.canonical_size))
        if tuple(canonical.shape[:3]) != expected:
            raise ValueError(f"array shape {canonical.shape[:3]} does not match the canonical grid [z,y,x] {expected}")
        extra = tuple(range(3, canonical.ndim))
        a = np.transpose(canonical, (2, 1, 0) + extra)  # -> ITK index order (x, y, z)
        a = np.flip(a, axis=[j for j in range(3) if self.flip[j]]) if any(self.flip) else a
        # Axis j of `a` holds original axis perm[j]; bring original axis k to position k.
        inverse = tuple(int(np.argsort(self.perm)[k]) for k in range(3))
        a = np.transpose(a, inverse + extra)
        return np.ascontiguousarray(np.transpose(a, (2, 1, 0) + extra))

    def __call__(self, canonical_image: sitk.Image) -> sitk.Image:
        """Image on the canonical grid -> same voxels on the original grid (pixel type kept)."""
        if tuple(canonical_image.GetSize()) != self.canonical_size:
            raise ValueError(f"image size {canonical_image.GetSize()} does not match the canonical grid {self.canonical_size}")
        is_vector = canonical_image.GetNumberOfComponentsPerPixel() > 1
        restored = sitk.GetImageFromArray(self.array(sitk.GetArrayViewFromImage(canonical_image)), isVector=is_vector)
        restored.SetSpacing(self.spacing)
        restored.SetOrigin(self.origin)
        restored.SetDirection(self.direction)
        return restored


def to_canonical(image: sitk.Image) -> tuple[sitk.Image, CanonicalRestore]:
    """Reorient ``image`` to LPS (DICOMOrient) by permuting/flipping axes only; no resampling.

    The canonical image has (up to any oblique residual rotation) identity direction, so its
    numpy array ``[z, y, x]`` has x towards patient left, y posterior, z superior, and
    ``array[k]`` is the k-th axial slice from inferior to superior.
    Returns ``(canonical_image, restore)``; ``restore(labels_on_canonical_grid)`` gives the
    same voxels on the original grid with the original geometry exactly.
    """
    if image.GetDimension() != 3:
        raise ValueError(f"to_canonical needs a 3D image, got {image.GetDimension()}D")
    canonical = sitk.DICOMOrient(image, "LPS")
    # Recover which permutation/flip DICOMOrient chose from the two direction matrices:
    # D_canonical = D_original @ M with M a signed permutation matrix.
    d_orig = np.array(image.GetDirection()).reshape(3, 3)
    d_can = np.array(canonical.GetDirection()).reshape(3, 3)
    m = d_orig.T @ d_can
    perm = tuple(int(np.argmax(np.abs(m[:, j]))) for j in range(3))
    if sorted(perm) != [0, 1, 2] or not np.allclose(np.abs(m[list(perm), [0, 1, 2]]), 1.0, atol=1e-4):
        raise ValueError(f"reorientation is not an axis permutation/flip (direction {image.GetDirection()})")
    flip = tuple(bool(m[perm[j], j] < 0) for j in range(3))
    restore = CanonicalRestore(
        perm=perm,
        flip=flip,
        canonical_size=tuple(canonical.GetSize()),
        size=tuple(image.GetSize()),
        spacing=tuple(image.GetSpacing()),
        origin=tuple(image.GetOrigin()),
        direction=tuple(image.GetDirection()),
    )
    return canonical, restore


# --------------------------------------------------------------------------- resampling


def resample_to_reference(labels: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Nearest-neighbour resample ``labels`` onto ``reference``'s grid in physical space.

    Uses the identity transform, keeps the pixel type of ``labels`` and fills voxels
    outside the label map with 0 (background).
    """
    return sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())


# --------------------------------------------------------------------------- writing


def _image_extension(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


@contextmanager
def atomic_output_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same extension); move it into place on success.

    Parent folders are created. If the body raises, the temporary file is removed and
    ``path`` is left untouched, so readers never see a half-written file.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_path(final, uuid.uuid4().hex[:_TOKEN_LENGTH])
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def _temporary_parts(final: Path) -> tuple[str, str]:
    ext = _image_extension(final)
    stem = final.name[: len(final.name) - len(ext)] if ext else final.name
    # Keep the real extension last: SimpleITK chooses the writer from it.
    return f".{stem}.tmp-", ext


def _temporary_path(final: Path, token: str) -> Path:
    prefix, ext = _temporary_parts(final)
    return final.with_name(f"{prefix}{token}{ext}")


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Delete temporary files that a killed writer of ``path`` left behind (``atomic_output_path``'s names)."""
    final = Path(path)
    prefix, ext = _temporary_parts(final)
    if not final.parent.is_dir():
        return
    for entry in final.parent.iterdir():
        name = entry.name
        if name.startswith(prefix) and name.endswith(ext) and len(name) == len(prefix) + _TOKEN_LENGTH + len(ext):
            entry.unlink(missing_ok=True)


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write ``image`` to .nii/.nii.gz/.nrrd/.mha atomically; returns the final path."""
    final = Path(path)
    ext = _image_extension(final)
    if ext not in WRITABLE_EXTENSIONS:
        raise VolumeError(f"{final}: unsupported output extension '{ext or '(none)'}'; "
                          f"use one of {', '.join(WRITABLE_EXTENSIONS)}")
    with atomic_output_path(final) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=compress)
        except RuntimeError as exc:
            raise VolumeError(f"{final}: cannot write image: {_itk_reason(exc)}") from exc
    return final
