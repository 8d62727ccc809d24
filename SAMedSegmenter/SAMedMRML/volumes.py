"""Volume node <-> SimpleITK image, with the full geometry.

Slicer stores a volume's geometry in the node (IJK-to-RAS: spacing, origin and direction
in *RAS*), ITK in the image (spacing, origin and direction in *LPS*). RAS = diag(-1, -1, 1)
applied to LPS, so the conversion negates the first two rows of the direction matrix and
the first two components of the origin. Voxel arrays need no reordering: Slicer's
``(k, j, i)`` array is SimpleITK's ``(z, y, x)`` array.

Parent-transform policy (the same for SAMedSegmenter and SAMedTrainer):

* No parent transform: the volume is used as is.
* Linear parent transform (any chain of linear transforms to world): **accepted without
  hardening or resampling.** The core works on the volume's own voxel grid (its local
  IJK-to-RAS); a segmentation made from it is placed under the *same* parent transform, so
  it overlays the volume exactly in world coordinates and keeps following it if the
  transform is edited later. Hardening a linear transform would change no voxel anyway.
  When training, segments are mapped from their own transform into the volume's local grid.
* Non-linear parent transform (grid, B-spline, thin-plate spline anywhere in the chain):
  **refused** with ``TransformNotSupportedError``. Hardening it would resample the voxels
  onto another grid, so the result could no longer be shown on the volume voxel for voxel;
  the message tells the user to harden the transform (Data module) first.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy

import slicer

__all__ = [
    "VolumeNodeError",
    "TransformNotSupportedError",
    "check_parent_transform",
    "ijk_to_ras",
    "volume_to_sitk",
    "volume_array",
    "update_volume_from_sitk",
    "sitk_geometry_to_ijk_to_ras",
    "check_same_grid",
    "LPS_TO_RAS",
]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


class VolumeNodeError(ValueError):
    """A volume node cannot be used (no image data, not a scalar volume, ...)."""


class TransformNotSupportedError(VolumeNodeError):
    """The node is under a non-linear parent transform (see the module docstring)."""


def _node_name(node) -> str:
    return node.GetName() if node is not None and node.GetName() else "(unnamed)"


def check_parent_transform(node) -> None:
    """Apply the parent-transform policy: return for none or linear, raise for non-linear."""
    transform = node.GetParentTransformNode()
    if transform is None or transform.IsTransformToWorldLinear():
        return
    culprit = transform  # name the warping node itself, not a linear one between it and the node
    while culprit is not None and culprit.IsLinear():
        culprit = culprit.GetParentTransformNode()
    culprit = culprit or transform
    raise TransformNotSupportedError(
        f"'{_node_name(node)}' is under the non-linear transform '{_node_name(culprit)}'. "
        "SAMed works on the volume's own voxel grid and cannot follow a warping transform: "
        "harden the transform first (Data module: right-click the node, 'Harden transform') "
        "or remove it, then try again.")


def ijk_to_ras(volume_node) -> np.ndarray:
    """The node's local IJK-to-RAS matrix (4x4, no parent transform) as numpy."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def volume_array(volume_node) -> np.ndarray:
    """Voxels as a read-only numpy view ``(k, j, i)``; raises VolumeNodeError if unusable."""
    if volume_node is None:
        raise VolumeNodeError("no input volume selected")
    if not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise VolumeNodeError(f"'{_node_name(volume_node)}' is a {volume_node.GetClassName()}; "
                              "a scalar (grayscale) volume is required")
    image = volume_node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise VolumeNodeError(f"volume '{_node_name(volume_node)}' has no image data (is it still loading?)")
    if image.GetNumberOfScalarComponents() != 1:
        raise VolumeNodeError(f"volume '{_node_name(volume_node)}' has {image.GetNumberOfScalarComponents()} "
                              "components per voxel (vector/RGB); a single-component volume is required")
    extent = image.GetExtent()
    if extent[0] != 0 or extent[2] != 0 or extent[4] != 0:
        raise VolumeNodeError(f"volume '{_node_name(volume_node)}' has image extent {extent} not starting at 0")
    dims = image.GetDimensions()
    if min(dims) < 1 or image.GetNumberOfPoints() == 0:
        raise VolumeNodeError(f"volume '{_node_name(volume_node)}' is empty (dimensions {dims})")
    array = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
    array.flags.writeable = False
    return array


def volume_to_sitk(volume_node) -> sitk.Image:
    """Copy a scalar volume node into a ``SimpleITK.Image`` with the same physical geometry (LPS).

    The geometry is the node's local IJK-to-RAS (see the parent-transform policy in the
    module docstring; non-linear parent transforms raise TransformNotSupportedError).
    """
    array = volume_array(volume_node)
    check_parent_transform(volume_node)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))  # copies: the worker never sees VTK memory
    directions = np.zeros((3, 3))
    volume_node.GetIJKToRASDirections(directions)  # columns: i, j, k axes in RAS
    image.SetSpacing(tuple(float(s) for s in volume_node.GetSpacing()))
    image.SetOrigin(tuple(float(v) for v in LPS_TO_RAS @ np.array(volume_node.GetOrigin())))
    image.SetDirection(tuple(float(v) for v in (LPS_TO_RAS @ directions).ravel()))
    return image


def sitk_geometry_to_ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of a SimpleITK image's grid."""
    direction = LPS_TO_RAS @ np.array(image.GetDirection()).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = direction @ np.diag(image.GetSpacing())
    m[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin())
    return m


def update_volume_from_sitk(volume_node, image: sitk.Image):
    """Replace a volume node's voxels and geometry with a SimpleITK image's (deep copy)."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeNodeError("a single-component 3D image is required")
    array = np.ascontiguousarray(sitk.GetArrayFromImage(image))
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    vtk_image = vtk.vtkImageData()
    vtk_image.SetDimensions(*image.GetSize())
    scalars = numpy_to_vtk(array.ravel(), deep=True)
    vtk_image.GetPointData().SetScalars(scalars)
    directions = LPS_TO_RAS @ np.array(image.GetDirection()).reshape(3, 3)
    volume_node.SetSpacing(*image.GetSpacing())
    volume_node.SetOrigin(*(LPS_TO_RAS @ np.array(image.GetOrigin())))
    volume_node.SetIJKToRASDirections(directions)
    volume_node.SetAndObserveImageData(vtk_image)
    return volume_node


def check_same_grid(image: sitk.Image, volume_node, what: str = "label map") -> None:
    """Raise ValueError unless ``image`` lies exactly on ``volume_node``'s voxel grid."""
    dims = volume_node.GetImageData().GetDimensions()
    if tuple(image.GetSize()) != tuple(dims):
        raise ValueError(f"{what} size {image.GetSize()} does not match volume "
                         f"'{_node_name(volume_node)}' size {tuple(dims)}")
    expected = ijk_to_ras(volume_node)
    actual = sitk_geometry_to_ijk_to_ras(image)
    tolerance = 1e-4 * max(1.0, float(np.max(np.abs(expected[:3, :3]))))
    if not np.allclose(expected[:3, :3], actual[:3, :3], atol=tolerance) or \
            not np.allclose(expected[:3, 3], actual[:3, 3], atol=1e-3 * max(1.0, min(volume_node.GetSpacing()))):
        raise ValueError(f"{what} geometry does not match volume '{_node_name(volume_node)}' "
                         f"(IJK-to-RAS {np.round(actual, 4).tolist()} vs {np.round(expected, 4).tolist()})")
