"""Cohort runs of ``samed segment`` (issue 13): case discovery, resume, failure isolation, statistics, torchrun
sharding and the air-slice skip.

The real cases are small cuts of the sample CTs, made in the test's temporary folder: six axial slices of
``ct_3mm`` (NRRD) and a DICOM series of five real files of ``ct_dicom`` (links to the shared files). The real
model is the untrained LiteMedSAM checkpoint (``tiny_checkpoint``): arbitrary but deterministic labels.
Plumbing-only tests use the transparent threshold network of ``test_preprocessing_inference``.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import SAMedLib.checkpoint as checkpoint_module
import SAMedLib.inference as inference_module
from SAMedLib import cli
from SAMedLib.checkpoint import load_model
from SAMedLib.classes import parse_class_list
from SAMedLib.cohort import (Case, CohortError, discover_cases, is_complete, shard_cases)
from SAMedLib.inference import body_slice_indices, segment_image
from SAMedLib.model_card import Preprocessing
from SAMedLib.statistics import label_statistics
from SAMedLib.volume_io import read_volume, resample_to_reference
from test_preprocessing_inference import image_from, phantom, threshold_model

REPO = Path(__file__).resolve().parents[1]
CLASSES = "1:spleen,5:liver,6:stomach,52:aorta"


def make_cohort(shared_data: Path, folder: Path) -> Path:
    """Two real cases and one corrupt file in ``folder``."""
    folder.mkdir(parents=True)
    ct = sitk.ReadImage(str(shared_data / "ct_3mm.nii.gz"))
    sitk.WriteImage(ct[:, :, 88:94], str(folder / "ct_small.nrrd"))  # spleen, liver, stomach, aorta
    series = folder / "ct_series"
    series.mkdir()
    for dicom_file in sorted((shared_data / "ct_dicom").iterdir())[:5]:
        (series / dicom_file.name).symlink_to(dicom_file)
    (folder / "broken.nii.gz").write_bytes(b"\x13\x37 not an image " * 10)
    (folder / "notes.txt").write_text("not a case")
    return folder


def segment_args(inputs, model, out, *extra) -> list[str]:
    return ["segment", *map(str, inputs), "--model", str(model), "--output-dir", str(out), "--device", "cpu",
            "--quiet", *extra]


class CountingSegment:
    """Wraps inference.segment_image and counts the volumes it segments."""

    def __init__(self, monkeypatch):
        self.calls, self.options = 0, []
        self.real = inference_module.segment_image
        monkeypatch.setattr(inference_module, "segment_image", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.options.append(kwargs)
        return self.real(*args, **kwargs)


FIRST_RUN_FILES: dict[str, bytes] = {}


@pytest.fixture(scope="module")
def first_run(shared_data, tiny_checkpoint, tmp_path_factory):
    """One cohort run over the folder: (cases folder, output folder, exit status, captured stderr)."""
    root = tmp_path_factory.mktemp("cohort")
    cases = make_cohort(shared_data, root / "cases")
    out = root / "out"
    code = cli.main(segment_args([cases], tiny_checkpoint, out, "--seg-nrrd", "--statistics", str(out / "stats.csv")))
    # Later tests rerun into ``out`` (a clean rerun removes failures.csv): keep what the first run wrote.
    FIRST_RUN_FILES.update({p.name: p.read_bytes() for p in out.iterdir()})
    return cases, out, code


# --------------------------------------------------------------------------- folder run, resume, overwrite


def test_folder_of_cases_gives_outputs_failure_row_and_exit_1(first_run, tiny_checkpoint, tmp_path, capsys):
    cases, out, code = first_run
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["ct_series.nii.gz", "ct_series.seg.nrrd", "ct_small.nii.gz",
                                                     "ct_small.seg.nrrd", "failures.csv", "stats.csv"]
    for name, source in (("ct_small", cases / "ct_small.nrrd"), ("ct_series", cases / "ct_series")):
        image, labels = read_volume(source), sitk.ReadImage(str(out / f"{name}.nii.gz"))
        assert labels.GetSize() == image.GetSize()
        np.testing.assert_allclose(labels.GetSpacing(), image.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(labels.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(labels.GetDirection(), image.GetDirection(), atol=1e-6)
    # The cohort's label map is what segmenting that one volume gives.
    direct = segment_image(read_volume(cases / "ct_small.nrrd"), load_model(tiny_checkpoint), device="cpu")
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "ct_small.nii.gz")))
    np.testing.assert_array_equal(written, sitk.GetArrayFromImage(direct))
    assert len(np.unique(written)) >= 2

    with open(out / "failures.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["case"] for row in rows] == ["broken"]
    # The same one-line reason as segmenting that file alone.
    capsys.readouterr()
    assert cli.main(["segment", str(cases / "broken.nii.gz"), "--model", str(tiny_checkpoint), "--output",
                     str(tmp_path / "x.nii.gz"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == f"samed: error: {rows[0]['error']}"

    with open(out / "stats.csv", newline="") as handle:
        stats = list(csv.DictReader(handle))
    assert [(r["case"], r["class_name"]) for r in stats] == [
        (case, name) for case in ("ct_series", "ct_small") for name in ("spleen", "kidney_right", "liver", "stomach")]
    small = {int(r["class_value"]): r for r in stats if r["case"] == "ct_small"}
    for value, row in small.items():
        assert int(row["voxels"]) == int((written == value).sum())
        assert row["model"] == tiny_checkpoint.name


def test_rerun_skips_done_cases_and_overwrite_redoes_them(first_run, tiny_checkpoint, monkeypatch):
    cases, out, _ = first_run
    outputs = ["ct_series.nii.gz", "ct_series.seg.nrrd", "ct_small.nii.gz", "ct_small.seg.nrrd"]
    before = {name: ((out / name).stat().st_ino, (out / name).read_bytes()) for name in outputs}
    stats_before = (out / "stats.csv").read_text()

    counter = CountingSegment(monkeypatch)
    code = cli.main(segment_args([cases], tiny_checkpoint, out, "--seg-nrrd", "--statistics", str(out / "stats.csv")))
    assert code == 1 and counter.calls == 0  # the corrupt file still fails; it fails while reading
    assert {name: ((out / name).stat().st_ino, (out / name).read_bytes()) for name in outputs} == before
    assert (out / "stats.csv").read_text() == stats_before  # statistics of skipped cases come from their outputs

    code = cli.main(segment_args([cases / "ct_small.nrrd"], tiny_checkpoint, out, "--seg-nrrd", "--overwrite"))
    assert code == 0 and counter.calls == 1
    for name in ("ct_small.nii.gz", "ct_small.seg.nrrd"):
        assert (out / name).stat().st_ino != before[name][0]  # a new file was moved into place ...
        assert (out / name).read_bytes() == before[name][1]  # ... with the same content
    assert not (out / "failures.csv").exists()  # nothing failed this time: no stale list


def test_cohort_run_passes_the_post_processing_options_to_every_case(first_run, tiny_checkpoint, monkeypatch,
                                                                       tmp_path):
    cases, _, _ = first_run
    counter = CountingSegment(monkeypatch)
    code = cli.main(segment_args([cases / "ct_small.nrrd", cases / "ct_series"], tiny_checkpoint, tmp_path,
                                 "--refine", "none", "--cleanup", "components", "--no-fill-gaps"))
    assert code == 0 and counter.calls == 2
    for options in counter.options:
        assert (options["refinement"], options["cleanup"], options["fill_gaps"]) == ("none", "components", False)


def test_killed_run_leaves_no_output_that_looks_done(tmp_path, monkeypatch):
    """A real SIGKILL in the middle of writing the label map; the rerun cleans up and completes the case."""
    scan = tmp_path / "cases" / "scan.nrrd"
    scan.parent.mkdir()
    sitk.WriteImage(image_from(phantom(depth=3)), str(scan))
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:0] = [{str(REPO / 'SAMedSegmenter')!r}, {str(REPO / 'Testing')!r}]
        import SimpleITK as sitk
        import SAMedLib.checkpoint as checkpoint
        from SAMedLib import cli
        from test_preprocessing_inference import threshold_model

        checkpoint.load_model = lambda *a, **k: threshold_model()
        real_write = sitk.WriteImage

        def write_half_then_die(image, path, *args, **kwargs):
            real_write(image, path, *args, **kwargs)
            with open(path, "r+b") as handle:
                handle.truncate(os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

        sitk.WriteImage = write_half_then_die
        cli.main(["segment", {str(scan.parent)!r}, "--model", "m.safetensors", "--output-dir", {str(out)!r},
                  "--device", "cpu", "--quiet"])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    left = [p.name for p in out.iterdir()]
    assert len(left) == 1 and left[0].startswith(".scan.tmp-"), left  # only a hidden, half-written temporary
    case = discover_cases([scan.parent], out)[0]
    assert not is_complete(case)

    monkeypatch.setattr(checkpoint_module, "load_model", lambda *a, **k: threshold_model())
    assert cli.main(segment_args([scan.parent], "m.safetensors", out)) == 0
    assert [p.name for p in out.iterdir()] == ["scan.nii.gz"]  # the stale temporary is gone
    assert is_complete(case)


# --------------------------------------------------------------------------- discovery, CSV, sharding


def test_csv_input_with_ids_and_outputs(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "load_model", lambda *a, **k: threshold_model())
    cases = tmp_path / "cases"
    cases.mkdir()
    for name, depth in (("a.nii.gz", 3), ("b.mha", 4)):
        sitk.WriteImage(image_from(phantom(depth=depth)), str(cases / name))
    listing = tmp_path / "list.csv"
    listing.write_text("id,image,output\npatient-01,cases/a.nii.gz,\npatient-02,cases/b.mha,custom/p2.nrrd\n")
    out = tmp_path / "out"
    code = cli.main(segment_args([listing], "m.safetensors", out, "--seg-nrrd", "--statistics", str(out / "s.json")))
    assert code == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "custom/p2.nrrd", "custom/p2.seg.nrrd", "patient-01.nii.gz", "patient-01.seg.nrrd", "s.json"]
    rows = json.loads((out / "s.json").read_text())
    assert [r["case"] for r in rows] == ["patient-01", "patient-02"]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "custom" / "p2.nrrd")))
    assert rows[1]["voxels"] == int((labels == 7).sum()) > 0

    listing.write_text("id,image\nsame,cases/a.nii.gz\nsame,cases/b.mha\n")
    with pytest.raises(CohortError, match="case id 'same' is used twice"):
        discover_cases([listing], out)
    listing.write_text("path\ncases/a.nii.gz\n")
    assert cli.main(segment_args([listing], "m.safetensors", out)) == 2


def test_folder_discovery_names_cases_and_ignores_non_cases(tmp_path):
    folder = tmp_path / "study"
    (folder / "series_1").mkdir(parents=True)
    (folder / "series_1" / "IM0001").write_bytes(b"")  # a DICOM series folder (files without extension)
    for name in ("a.nii.gz", "b.nrrd", "c.mha", "old.seg.nrrd", "notes.txt", ".a.tmp-0123abcd.nii.gz"):
        (folder / name).write_bytes(b"")
    (folder / "out").mkdir()  # the output folder inside the input folder is no case
    cases = discover_cases([folder], folder / "out", seg_nrrd=True)
    assert [(c.id, c.image.name, c.output.name, c.seg_nrrd.name) for c in cases] == [
        ("a", "a.nii.gz", "a.nii.gz", "a.seg.nrrd"), ("b", "b.nrrd", "b.nii.gz", "b.seg.nrrd"),
        ("c", "c.mha", "c.nii.gz", "c.seg.nrrd"), ("series_1", "series_1", "series_1.nii.gz", "series_1.seg.nrrd")]
    assert all(c.output.parent == folder / "out" for c in cases)


def test_argument_errors_exit_2(tmp_path, capsys):
    scan = tmp_path / "scan.nii.gz"
    sitk.WriteImage(image_from(phantom()), str(scan))
    for args, words in (
            (["segment", str(scan), str(scan), "--model", "m", "--output", str(tmp_path / "o.nii.gz")],
             "--output-dir DIR is required"),
            (["segment", str(scan), "--model", "m", "--output", "o.nii.gz", "--output-dir", str(tmp_path)], "not both"),
            (["segment", str(scan), "--model", "m", "--output-dir", str(tmp_path), "--seg-nrrd", "x.seg.nrrd"],
             "takes no file name"),
            (["segment", str(scan), "--model", "m", "--output-dir", str(tmp_path), "--statistics", "s.txt"],
             ".csv or .json"),
            (["segment", str(tmp_path / "none"), "--model", "m", "--output-dir", str(tmp_path / "o")],
             "no such file"),
            (["segment", str(scan), "--model", "m", "--output-dir", str(tmp_path / "o"), "--openvino", "--compile"],
             "either --openvino or --compile")):
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("samed: error: ") and words in err[0], (args, err)
    assert not (tmp_path / "o").exists()


def test_sharding_is_balanced_deterministic_and_complete():
    sizes = [300, 20, 112, 250, 90, 90, 45, 512, 8, 130]
    cases = [Case(f"case{i:02d}", Path(f"/in/{i}"), Path(f"/out/{i}.nii.gz"), slices=s) for i, s in enumerate(sizes)]
    shuffled = [cases[i] for i in np.random.default_rng(1).permutation(len(cases))]
    for world in (1, 2, 3, 4):
        shards = [shard_cases(cases, rank, world) for rank in range(world)]
        # The same split whatever order the ranks listed the cases in (each rank plans on its own).
        assert [{c.id for c in s} for s in shards] == [{c.id for c in shard_cases(shuffled, r, world)}
                                                      for r in range(world)]
        ids = [c.id for shard in shards for c in shard]
        assert sorted(ids) == sorted(c.id for c in cases)  # every case exactly once
        loads = [sum(c.slices for c in shard) for shard in shards]
        assert max(loads) - min(loads) <= max(sizes)  # greedy largest-first bound
    loads = [sum(c.slices for c in shard_cases(cases, rank, 2)) for rank in range(2)]
    assert loads == [777, 780]  # 1557 slices split almost evenly (round robin by count: 555 / 1002)


# --------------------------------------------------------------------------- statistics


def test_statistics_values_on_a_hand_made_case():
    image_arr = np.zeros((2, 3, 4), np.int16)
    labels_arr = np.zeros((2, 3, 4), np.uint8)
    image_arr[0, 0, :2], labels_arr[0, 0, :2] = (10, 30), 5  # mean 20, std 10
    image_arr[1, 2, 3], labels_arr[1, 2, 3] = -7, 1
    labels_arr[1, 1, 1] = 9  # not a listed class: ignored
    image = image_from(image_arr, spacing=(2.0, 0.5, 3.0))
    labels = sitk.GetImageFromArray(labels_arr)
    labels.CopyInformation(image)
    rows = label_statistics(image, labels, parse_class_list("1:spleen,5:liver,6:stomach"), "c", "m")
    by_name = {r["class_name"]: r for r in rows}
    assert by_name["liver"]["voxels"] == 2 and by_name["liver"]["volume_ml"] == pytest.approx(2 * 3.0 / 1000)
    assert by_name["liver"]["intensity_mean"] == pytest.approx(20) and by_name["liver"]["intensity_std"] == pytest.approx(10)
    assert by_name["spleen"]["intensity_mean"] == -7 and by_name["spleen"]["intensity_std"] == 0
    assert by_name["stomach"]["voxels"] == 0 and np.isnan(by_name["stomach"]["intensity_mean"])


def test_samed_statistics_matches_voxel_volume_and_evaluate(shared_data, tmp_path, capsys):
    """The DICOM series' labels are stored with a flipped y axis: statistics must resample them like evaluate."""
    labels_path = shared_data / "ct_dicom_labels.nii.gz"
    out = tmp_path / "stats.json"
    assert cli.main(["statistics", "--image", str(shared_data / "ct_dicom"), "--labels", str(labels_path),
                     "--classes", CLASSES, "--output", str(out)]) == 0
    rows = {r["class_name"]: r for r in json.loads(out.read_text())}

    image = read_volume(shared_data / "ct_dicom")
    empty = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(image)
    sitk.WriteImage(empty, str(tmp_path / "empty.nii.gz"))
    capsys.readouterr()
    assert cli.main(["evaluate", "--prediction", str(tmp_path / "empty.nii.gz"), "--reference", str(labels_path),
                     "--classes", CLASSES, "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)["classes"]

    voxel_ml = float(np.prod(image.GetSpacing())) / 1000
    on_image = sitk.GetArrayFromImage(resample_to_reference(read_volume(labels_path, allow_constant=True), image))
    hu = sitk.GetArrayFromImage(image).astype(np.float64)
    for name, row in rows.items():
        assert row["voxels"] == evaluated[name]["ref_voxels"] > 1000
        assert row["volume_ml"] == pytest.approx(row["voxels"] * voxel_ml, rel=1e-12)
        inside = hu[on_image == row["class_value"]]
        assert row["intensity_mean"] == pytest.approx(inside.mean()) and row["intensity_std"] == pytest.approx(inside.std())
    # Contrast-enhanced liver (89 HU); the label map's raw array, not resampled, would give -75 HU (air and fat).
    assert 60 < rows["liver"]["intensity_mean"] < 200

    assert cli.main(["statistics", "--image", str(shared_data / "ct_dicom"), "--labels", str(labels_path),
                     "--classes", "5:liver"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("case,class_value,class_name,voxels") and printed[1].startswith("ct_dicom,5,liver,")


# --------------------------------------------------------------------------- air-slice skip


def test_body_slice_indices_follow_the_window():
    ct = np.full((5, 4, 4), -1000, np.int16)
    ct[1, 2, 2] = -124  # just inside [-125, 275]
    ct[2, 0, 0] = -125  # on the window's edge: normalises to 0, still air
    ct[3] = 40
    assert body_slice_indices(ct, Preprocessing(), (-125.0, 275.0)).tolist() == [1, 3]
    mr = np.zeros((3, 4, 4), np.float32)
    mr[1, 1, 1] = 5.0
    assert body_slice_indices(mr, Preprocessing(modality="MR"), (0.0, 10.0)).tolist() == [1]


def test_air_slice_skip_leaves_labels_unchanged_on_a_real_scan(shared_data, tiny_checkpoint, monkeypatch):
    ct = sitk.GetArrayFromImage(read_volume(shared_data / "ct_3mm.nii.gz"))[88:92]
    rng = np.random.default_rng(0)
    air = (-1000 + rng.normal(0, 20, (2,) + ct.shape[1:])).astype(ct.dtype)  # air with scanner noise
    padded = np.concatenate([air[:1], ct, air[1:]])
    image = image_from(padded, spacing=(3.0, 3.0, 3.0))
    model = load_model(tiny_checkpoint)
    calls = []
    real_predict = inference_module.SlicePredictor.__call__
    monkeypatch.setattr(inference_module.SlicePredictor, "__call__",
                        lambda self, slices, *a: calls.append(len(slices)) or real_predict(self, slices, *a))
    skipped = sitk.GetArrayFromImage(segment_image(image, model, device="cpu"))
    assert sum(calls) == 4  # the two air slices never reached the model
    monkeypatch.setattr(inference_module, "body_slice_indices", lambda volume, *a: np.arange(volume.shape[0]))
    everything = sitk.GetArrayFromImage(segment_image(image, model, device="cpu"))
    assert sum(calls) == 4 + 6
    np.testing.assert_array_equal(skipped[1:5], everything[1:5])
    assert len(np.unique(skipped[1:5])) >= 2
    assert not skipped[[0, 5]].any()


# --------------------------------------------------------------------------- torchrun


@pytest.mark.slow
def test_torchrun_two_cpu_processes_write_the_same_bytes(first_run, tiny_checkpoint, tmp_path):
    cases, _, _ = first_run
    out = tmp_path / "out"
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "SAMedLib.cli",
               *segment_args([cases], tiny_checkpoint, out, "--seg-nrrd", "--statistics", str(out / "stats.csv"))]
    env = {**os.environ, "PYTHONPATH": str(REPO / "SAMedSegmenter")}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stderr[-3000:]  # the corrupt case fails: exit 1 from the ranks
    assert "2 segmented, 0 already done, 1 failed" in result.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(FIRST_RUN_FILES)
    for name in names:
        assert (out / name).read_bytes() == FIRST_RUN_FILES[name], name


# --------------------------------------------------------------------------- encoder runtimes


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="OpenVINO not installed (part of [test])")
def test_openvino_segments_a_real_scan_like_torch(shared_data, tiny_checkpoint, tmp_path):
    image = read_volume(shared_data / "ct_3mm.nii.gz")[:, :, 86:90]
    scan, output = tmp_path / "slab.nii.gz", tmp_path / "labels.nii.gz"
    sitk.WriteImage(image, str(scan))
    expected = sitk.GetArrayFromImage(segment_image(image, load_model(tiny_checkpoint), device="cpu",
                                                    precision="fp32"))
    assert cli.main(["segment", str(scan), "--model", str(tiny_checkpoint), "--output", str(output),
                     "--openvino", "--precision", "fp32", "--quiet"]) == 0
    labels = sitk.ReadImage(str(output))
    assert labels.GetSize() == image.GetSize() and labels.GetDirection() == image.GetDirection()
    different = (sitk.GetArrayFromImage(labels) != expected).mean()
    assert different < 1e-3 and len(np.unique(expected)) >= 2, different


def test_openvino_runs_on_the_cpu_only():
    from argparse import Namespace

    from SAMedLib.errors import SAMedError

    with pytest.raises(SAMedError, match="on the CPU, but the device is 'cuda:0'"):
        cli._check_encoder_runtime(Namespace(openvino=True, compile=False), "cuda:0")


def test_compiled_encoder_falls_back_to_eager_when_compiling_fails(monkeypatch, caplog):
    import logging

    import torch
    from torch import nn

    from SAMedLib.acceleration import compile_encoder

    attempts = []

    def no_compiler(module, **kwargs):  # torch.compile defers the work: it fails at the first call
        def call(images):
            attempts.append(images.shape)
            raise RuntimeError("CppCompileError: C++ compile error\ncommand: cl /O2 ...")
        return call

    monkeypatch.setattr(torch, "compile", no_compiler)
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), nn.GELU()).eval()
    images = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        expected = encoder(images)
        wrapped = compile_encoder(encoder)
        with caplog.at_level(logging.WARNING, logger="SAMedLib.acceleration"):
            first, second = wrapped(images), wrapped(images)
    assert len(attempts) == 1  # after the first failure the compiled path is not tried again
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-5)
    assert [r.getMessage() for r in caplog.records] == [
        "torch.compile failed (CppCompileError: C++ compile error): running the encoder uncompiled"]
