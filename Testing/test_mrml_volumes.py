"""Volume node <-> SimpleITK geometry, checked against Slicer's own NRRD writer/reader and physical points."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

import slicer
from mrml_test_utils import GEOMETRIES, ijk_to_ras_numpy, make_volume, ras_to_lps, scene_snapshot
from SAMedMRML.volumes import (TransformNotSupportedError, VolumeNodeError, check_same_grid, update_volume_from_sitk,
                               volume_to_sitk)


def _ramp(shape=(7, 9, 11), dtype=np.int16) -> np.ndarray:
    return (np.arange(np.prod(shape)).reshape(shape) % 3000 - 1000).astype(dtype)


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_volume_to_sitk_matches_physical_points(mrml, geometry):
    directions, spacing, origin = GEOMETRIES[geometry]
    array = _ramp()
    node = make_volume(mrml.scene, array, directions, spacing, origin)
    image = volume_to_sitk(node)
    assert image.GetSize() == (11, 9, 7)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), array)
    m = ijk_to_ras_numpy(node)
    for ijk in [(0, 0, 0), (10, 0, 0), (0, 8, 0), (0, 0, 6), (3, 5, 2), (10, 8, 6)]:
        ras = m @ np.array([*ijk, 1.0])
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(ijk), ras_to_lps(ras), atol=1e-6)
        # ...and the voxel at that physical point holds the same value.
        assert image.GetPixel(image.TransformPhysicalPointToIndex(ras_to_lps(ras))) == array[ijk[2], ijk[1], ijk[0]]


@pytest.mark.parametrize("geometry", ["lps_anisotropic", "oblique", "permuted"])
def test_volume_to_sitk_agrees_with_slicer_nrrd_writer(mrml, tmp_path, geometry):
    directions, spacing, origin = GEOMETRIES[geometry]
    node = make_volume(mrml.scene, _ramp(), directions, spacing, origin)
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(tmp_path / "vol.nrrd"))
    assert storage.WriteData(node) == 1
    written = sitk.ReadImage(str(tmp_path / "vol.nrrd"))
    ours = volume_to_sitk(node)
    np.testing.assert_allclose(ours.GetSpacing(), written.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(ours.GetOrigin(), written.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(ours.GetDirection(), written.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(ours), sitk.GetArrayViewFromImage(written))


@pytest.mark.parametrize("geometry", ["flipped", "oblique"])
def test_update_volume_from_sitk_agrees_with_slicer_reader(mrml, tmp_path, geometry):
    directions, spacing, origin = GEOMETRIES[geometry]
    image = sitk.GetImageFromArray(_ramp(dtype=np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(ras_to_lps(origin))
    image.SetDirection(tuple((np.diag([-1.0, -1, 1]) @ directions).ravel()))
    sitk.WriteImage(image, str(tmp_path / "img.nrrd"))
    read_by_slicer = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "bySlicer")
    storage = mrml.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "img.nrrd"))
    assert storage.ReadData(read_by_slicer) == 1
    ours = update_volume_from_sitk(mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ours"), image)
    np.testing.assert_allclose(ijk_to_ras_numpy(ours), ijk_to_ras_numpy(read_by_slicer), atol=1e-5)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(ours), slicer.util.arrayFromVolume(read_by_slicer))
    # and back again
    again = volume_to_sitk(ours)
    np.testing.assert_allclose(again.GetDirection(), image.GetDirection(), atol=1e-9)
    np.testing.assert_allclose(again.GetOrigin(), image.GetOrigin(), atol=1e-9)


def test_nifti_sample_through_slicer_storage_node(mrml, shared_data):
    """The real CT read by Slicer's archetype storage node has the geometry SimpleITK reads from the file."""
    node = mrml.volumes_logic.AddArchetypeVolume(str(shared_data / "ct_3mm.nii.gz"), "ct_3mm", 0)
    assert node is not None
    ours = volume_to_sitk(node)
    reference = sitk.ReadImage(str(shared_data / "ct_3mm.nii.gz"))
    assert ours.GetSize() == reference.GetSize()
    np.testing.assert_allclose(ours.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(ours.GetDirection(), reference.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(ours), sitk.GetArrayViewFromImage(reference))


def test_linear_parent_transform_is_accepted_with_local_geometry(mrml):
    directions, spacing, origin = GEOMETRIES["oblique"]
    node = make_volume(mrml.scene, _ramp(), directions, spacing, origin)
    before = volume_to_sitk(node)
    transform = mrml.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    t = vtk.vtkTransform()
    t.RotateZ(30)
    t.Translate(10, -5, 3)
    transform.SetMatrixTransformToParent(t.GetMatrix())
    node.SetAndObserveTransformNodeID(transform.GetID())
    after = volume_to_sitk(node)
    assert after.GetOrigin() == before.GetOrigin() and after.GetDirection() == before.GetDirection()


def test_nonlinear_parent_transform_is_refused(mrml):
    node = make_volume(mrml.scene, _ramp(), *GEOMETRIES["identity"])
    warp = mrml.scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    tps = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for p in [(0, 0, 0), (10, 0, 0), (0, 10, 0), (0, 0, 10), (10, 10, 10)]:
        source.InsertNextPoint(p)
        target.InsertNextPoint(p[0] + 1, p[1], p[2] + (2 if p[2] else 0))
    tps.SetSourceLandmarks(source)
    tps.SetTargetLandmarks(target)
    tps.SetBasisToR()
    warp.SetAndObserveTransformToParent(tps)
    # A linear transform above a warp is still non-linear to world.
    linear = mrml.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "linear")
    linear.SetAndObserveTransformNodeID(warp.GetID())
    node.SetAndObserveTransformNodeID(linear.GetID())
    before = scene_snapshot(mrml.scene)
    with pytest.raises(TransformNotSupportedError, match="non-linear transform 'warp'.*[Hh]arden"):
        volume_to_sitk(node)
    assert scene_snapshot(mrml.scene) == before


def test_unusable_volumes_give_clear_errors(mrml):
    empty = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(VolumeNodeError, match="'empty' has no image data"):
        volume_to_sitk(empty)
    with pytest.raises(VolumeNodeError, match="no input volume"):
        volume_to_sitk(None)
    rgb = mrml.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    slicer.util.updateVolumeFromArray(rgb, np.zeros((3, 4, 5, 3), np.uint8))
    with pytest.raises(VolumeNodeError, match="rgb"):
        volume_to_sitk(rgb)


def test_check_same_grid_rejects_other_grids(mrml):
    directions, spacing, origin = GEOMETRIES["oblique"]
    node = make_volume(mrml.scene, _ramp(), directions, spacing, origin)
    image = volume_to_sitk(node)
    check_same_grid(image, node)
    shifted = sitk.Image(image)
    shifted.SetOrigin(tuple(np.array(image.GetOrigin()) + (0.5, 0, 0)))
    with pytest.raises(ValueError, match="geometry does not match"):
        check_same_grid(shifted, node)
    with pytest.raises(ValueError, match="size"):
        check_same_grid(sitk.Image(3, 3, 3, sitk.sitkUInt8), node)
