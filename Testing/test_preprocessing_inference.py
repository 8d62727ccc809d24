"""Model-grid mapping, whole-volume inference geometry, progress/cancel, OOM fallback and the CLI contract (issue 3).

Most geometry checks use a transparent "threshold" network (class 1 where the normalised intensity > 0.5),
so the expected label map is known voxel by voxel in any orientation; the real LiteMedSAM checkpoint
(``tiny_checkpoint`` from conftest: packaged weights + an untrained linear head) checks that the same scan
stored in two orientations gives the same prediction.
"""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage
from torch import nn

import SAMedLib.checkpoint as checkpoint_module
import SAMedLib.inference as inference_module
from SAMedLib import cli
from SAMedLib.checkpoint import LoadedModel, load_model
from SAMedLib.classes import SegmentClass
from SAMedLib.errors import SAMedError
from SAMedLib.inference import Cancelled, resolve_device, segment_image
from SAMedLib.model_card import ModelCard, Preprocessing
from SAMedLib.preprocessing import (from_model_grid, gaussian_blur, model_input, slice_to_model_theta, smoothing_sigmas,
                                    to_model_grid)
from SAMedLib.volume_io import resample_to_reference

ORGAN = SegmentClass.named(7, "organ")
THRESHOLD_HU = 75.0  # middle of the default CT window [-125, 275]


# --------------------------------------------------------------------------- helpers


class ThresholdNet(nn.Module):
    """logits [0.5 - x, x - 0.5]: class 1 exactly where the encoder input (normalised intensity) exceeds 0.5."""

    def __init__(self):
        super().__init__()
        self.batch_sizes: list[int] = []
        self.inputs: list[torch.Tensor] = []
        self.image_encoder = nn.Identity()  # what segment_image prepares (folds BatchNorm, channels-last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(images.shape[0])
        self.inputs.append(images[:, 0].clone())
        x = images[:, :1]
        return torch.cat([0.5 - x, x - 0.5], dim=1)


def threshold_model(prep: Preprocessing | None = None, net: nn.Module | None = None) -> LoadedModel:
    prep = prep or Preprocessing()
    card = ModelCard(base_name="litemedsam", base_sha256="0" * 64, input_size=prep.input_size, head="linear",
                     mode="frozen", classes=[ORGAN], preprocessing=prep)
    return LoadedModel(net or ThresholdNet(), card, None)


def phantom(depth: int = 4, height: int = 36, width: int = 44) -> np.ndarray:
    """(z, y, x) HU: soft tissue (-100) with a bright (200) asymmetric L-shape that changes from slice to slice."""
    arr = np.full((depth, height, width), -100, np.int16)
    for z in range(depth):
        arr[z, 6:24, 8 + 2 * z:14 + 2 * z] = 200  # vertical bar, moving right with z
        arr[z, 18:24, 8 + 2 * z:34] = 200  # horizontal foot, towards +x
    arr[-1, 28:33, 36:41] = 200  # a block only in the last slice
    return arr


def image_from(arr: np.ndarray, spacing=(3.0, 2.5, 5.0), origin=(10.0, -20.0, 30.0), direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection((np.eye(3) if direction is None else np.asarray(direction)).ravel().tolist())
    return image


def rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def reoriented_copy(image: sitk.Image) -> sitk.Image:
    """The same physical scan stored with permuted and flipped voxel axes (and so another direction matrix)."""
    copy = sitk.Flip(sitk.PermuteAxes(image, [2, 0, 1]), [True, False, True])
    assert copy.GetDirection() != image.GetDirection() and copy.GetSize() != image.GetSize()
    # Precondition: it really is the same scan in physical space.
    np.testing.assert_array_equal(sitk.GetArrayFromImage(resample_to_reference(copy, image)),
                                  sitk.GetArrayFromImage(image))
    return copy


def assert_same_geometry(result: sitk.Image, image: sitk.Image) -> None:
    assert result.GetSize() == image.GetSize()
    assert result.GetSpacing() == image.GetSpacing()
    assert result.GetOrigin() == image.GetOrigin()
    assert result.GetDirection() == image.GetDirection()


def in_plane_edges(mask: np.ndarray) -> np.ndarray:
    """Voxels within one in-plane voxel of the mask's boundary (per axial slice of the array)."""
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True
    return ndimage.binary_dilation(mask, structure) & ~ndimage.binary_erosion(mask, structure, border_value=1)


def assert_threshold_labels(result: sitk.Image, image: sitk.Image, slice_axis: int = 0) -> None:
    """The label map is ORGAN.value where HU > threshold, except on the organ's in-plane edge."""
    got = sitk.GetArrayFromImage(result)
    organ = sitk.GetArrayFromImage(image) > THRESHOLD_HU
    assert set(np.unique(got)) == {0, ORGAN.value}
    wrong = (got == ORGAN.value) != organ
    moved = np.moveaxis(organ, slice_axis, 0)
    edges = np.moveaxis(in_plane_edges(moved), 0, slice_axis)
    assert not (wrong & ~edges).any(), f"{int((wrong & ~edges).sum())} wrong voxels away from edges"
    assert wrong.sum() <= 0.25 * organ.sum()


# --------------------------------------------------------------------------- model-grid mapping


@pytest.mark.parametrize("inplane", ["spacing", "stretch"])
def test_label_pattern_survives_model_grid_round_trip(inplane):
    """Anisotropic slice (2.4 x 1.7 mm) -> model grid -> back: labels agree except within 1 pixel of edges."""
    prep = Preprocessing(inplane=inplane, pixel_spacing_mm=1.6)
    height, width = 70, 90
    labels = np.zeros((height, width), np.float32)
    labels[10:40, 15:30] = 1
    labels[30:60, 25:80] = 2
    labels[45:52, 60:70] = 3  # inside class 2
    theta = slice_to_model_theta((height, width), (2.4, 1.7), prep)
    on_grid = to_model_grid(torch.from_numpy(labels)[None, None], theta, prep.input_size, mode="nearest")
    back, inside = from_model_grid(on_grid, theta, (height, width), mode="nearest")
    assert inside.all()  # 168 x 153 mm fits into the 409.6 mm field of view
    back = back[0, 0].numpy()
    wrong = back != labels
    edges = np.zeros_like(wrong)
    for value in (1, 2, 3):
        mask = labels == value
        edges |= ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask, border_value=1)
    assert not (wrong & ~edges).any()
    assert wrong.mean() < 0.05
    assert set(np.unique(on_grid.numpy())) == {0, 1, 2, 3}


def test_spacing_mode_keeps_physical_size():
    """A 100 mm disc spans 100 / 1.6 = 62.5 model pixels in both directions, whatever the slice's pixel size."""
    prep = Preprocessing(pixel_spacing_mm=1.6)
    spacing_y, spacing_x = 0.7, 1.3
    height, width = 200, 160  # 140 x 208 mm: not square, so stretching would distort
    yy, xx = np.mgrid[0:height, 0:width]
    disc = (((yy + 0.5 - height / 2) * spacing_y) ** 2 + ((xx + 0.5 - width / 2) * spacing_x) ** 2) <= 50.0 ** 2
    theta = slice_to_model_theta((height, width), (spacing_y, spacing_x), prep)
    on_grid = to_model_grid(torch.from_numpy(disc.astype(np.float32))[None, None], theta, prep.input_size)[0, 0]
    rows = (on_grid > 0.5).any(dim=1).sum().item()
    cols = (on_grid > 0.5).any(dim=0).sum().item()
    assert abs(rows - 62.5) <= 2 and abs(cols - 62.5) <= 2, (rows, cols)
    # The disc stays centred on the model grid.
    ys, xs = torch.nonzero(on_grid > 0.5, as_tuple=True)
    assert abs(ys.float().mean().item() - 127.5) < 1 and abs(xs.float().mean().item() - 127.5) < 1
    # Stretch mode instead fills the grid with the slice: the disc is no longer round.
    stretched = to_model_grid(torch.from_numpy(disc.astype(np.float32))[None, None],
                              slice_to_model_theta((height, width), (spacing_y, spacing_x),
                                                   Preprocessing(inplane="stretch")), 256)[0, 0] > 0.5
    assert abs(stretched.any(dim=1).sum().item() - stretched.any(dim=0).sum().item()) > 20


def test_smoothing_sigmas_follow_fwhm_arithmetic():
    assert smoothing_sigmas((3.0, 3.0), Preprocessing(resolution_mm=3.0)) == (0.0, 0.0)  # the training scan itself
    sy, sx = smoothing_sigmas((0.977, 0.5), Preprocessing(resolution_mm=3.0))
    assert sy == pytest.approx(np.sqrt(9 - 0.977**2) / 2.3548 / 0.977, rel=1e-3)  # ~1.23 px
    assert sx == pytest.approx(np.sqrt(9 - 0.25) / 2.3548 / 0.5, rel=1e-3)
    # Coarser recorded resolution than the model pixel: the model pixel still sets the antialiasing.
    assert smoothing_sigmas((0.977, 0.977), Preprocessing(resolution_mm=1.0))[0] == pytest.approx(
        np.sqrt(1.6**2 - 0.977**2) / 2.3548 / 0.977, rel=1e-3)
    # No resolution in the card (older models, imported SAMed): no smoothing, as they were trained.
    assert smoothing_sigmas((0.977, 0.977), Preprocessing()) == (0.0, 0.0)


def test_gaussian_blur_keeps_constants_and_has_the_asked_width():
    flat = torch.full((1, 1, 21, 21), 0.3)
    assert torch.allclose(gaussian_blur(flat, 1.5, 1.5), flat)
    impulse = torch.zeros(1, 1, 41, 41)
    impulse[0, 0, 20, 20] = 1.0
    blurred = gaussian_blur(impulse, 2.0, 0.0)[0, 0]
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5) and torch.equal(blurred[:, 19], torch.zeros(41))
    offsets = torch.arange(41.0) - 20
    assert (blurred[:, 20] * offsets**2).sum().item() == pytest.approx(4.0, rel=0.02)  # variance = sigma^2


def test_a_fine_scan_reaches_the_model_like_a_coarse_scan_of_the_same_anatomy():
    """One smooth-edged anatomy sampled at 1 mm and at 3 mm (box-averaged, as a thick-pixel scanner does).

    With the model's resolution at 3 mm, the 1 mm scan's model input is much closer to the 3 mm one's
    than when it is only resampled."""
    fine_mm, coarse_mm, extent = 1.0, 3.0, 300
    yy, xx = np.mgrid[0:extent, 0:extent] + 0.5  # 1 mm pixel centres
    anatomy = ((yy - 150) ** 2 / 60**2 + (xx - 140) ** 2 / 90**2 < 1).astype(np.float32) * 0.6
    anatomy += ((yy - 120) ** 2 + (xx - 190) ** 2 < 12**2) * 0.35  # a small bright structure
    anatomy += ((np.sin(xx / 2.0) * np.sin(yy / 2.0)) > 0.7) * 0.05 * (anatomy > 0)  # fine texture a 3 mm pixel loses
    coarse = anatomy.reshape(100, 3, 100, 3).mean(axis=(1, 3))
    prep = Preprocessing(resolution_mm=coarse_mm)
    as_coarse = model_input(torch.from_numpy(coarse)[None], slice_to_model_theta((100, 100), (3.0, 3.0), prep),
                            prep, (coarse_mm, coarse_mm))
    theta = slice_to_model_theta((extent, extent), (fine_mm, fine_mm), prep)
    matched = model_input(torch.from_numpy(anatomy)[None], theta, prep, (fine_mm, fine_mm))
    unmatched = model_input(torch.from_numpy(anatomy)[None], theta, Preprocessing(), (fine_mm, fine_mm))
    gap_matched = (matched - as_coarse).abs().mean().item()
    gap_unmatched = (unmatched - as_coarse).abs().mean().item()
    assert gap_matched < 0.6 * gap_unmatched, (gap_matched, gap_unmatched)


def test_wide_slice_is_cropped_to_the_field_of_view_and_marked_outside():
    """A 500 mm slice (512 px at 0.977 mm) in spacing mode: only the central 409.6 mm is covered."""
    prep = Preprocessing()
    theta = slice_to_model_theta((512, 512), (0.977, 0.977), prep)
    _, inside = from_model_grid(torch.zeros(1, 2, 256, 256), theta, (512, 512))
    covered = inside.any(dim=0).sum().item()
    assert abs(covered - 409.6 / 0.977) <= 2
    assert not inside[0, 0] and inside[256, 256]
    slices = torch.rand(2, 512, 512)
    assert model_input(slices, theta, prep, (0.977, 0.977)).shape == (2, 3, 256, 256)


# --------------------------------------------------------------------------- segment_image geometry


DIRECTIONS = {
    "identity": np.eye(3),
    "flipped_y": np.diag([1.0, -1.0, 1.0]),  # like ct_dicom_labels.nii.gz
    "nifti_ras_like": np.diag([-1.0, -1.0, 1.0]),
    "oblique": rotation("x", 8) @ rotation("z", 20),
}


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_segment_image_keeps_geometry_and_maps_labels_back(name):
    image = image_from(phantom(), spacing=(3.0, 2.5, 5.0), direction=DIRECTIONS[name])
    events = []
    result = segment_image(image, threshold_model(), device="cpu", batch_size=3,
                           progress=lambda fraction, message: events.append((fraction, message)))
    assert_same_geometry(result, image)
    assert result.GetPixelID() == sitk.sitkUInt8
    assert_threshold_labels(result, image)
    fractions = [f for f, _ in events]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(b > a for a, b in zip(fractions, fractions[1:]))
    assert all(isinstance(m, str) and m for _, m in events)
    assert result.GetMetaData("SAMed_largest_component") == "0"


def test_segment_image_on_permuted_flipped_storage():
    """Axial slices are taken after reorientation: a sagittal-stored copy gives the same labels in space."""
    image = image_from(phantom())
    copy = reoriented_copy(image)
    net = ThresholdNet()
    result = segment_image(copy, threshold_model(net=net), device="cpu", batch_size=2)
    assert_same_geometry(result, copy)
    assert net.batch_sizes == [2, 2]  # 4 axial slices, not copy's first axis
    on_image = sitk.GetArrayFromImage(resample_to_reference(result, image))
    direct = sitk.GetArrayFromImage(segment_image(image, threshold_model(), device="cpu", batch_size=2))
    np.testing.assert_array_equal(on_image, direct)
    assert_threshold_labels(result, copy, slice_axis=2)  # copy's array axis 2 is the original z


def test_segment_image_spacing_mode_sees_physical_size():
    """Through segment_image: a 60 mm wide square occupies 60 / 1.6 = 37.5 model pixels, on both scanners."""
    for spacing in ((0.8, 0.8, 2.0), (2.0, 1.25, 2.0)):
        size_x, size_y = int(round(120 / spacing[0])), int(round(120 / spacing[1]))
        arr = np.full((2, size_y, size_x), -125, np.int16)  # window bottom: 0
        cy, cx = size_y // 2, size_x // 2
        hy, hx = int(round(30 / spacing[1])), int(round(30 / spacing[0]))
        arr[:, cy - hy:cy + hy, cx - hx:cx + hx] = 275  # window top: 1, so antialiasing keeps the 0.5 edge in place
        net = ThresholdNet()
        segment_image(image_from(arr, spacing=spacing), threshold_model(net=net), device="cpu")
        grid = net.inputs[0][0] > 0.5
        assert abs(grid.any(dim=1).sum().item() - 37.5) <= 1.5, spacing
        assert abs(grid.any(dim=0).sum().item() - 37.5) <= 1.5, spacing


def test_same_scan_in_two_orientations_gives_the_same_prediction(tiny_checkpoint, tmp_path):
    """Real LiteMedSAM checkpoint; the second orientation goes through `samed segment`."""
    body = np.full((3, 48, 64), -1000, np.int16)
    yy, xx = np.mgrid[0:48, 0:64]
    body[:, ((yy - 24) / 20.0) ** 2 + ((xx - 32) / 28.0) ** 2 < 1] = 40
    body[:, 30:38, 29:35] = 700  # spine, posterior
    body[:, 10:22, 12:26] = 150  # a bright organ on one side
    body[1:, 16:24, 40:52] = -20  # something else, only in two slices
    image = image_from(body, spacing=(5.0, 6.0, 5.0))
    copy = reoriented_copy(image)
    model = load_model(tiny_checkpoint)
    direct = segment_image(image, model, device="cpu", batch_size=3)
    assert_same_geometry(direct, image)
    direct_arr = sitk.GetArrayFromImage(direct)
    assert len(np.unique(direct_arr)) >= 2  # the comparison is not between two blank maps

    input_path, output_path = tmp_path / "copy.nrrd", tmp_path / "labels.nii.gz"
    sitk.WriteImage(copy, str(input_path))
    code = cli.main(["segment", str(input_path), "--model", str(tiny_checkpoint), "--output", str(output_path),
                     "--device", "cpu", "--batch-size", "3", "--quiet"])
    assert code == 0
    written = sitk.ReadImage(str(output_path))
    assert written.GetSize() == copy.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), copy.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), copy.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), copy.GetDirection(), atol=1e-6)
    on_image = sitk.GetArrayFromImage(resample_to_reference(written, image))
    np.testing.assert_array_equal(on_image, direct_arr)


# --------------------------------------------------------------------------- progress, cancel, OOM


def test_cancellation_stops_between_batches():
    image = image_from(phantom(depth=4))
    net = ThresholdNet()
    events, checks = [], []

    def should_cancel():
        checks.append(len(net.batch_sizes))
        return len(checks) >= 2  # after the first batch

    with pytest.raises(Cancelled):
        segment_image(image, threshold_model(net=net), device="cpu", batch_size=1,
                      progress=lambda f, m: events.append(f), should_cancel=should_cancel)
    assert net.batch_sizes == [1]  # the second batch never ran
    assert events == [0.0, 0.25]  # progress shows it did not finish
    assert checks == [0, 1]


class _Interrupt:
    """Replaces SlicePredictor.__call__: the first batch works, the second raises ``error``."""

    def __init__(self, error: BaseException):
        self.error, self.calls = error, 0
        self.real = inference_module.SlicePredictor.__call__

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls >= 2:
            raise self.error
        return self.real(*args, **kwargs)


@pytest.mark.parametrize("error, code", [(Cancelled("segmentation cancelled"), 130),
                                         (SAMedError("disk on fire"), 2)])
def test_cli_writes_nothing_when_cancelled_or_failed(error, code, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint_module, "load_model", lambda *a, **k: threshold_model())
    interrupt = _Interrupt(error)
    monkeypatch.setattr(inference_module.SlicePredictor, "__call__", lambda *a, **k: interrupt(*a, **k))
    input_path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(image_from(phantom()), str(input_path))
    output, seg = tmp_path / "out" / "labels.nii.gz", tmp_path / "out" / "labels.seg.nrrd"
    result = cli.main(["segment", str(input_path), "--model", str(tmp_path / "m.safetensors"), "--output",
                       str(output), "--seg-nrrd", str(seg), "--device", "cpu", "--batch-size", "1", "--quiet"])
    assert result == code and interrupt.calls == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and (err[0] == "samed: cancelled" if code == 130 else err[0] == "samed: error: disk on fire")
    assert not output.exists() and not seg.exists()
    assert not output.parent.exists() or not any(output.parent.iterdir())


def test_cli_ctrl_c_leaves_no_output(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "load_model", lambda *a, **k: threshold_model())
    interrupt = _Interrupt(KeyboardInterrupt())
    monkeypatch.setattr(inference_module.SlicePredictor, "__call__", lambda *a, **k: interrupt(*a, **k))
    input_path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(image_from(phantom()), str(input_path))
    with pytest.raises(KeyboardInterrupt):
        cli.main(["segment", str(input_path), "--model", "m.safetensors", "--output", str(tmp_path / "o.nii.gz"),
                  "--device", "cpu", "--batch-size", "1", "--quiet"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii.gz"]


class OomAboveOne(ThresholdNet):
    """Raises CUDA's out-of-memory error for any batch of more than ``limit`` slices."""

    def __init__(self, limit: int = 1):
        super().__init__()
        self.limit, self.attempts = limit, []

    def forward(self, images):
        self.attempts.append(images.shape[0])
        if len(self.attempts) > 50:
            raise RuntimeError("runaway retry loop")
        if images.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(images)


def test_out_of_memory_halves_the_batch_and_still_segments(caplog):
    image = image_from(phantom(depth=5))
    expected = sitk.GetArrayFromImage(segment_image(image, threshold_model(), device="cpu", batch_size=4))
    net = OomAboveOne(limit=1)
    with caplog.at_level(logging.WARNING, logger="SAMedLib.inference"):
        result = segment_image(image, threshold_model(net=net), device="cpu", batch_size=4)
    assert net.attempts == [4, 2, 1, 1, 1, 1, 1]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result), expected)
    assert_same_geometry(result, image)
    messages = [r.getMessage() for r in caplog.records]
    assert "CUDA out of memory: retrying with batch size 2" in messages
    assert "CUDA out of memory: retrying with batch size 1" in messages

    # Out of memory even for one slice, already on the CPU: a clear error, not an endless retry loop.
    with pytest.raises(SAMedError, match="out of memory even for one slice"):
        segment_image(image, threshold_model(net=OomAboveOne(limit=0)), device="cpu", batch_size=2)


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device(None) == "cpu" and resolve_device("CPU") == "cpu"
    for device in ("cuda", "cuda:1"):
        with pytest.raises(SAMedError, match="no CUDA GPU is available"):
            resolve_device(device)
    with pytest.raises(SAMedError, match="MPS is not available"):
        resolve_device("mps")
    with pytest.raises(SAMedError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:0") == "cuda:0"


def test_largest_component_option_is_applied_and_recorded():
    arr = phantom(depth=4)
    arr[:, 1:4, 37:42] = 200  # a small separate bright blob in every slice
    image = image_from(arr)
    plain = segment_image(image, threshold_model(), device="cpu")
    kept = segment_image(image, threshold_model(), device="cpu", largest_component=True)
    assert kept.GetMetaData("SAMed_largest_component") == "1"
    plain_arr, kept_arr = sitk.GetArrayFromImage(plain), sitk.GetArrayFromImage(kept)
    assert plain_arr[:, 1:4, 37:42].any() and not kept_arr[:, 1:4, 37:42].any()
    assert (kept_arr == ORGAN.value).sum() > 0.8 * (plain_arr == ORGAN.value).sum()


# --------------------------------------------------------------------------- CLI contract


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("samed: error: ")
    return err[0]


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    good = tmp_path / "good.nii.gz"
    sitk.WriteImage(image_from(phantom()), str(good))
    cases = {}
    cases["2D"] = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(100, dtype=np.int16).reshape(10, 10)), str(cases["2D"]))
    cases["4D"] = tmp_path / "series.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([image_from(phantom()), image_from(phantom())]), str(cases["4D"]))
    cases["constant"] = tmp_path / "blank.nii.gz"
    sitk.WriteImage(image_from(np.zeros((4, 8, 8), np.int16)), str(cases["constant"]))
    cases["missing"] = tmp_path / "absent.nii.gz"
    cases["empty"] = tmp_path / "empty.nii.gz"
    cases["empty"].write_bytes(b"")
    expected_words = {"2D": "2D image", "4D": "4D image", "constant": "same value", "missing": "no such file",
                      "empty": "empty"}
    out = tmp_path / "out.nii.gz"
    for name, path in cases.items():
        code = cli.main(["segment", str(path), "--model", str(tiny_checkpoint), "--output", str(out), "--quiet"])
        line = _one_error_line(capsys)
        assert code == 2, name
        assert str(path) in line and expected_words[name] in line, (name, line)
        assert not out.exists()

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x13\x37" * 100)
    for model, words in ((tmp_path / "nope.safetensors", "not found"), (corrupt, "not a SAMed checkpoint")):
        code = cli.main(["segment", str(good), "--model", str(model), "--output", str(out), "--device", "cpu"])
        line = _one_error_line(capsys)
        assert code == 2 and str(model) in line and words in line, line
        assert not out.exists()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = cli.main(["segment", str(good), "--model", str(tiny_checkpoint), "--output", str(out), "--device", "cuda"])
    assert code == 2 and "no CUDA GPU" in _one_error_line(capsys)
    # Output names are checked before any work is done (no model load, no segmentation).
    code = cli.main(["segment", str(good), "--model", str(tmp_path / "nope.safetensors"), "--output",
                     str(tmp_path / "o.png"), "--device", "cpu", "--quiet"])
    assert code == 2 and "unsupported output extension" in _one_error_line(capsys)
    code = cli.main(["segment", str(good), "--model", str(tmp_path / "nope.safetensors"), "--output", str(out),
                     "--seg-nrrd", str(tmp_path / "s.nii.gz"), "--device", "cpu", "--quiet"])
    assert code == 2 and ".seg.nrrd" in _one_error_line(capsys)
    assert not out.exists()


def _label_image(arr: np.ndarray, spacing=(2.0, 1.0, 1.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(arr.astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin((-5.0, 3.0, 7.0))
    return image


def test_cli_evaluate_json_on_hand_computed_case(tmp_path, capsys):
    """Spleen: 4x4x4 cubes one voxel apart along x (2 mm): Dice 48*2/128 = 0.75, HD95 2 mm.
    Liver: reference only -> Dice 0, HD95 missing. Stomach: in neither -> excluded from the mean."""
    pred = np.zeros((10, 12, 14), np.uint8)
    ref = np.zeros_like(pred)
    pred[3:7, 2:6, 4:8] = 1
    ref[3:7, 2:6, 5:9] = 1
    ref[5:8, 8:11, 2:5] = 5
    pred_path, ref_path = tmp_path / "pred.nii.gz", tmp_path / "ref.nrrd"
    sitk.WriteImage(_label_image(pred), str(pred_path))
    # The reference is stored with its y axis flipped (the sample data's geometry trap): only resampling in
    # physical space lines it up.
    flipped = sitk.Flip(_label_image(ref), [False, True, False])
    assert flipped.GetDirection() != (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    sitk.WriteImage(flipped, str(ref_path))

    code = cli.main(["evaluate", "--prediction", str(pred_path), "--reference", str(ref_path),
                     "--classes", "1:spleen,5:liver,6:stomach", "--json"])
    assert code == 0
    scores = json.loads(capsys.readouterr().out)
    spleen, liver, stomach = (scores["classes"][n] for n in ("spleen", "liver", "stomach"))
    assert spleen["dice"] == pytest.approx(0.75) and spleen["hd95_mm"] == pytest.approx(2.0)
    assert spleen["pred_voxels"] == spleen["ref_voxels"] == 64
    assert liver["dice"] == 0.0 and liver["hd95_mm"] is None and liver["ref_voxels"] == 27
    assert stomach["dice"] is None and stomach["hd95_mm"] is None
    assert scores["mean_dice"] == pytest.approx(0.375)
    assert scores["mean_hd95_mm"] == pytest.approx(2.0)
    assert scores["prediction"] == str(pred_path) and scores["reference"] == str(ref_path)

    code = cli.main(["evaluate", "--prediction", str(pred_path), "--reference", str(ref_path),
                     "--classes", "1:spleen,5:liver"])
    table = capsys.readouterr().out
    assert code == 0 and "spleen" in table and "0.7500" in table and "n/a" in table

    code = cli.main(["evaluate", "--prediction", str(pred_path), "--reference", str(tmp_path / "none.nii.gz"),
                     "--classes", "1:spleen"])
    assert code == 2 and "none.nii.gz" in _one_error_line(capsys)
    code = cli.main(["evaluate", "--prediction", str(pred_path), "--reference", str(ref_path), "--classes", "spleen"])
    assert code == 2 and "VALUE:NAME" in _one_error_line(capsys)
