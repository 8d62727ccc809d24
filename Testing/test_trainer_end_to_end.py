"""End to end through both Slicer logics, as an annotator would use them (issue: SAMedTrainer).

1. A real MRML scene: the 3 mm CT read by Slicer's own volume reader (archetype storage node),
   its reference labels read as a label map volume and imported as *segments* with Slicer's
   importer (only spleen = 1 and liver = 5, named through a colour table, as when a user loads a
   label map with its colour table).
2. ``TrainerLogic.train``: export to a private temporary folder, the real ``samed train`` child
   process (frozen LiteMedSAM encoder + CNN head, a short run), model registration.
3. The DICOM series of the *other* scanner (0.98 mm, different field of view) is put into the
   scene and segmented through SAMedSegmenter's ``SegmenterLogic`` with the new model.
4. The result is exported back to a label map on the DICOM grid (the glue's
   ``segmentation_to_labelmap``) and scored against the DICOM reference labels, resampled onto
   the DICOM grid in physical space (its label file has a flipped y axis: raw arrays do not line up).

Chance level is a Dice near 0 (an untrained head gives arbitrary labels). The trainer's seed is fixed,
so the run is repeatable: liver 0.90, spleen 0.74 (other seeds: spleen 0.82-0.91, liver 0.87-0.92), well
above the thresholds below. Cost on this 2-core CPU: ~100 s when it is otherwise idle (interpreter/torch
start-up, encoding 12 slices, 160 head steps, segmenting 20 DICOM slices), 2-3x that when shared.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import slicer
from SAMedLib.metrics import dice
from SAMedLib.model_registry import list_models, read_card
from SAMedLib.volume_io import read_volume, resample_to_reference
from SAMedMRML.segmentations import segment_ids_and_names, segmentation_to_labelmap
from SAMedMRML.segmenter_logic import SegmenterLogic
from SAMedMRML.volumes import update_volume_from_sitk, volume_to_sitk
from SAMedTrainerLib.trainer_logic import TrainerLogic, TrainingOptions

SPLEEN, LIVER = 1, 5  # TotalSegmentator values in the reference label maps
LIVER_MIN_DICE, SPLEEN_MIN_DICE = 0.5, 0.3  # chance is ~0
ITERATIONS = 160


def _read_with_slicer(scene, node_class: str, path: Path, name: str):
    """Load a volume file the way Slicer does: a volume node plus an archetype storage node."""
    node = scene.AddNewNodeByClass(node_class, name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node), f"Slicer could not read {path}"
    node.CreateDefaultDisplayNodes()
    return node


def _import_as_segments(mrml, labelmap_node, values_names: dict[int, str], name: str):
    """Keep only ``values_names`` in the label map, name them through a colour table and import them
    as segments with Slicer's importer (``vtkSlicerSegmentationsModuleLogic``)."""
    array = slicer.util.arrayFromVolume(labelmap_node)
    array[~np.isin(array, list(values_names))] = 0
    slicer.util.arrayFromVolumeModified(labelmap_node)
    colors = mrml.scene.AddNewNodeByClass("vtkMRMLColorTableNode", f"{name} colours")
    colors.SetTypeToUser()
    colors.SetNumberOfColors(max(values_names) + 1)
    colors.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for value, segment_name in values_names.items():
        colors.SetColor(value, segment_name, *np.random.default_rng(value).uniform(0.2, 1.0, 3), 1.0)
    labelmap_node.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
    segmentation = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    assert mrml.segmentations_logic.ImportLabelmapToSegmentationNode(labelmap_node, segmentation)
    return segmentation


@pytest.mark.slow
def test_train_on_scene_then_segment_dicom_with_new_model(mrml, shared_data, tmp_path, monkeypatch):
    started = time.monotonic()
    models_home = tmp_path / "models"
    monkeypatch.setenv("SAMED_MODELS_DIR", str(models_home))
    scene = mrml.scene

    # 1. The annotated training scan, as it would be in Slicer.
    ct = _read_with_slicer(scene, "vtkMRMLScalarVolumeNode", shared_data / "ct_3mm.nii.gz", "CT 3mm")
    labelmap = _read_with_slicer(scene, "vtkMRMLLabelMapVolumeNode", shared_data / "ct_3mm_labels.nii.gz",
                                 "CT 3mm labels")
    annotation = _import_as_segments(mrml, labelmap, {SPLEEN: "spleen", LIVER: "liver"}, "CT 3mm annotation")
    assert [n for _, n in segment_ids_and_names(annotation)] == ["spleen", "liver"]
    scene.RemoveNode(labelmap)  # only the segmentation is used from here on

    # 2. Train briefly through the logic (the real `samed train` child process).
    logic = TrainerLogic()
    logic.workRoot = str(tmp_path / "work")
    os.makedirs(logic.workRoot)
    events = []
    # Short and cheap: 10 labelled slices (+2 background) encoded once, then a CNN head trained for 160 small
    # steps. The spleen (1% of the pixels, as bright as the liver) is only told apart after ~50-100 steps:
    # with 40 steps, or the default learning rate, its Dice stays 0 while the liver is already fine.
    options = TrainingOptions(model_name="liver and spleen", mode="frozen", head="cnn", iterations=ITERATIONS,
                              batch_size=2, learning_rate=1.2e-2, device="cpu",
                              extra_args=["--views-per-slice", "1", "--max-labeled-slices", "10"])
    path = logic.train([(ct, annotation)], None, options, progress=events.append)
    trained_at = time.monotonic()

    kinds = [e["event"] for e in events]
    assert kinds.count("iteration") == ITERATIONS and "done" in kinds and kinds[-1] == "registered", logic.lastStderr
    assert path == (models_home / "liver and spleen.safetensors").resolve() and path.is_file()
    assert list_models() == [path]  # registered: SAMedSegmenter lists it
    card = read_card(path)
    assert card["mode"] == "frozen" and [(c["value"], c["name"]) for c in card["classes"]] == [(1, "spleen"),
                                                                                              (2, "liver")]
    # the private export folder (image + label map NRRDs) is gone
    exported = [Path(a) for a in logic.lastCommand if a.endswith(".nrrd")]
    assert exported and all(not p.exists() for p in exported)
    assert not exported[0].parent.exists() and os.listdir(logic.workRoot) == []

    # 3. The other scanner's DICOM series in the same scene, segmented through SAMedSegmenter's logic.
    dicom_image = read_volume(shared_data / "ct_dicom")
    dicom = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT DICOM")
    update_volume_from_sitk(dicom, dicom_image)
    dicom.CreateDefaultDisplayNodes()
    result = SegmenterLogic().segment(dicom, path, device="cpu")
    segments = dict((n, sid) for sid, n in segment_ids_and_names(result))
    assert list(segments) == ["spleen", "liver"]

    # 4. Back to a label map on the DICOM grid, scored against the reference in physical space.
    predicted = segmentation_to_labelmap(result, dicom, [(segments["liver"], LIVER), (segments["spleen"], SPLEEN)])
    grid = volume_to_sitk(dicom)
    assert predicted.GetSize() == dicom_image.GetSize()
    np.testing.assert_allclose(predicted.GetOrigin(), dicom_image.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(predicted.GetDirection(), dicom_image.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(predicted.GetSpacing(), grid.GetSpacing(), atol=1e-6)
    reference = resample_to_reference(sitk.ReadImage(str(shared_data / "ct_dicom_labels.nii.gz")), dicom_image)
    prediction, truth = sitk.GetArrayFromImage(predicted), sitk.GetArrayFromImage(reference)
    scores = {name: dice(prediction == value, truth == value) for name, value in (("liver", LIVER),
                                                                                  ("spleen", SPLEEN))}
    print(f"\nDice on the DICOM series: liver {scores['liver']:.3f}, spleen {scores['spleen']:.3f}; "
          f"training {trained_at - started:.0f} s, total {time.monotonic() - started:.0f} s")
    assert scores["liver"] > LIVER_MIN_DICE, scores
    assert scores["spleen"] > SPLEEN_MIN_DICE, scores
