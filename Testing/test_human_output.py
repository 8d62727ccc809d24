"""Output a person reads or looks at: progress (tqdm on a terminal, plain lines in logs), training events as
sentences, and the --preview montage (geometry, colours, the reference's outlines, atomic write)."""
from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from SAMedLib import cli
from SAMedLib.classes import parse_class_list
from SAMedLib.console import Progress, TrainingDisplay, format_dice, format_training_event
from SAMedLib.preview import PreviewError, montage_slices, write_preview
from SAMedLib.volume_io import read_volume, resample_to_reference, to_canonical

ORGANS = parse_class_list("1:spleen,5:liver,6:stomach,52:aorta")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def dicom(shared_data):
    """The 20-slice DICOM series and its reference label map (stored with a flipped y axis)."""
    return read_volume(shared_data / "ct_dicom"), sitk.ReadImage(str(shared_data / "ct_dicom_labels.nii.gz"))


# --------------------------------------------------------------------------- progress


def test_progress_in_a_log_is_plain_lines_with_eta_and_no_carriage_returns():
    log = io.StringIO()
    bar = Progress("segment", 1.0, log)
    for k in range(1, 41):
        bar.update_to(k / 40, f"slice {k}/40")
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 10  # one per tenth, not one per slice
    assert lines[0].startswith("segment:  10% slice 4/40 (") and "ETA" in lines[0]
    assert lines[-1].startswith("segment: 100% slice 40/40 (") and "ETA" not in lines[-1]


def test_progress_on_a_terminal_is_a_tqdm_bar():
    terminal = Terminal()
    bar = Progress("training", 200, terminal)
    bar.update_to(50, "50/200, loss 0.4000")
    bar.close()
    text = terminal.getvalue()
    assert "\r" in text and "training:  25%|" in text and ", 50/200, loss 0.4000]" in text
    assert "<" in text  # tqdm's elapsed<remaining


def test_training_events_read_as_sentences():
    validation = {"event": "validation", "iteration": 50, "dice": {"spleen": 0.8012, "liver": 0.9345, "pancreas": None},
                  "mean_dice": 0.7123, "best": True}
    assert format_training_event(validation) == ("iteration 50: mean Dice 0.712 (spleen 0.801, liver 0.934, "
                                                 "pancreas n/a), best so far")
    assert format_dice({"aorta": 0.5}) == "aorta 0.500"
    refinement = {"event": "refinement", "chosen": {"spleen": "box", "aorta": "none"},
                  "validation_dice": {"none": {"spleen": 0.8, "aorta": 0.9}}}
    assert format_training_event(refinement) == ("self-prompted refinement chosen on the validation slices: "
                                                 "spleen box, aorta none")
    stopped = {"event": "stopped", "path": "m.safetensors", "iteration": 73, "seconds": 95.2, "best_mean_dice": -1.0}
    assert format_training_event(stopped) == ("training stopped after 73 iterations in 1m35s, no validation slices: "
                                              "m.safetensors")
    warning = {"event": "warning", "message": "best validation mean Dice 0.523 is below 0.7: ..."}
    assert format_training_event(warning) == "warning: best validation mean Dice 0.523 is below 0.7: ..."
    probe = {"event": "probe_start", "loss_before": 1.0566, "loss_after": 0.4945,
             "message": "class outputs fitted on the frozen features: loss 1.0566 -> 0.4945"}
    assert format_training_event(probe) == "class outputs fitted on the frozen features: loss 1.0566 -> 0.4945"
    log = io.StringIO()
    display = TrainingDisplay(log)
    for i in range(1, 5):
        display({"event": "iteration", "iteration": i, "iterations": 4, "loss": 1.0 / i, "lr": 1e-3, "eta_s": 1.0})
    display({"event": "checkpoint", "path": "m.safetensors", "iteration": 4})
    assert log.getvalue().splitlines()[-1] == "checkpoint saved: m.safetensors (iteration 4)"
    assert "training: 100% 4/4, loss 0.2500" in log.getvalue()


# --------------------------------------------------------------------------- preview


def test_montage_puts_labels_on_the_image_in_physical_space(dicom):
    image, reference = dicom  # the reference's y axis is flipped against the series'
    montage = montage_slices(image, reference, values=[1, 5], count=3)
    canonical, _ = to_canonical(image)
    on_image = sitk.GetArrayFromImage(resample_to_reference(reference, canonical))
    np.testing.assert_array_equal(montage.labels, on_image[montage.slice_indices])
    raw = sitk.GetArrayFromImage(reference)[montage.slice_indices]
    assert (montage.labels != raw).mean() > 0.01  # comparing raw arrays would have drawn the organs mirrored
    assert len(montage.slice_indices) == 3 and montage.depth == 20 and montage.image.shape == (3, 512, 512)
    # Radiological view: the liver (patient right) on the left half, the spleen on the right half.
    columns = np.arange(512)
    for k in range(3):
        liver = (montage.labels[k] == 5).sum(0) @ columns / (montage.labels[k] == 5).sum()
        spleen = (montage.labels[k] == 1).sum(0) @ columns / (montage.labels[k] == 1).sum()
        assert liver < 256 < spleen


def _pixels_near(picture: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 8) -> np.ndarray:
    return (np.abs(picture[..., :3].astype(int) - np.array(rgb)) <= tolerance).all(-1)


def test_preview_draws_segments_in_their_colours_and_the_reference_dashed(dicom, tmp_path):
    from matplotlib.image import imread

    image, reference = dicom
    spleen, liver = ORGANS[0], ORGANS[1]
    prediction = resample_to_reference(reference, image)
    path = write_preview(image, prediction, [spleen, liver], tmp_path / "p.png", count=1, window=(-125, 275))
    picture = (imread(path) * 255).round().astype(np.uint8)
    spleen_x = np.nonzero(_pixels_near(picture, spleen.color))[1]
    liver_x = np.nonzero(_pixels_near(picture, liver.color))[1]
    assert len(spleen_x) > 50 and len(liver_x) > 50
    assert liver_x.mean() < spleen_x.mean()  # where they are in the body, as above
    assert list(tmp_path.iterdir()) == [path]  # written through a temporary file, nothing else left

    # An empty prediction: the only colour left is the reference's outline.
    empty = sitk.Image(prediction.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(prediction)
    alone = (imread(write_preview(image, empty, [spleen], tmp_path / "e.png", count=1)) * 255).round().astype(np.uint8)
    with_reference = write_preview(image, empty, [spleen], tmp_path / "r.png", reference=reference, count=1)
    outlined = (imread(with_reference) * 255).round().astype(np.uint8)
    legend_only = _pixels_near(alone, spleen.color).sum()
    assert _pixels_near(outlined, spleen.color).sum() > legend_only + 50


def test_preview_without_matplotlib_fails_before_the_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code = cli.main(["segment", str(tmp_path / "not_read_yet.nii.gz"), "--model", "m.safetensors",
                     "--output", str(tmp_path / "o.nii.gz"), "--preview", str(tmp_path / "p.png")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("samed: error: --preview needs matplotlib") and len(err.splitlines()) == 1
    with pytest.raises(PreviewError, match="must be a .png"):
        write_preview(None, None, ORGANS, tmp_path / "p.jpg")
    assert list(tmp_path.iterdir()) == []


def test_demo_draws_its_preview_by_default(shared_data, tmp_path, monkeypatch, capsys):
    """The demo's commands, recorded instead of run: its `samed evaluate` draws out/demo/preview.png."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "one_volume_demo.py"
    spec = importlib.util.spec_from_file_location("one_volume_demo", script)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    commands = []

    def run_cli(argv: list[str]) -> str:
        commands.append(argv)
        return json.dumps({"classes": {name: {"dice": 0.5} for name in demo.HEADLINE}}) if "--json" in argv else "a table"

    monkeypatch.setattr(demo, "run_cli", run_cli)
    monkeypatch.setattr(sys, "argv", ["one_volume_demo.py", "--data", str(shared_data), "--out", str(tmp_path)])
    assert demo.main() == 0
    drawing = [argv for argv in commands if "--preview" in argv]
    assert len(drawing) == 1 and drawing[0][0] == "evaluate"
    assert drawing[0][drawing[0].index("--preview") + 1] == str(tmp_path / "preview.png")
    assert drawing[0][drawing[0].index("--image") + 1] == str(shared_data / "ct_dicom")
    assert "a table" in capsys.readouterr().out
