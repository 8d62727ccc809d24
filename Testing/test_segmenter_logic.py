"""SegmenterLogic end to end on real MRML with a real (tiny, untrained) checkpoint.

Inference is slow on a shared 2-core CPU (seconds per slice), so the volumes here are a few
slices of the real CT; the whole DICOM series runs only in the ``slow`` test.
"""
from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

from mrml_test_utils import scene_snapshot, segmentation_state
from SAMedLib.checkpoint import load_model
from SAMedLib.errors import CheckpointError
from SAMedLib.inference import segment_image
from SAMedLib.volume_io import read_volume, resample_to_reference
from SAMedMRML import segmenter_logic
from SAMedMRML.segmentations import segmentation_to_labelmap
from SAMedMRML.segmenter_logic import SegmentationCancelled, SegmenterLogic
from SAMedMRML.volumes import TransformNotSupportedError, volume_to_sitk


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory, shared_data) -> Path:
    """Three axial slices of the real CT (with the liver and spleen), written with an oblique, flipped direction."""
    image = read_volume(shared_data / "ct_3mm.nii.gz")
    part = image[:, :, 95:98]
    c, s = np.cos(np.radians(12)), np.sin(np.radians(12))
    part.SetDirection((-c, -s, 0.0, -s, c, 0.0, 0.0, 0.0, 1.0))  # x flipped + 12 degree rotation about z
    part.SetOrigin((17.5, -40.25, 12.0))
    path = tmp_path_factory.mktemp("ct") / "small_ct.nrrd"
    sitk.WriteImage(part, str(path))
    return path


def _load_with_slicer(mrml, path: Path, name="small CT"):
    """Read the file through Slicer's own archetype storage node (as File > Add Data does)."""
    node = mrml.volumes_logic.AddArchetypeVolume(str(path), name, 0)
    assert node is not None, f"Slicer could not read {path}"
    return node


def _class_values(card):
    return [(c.name, c.value) for c in card.classes]


def test_segment_equals_core_label_map_on_one_persistent_worker(mrml, small_ct, tiny_checkpoint, monkeypatch):
    volume = _load_with_slicer(mrml, small_ct)
    threads, progress_threads, pumped = [], [], []

    import SAMedLib.inference as inference
    real_segment_image = inference.segment_image

    def recording_segment_image(*args, **kwargs):
        threads.append(threading.current_thread())
        return real_segment_image(*args, **kwargs)

    monkeypatch.setattr(inference, "segment_image", recording_segment_image)
    logic = SegmenterLogic(processEvents=lambda: pumped.append(1))
    fractions = []

    def progress(fraction, message):
        progress_threads.append(threading.current_thread())
        fractions.append(fraction)

    node = logic.segment(volume, tiny_checkpoint, device="cpu", progress=progress, batchSize=1)

    # what the core produces from the same file
    core = real_segment_image(read_volume(small_ct), load_model(tiny_checkpoint), device="cpu", batch_size=1)
    core_array = sitk.GetArrayViewFromImage(core)
    assert len(np.unique(core_array)) >= 2, "untrained model gave a constant map: test would prove nothing"
    # the segmentation node, read back onto the volume grid, equals it voxel for voxel in physical space
    card = logic.lastModelCard
    back = segmentation_to_labelmap(node, volume, _class_values(card))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(resample_to_reference(back, core)), core_array)
    # The file's direction is left-handed; Slicer's reader flips k to make IJK-to-RAS right-handed, so the
    # arrays differ in order and only the physical-space comparison above is meaningful.
    assert volume_to_sitk(volume).GetDirection()[8] == -1.0 and core.GetDirection()[8] == 1.0
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back)[::-1], core_array)
    # results table
    rows = {r["name"]: r for r in logic.lastStatistics}
    voxel_ml = float(np.prod(core.GetSpacing())) / 1000
    for c in card.classes:
        n = int((core_array == c.value).sum())
        assert rows[c.name]["voxels"] == n and rows[c.name]["volume_ml"] == pytest.approx(n * voxel_ml)
    # threading: torch work on the worker, progress on the caller's thread, events pumped while waiting
    assert threads and all(t is not threading.main_thread() for t in threads)
    assert all(t is threading.current_thread() for t in progress_threads)
    assert pumped and fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)

    # second run into the same node: segments replaced, same worker thread (persistent), no new nodes
    node.GetSegmentation().AddEmptySegment("user segment", "user segment")
    count = mrml.scene.GetNumberOfNodes()
    again = logic.segment(volume, tiny_checkpoint, outputSegmentation=node, device="cpu")
    assert again is node and mrml.scene.GetNumberOfNodes() == count
    seg = node.GetSegmentation()
    assert [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())] == [c.name for c in card.classes]
    assert len(threads) == 2 and threads[0] is threads[1]
    assert threads[0] is segmenter_logic.shared_worker().thread


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="OpenVINO not installed (part of [test])")
def test_openvino_option_converts_the_cached_model_once_and_keeps_the_segments(mrml, small_ct, tiny_checkpoint):
    from SAMedLib.acceleration import OpenVINOModule

    volume = _load_with_slicer(mrml, small_ct)
    logic = SegmenterLogic()
    messages = []
    node = logic.segment(volume, tiny_checkpoint, device="cpu", openvino=True,
                         progress=lambda fraction, message: messages.append(message))
    converted = logic._model_cache[1].model.image_encoder
    assert isinstance(converted, OpenVINOModule) and any("OpenVINO" in m for m in messages)
    again = logic.segment(volume, tiny_checkpoint, outputSegmentation=node, device="cpu", openvino=True)
    assert logic._model_cache[1].model.image_encoder is converted  # converted once, with the cached model
    core = segment_image(read_volume(small_ct), load_model(tiny_checkpoint), device="cpu")  # torch
    back = segmentation_to_labelmap(again, volume, _class_values(logic.lastModelCard))
    labels = sitk.GetArrayFromImage(resample_to_reference(back, core))
    assert len(np.unique(labels)) >= 2
    assert (labels != sitk.GetArrayViewFromImage(core)).mean() < 0.01  # bf16 either way: a few voxels differ
    logic.segment(volume, tiny_checkpoint, outputSegmentation=node, device="cpu")  # option off: torch again
    assert not isinstance(logic._model_cache[1].model.image_encoder, OpenVINOModule)


def test_cancel_mid_run_leaves_scene_unchanged(mrml, small_ct, tiny_checkpoint):
    volume = _load_with_slicer(mrml, small_ct)
    existing = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "previous result")
    existing.GetSegmentation().AddEmptySegment("old", "old")
    state = segmentation_state(existing)
    before = scene_snapshot(mrml.scene)
    logic = SegmenterLogic()
    seen = []

    def progress(fraction, message):
        seen.append(fraction)
        if fraction > 0.0:  # inference has started: cancel between batches
            logic.cancel()

    for output in (None, existing):
        seen.clear()
        with pytest.raises(SegmentationCancelled):
            logic.segment(volume, tiny_checkpoint, outputSegmentation=output, device="cpu", progress=progress,
                          batchSize=1)
        assert max(seen) < 0.97  # cancelled before the result was written
        assert scene_snapshot(mrml.scene) == before
        assert segmentation_state(existing) == state
    assert not logic.isRunning


def test_scene_closed_mid_run_cancels_and_writes_nothing(mrml, small_ct, tiny_checkpoint):
    """Closing the scene (File > Close Scene, or quitting Slicer) while the worker runs: the result is written
    neither into the removed nodes nor into the next scene."""
    volume = _load_with_slicer(mrml, small_ct)
    output = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "previous result")
    closed = []

    def processEvents():  # the user closes the scene while Slicer waits for the worker
        if not closed:
            closed.append(True)
            mrml.scene.Clear(0)

    logic = SegmenterLogic(processEvents=processEvents)
    with pytest.raises(SegmentationCancelled, match="scene was closed"):
        logic.segment(volume, tiny_checkpoint, outputSegmentation=output, device="cpu", batchSize=1)
    assert closed and not logic.isRunning
    assert mrml.scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0
    assert output.GetSegmentation().GetNumberOfSegments() == 0  # the removed node was not filled either


def test_corrupt_and_mismatched_checkpoints_fail_clearly_without_new_nodes(mrml, small_ct, tiny_checkpoint, tmp_path):
    volume = _load_with_slicer(mrml, small_ct)
    before = scene_snapshot(mrml.scene)
    logic = SegmenterLogic()

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01 this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="corrupt.safetensors"):
        logic.segment(volume, corrupt, device="cpu")
    assert scene_snapshot(mrml.scene) == before

    # a real checkpoint whose tensors do not fit its card (5 classes announced, 4 trained)
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(tiny_checkpoint), framework="pt") as handle:
        metadata = dict(handle.metadata())
    card = json.loads(metadata["samed_model_card"])
    card["classes"].append({"value": 7, "name": "pancreas", "color": [1, 2, 3], "snomed_code": None,
                            "snomed_meaning": None, "laterality": None})
    mismatched = tmp_path / "mismatched.safetensors"
    save_file(load_file(str(tiny_checkpoint)), str(mismatched), metadata={"samed_model_card": json.dumps(card)})
    with pytest.raises(CheckpointError):
        logic.segment(volume, mismatched, device="cpu")
    assert scene_snapshot(mrml.scene) == before

    with pytest.raises(FileNotFoundError, match="model file not found"):
        logic.segment(volume, tmp_path / "missing.safetensors")
    assert scene_snapshot(mrml.scene) == before


def test_nonlinear_transform_refused_before_any_work(mrml, small_ct, tiny_checkpoint):
    volume = _load_with_slicer(mrml, small_ct)
    warp = mrml.scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    tps = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for p in [(0, 0, 0), (50, 0, 0), (0, 50, 0), (0, 0, 50)]:
        source.InsertNextPoint(p)
        target.InsertNextPoint(p[0] + 2, p[1], p[2])
    tps.SetSourceLandmarks(source)
    tps.SetTargetLandmarks(target)
    warp.SetAndObserveTransformToParent(tps)
    volume.SetAndObserveTransformNodeID(warp.GetID())
    before = scene_snapshot(mrml.scene)
    logic = SegmenterLogic()
    with pytest.raises(TransformNotSupportedError, match="warp"):
        logic.segment(volume, tiny_checkpoint)
    assert scene_snapshot(mrml.scene) == before


def test_read_card_without_torch_matches_checkpoint(tiny_checkpoint):
    from SAMedLib.checkpoint import read_model_card
    from SAMedLib.model_registry import describe_card, read_card

    card = read_card(tiny_checkpoint)
    assert card == read_model_card(tiny_checkpoint).to_dict()
    text = describe_card(card)
    assert "1: spleen" in text and "litemedsam" in text and "linear head" in text


def _load_dicom_like_slicer(volumes_logic, folder: Path, name: str):
    """What Slicer's DICOM scalar-volume plugin does: sort the series' files along the slice normal by
    ImagePositionPatient, then read them with the archetype reader from that explicit file list."""
    reader = sitk.ImageFileReader()
    positioned = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        position = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
        orientation = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
        normal = np.cross(orientation[:3], orientation[3:])
        positioned.append((float(np.dot(normal, position)), str(path)))
    files = vtk.vtkStringArray()
    for _, path in sorted(positioned):
        files.InsertNextValue(path)
    return volumes_logic.AddArchetypeScalarVolume(files.GetValue(0), name, 0, files)


@pytest.mark.slow
def test_dicom_series_through_slicer_equals_core_on_same_scan(mrml, shared_data, tiny_checkpoint):
    """The 20-slice DICOM series read the way Slicer's DICOM plugin reads it, segmented through the logic,
    gives exactly the label map the core (``samed segment``'s code path) gives on the same folder."""
    dicom = shared_data / "ct_dicom"
    volume = _load_dicom_like_slicer(mrml.volumes_logic, dicom, "ct_dicom")
    assert volume is not None
    assert volume.GetImageData().GetDimensions() == (512, 512, 20)
    core_image = read_volume(dicom)
    slicer_image = volume_to_sitk(volume)
    np.testing.assert_allclose(slicer_image.GetSpacing(), core_image.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(slicer_image.GetOrigin(), core_image.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(slicer_image.GetDirection(), core_image.GetDirection(), atol=1e-6)
    logic = SegmenterLogic()
    node = logic.segment(volume, tiny_checkpoint, device="auto")
    core = segment_image(core_image, load_model(tiny_checkpoint), device="auto")
    back = segmentation_to_labelmap(node, volume, _class_values(logic.lastModelCard))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(resample_to_reference(back, core)),
                                  sitk.GetArrayViewFromImage(core))
