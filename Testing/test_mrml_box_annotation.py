"""Box annotation in the scene (real slicer-core nodes): RAS box -> voxels, mask -> segment with masking and undo."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import SimpleITK as sitk

import slicer
from mrml_test_utils import GEOMETRIES, ijk_to_ras_numpy, make_volume
from SAMedLib.annotation import box_from_ijk, slice_from_ijk
from SAMedLib.volume_io import to_canonical
from SAMedMRML.box_annotation import apply_mask_to_segment, markup_points_to_ijk, ras_bounds_to_ijk, roi_to_ijk
from SAMedMRML.volumes import volume_to_sitk

SHAPE = (10, 14, 18)  # k, j, i


def _volume(mrml, geometry):
    directions, spacing, origin = GEOMETRIES[geometry]
    array = np.arange(np.prod(SHAPE), dtype=np.int32).reshape(SHAPE)  # every voxel its own value
    return make_volume(mrml.scene, array, directions, spacing, origin)


def _ras(volume, ijk) -> np.ndarray:
    return (ijk_to_ras_numpy(volume) @ np.array([*ijk, 1.0]))[:3]


def _bounds(points) -> list[float]:
    points = np.asarray(points)
    return [v for axis in range(3) for v in (points[:, axis].min(), points[:, axis].max())]


@pytest.mark.parametrize("geometry", ["flipped", "oblique", "permuted", "lps_anisotropic"])
def test_ras_box_lands_on_the_boxed_voxels(mrml, geometry):
    volume = _volume(mrml, geometry)
    image = volume_to_sitk(volume)
    canonical, restore = to_canonical(image)
    # A box corner voxel pair on one slice of the volume's axial axis (which storage axis that is depends on
    # the geometry), drawn as world RAS bounds through the two voxel centres.
    axial = restore.perm[2]
    a, b = np.array([3, 4, 2]), np.array([13, 11, 8])  # (i, j, k)
    b[axial] = a[axial]
    low, high = ras_bounds_to_ijk(volume, _bounds([_ras(volume, a), _ras(volume, b)]))
    box = box_from_ijk(restore, low, high)
    values = sitk.GetArrayViewFromImage(canonical)
    inside = values[box.slice, box.y0:box.y1 + 1, box.x0:box.x1 + 1]
    original = slicer.util.arrayFromVolume(volume)
    expected = original[min(a[2], b[2]):max(a[2], b[2]) + 1, min(a[1], b[1]):max(a[1], b[1]) + 1,
                        min(a[0], b[0]):max(a[0], b[0]) + 1]
    if geometry == "oblique":  # the RAS-aligned bounds of an oblique box contain it, not equal it
        assert set(expected.ravel()) <= set(inside.ravel())
    else:
        assert sorted(inside.ravel()) == sorted(expected.ravel())  # exactly the boxed voxels, whatever the flips


def test_ras_box_follows_the_volume_parent_transform(mrml):
    volume = _volume(mrml, "lps_anisotropic")
    transform = mrml.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = (12.0, -7.0, 30.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    a, b = np.array([2, 3, 4]), np.array([8, 9, 4])
    world = [(shift @ np.array([*_ras(volume, p), 1.0]))[:3] for p in (a, b)]
    low, high = ras_bounds_to_ijk(volume, _bounds(world))
    assert np.allclose(low, np.minimum(a, b), atol=1e-6) and np.allclose(high, np.maximum(a, b), atol=1e-6)


def test_roi_node_bounds_give_the_voxel_box(mrml):
    volume = _volume(mrml, "identity")
    roi = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(6.0, 7.0, 4.0)
    roi.SetSize(6.0, 4.0, 0.0)  # a flat box on slice k = 4
    low, high = roi_to_ijk(volume, roi)
    assert np.allclose(low, (3, 5, 4)) and np.allclose(high, (9, 9, 4))


@pytest.mark.parametrize("geometry", ["flipped", "oblique", "permuted"])
def test_end_mark_points_land_on_their_axial_slices(mrml, geometry):
    volume = _volume(mrml, geometry)
    canonical, restore = to_canonical(volume_to_sitk(volume))
    values = sitk.GetArrayViewFromImage(canonical)
    original = slicer.util.arrayFromVolume(volume)
    marks = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    voxels = [np.array([3, 4, 2]), np.array([13, 11, 8])]  # (i, j, k)
    for ijk in voxels:
        marks.AddControlPoint(*_ras(volume, ijk))
    points = markup_points_to_ijk(volume, marks)
    assert len(points) == 2
    for ijk, point in zip(voxels, points):
        assert np.allclose(point, ijk, atol=1e-6)
        # the canonical slice holds the marked voxel, whichever storage axis is axial and however it is flipped
        assert original[ijk[2], ijk[1], ijk[0]] in values[slice_from_ijk(restore, point)]


# --------------------------------------------------------------------------- mask -> segment


def _editor(mrml, volume):
    segmentation = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    editor_node = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor_node.SetAndObserveSegmentationNode(segmentation)
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(mrml.scene)
    logic.SetMRMLApplicationLogic(mrml.app_logic)
    logic.SetSegmentEditorNode(editor_node)
    logic.SetSourceVolumeNode(volume)
    organ = segmentation.GetSegmentation().AddEmptySegment("organ")
    other = segmentation.GetSegmentation().AddEmptySegment("other")
    return logic, editor_node, segmentation, organ, other


def _segment(segmentation, segment_id, volume) -> np.ndarray:
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume).astype(bool)


def _mask_image(volume, array) -> sitk.Image:
    reference = volume_to_sitk(volume)
    mask = sitk.GetImageFromArray(array.astype(np.uint8))
    mask.CopyInformation(reference)
    return mask


@pytest.mark.parametrize("geometry", ["oblique", "flipped"])
def test_mask_becomes_the_segment_and_undo_restores(mrml, geometry):
    volume = _volume(mrml, geometry)
    logic, _, segmentation, organ, other = _editor(mrml, volume)
    first = np.zeros(SHAPE, bool)
    first[1:3, 2:5, 2:6] = True
    apply_mask_to_segment(logic, organ, _mask_image(volume, first), volume)
    assert np.array_equal(_segment(segmentation, organ, volume), first)
    second = np.zeros(SHAPE, bool)
    second[4:8, 6:12, 8:15] = True
    apply_mask_to_segment(logic, organ, _mask_image(volume, second), volume)
    assert np.array_equal(_segment(segmentation, organ, volume), second)  # replaced, as the box list is
    assert logic.CanUndo()
    logic.Undo()
    assert np.array_equal(_segment(segmentation, organ, volume), first)


def test_masking_settings_are_respected(mrml):
    volume = _volume(mrml, "oblique")
    logic, editor_node, segmentation, organ, other = _editor(mrml, volume)
    occupied = np.zeros(SHAPE, bool)
    occupied[4:6, 6:9, 8:11] = True
    slicer.util.updateSegmentBinaryLabelmapFromArray(occupied.astype(np.uint8), segmentation, other, volume)
    box_mask = np.zeros(SHAPE, bool)
    box_mask[3:7, 5:10, 7:12] = True

    # Editable area "outside all segments": the other segment's voxels stay out of the organ.
    editor_node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    editor_node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    apply_mask_to_segment(logic, organ, _mask_image(volume, box_mask), volume)
    assert np.array_equal(_segment(segmentation, organ, volume), box_mask & ~occupied)
    assert np.array_equal(_segment(segmentation, other, volume), occupied)

    # Editable everywhere + overwrite all: the organ takes the voxels from the other segment.
    editor_node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
    editor_node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments)
    apply_mask_to_segment(logic, organ, _mask_image(volume, box_mask), volume)
    assert np.array_equal(_segment(segmentation, organ, volume), box_mask)
    assert not _segment(segmentation, other, volume).any()

    # Editable intensity range: voxels whose source value is out of range are not touched (the voxel values are
    # voxel indices here), so the organ keeps what it had there before.
    logic.Undo()
    before = _segment(segmentation, organ, volume)
    editor_node.SetSourceVolumeIntensityMask(True)
    editor_node.SetSourceVolumeIntensityMaskRange(0, 900)
    apply_mask_to_segment(logic, organ, _mask_image(volume, box_mask), volume)
    editable = slicer.util.arrayFromVolume(volume) <= 900
    assert editable[box_mask].any() and not editable[box_mask].all()
    assert np.array_equal(_segment(segmentation, organ, volume), (box_mask & editable) | (before & ~editable))


def test_empty_or_misplaced_mask_is_refused_and_nothing_changes(mrml):
    volume = _volume(mrml, "flipped")
    logic, _, segmentation, organ, _ = _editor(mrml, volume)
    with pytest.raises(ValueError, match="empty mask"):
        apply_mask_to_segment(logic, organ, _mask_image(volume, np.zeros(SHAPE, bool)), volume)
    wrong_grid = sitk.Image(5, 5, 5, sitk.sitkUInt8)
    with pytest.raises(ValueError, match="size"):
        apply_mask_to_segment(logic, organ, wrong_grid, volume)
    with pytest.raises(ValueError, match="not in the edited segmentation"):
        apply_mask_to_segment(logic, "nope", _mask_image(volume, np.ones(SHAPE, bool)), volume)
    assert not logic.CanUndo()  # no undo state saved for a refused edit


# --------------------------------------------------------------------------- the worker-thread logic (real model)


@pytest.mark.slow
def test_box_logic_annotates_a_volume_node_on_the_worker_and_cancels_cleanly(mrml, shared_data):
    from SAMedLib.metrics import dice
    from SAMedLib.volume_io import read_volume, resample_to_reference, to_canonical
    from SAMedMRML.box_annotation import BoxAnnotationLogic
    from SAMedMRML.segmenter_logic import SegmentationCancelled, TorchWorker
    from SAMedMRML.volumes import update_volume_from_sitk

    image = read_volume(shared_data / "ct_3mm.nii.gz")
    reference = resample_to_reference(read_volume(shared_data / "ct_3mm_labels.nii.gz", allow_constant=True), image)
    crop = to_canonical(image)[0][:, :, 84:92]
    spleen = sitk.GetArrayFromImage(to_canonical(reference)[0][:, :, 84:92]) == 1
    volume = update_volume_from_sitk(mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT"), crop)
    z = 5
    ys, xs = np.nonzero(spleen[z])
    roi = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    corners = np.array([_ras(volume, (xs.min(), ys.min(), z)), _ras(volume, (xs.max(), ys.max(), z))])
    roi.SetCenter(*corners.mean(axis=0))
    roi.SetSize(*np.abs(corners[1] - corners[0]))
    worker = TorchWorker("test-box")
    logic = BoxAnnotationLogic(worker=worker)
    mask = logic.annotate(volume, [roi_to_ijk(volume, roi)], propagate=False, device="cpu")
    labels = sitk.GetArrayFromImage(mask)
    assert np.flatnonzero(labels.any(axis=(1, 2))).tolist() == [z]
    assert dice(labels[z] > 0, spleen[z]) > 0.85
    annotator = logic._annotator[1]
    assert annotator.encoder_runs == 1

    def cancel_on_first_report(fraction, message):
        logic.cancel()

    with pytest.raises(SegmentationCancelled):
        logic.annotate(volume, [roi_to_ijk(volume, roi)], propagate=True, device="cpu", progress=cancel_on_first_report)
    assert logic._annotator[1] is annotator  # same volume: the model and the embedding cache were kept
    assert annotator.encoder_runs < len(spleen)  # stopped before walking through every slice

    end = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")  # "the spleen is not on slice z - 2"
    end.AddControlPoint(*_ras(volume, (xs.mean(), ys.mean(), z - 2)))
    labels = sitk.GetArrayFromImage(logic.annotate(volume, [roi_to_ijk(volume, roi)], device="cpu",
                                                   ends_ijk=markup_points_to_ijk(volume, end)))
    assert np.flatnonzero(labels.any(axis=(1, 2))).min() == z - 1  # propagation stopped at the end mark
    if importlib.util.find_spec("openvino") is not None:  # the option: a new annotator with an OpenVINO encoder
        from SAMedLib.acceleration import OpenVINOModule

        fast = logic.annotate(volume, [roi_to_ijk(volume, roi)], propagate=False, device="cpu", openvino=True)
        assert isinstance(logic._annotator[1].encoder, OpenVINOModule) and logic._annotator[1] is not annotator
        assert dice(sitk.GetArrayFromImage(fast)[z] > 0, labels[z] > 0) > 0.97
    worker.shutdown()
