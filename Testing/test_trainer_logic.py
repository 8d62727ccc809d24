"""SAMedTrainer logic: classes, validation, export, command line, progress parsing and the process (Stop, failure).

The process machinery runs a real child process: ``Testing/fake_samed_cli.py`` stands in for
``SAMedLib.cli`` and prints the same JSON progress lines (see its docstring).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import SimpleITK as sitk
import vtk

from mrml_test_utils import GEOMETRIES, make_volume, scene_snapshot
from SAMedLib.classes import SegmentClass
from SAMedLib.model_registry import list_models, read_card
from SAMedMRML.segmentations import labelmap_to_segmentation
from SAMedMRML.volumes import volume_to_sitk
from SAMedTrainerLib.process import TrainingProcess, process_group_options
from SAMedTrainerLib.trainer_logic import (TrainerLogic, TrainingClass, TrainingCurves, TrainingFailed,
                                           TrainingInputError, TrainingOptions, TrainingStopped, build_train_command,
                                           assign_label_values, derive_classes, parse_progress_line,
                                           unique_model_path)
from SAMedTrainerLib.training_classes import to_training_classes

TESTING = Path(__file__).resolve().parent
SHAPE = (10, 14, 16)


@pytest.fixture
def models_home(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "models"
    monkeypatch.setenv("SAMED_MODELS_DIR", str(folder))
    return folder


def _pair(scene, names_values: dict[str, int], geometry="oblique", name="CT"):
    directions, spacing, origin = GEOMETRIES[geometry]
    volume = make_volume(scene, np.random.default_rng(0).integers(-200, 200, SHAPE).astype(np.int16),
                         directions, spacing, origin, name=name)
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:5, 2:8, 3:9] = 1
    labels[5:9, 6:12, 8:14] = 2
    labels[2:4, 10:13, 1:4] = 3
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(sitk.Cast(volume_to_sitk(volume), sitk.sitkUInt8))
    classes = [SegmentClass(v, n, (200, 100, 50 + 10 * v)) for n, v in names_values.items()]
    segmentation = labelmap_to_segmentation(image, classes, volume, name=f"{name} segmentation")
    return volume, segmentation, labels


@pytest.fixture
def two_pairs(mrml):
    v1, s1, l1 = _pair(mrml.scene, {"Liver": 1, "spleen": 2}, name="CT1")
    v2, s2, l2 = _pair(mrml.scene, {"liver ": 1, "kidney_right": 3}, geometry="lps_anisotropic", name="CT2")
    return [(v1, s1), (v2, s2)], (l1, l2)


def _logic(tmp_path, mode="ok", record=None) -> TrainerLogic:
    logic = TrainerLogic(pollInterval=0.01)
    logic.cliModule = "fake_samed_cli"
    logic.extraPythonPath = [str(TESTING)]
    logic.workRoot = str(tmp_path / "work")
    os.makedirs(logic.workRoot, exist_ok=True)
    env = dict(os.environ, FAKE_SAMED_MODE=mode)
    if record:
        env["FAKE_SAMED_RECORD"] = str(record)
    logic.baseEnvironment = env
    return logic


def _launcher_stand_in(folder: Path, new_session: bool = False) -> tuple[Path, Path]:
    """An executable that behaves like Slicer's ``PythonSlicer`` (the CTK AppLauncher): it starts the real
    interpreter as a *child* (no exec) that inherits its pipes, forwards no signal, dies on SIGTERM and
    otherwise exits with the child's exit code. It writes the child's pid to the returned file.
    ``new_session``: the child leaves the launcher's process group (as a ``setsid`` grandchild would)."""
    launcher, pid_file = folder / "PythonSlicer", folder / "python-real.pid"
    start = "setsid " if new_session else ""
    launcher.write_text(f"#!/bin/sh\n{start}'{sys.executable}' \"$@\" &\necho $! > '{pid_file}'\nwait $!\nexit $?\n")
    launcher.chmod(0o755)
    return launcher, pid_file


def _processes_of_run(marker: str, pids=()) -> list[str]:
    """Processes still running whose command line mentions ``marker`` (a path unique to the test), or with ``pids``."""
    alive = []
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if process.info["status"] != psutil.STATUS_ZOMBIE and (marker in cmdline or process.info["pid"] in pids):
            alive.append(f"{process.info['pid']}: {cmdline}")
    return alive


# --------------------------------------------------------------------------- progress lines


@pytest.mark.parametrize("line, expected", [
    ('{"event":"iteration","iteration":3,"iterations":10,"loss":0.5,"lr":0.001,"eta_s":12.5}', "iteration"),
    ('  {"event": "validation", "iteration": 4, "dice": {"liver": 0.9}, "mean_dice": 0.9}\n', "validation"),
    ('{"event":"checkpoint","path":"/x/m.safetensors","iteration":4}', "checkpoint"),
    ('{"event":"done","path":"/x/m.safetensors"}', "done"),
    ('{"event":"stopped","path":"/x/m.safetensors","iteration":7}', "stopped"),
    ('{"event":"error","message":"bad labels"}', "error"),
    ('{"event":"encoding","done":4,"total":20,"message":"encoding views"}', "encoding"),
    ('{"event":"something_new","x":1}', "something_new"),
    ("loading volumes", None),
    ("", None),
    ("{not json", None),
    ("[1, 2]", None),
    ('{"no_event": 1}', None),
    ('{"event": 5}', None),
    ('{"event":"iteration","iteration":"three","iterations":10}', None),
    ('{"event":"iteration","iterations":10}', None),
    ('{"event":"validation","iteration":2,"dice":[0.1],"mean_dice":0.1}', None),
    ('{"event":"checkpoint"}', None),
])
def test_parse_progress_line(line, expected):
    event = parse_progress_line(line)
    assert (event["event"] if event else None) == expected


# --------------------------------------------------------------------------- classes


def test_classes_derived_from_segment_names_across_pairs(two_pairs):
    pairs, _ = two_pairs
    classes = derive_classes(pairs)
    assert [c.name for c in classes] == ["Liver", "spleen", "kidney_right"]  # "liver " is the same class as "Liver"
    liver, spleen, kidney = classes
    assert liver.color == (200, 100, 60)
    # codes come from the segments' terminology (written by labelmap_to_segmentation for known organs)...
    assert (kidney.codes.code, kidney.codes.laterality) == ("64033007", ("24028007", "Right"))
    assert spleen.codes.code == "78961009"
    # ...and a segment with Slicer's placeholder terminology falls back to the organ table by name
    segment = pairs[0][1].GetSegmentation().GetSegment("Liver")
    segment.SetTerminology("Segmentation category and type - 3D Slicer General Anatomy list~SCT^85756007^Tissue~"
                           "SCT^85756007^Tissue~^^~Anatomic codes - DICOM master list~^^~^^")
    assert derive_classes(pairs)[0].codes.code == "10200004"


def test_segment_classes_round_trip_through_training_classes():
    """A model's classes given to train() keep name, colour and codes; only the value is the run's own (1..N)."""
    given = [SegmentClass.named(4, "kidney_left", (1, 2, 3)), SegmentClass(9, "tumour", (4, 5, 6))]
    valued = [sc for _, sc in assign_label_values(to_training_classes(given))]
    assert valued == [SegmentClass.named(1, "kidney_left", (1, 2, 3)), SegmentClass(2, "tumour", (4, 5, 6))]
    assert valued[0].laterality == ("7771000", "Left")


# --------------------------------------------------------------------------- bad input, before anything starts


def _expect_input_error(logic, pairs, classes, match, options=None):
    record = Path(logic.workRoot).parent / "record.json"
    with pytest.raises(TrainingInputError, match=match):
        logic.train(pairs, classes, options or TrainingOptions(iterations=3))
    assert not record.exists()  # the process never started
    assert os.listdir(logic.workRoot) == []  # temporary folder removed


def test_bad_input_is_refused_before_anything_starts(mrml, two_pairs, tmp_path, models_home):
    pairs, _ = two_pairs
    logic = _logic(tmp_path, record=tmp_path / "record.json")
    _expect_input_error(logic, [], None, "no training pairs")
    empty = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Empty seg")
    _expect_input_error(logic, [(pairs[0][0], empty)], None, "'Empty seg' has no segments")
    classes = derive_classes(pairs) + [TrainingClass("pancreas", "pancreas", (1, 2, 3))]
    _expect_input_error(logic, pairs, classes, "class 'pancreas' is present in no pair")
    no_volume = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "not loaded")
    _expect_input_error(logic, [(no_volume, pairs[0][1])], None, "'not loaded' has no image data")
    _expect_input_error(logic, pairs, None, "needs its official SAM checkpoint",
                        TrainingOptions(base="sam_vit_b", iterations=3))


def test_pair_whose_segments_lie_outside_the_volume_is_refused(mrml, two_pairs, tmp_path, models_home):
    pairs, _ = two_pairs
    volume, segmentation = pairs[0]
    far = mrml.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    t = vtk.vtkTransform()
    t.Translate(500, 0, 0)
    far.SetMatrixTransformToParent(t.GetMatrix())
    segmentation.SetAndObserveTransformNodeID(far.GetID())
    logic = _logic(tmp_path, record=tmp_path / "record.json")
    _expect_input_error(logic, [pairs[0]], None, "does not overlap volume 'CT1'")
    # an empty segment of a class that no other pair has: "present in no pair"
    segmentation.SetAndObserveTransformNodeID(None)
    segmentation.GetSegmentation().AddEmptySegment("gallbladder", "gallbladder")
    _expect_input_error(logic, [pairs[0]], None, "class 'gallbladder' is present in no pair")


def test_scene_unchanged_by_validation_failure(mrml, two_pairs, tmp_path, models_home):
    pairs, _ = two_pairs
    before = scene_snapshot(mrml.scene)
    logic = _logic(tmp_path)
    with pytest.raises(TrainingInputError):
        logic.train(pairs, derive_classes(pairs) + [TrainingClass("x", "x", (1, 2, 3))])
    assert scene_snapshot(mrml.scene) == before


# --------------------------------------------------------------------------- a complete (fake) run


def test_successful_run_exports_pairs_reports_progress_and_registers(mrml, two_pairs, tmp_path, models_home):
    pairs, (l1, l2) = two_pairs
    classes = derive_classes(pairs)
    classes[1].enabled = False  # spleen not trained
    classes[0].color = (10, 20, 30)  # the user's colour, not the organ table's
    classes[0].name = "Liver (hepar)"  # display name differs from the segment name
    record = tmp_path / "record.json"
    logic = _logic(tmp_path, record=record)
    events = []
    before = scene_snapshot(mrml.scene)
    path = logic.train(pairs, classes, TrainingOptions(model_name="my model", iterations=4, device="cpu"),
                       progress=events.append)
    assert path == models_home / "my model.safetensors"
    assert list_models() == [path]
    # the model card carries the user's colours and the SNOMED codes read from segment terminology
    card = read_card(path)
    liver, kidney = card["classes"]
    assert (liver["value"], liver["name"], liver["color"], liver["snomed_code"]) == \
        (1, "Liver (hepar)", [10, 20, 30], "10200004")
    assert (kidney["name"], kidney["snomed_code"], kidney["laterality"]) == ("kidney_right", "64033007",
                                                                            ["24028007", "Right"])
    assert read_card(path)["training"]["fake"] is True  # tensors/other card fields untouched
    kinds = [e["event"] for e in events]
    assert kinds.count("iteration") == 4 and "validation" in kinds and kinds[-2:] == ["done", "registered"]
    assert any(e["event"] == "log" and "plain log line" in e["message"] for e in events)
    assert os.listdir(logic.workRoot) == []
    assert scene_snapshot(mrml.scene) == before

    info = json.loads(record.read_text())
    args = info["args"]
    assert args[args.index("--classes") + 1] == "1:Liver (hepar),2:kidney_right"
    assert args[args.index("--device") + 1] == "cpu" and "--progress-json" in args
    assert args.count("--image") == 2 and args.count("--labels") == 2
    # label maps: on the volume grid, liver -> 1, kidney_right -> 2, spleen (disabled) -> background
    first, second = info["labels"]
    assert first["same_grid"] and second["same_grid"]
    assert first["values"] == {"0": int((l1 != 1).sum()), "1": int((l1 == 1).sum())}
    assert second["values"] == {"0": int((~np.isin(l2, [1, 3])).sum()), "1": int((l2 == 1).sum()),
                                "2": int((l2 == 3).sum())}
    # the private work folder was the process's cwd and is gone
    assert Path(info["cwd"]).parent == Path(logic.workRoot) and not Path(info["cwd"]).exists()


LAUNCHERS = [pytest.param(None, id="direct"),
             pytest.param(False, id="launcher", marks=pytest.mark.skipif(os.name == "nt", reason="POSIX stand-in")),
             pytest.param(True, id="launcher-child-left-the-group",
                          marks=pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid (Linux)"))]


def _stopping_run(logic, tmp_path, launcher_new_session, at_iteration: int):
    """Start through the launcher stand-in (unless None); ``progress`` records events and calls ``stop()`` at
    ``at_iteration``; ``run_pids()`` are the started process and, behind a launcher, the trainer."""
    pid_file = None
    if launcher_new_session is not None:
        logic.pythonExecutable, pid_file = _launcher_stand_in(tmp_path, launcher_new_session)
    seen, started = [], []

    def progress(event):
        seen.append(event)
        if logic._process is not None and not started:
            started.append(logic._process.pid)
        if event["event"] == "iteration" and event["iteration"] == at_iteration:
            logic.stop()

    def run_pids():
        return started + ([int(pid_file.read_text())] if pid_file else [])

    return progress, seen, run_pids


@pytest.mark.parametrize("signals", [pytest.param(True, id="signals"),
                                     pytest.param(False, id="no-signals")])  # Windows: no console for CTRL_BREAK
@pytest.mark.parametrize("launcher_new_session", LAUNCHERS)
def test_stop_ends_the_process_and_reports_the_last_checkpoint(mrml, two_pairs, tmp_path, models_home,
                                                               launcher_new_session, signals, monkeypatch):
    """Inside Slicer the started process is a launcher that forwards no signal: Stop must reach the trainer behind
    it, and the run ends when the trainer is done (its ``stopped`` event read, nothing left running). Where no
    signal reaches the trainer at all (Windows: neither Slicer nor the trainer has a console), the stop file does,
    and the run still ends with the trainer's own clean stop, not with the kill after ``stop_timeout``."""
    if not signals:
        monkeypatch.setattr(TrainingProcess, "send_stop_signals", lambda self: None)
    pairs, _ = two_pairs
    logic = _logic(tmp_path, mode="slow")
    before = scene_snapshot(mrml.scene)
    progress, seen, run_pids = _stopping_run(logic, tmp_path, launcher_new_session, at_iteration=5)
    with pytest.raises(TrainingStopped) as info:
        logic.train(pairs, None, TrainingOptions(model_name="stopped", iterations=3), progress=progress)
    stopped = info.value
    assert stopped.checkpoint == models_home / "stopped.safetensors" and stopped.checkpoint.is_file()
    assert stopped.iteration is not None and 4 <= stopped.iteration < 50
    assert [e["event"] for e in seen].count("stopped") == 1, logic.lastStderr  # the trainer's own clean stop
    assert not any("did not stop within" in e.get("message", "") for e in seen)
    stop_file = Path(logic.lastCommand[logic.lastCommand.index("--stop-file") + 1])
    assert stop_file.parent.parent == Path(logic.workRoot)  # in the run's private folder (removed below)
    assert _processes_of_run(str(tmp_path), run_pids()) == []
    assert not logic.isRunning
    assert os.listdir(logic.workRoot) == []
    assert scene_snapshot(mrml.scene) == before
    assert list_models() == [stopped.checkpoint]  # on disk in the models folder...
    assert not (models_home / "registry.json").exists()  # ...but not registered: the user is asked first


@pytest.mark.parametrize("launcher_new_session", LAUNCHERS)
def test_stop_kills_a_trainer_that_ignores_sigterm(mrml, two_pairs, tmp_path, models_home, launcher_new_session):
    pairs, _ = two_pairs
    logic = _logic(tmp_path, mode="ignore_term")
    progress, _, run_pids = _stopping_run(logic, tmp_path, launcher_new_session, at_iteration=3)
    with pytest.raises(TrainingStopped) as info:
        logic.train(pairs, None, TrainingOptions(model_name="killed", iterations=3, stop_timeout=1.0),
                    progress=progress)
    assert info.value.checkpoint == models_home / "killed.safetensors"  # from the last checkpoint event
    assert _processes_of_run(str(tmp_path), run_pids()) == []  # the whole tree killed
    assert os.listdir(logic.workRoot) == []


def test_trainer_tree_gets_a_process_group_of_its_own():
    """POSIX: a new session (killpg reaches the launcher's children). Windows: a new process group (CTRL_BREAK
    reaches it) and no console window; the values are Windows' documented CREATE_* flags."""
    assert process_group_options("posix") == {"start_new_session": True}
    assert process_group_options("nt") == {"creationflags": 0x00000200 | 0x08000000}


def test_a_process_left_holding_the_pipes_neither_hangs_the_run_nor_survives_it(mrml, two_pairs, tmp_path,
                                                                               models_home):
    pairs, _ = two_pairs
    logic = _logic(tmp_path, mode="leave_child")
    path = logic.train(pairs, None, TrainingOptions(model_name="done", iterations=3))
    assert path == models_home / "done.safetensors" and path.is_file()
    assert _processes_of_run(str(path), []) == []  # the helper (its command line names the model) was killed


def test_abort_kills_the_trainer_at_once(mrml, two_pairs, tmp_path, models_home):
    """Slicer quitting: no clean stop (it may take a minute), but nothing left running either."""
    pairs, _ = two_pairs
    logic = _logic(tmp_path, mode="ignore_term")
    pids, logs = [], []

    def progress(event):
        if event["event"] == "log":
            logs.append(event["message"])
        if event["event"] == "iteration" and event["iteration"] == 2:
            pids.append(logic._process.pid)
            logic.abort()

    with pytest.raises(TrainingStopped):
        logic.train(pairs, None, TrainingOptions(model_name="aborted", iterations=3, stop_timeout=60),
                    progress=progress)
    assert not any("did not stop within" in message for message in logs)  # killed at once, not after the timeout
    assert pids and _processes_of_run(str(tmp_path), pids) == []
    assert os.listdir(logic.workRoot) == []


def test_failure_surfaces_the_trainers_error_message(mrml, two_pairs, tmp_path, models_home):
    pairs, _ = two_pairs
    logic = _logic(tmp_path, mode="fail")
    with pytest.raises(TrainingFailed, match="CUDA out of memory: try a smaller batch size") as info:
        logic.train(pairs, None, TrainingOptions(model_name="fails", iterations=10))
    assert info.value.returncode == 1
    assert "torch.OutOfMemoryError" in info.value.stderr
    assert os.listdir(logic.workRoot) == []
    assert list_models() == [models_home / "fails.safetensors"]  # the partial file is not registered...
    assert not (models_home / "registry.json").exists()  # ...as the registry was never written


def test_crash_without_json_error_surfaces_stderr(mrml, two_pairs, tmp_path, models_home):
    pairs, _ = two_pairs
    logic = _logic(tmp_path, mode="crash")
    with pytest.raises(TrainingFailed, match="ValueError: labels file pair1_labels.nrrd has values 9"):
        logic.train(pairs, None, TrainingOptions(model_name="crash", iterations=3))
    assert os.listdir(logic.workRoot) == []


# --------------------------------------------------------------------------- command line and names


def test_build_train_command_options(tmp_path):
    classes = [SegmentClass.named(1, "liver"), SegmentClass.named(2, "spleen")]
    options = TrainingOptions(base="sam_vit_b", base_checkpoint="/w/sam_vit_b_01ec64.pth", mode="frozen",
                              head="autosam_vit", iterations=50, learning_rate=5e-4, batch_size=2, device="cuda")
    cmd = build_train_command("/py", [Path("/a/i1.nrrd"), Path("/a/i2.nrrd")], [Path("/a/l1.nrrd"), Path("/a/l2.nrrd")],
                              classes, options, Path("/m/out.safetensors"), (Path("/a/vi.nrrd"), Path("/a/vl.nrrd")),
                              stop_file=Path("/a/stop"))
    assert cmd[:4] == ["/py", "-m", "SAMedLib.cli", "train"]
    assert cmd[4:12] == ["--image", "/a/i1.nrrd", "--labels", "/a/l1.nrrd", "--image", "/a/i2.nrrd", "--labels",
                         "/a/l2.nrrd"]

    def value(flag):
        return cmd[cmd.index(flag) + 1]

    assert value("--classes") == "1:liver,2:spleen" and value("--base") == "sam_vit_b"
    assert value("--base-checkpoint") == "/w/sam_vit_b_01ec64.pth"
    assert (value("--mode"), value("--head"), value("--iterations")) == ("frozen", "autosam_vit", "50")
    assert "--lora-rank" not in cmd  # frozen encoder: no LoRA
    assert float(value("--lr")) == 5e-4 and value("--batch-size") == "2" and value("--device") == "cuda"
    assert value("--output") == "/m/out.safetensors" and cmd[-1] == "--progress-json"
    assert value("--stop-file") == "/a/stop"
    lora = build_train_command("/py", [Path("i")], [Path("l")], classes, TrainingOptions(lora_rank=8), Path("o"))
    assert lora[lora.index("--lora-rank") + 1] == "8" and "--lr" not in lora and "--batch-size" not in lora


def test_unique_model_path(tmp_path):
    assert unique_model_path(tmp_path, "liver: v1") == tmp_path / "liver_ v1.safetensors"
    (tmp_path / "m.safetensors").write_bytes(b"")
    (tmp_path / "m (2).safetensors").write_bytes(b"")
    assert unique_model_path(tmp_path, "m") == tmp_path / "m (3).safetensors"


def test_existing_output_is_not_overwritten(mrml, two_pairs, tmp_path, models_home):
    pairs, _ = two_pairs
    existing = tmp_path / "keep.safetensors"
    existing.write_bytes(b"precious")
    logic = _logic(tmp_path, record=tmp_path / "record.json")
    _expect_input_error(logic, pairs, None, "already exists",
                        TrainingOptions(output_path=existing, iterations=3))
    assert existing.read_bytes() == b"precious"


# --------------------------------------------------------------------------- curves


def test_training_curves_fill_tables_and_chart(mrml):
    curves = TrainingCurves(mrml.scene)
    for event in [{"event": "iteration", "iteration": 1, "iterations": 4, "loss": 0.9},
                  {"event": "iteration", "iteration": 2, "iterations": 4, "loss": 0.7},
                  {"event": "validation", "iteration": 2, "mean_dice": 0.4, "dice": {}},
                  {"event": "log", "message": "x"}]:
        curves.update(event)
    loss = curves.lossTable.GetTable()
    assert loss.GetNumberOfRows() == 2
    assert [loss.GetValue(r, 1).ToDouble() for r in range(2)] == [0.9, 0.7]
    assert curves.diceTable.GetTable().GetNumberOfRows() == 1
    assert curves.chartNode.GetNumberOfPlotSeriesNodes() == 2
    assert curves.lossSeries.GetYColumnName() == "loss"
    curves.remove()
    assert mrml.scene.GetNodesByClass("vtkMRMLTableNode").GetNumberOfItems() == 0


# --------------------------------------------------------------------------- the real trainer (slow)


def _real_pair(mrml, shared_data, tmp_path):
    """Twelve slices of the real CT with liver and spleen imported as segments, loaded through Slicer's reader."""
    from SAMedLib.volume_io import read_volume

    image = read_volume(shared_data / "ct_3mm.nii.gz")[:, :, 88:100]
    labels = sitk.ReadImage(str(shared_data / "ct_3mm_labels.nii.gz"))[:, :, 88:100]
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    volume = mrml.volumes_logic.AddArchetypeVolume(str(tmp_path / "ct.nrrd"), "CT", 0)
    on_grid = sitk.Resample(labels, volume_to_sitk(volume), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    segmentation = labelmap_to_segmentation(on_grid, [SegmentClass.named(1, "spleen"), SegmentClass.named(5, "liver")],
                                            volume, name="CT annotation")
    return volume, segmentation


@pytest.mark.slow
def test_real_trainer_end_to_end_then_segment(mrml, shared_data, tmp_path, models_home):
    from SAMedMRML.segmenter_logic import SegmenterLogic

    volume, segmentation = _real_pair(mrml, shared_data, tmp_path)
    classes = derive_classes([(volume, segmentation)])
    classes[1].color = (1, 2, 3)  # liver, recoloured by the user
    logic = TrainerLogic()
    logic.workRoot = str(tmp_path / "work")
    os.makedirs(logic.workRoot)
    events = []
    options = TrainingOptions(model_name="real", mode="frozen", head="linear", iterations=4, device="cpu",
                              batch_size=2, extra_args=["--views-per-slice", "1", "--max-labeled-slices", "4",
                                                        "--validate-every", "2", "--no-augmentation"])
    path = logic.train([(volume, segmentation)], classes, options, progress=events.append)
    kinds = [e["event"] for e in events]
    assert "iteration" in kinds and "done" in kinds, logic.lastStderr
    assert path == models_home / "real.safetensors" and list_models() == [path]
    card = read_card(path)
    assert [(c["value"], c["name"]) for c in card["classes"]] == [(1, "spleen"), (2, "liver")]
    assert card["classes"][1]["color"] == [1, 2, 3] and card["classes"][0]["snomed_code"] == "78961009"
    assert os.listdir(logic.workRoot) == []

    # hand-off: SAMedSegmenter's logic segments with the new model
    small = mrml.volumes_logic.AddArchetypeVolume(str(tmp_path / "ct.nrrd"), "CT again", 0)
    node = SegmenterLogic().segment(small, path, device="cpu")
    seg = node.GetSegmentation()
    assert [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())] == ["spleen", "liver"]
    np.testing.assert_allclose(seg.GetSegment("liver").GetColor(), np.array([1, 2, 3]) / 255.0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="the launcher stand-in is a POSIX shell script")
def test_real_trainer_stop_through_a_launcher_and_failure(mrml, shared_data, tmp_path, models_home):
    """Stop as inside Slicer on Linux/macOS: the command starts a launcher that runs the real trainer as its child
    and forwards no signal. The trainer itself must get the stop, write its final checkpoint and exit."""
    volume, segmentation = _real_pair(mrml, shared_data, tmp_path)
    logic = TrainerLogic()
    logic.pythonExecutable, pid_file = _launcher_stand_in(tmp_path)
    logic.workRoot = str(tmp_path / "work")
    os.makedirs(logic.workRoot)
    events = []

    def progress(event):
        events.append(event)
        if event["event"] == "iteration" and event["iteration"] >= 3:
            logic.stop()

    # No validation data: the trainer writes its checkpoint only at its end, i.e. on the clean stop.
    options = TrainingOptions(model_name="stopped", mode="frozen", head="cnn", iterations=100000, device="cpu",
                              batch_size=2, extra_args=["--views-per-slice", "1", "--max-labeled-slices", "4",
                                                        "--no-augmentation"])
    with pytest.raises(TrainingStopped) as info:
        logic.train([(volume, segmentation)], None, options, progress=progress)
    stopped = [e for e in events if e["event"] == "stopped"]
    assert len(stopped) == 1, logic.lastStderr  # the trainer's own clean stop
    assert info.value.checkpoint == models_home / "stopped.safetensors" == Path(stopped[0]["path"])
    card = read_card(info.value.checkpoint)
    assert card["classes"][0]["name"] == "spleen"
    assert card["training"]["iterations"] == stopped[0]["iteration"] == info.value.iteration < 1000
    written = info.value.checkpoint.stat().st_mtime_ns
    assert os.listdir(logic.workRoot) == [] and not logic.isRunning
    trainer_pid = int(pid_file.read_text())
    time.sleep(15)  # a trainer left behind would still be training (and would overwrite the checkpoint at its end)
    assert _processes_of_run(str(tmp_path), [trainer_pid]) == []
    assert info.value.checkpoint.stat().st_mtime_ns == written and os.listdir(logic.workRoot) == []

    # the trainer's own error message comes through the launcher (an option the CLI rejects)
    bad = TrainingOptions(model_name="bad", iterations=2, device="cpu", extra_args=["--views-per-slice", "0"])
    with pytest.raises(TrainingFailed, match="views per slice must be >= 1"):
        logic.train([(volume, segmentation)], None, bad)
    assert os.listdir(logic.workRoot) == []


def test_stop_during_export_never_starts_the_process(mrml, two_pairs, tmp_path, models_home):
    pairs, _ = two_pairs
    record = tmp_path / "record.json"
    logic = _logic(tmp_path, record=record)
    running = []

    def progress(event):
        running.append(logic.isRunning)
        logic.stop()

    with pytest.raises(TrainingStopped) as info:
        logic.train(pairs, None, TrainingOptions(iterations=3), progress=progress)
    assert info.value.checkpoint is None
    assert running and all(running) and not logic.isRunning
    assert not record.exists() and os.listdir(logic.workRoot) == []
    with pytest.raises(RuntimeError, match="already running"):
        logic._busy = True
        try:
            logic.train(pairs)
        finally:
            logic._busy = False
