"""Shared pytest fixtures: the real CT sample data and a real (headless) MRML scene."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
# Slicer installs both modules' folders side by side; mirror that so the MRML glue imports as in Slicer.
for module_dir in ("SAMedSegmenter", "SAMedTrainer"):
    if str(REPO / module_dir) not in sys.path:
        sys.path.insert(0, str(REPO / module_dir))

SHARED_DATA = REPO.parent / "shared" / "data" / "abdomen-ct"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder with ct_3mm.nii.gz, ct_dicom/ and their reference labels (read-only; never copied)."""
    if not (SHARED_DATA / "ct_3mm.nii.gz").exists():
        pytest.fail(f"sample data missing: expected {SHARED_DATA} (../shared/data/abdomen-ct beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def lite():
    """The pristine pretrained LiteMedSAM backbone, built once. Tests deep-copy it: build_model edits the encoder."""
    from SAMedLib.backbones import build_backbone

    backbone = build_backbone("litemedsam")
    backbone.image_encoder.eval()
    return backbone


def make_mrml_scene():
    """A real vtkMRMLScene with the volumes and segmentations logics attached (no Slicer app, no Qt)."""
    import slicer

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    color_logic = app_logic.GetColorLogic()
    color_logic.SetMRMLScene(scene)
    color_logic.AddDefaultColorNodes()
    app_logic.SetModuleLogic("Colors", color_logic)
    volumes_logic = slicer.vtkSlicerVolumesLogic()
    volumes_logic.SetMRMLScene(scene)
    volumes_logic.SetMRMLApplicationLogic(app_logic)
    app_logic.SetModuleLogic("Volumes", volumes_logic)
    # Registers the segmentation converter rules; without it AddEmptySegment fails.
    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLScene(scene)
    segmentations_logic.SetMRMLApplicationLogic(app_logic)
    app_logic.SetModuleLogic("Segmentations", segmentations_logic)
    sh_logic = slicer.vtkSlicerSubjectHierarchyModuleLogic()
    sh_logic.SetMRMLScene(scene)
    app_logic.SetModuleLogic("SubjectHierarchy", sh_logic)
    # slicer.util helpers look these up globally, as they do inside Slicer.
    slicer.mrmlScene = scene
    slicer.modules = SimpleNamespace(
        volumes=SimpleNamespace(logic=lambda: volumes_logic),
        segmentations=SimpleNamespace(logic=lambda: segmentations_logic),
        subjecthierarchy=SimpleNamespace(logic=lambda: sh_logic),
    )
    return SimpleNamespace(scene=scene, app_logic=app_logic, volumes_logic=volumes_logic,
                           segmentations_logic=segmentations_logic, subject_hierarchy_logic=sh_logic)


@pytest.fixture
def mrml():
    """A fresh real MRML scene per test (see make_mrml_scene)."""
    env = make_mrml_scene()
    yield env
    env.scene.Clear(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A real, small SAMed checkpoint: LiteMedSAM (packaged weights) + an untrained linear head, frozen mode.

    Untrained, so its labels are arbitrary but deterministic: good for plumbing tests
    (same label map through every path), useless for accuracy.
    """
    from SAMedLib.selftest import untrained_checkpoint

    return untrained_checkpoint(tmp_path_factory.mktemp("models") / "tiny.safetensors",
                                "1:spleen,2:kidney_right,5:liver,6:stomach")


@pytest.fixture(scope="session")
def ct_slice(shared_data):
    """The axial slice of ct_3mm with the most liver, as encoder input (1,3,256,256) + liver mask on that grid."""
    import numpy as np
    import torch

    from SAMedLib.classes import parse_class_list
    from SAMedLib.model_card import Preprocessing
    from SAMedLib.preprocessing import model_input, slice_to_model_theta, to_model_grid
    from SAMedLib.training_data import load_training_pair

    prep = Preprocessing()
    volume = load_training_pair(shared_data / "ct_3mm.nii.gz", shared_data / "ct_3mm_labels.nii.gz",
                                parse_class_list("5:liver"), prep)
    z = int(volume.labels.reshape(volume.labels.shape[0], -1).sum(1).argmax())
    theta = slice_to_model_theta(volume.image.shape[1:], volume.spacing_yx, prep)
    image = model_input(torch.from_numpy(volume.image[z:z + 1]), theta, prep, volume.spacing_yx)
    liver = to_model_grid(torch.from_numpy(volume.labels[z:z + 1].astype(np.float32))[None], theta, prep.input_size,
                          mode="nearest")[0, 0] > 0
    assert liver.sum() > 2000  # a big liver cross-section
    return image, liver
