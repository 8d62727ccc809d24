"""Fine-tuning (issue 4): loss, schedule, embedding cache, augmentation, bad input, a real short fine-tune on the
sample CT, resume, LoRA on CPU, 2-process torchrun, and the --progress-json contract.

Cost control (2-core CPU): the real fine-tune encodes 9 slices once and trains a CNN head for 30 iterations;
the resume/bad-input tests reuse one LiteMedSAM build (monkeypatched into the trainer; same weights and hash);
the LoRA run is 3 iterations of batch 1 on one slice.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from scipy import ndimage
from torch import nn

import SAMedLib.trainer as trainer_module
from SAMedLib import cli
from SAMedLib.augmentation import AugmentationConfig, ViewAugmentation, apply_class_levels, apply_intensity, sample_view
from SAMedLib.backbones import build_backbone
from SAMedLib.checkpoint import LoadedModel, load_model, read_model_card
from SAMedLib.classes import parse_class_list
from SAMedLib.embedding_cache import EmbeddingCache
from SAMedLib.errors import CheckpointError, SAMedError
from SAMedLib.inference import segment_image
from SAMedLib.losses import segmentation_loss, soft_dice_loss
from SAMedLib.metrics import dice
from SAMedLib.model import build_model
from SAMedLib.model_card import Preprocessing
from SAMedLib.preprocessing import model_input, normalize_intensity, slice_to_model_theta
from SAMedLib.schedule import learning_rate
from SAMedLib.trainer import REFINEMENT_MARGIN, UNDERTRAINED_DICE, TrainConfig, train
from SAMedLib.training_data import TrainingDataError, TrainingVolume, load_training_pair, prepare_training_pair
from SAMedLib.volume_io import read_volume, resample_to_reference

REPO = Path(__file__).resolve().parents[1]
FOUR_ORGANS = "1:spleen,5:liver,6:stomach,52:aorta"
NO_AUGMENTATION = AugmentationConfig(p_rot90_flip=0, p_small_rotation=0, scale_range=(1, 1), max_shift=0, p_far_shift=0,
                                     contrast_range=(1, 1), brightness=0, gamma_range=(1, 1), noise_std=0,
                                     p_class_level=0)
ITERATION_KEYS = {"event", "iteration", "iterations", "loss", "lr", "eta_s"}


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """train() in the main thread installs SIGINT/SIGTERM handlers (for the CLI); give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="module")
def lite():
    return build_backbone("litemedsam")


@pytest.fixture
def fast_trainer_base(lite, monkeypatch):
    """The trainer gets a copy of one LiteMedSAM build (same weights, same SHA-256) instead of rebuilding it."""
    real = trainer_module.build_backbone
    monkeypatch.setattr(trainer_module, "build_backbone",
                        lambda name, *a, **k: copy.deepcopy(lite) if name == "litemedsam" else real(name, *a, **k))


class StopAfter:
    """A caller's stop flag: ``.stop`` turns True once ``k`` iterations are reported."""

    def __init__(self, k: int):
        self.k, self.stop, self.events = k, False, []

    def __call__(self, event: dict) -> None:
        self.events.append(event)
        if event["event"] == "iteration" and event["iteration"] >= self.k:
            self.stop = True


# --------------------------------------------------------------------------- loss


def test_perfect_logits_give_near_zero_loss():
    target = torch.randint(0, 4, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    target[0, 0, :4] = torch.arange(4)  # every class present
    perfect = 30.0 * F.one_hot(target, 4).permute(0, 3, 1, 2).float()
    assert soft_dice_loss(perfect, target) < 1e-4
    assert segmentation_loss(perfect, target) < 1e-4
    wrong = 30.0 * (1 - F.one_hot(target, 4).permute(0, 3, 1, 2).float())
    assert soft_dice_loss(wrong, target) > 0.99


def test_dice_loss_hand_computed():
    """Two pixels, targets [0, 1], logits 0: every probability is 0.5, so Dice = 2*0.5 / (1 + 1) = 0.5 per class."""
    logits = torch.zeros(1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.5, abs=1e-4)
    # Background is one of the averaged channels (SAMed): target all foreground, prediction p1 = 0.75 everywhere:
    # foreground Dice = 2*1.5/(1.5+2) = 6/7; background Dice = (0 + eps)/(0.5 + eps) ~ 0 -> loss ~ (1/7 + 1)/2.
    logits = torch.tensor([[[[0.0, 0.0]], [[math.log(3.0), math.log(3.0)]]]])
    assert soft_dice_loss(logits, torch.tensor([[[1, 1]]])).item() == pytest.approx((1 / 7 + 1) / 2, abs=1e-3)


def test_ce_dice_weighting():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 8, 8, generator=generator)
    target = torch.randint(0, 3, (2, 8, 8), generator=generator)
    ce = F.cross_entropy(logits, target)
    dl = soft_dice_loss(logits, target)
    assert segmentation_loss(logits, target).item() == pytest.approx((0.2 * ce + 0.8 * dl).item(), rel=1e-6)
    assert segmentation_loss(logits, target, dice_weight=0.0).item() == pytest.approx(ce.item(), rel=1e-6)
    assert segmentation_loss(logits, target, dice_weight=1.0).item() == pytest.approx(dl.item(), rel=1e-6)
    with pytest.raises(ValueError, match="dice_weight"):
        segmentation_loss(logits, target, dice_weight=1.5)
    # Gradients flow to the logits.
    logits.requires_grad_(True)
    segmentation_loss(logits, target).backward()
    assert logits.grad.abs().sum() > 0


# --------------------------------------------------------------------------- schedule


def test_learning_rate_schedule_known_points():
    lr = lambda i: learning_rate(i, 1.0, total=100, warmup=10)  # noqa: E731
    assert [lr(i) for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # linear warm-up
    assert lr(10) == pytest.approx(1.0)  # decay starts at the peak
    assert lr(55) == pytest.approx(0.5 ** 0.9)  # half-way through the decay, power 0.9
    assert lr(100) == 0.0 and lr(150) == 0.0  # reaches zero at the end, never negative
    assert 0 < lr(99) < 0.03
    decay = [lr(i) for i in range(10, 101)]
    assert all(b <= a for a, b in zip(decay, decay[1:]))
    assert learning_rate(0, 3e-3, total=5, warmup=0) == pytest.approx(3e-3)
    assert learning_rate(3, 1.0, total=5, warmup=0, power=1.0) == pytest.approx(0.4)
    for bad in (dict(total=10, warmup=10), dict(total=0, warmup=0), dict(total=10, warmup=-1)):
        with pytest.raises(ValueError):
            learning_rate(0, 1.0, **bad)


# --------------------------------------------------------------------------- embedding cache


class CountingEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 8, stride=8)
        self.images = 0

    def forward(self, x):
        self.images += x.shape[0]
        return self.conv(x)


def _ct_inputs(window=(-125.0, 275.0)) -> torch.Tensor:
    """Three encoder inputs made from a synthetic HU volume with the given CT window."""
    prep = Preprocessing(window=window, input_size=64, pixel_spacing_mm=4.0)
    yy, xx = np.mgrid[0:40, 0:40]
    hu = np.stack([np.where((yy - 20) ** 2 + (xx - 15 - 3 * k) ** 2 < 80, 180, -60) for k in range(3)]).astype(np.float32)
    theta = slice_to_model_theta((40, 40), (5.0, 5.0), prep)
    return model_input(torch.from_numpy(normalize_intensity(hu, prep)), theta, prep, (5.0, 5.0))


def test_embedding_cache_hits_misses_and_identical_embeddings():
    encoder = CountingEncoder()
    cache = EmbeddingCache("litemedsam:abc")
    inputs = _ct_inputs()
    first = cache.encode(encoder, inputs)
    assert (cache.hits, cache.misses, encoder.images, len(cache)) == (0, 3, 3, 3)
    second = cache.encode(encoder, inputs)
    assert (cache.hits, cache.misses, encoder.images) == (3, 3, 3)  # nothing re-encoded
    assert torch.equal(first, second)
    with torch.no_grad():
        assert torch.equal(first, encoder(inputs))
    # A batch mixing known and new inputs encodes only the new one and keeps the order.
    mixed = torch.stack([inputs[2], torch.rand(3, 64, 64), inputs[0]])
    before = encoder.images
    out = cache.encode(encoder, mixed)
    assert encoder.images - before == 1  # only the fresh one
    with torch.no_grad():
        torch.testing.assert_close(out, encoder(mixed))
    assert torch.equal(out[0], first[2]) and torch.equal(out[2], first[0])


def test_embedding_cache_invalidated_when_preprocessing_or_base_changes(tmp_path):
    encoder = CountingEncoder()
    cache = EmbeddingCache("litemedsam:abc")
    cache.encode(encoder, _ct_inputs())
    other_window = _ct_inputs(window=(-160.0, 240.0))  # same scan, another CT window
    assert not torch.equal(other_window, _ct_inputs())
    cache.encode(encoder, other_window)
    assert (cache.misses, encoder.images) == (6, 6)
    shifted_view = _ct_inputs().roll(3, dims=-1)  # same scan, another augmentation view
    cache.encode(encoder, shifted_view)
    assert cache.misses == 9
    other_base = EmbeddingCache("litemedsam:def")  # other base weights
    assert other_base.key(_ct_inputs()[0]) != cache.key(_ct_inputs()[0])


def test_embedding_cache_disk_mirror_is_reused_by_a_new_instance(tmp_path):
    encoder = CountingEncoder()
    inputs = _ct_inputs()
    first = EmbeddingCache("litemedsam:abc", tmp_path / "cache").encode(encoder, inputs)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3
    assert not list((tmp_path / "cache").glob("*.tmp"))
    later = EmbeddingCache("litemedsam:abc", tmp_path / "cache")  # e.g. the next training run
    again = later.encode(encoder, inputs)
    assert encoder.images == 3 and later.hits == 3 and later.misses == 0
    assert torch.equal(first, again)
    other = EmbeddingCache("sam_vit_b:123", tmp_path / "cache")
    other.encode(encoder, inputs)
    assert other.misses == 3 and encoder.images == 6


# --------------------------------------------------------------------------- augmentation


def _l_shape_volume() -> TrainingVolume:
    image = np.full((1, 100, 100), 0.2, np.float32)
    labels = np.zeros((1, 100, 100), np.uint8)
    for region in (np.s_[0, 20:70, 20:36], np.s_[0, 54:70, 20:80]):
        image[region], labels[region] = 0.9, 1
    return TrainingVolume("L", image, labels, (3.0, 3.0))


def test_identity_view_leaves_image_unchanged():
    theta = slice_to_model_theta((100, 120), (2.0, 1.5), Preprocessing())
    view = ViewAugmentation.identity()
    assert torch.equal(view.compose(theta), theta)
    image = torch.rand(1, 1, 32, 32)
    assert torch.equal(apply_intensity(image, view, noise_std=0.02), image)
    assert torch.equal(apply_class_levels(image, torch.ones_like(image), view), image)
    volume = _l_shape_volume()
    views = trainer_module._make_views(volume, np.array([0]), [[view]], Preprocessing(), 64, noise_std=0.02)
    plain = model_input(torch.from_numpy(volume.image), slice_to_model_theta((100, 100), (3.0, 3.0), Preprocessing()),
                        Preprocessing(), (3.0, 3.0))
    assert torch.equal(views.inputs, plain)


def test_labels_stay_aligned_with_the_image_under_random_views():
    volume = _l_shape_volume()
    geometric_only = AugmentationConfig(p_far_shift=0, contrast_range=(1, 1), brightness=0, gamma_range=(1, 1), noise_std=0,
                                        p_class_level=0, p_blur=0,
                                        p_rot90_flip=0.5)  # SAMed's rot90 + flip, to test them
    rng = np.random.default_rng(7)
    views = [sample_view(rng, geometric_only, 1) for _ in range(16)]
    assert any(abs(v.matrix[1]) > 0.5 for v in views)  # some 90-degree rotations
    assert any(v.matrix[0] * v.matrix[3] - v.matrix[1] * v.matrix[2] < 0 for v in views)  # some flips
    made = trainer_module._make_views(volume, np.array([0]), [[ViewAugmentation.identity()] + views],
                                      Preprocessing(), 64, noise_std=0.0)
    pooled = F.avg_pool2d(made.inputs[:, :1], 4)[:, 0]  # encoder input on the 64x64 target grid
    identity_target = made.targets[0]
    changed = 0
    for pooled_image, target in zip(pooled, made.targets):
        organ = (target == 1).numpy()
        assert organ.sum() > 20
        bright = (pooled_image > 0.55).numpy()
        edges = ndimage.binary_dilation(organ) & ~ndimage.binary_erosion(organ)
        assert not ((bright != organ) & ~edges).any()  # only the outline may differ (pooling blur)
        changed += (target != identity_target).float().mean().item() > 0.02
    assert changed >= 10  # the views really moved the shape


def test_intensity_jitter_stays_in_range_and_keeps_organ_brighter():
    volume = _l_shape_volume()
    rng = np.random.default_rng(3)
    views = [sample_view(rng, AugmentationConfig(p_far_shift=0), 1) for _ in range(8)]
    made = trainer_module._make_views(volume, np.array([0]), [views], Preprocessing(), 64, noise_std=0.02)
    assert made.inputs.min() >= 0 and made.inputs.max() <= 1
    pooled = F.avg_pool2d(made.inputs[:, :1], 4)[:, 0]
    for pooled_image, target in zip(pooled, made.targets):
        organ = target == 1
        body = (target == 0) & (pooled_image > 0.05)
        assert pooled_image[organ].mean() > pooled_image[body].mean()
    # Reproducible: the same seed gives the same views.
    assert [sample_view(np.random.default_rng(3), AugmentationConfig(p_far_shift=0), 1) for _ in range(1)] == views[:1]


def test_default_views_keep_the_canonical_orientation():
    """No rot90/flip by default: every view is a small rotation (<= 20 degrees) with positive determinant."""
    rng = np.random.default_rng(11)
    for view in (sample_view(rng, AugmentationConfig(), 2) for _ in range(200)):
        a, b, c, d = view.matrix
        assert a * d - b * c > 0  # no flip
        assert abs(math.degrees(math.atan2(c, a))) <= 20.0 + 1e-6  # no 90-degree turn
        assert len(view.class_levels) == 2  # per-class offsets on every augmented view


def test_blur_augmentation_smooths_the_view():
    volume = _l_shape_volume()
    plain = ViewAugmentation.identity()
    blurred = dataclasses.replace(plain, blur_sigma=1.0)
    made = trainer_module._make_views(volume, np.array([0]), [[plain, blurred]], Preprocessing(), 64, noise_std=0.0)
    image, smooth = made.inputs[0, 0], made.inputs[1, 0]
    # Gradient energy (total variation would not do: a blurred step keeps its height).
    energy = [float(((x[1:] - x[:-1]) ** 2).sum() + ((x[:, 1:] - x[:, :-1]) ** 2).sum()) for x in (image, smooth)]
    assert energy[1] < 0.7 * energy[0], energy
    assert abs(float(smooth.sum() - image.sum())) < 0.02 * float(image.sum())  # blurred, not darkened
    assert torch.equal(made.targets[0], made.targets[1])  # labels are not blurred


# --------------------------------------------------------------------------- stop signals


def test_windows_ctrl_break_stops_training_cleanly(monkeypatch):
    """Windows delivers the Stop button's CTRL_BREAK_EVENT as SIGBREAK: train() must stop cleanly on it as on
    SIGTERM (and restore the previous handler). Linux has no SIGBREAK, so SIGUSR1 plays it here."""
    monkeypatch.setattr(signal, "SIGBREAK", signal.SIGUSR1, raising=False)
    unhandled = []

    def previous_handler(*_):
        unhandled.append(True)

    def stopped_by_the_signal(config, progress, progress_json, stop):  # stands in for the training loop
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(200):  # Python runs signal handlers on the main thread between bytecodes
            if stop.stop or unhandled:
                break
            time.sleep(0.01)
        return stop.stop

    saved = signal.signal(signal.SIGUSR1, previous_handler)
    try:
        monkeypatch.setattr(trainer_module, "_train", stopped_by_the_signal)
        assert train(TrainConfig(images=[], labels=[], classes=[], output="unused")) is True and unhandled == []
        assert signal.getsignal(signal.SIGUSR1) is previous_handler
    finally:
        signal.signal(signal.SIGUSR1, saved)


def test_stop_file_stops_training_cleanly_with_its_final_checkpoint(shared_data, tmp_path, fast_trainer_base):
    """Slicer's Stop on Windows cannot signal a trainer without a console: the stop file appearing mid-run must end
    train() exactly as SIGTERM does (final checkpoint at that iteration, ``stopped`` event, resume state)."""
    out, stop_file = tmp_path / "stopped.safetensors", tmp_path / "stop"
    config = TrainConfig(images=[str(shared_data / "ct_3mm.nii.gz")], labels=[str(shared_data / "ct_3mm_labels.nii.gz")],
                         classes=parse_class_list("5:liver"), output=str(out), mode="frozen", head="linear",
                         iterations=300, batch_size=2, views_per_slice=1, max_labeled_slices=2, background_fraction=0,
                         device="cpu", stop_file=str(stop_file))
    events = []

    def progress(event):
        events.append(event)
        if event["event"] == "iteration" and event["iteration"] == 3:
            stop_file.touch()

    result = train(config, progress=progress)  # no stop_flag: the CLI's path, signal handlers installed
    assert result.iterations_done == 3
    assert events[-1]["event"] == "stopped" and events[-1]["iteration"] == 3
    assert read_model_card(out).training["iterations"] == 3  # no validation data: written only by the stop
    assert torch.load(Path(str(out) + ".resume.pt"), weights_only=True)["iteration"] == 3


def test_samed_train_passes_the_stop_file_on(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(trainer_module, "train", lambda config, **_: seen.append(config) or trainer_module.TrainingResult(
        Path(config.output), {}, 0.0, 0, 0.0, False))
    cli.main(["train", "--image", "i.nii.gz", "--labels", "l.nii.gz", "--classes", "5:liver", "--output",
              str(tmp_path / "m.safetensors"), "--stop-file", str(tmp_path / "stop")])
    assert [c.stop_file for c in seen] == [str(tmp_path / "stop")]


# --------------------------------------------------------------------------- bad training input


def _pair(tmp_path: Path, label_arr: np.ndarray, shift_mm: float = 0.0):
    image_arr = np.full(label_arr.shape, -50, np.int16)
    image_arr[label_arr > 0] = 120
    image_arr[0, 0, 0] = 300
    image = sitk.GetImageFromArray(image_arr)
    image.SetSpacing((2.0, 2.0, 4.0))
    labels = sitk.GetImageFromArray(label_arr.astype(np.uint8))
    labels.CopyInformation(image)
    labels.SetOrigin(tuple(o + shift_mm for o in image.GetOrigin()))
    image_path, labels_path = tmp_path / "img.nii.gz", tmp_path / f"lab_{int(shift_mm)}_{int(label_arr.max())}.nii.gz"
    sitk.WriteImage(image, str(image_path))
    sitk.WriteImage(labels, str(labels_path))
    return image, labels, image_path, labels_path


def test_bad_training_pairs_give_clear_errors(tmp_path):
    arr = np.zeros((6, 20, 20), np.uint8)
    arr[2:5, 5:12, 6:14] = 5
    image, labels, _, _ = _pair(tmp_path, arr)
    liver = parse_class_list("5:liver")
    volume = prepare_training_pair(image, labels, liver, Preprocessing())
    assert volume.labels.max() == 1 and volume.labels.sum() == (arr == 5).sum()  # values -> class index

    _, far, _, _ = _pair(tmp_path, arr, shift_mm=10_000.0)  # same array, origin 10 m away
    with pytest.raises(TrainingDataError, match="do not overlap the image"):
        prepare_training_pair(image, far, liver, Preprocessing(), labels_name="far.nii.gz")
    with pytest.raises(TrainingDataError, match=r"99 \(mystery\)"):
        prepare_training_pair(image, labels, parse_class_list("5:liver,99:mystery"), Preprocessing())
    _, empty, _, _ = _pair(tmp_path, np.zeros_like(arr))
    with pytest.raises(TrainingDataError, match="empty"):
        prepare_training_pair(image, empty, liver, Preprocessing(), labels_name="blank.nii.gz")


def test_samed_train_bad_input_exits_2(shared_data, tmp_path, capsys, fast_trainer_base):
    labels = sitk.ReadImage(str(shared_data / "ct_3mm_labels.nii.gz"))
    far = sitk.Image(labels)
    far.SetOrigin(tuple(o + 10_000.0 for o in labels.GetOrigin()))
    far_path = tmp_path / "labels_10m_away.nii.gz"
    sitk.WriteImage(far, str(far_path))
    empty = sitk.Image(labels.GetSize(), labels.GetPixelID())
    empty.CopyInformation(labels)
    empty_path = tmp_path / "empty_labels.nii.gz"
    sitk.WriteImage(empty, str(empty_path))
    image = str(shared_data / "ct_3mm.nii.gz")
    cases = [(far_path, "5:liver", "do not overlap"),
             (shared_data / "ct_3mm_labels.nii.gz", "5:liver,200:mystery", "200 (mystery)"),  # 1..117 occur
             (empty_path, "5:liver", "label map is empty")]
    out = tmp_path / "model.safetensors"
    for labels_path, classes, words in cases:
        code = cli.main(["train", "--image", image, "--labels", str(labels_path), "--classes", classes,
                         "--iterations", "2", "--device", "cpu", "--output", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("samed: error:"), err
        assert words in err[0], err[0]
        assert not out.exists()
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--image", image, "--image", image, "--labels", str(far_path), "--classes", "5:liver",
                  "--output", str(out)])
    assert info.value.code == 2
    assert "one --labels per --image" in capsys.readouterr().err
    code = cli.main(["train", "--image", image, "--labels", str(far_path), "--classes", "5:liver",
                     "--output", str(tmp_path / "model.pt"), "--device", "cpu"])
    assert code == 2 and ".safetensors" in capsys.readouterr().err
    code = cli.main(["train", "--image", image, "--labels", str(far_path), "--classes", "5:liver",
                     "--warmup-fraction", "1", "--output", str(out), "--device", "cpu"])
    assert code == 2 and "warm-up fraction must be from 0 to below 1, got 1.0" in capsys.readouterr().err


# --------------------------------------------------------------------------- real fine-tune


class SharedEncoder(nn.Module):
    """Memoises encoder outputs by input bytes, so two frozen-encoder models share one encoding per slice."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder, self.memo = encoder, {}

    def forward(self, x):
        key = hashlib.sha256(x.detach().cpu().numpy().tobytes()).hexdigest()
        if key not in self.memo:
            self.memo[key] = self.encoder(x)
        return self.memo[key]


def test_short_real_fine_tune_raises_liver_dice(shared_data, tmp_path, capsys, lite):
    """Frozen LiteMedSAM + CNN head, 8 labeled slices of the 3 mm scan, 30 iterations; then segment 4 slices of
    the other scanner's DICOM series and score the liver against its reference (resampled in physical space)."""
    out = tmp_path / "organs.safetensors"
    # Validation volume: two other slices of the DICOM scan (its label file is given whole: the trainer resamples it).
    dicom = read_volume(shared_data / "ct_dicom")
    validation = tmp_path / "dicom_2_slices.nii.gz"
    sitk.WriteImage(dicom[:, :, 2:4], str(validation))
    code = cli.main(["train", "--image", str(shared_data / "ct_3mm.nii.gz"), "--labels",
                     str(shared_data / "ct_3mm_labels.nii.gz"), "--classes", FOUR_ORGANS, "--mode", "frozen",
                     "--head", "cnn", "--views-per-slice", "1", "--max-labeled-slices", "8", "--iterations", "30",
                     "--batch-size", "4", "--validate-every", "10", "--warmup-fraction", "0.2", "--val-image", str(validation),
                     "--val-labels", str(shared_data / "ct_dicom_labels.nii.gz"), "--device", "cpu",
                     "--progress-json", "--output", str(out)])
    assert code == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]

    # --progress-json contract: one JSON object per line, documented keys.
    iterations = [e for e in events if e["event"] == "iteration"]
    assert [e["iteration"] for e in iterations] == list(range(1, 31))
    for e in iterations:
        assert ITERATION_KEYS <= set(e) and e["iterations"] == 30
        assert math.isfinite(e["loss"]) and e["lr"] >= 0 and e["eta_s"] >= 0
    validations = [e for e in events if e["event"] == "validation"]
    assert [e["iteration"] for e in validations] == [10, 20, 30]
    for e in validations:
        assert set(e["dice"]) == {"spleen", "liver", "stomach", "aorta"}
        assert all(v is None or 0 <= v <= 1 for v in e["dice"].values())
        assert 0 <= e["mean_dice"] <= 1 and isinstance(e["best"], bool)
    assert events[-1]["event"] == "done" and events[-1]["path"] == str(out)
    # A run that validates below UNDERTRAINED_DICE says so just before it ends; a converged one does not.
    warnings = [e for e in events if e["event"] == "warning"]
    best = max(e["mean_dice"] for e in validations)
    assert len(warnings) == (best < UNDERTRAINED_DICE) and (not warnings or events[-2] == warnings[0])
    assert iterations[-1]["loss"] < iterations[0]["loss"]
    assert not Path(str(out) + ".resume.pt").exists()

    card = read_model_card(out)
    assert card.head == "cnn" and card.mode == "frozen" and [c.value for c in card.classes] == [1, 5, 6, 52]
    assert card.training["iterations"] == 30 and card.training["training_slices"] == 9  # 8 labeled + 1 background
    assert card.training["warmup_fraction"] == 0.2
    assert card.training["head_start"] == "random" and "probe_start" not in card.training  # the CNN has no tokens
    assert [e["lr"] for e in iterations[:2]] == pytest.approx([1e-3 / 6, 2e-3 / 6])  # 6 warm-up iterations
    assert card.training["validation_mean_dice"] == max(e["mean_dice"] for e in validations)  # best one kept
    assert card.preprocessing.resolution_mm == 3.0  # the training scan's in-plane spacing: inference smooths to it
    # Refinement chosen class by class on the validation volume: box unless another choice beats it by the margin.
    [choice] = [e for e in events if e["event"] == "refinement"]
    assert card.postprocessing.refinement_by_class == choice["chosen"] and card.postprocessing.cleanup == "extent"
    for name, chosen in choice["chosen"].items():
        dice_of = {c: (d[name] if d[name] is not None else -1.0) for c, d in choice["validation_dice"].items()}
        if chosen != "box":
            assert dice_of[chosen] >= dice_of["box"] + REFINEMENT_MARGIN
        else:
            assert all(v <= dice_of["box"] + REFINEMENT_MARGIN for v in dice_of.values())

    # Score on the DICOM scan (another scanner, field of view and orientation of its label file).
    image = dicom[:, :, 8:12]
    reference = sitk.ReadImage(str(shared_data / "ct_dicom_labels.nii.gz"))
    trained = load_model(out)
    shared = SharedEncoder(trained.model.image_encoder)
    trained.model.image_encoder = shared
    start = build_model(copy.deepcopy(lite), "cnn", 4, "frozen", None, seed=1234).eval()  # the trainer's start
    start.image_encoder = shared
    scores = {}
    for name, model in (("trained", trained), ("start", LoadedModel(start, trained.card, None))):
        # The heads alone: what training learned (box refinement would also lift the start's liver).
        prediction = segment_image(image, model, device="cpu", batch_size=4, refinement="none")
        ref = sitk.GetArrayFromImage(resample_to_reference(reference, prediction))
        scores[name] = dice(sitk.GetArrayFromImage(prediction) == 5, ref == 5)
    assert len(shared.memo) == 1  # one batch of 4 slices, encoded once for both models
    assert scores["trained"] > 0.7, scores
    assert scores["trained"] > scores["start"] + 0.3, scores


# --------------------------------------------------------------------------- resume


def test_resume_continues_the_schedule(shared_data, tmp_path, fast_trainer_base):
    out = tmp_path / "resumable.safetensors"
    config = TrainConfig(images=[str(shared_data / "ct_3mm.nii.gz")], labels=[str(shared_data / "ct_3mm_labels.nii.gz")],
                         classes=parse_class_list("5:liver"), output=str(out), mode="frozen", head="linear",
                         iterations=8, batch_size=2, learning_rate=5e-3, views_per_slice=1, max_labeled_slices=2,
                         background_fraction=0, validate_every=2, device="cpu", cache_dir=str(tmp_path / "cache"))
    flag = StopAfter(3)  # stops between iterations 3 and 4 (not a validation point)
    first = train(config, progress=flag, stop_flag=flag)
    assert first.iterations_done == 3
    assert [e["event"] for e in flag.events][-1] == "stopped"
    resume_file = Path(str(out) + ".resume.pt")
    state = torch.load(resume_file, weights_only=True)
    assert state["iteration"] == 3
    stored = load_file(str(out))
    assert all(torch.equal(stored[k], v) for k, v in state["trainable"].items())  # the weights at iteration 3
    assert read_model_card(out).training["iterations"] == 3
    cached = sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors"))
    assert len(cached) == 2

    events = []
    second = train(TrainConfig(**{**config.__dict__, "resume": True}), progress=events.append,
                   stop_flag=StopAfter(10**6))
    steps = [e for e in events if e["event"] == "iteration"]
    assert [e["iteration"] for e in steps] == [4, 5, 6, 7, 8]  # continues after 3, ends at N
    warmup = int(config.warmup_fraction * config.iterations)
    for e in steps:  # the same schedule as an uninterrupted run
        assert e["lr"] == pytest.approx(learning_rate(e["iteration"] - 1, config.learning_rate, 8, warmup))
    assert second.iterations_done == 8 and events[-1]["event"] == "done"
    assert read_model_card(out).training["iterations"] == 8
    assert not resume_file.exists()
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors")) == cached  # embeddings reused
    assert read_model_card(out).training["iterations_planned"] == 8


def test_a_stop_skips_the_refinement_choice(shared_data, tmp_path, fast_trainer_base, monkeypatch):
    """After Stop the trainer writes its checkpoint at once: the per-class refinement choice (three passes over the
    validation slices) is skipped and every class gets the default ``box``."""
    import SAMedLib.trainer as trainer_module

    def no_validation_passes(*args, **kwargs):
        raise AssertionError("the refinement choice ran after Stop")

    monkeypatch.setattr(trainer_module, "refine_logits", no_validation_passes)
    out = tmp_path / "stopped.safetensors"
    validation = tmp_path / "two_slices.nii.gz"  # validation data, so that there is a choice to skip
    sitk.WriteImage(read_volume(shared_data / "ct_3mm.nii.gz")[:, :, 94:96], str(validation))
    config = TrainConfig(images=[str(shared_data / "ct_3mm.nii.gz")], labels=[str(shared_data / "ct_3mm_labels.nii.gz")],
                         classes=parse_class_list("5:liver"), output=str(out), mode="frozen", head="linear",
                         iterations=8, batch_size=2, learning_rate=5e-3, views_per_slice=1, max_labeled_slices=2,
                         background_fraction=0, validate_every=2, device="cpu", cache_dir=str(tmp_path / "cache"),
                         validation_image=str(validation), validation_labels=str(shared_data / "ct_3mm_labels.nii.gz"))
    flag = StopAfter(3)
    train(config, progress=flag, stop_flag=flag)
    [choice] = [e for e in flag.events if e["event"] == "refinement"]
    assert choice["skipped"] and flag.events[-1]["event"] == "stopped"
    card = read_model_card(out)
    assert card.postprocessing.refinement == "box" and card.postprocessing.refinement_by_class == {}


# --------------------------------------------------------------------------- LoRA on CPU


def test_lora_mode_trains_on_cpu(shared_data, tmp_path, fast_trainer_base):
    """SAMed's mode: LoRA in the encoder + head, fresh views each iteration; three iterations on one slice."""
    out = tmp_path / "lora.safetensors"
    events = []
    config = TrainConfig(images=[str(shared_data / "ct_3mm.nii.gz")], labels=[str(shared_data / "ct_3mm_labels.nii.gz")],
                         classes=parse_class_list("5:liver"), output=str(out), mode="lora", head="linear",
                         iterations=3, batch_size=1, learning_rate=1e-2, max_labeled_slices=1, background_fraction=0,
                         validate_every=100, device="cpu", augmentation=NO_AUGMENTATION)
    train(config, progress=events.append, stop_flag=StopAfter(10**6))
    losses = [e["loss"] for e in events if e["event"] == "iteration"]
    assert len(losses) == 3
    assert losses[2] < losses[1] < losses[0]  # same slice each time: the loss falls step after step
    assert losses[2] < 0.95 * losses[0]
    stored = load_file(str(out))
    lora_b = [v for k, v in stored.items() if k.endswith("lora_B")]
    assert len(lora_b) == 10 and max(v.abs().max().item() for v in lora_b) > 1e-4  # LoRA itself learned
    card = read_model_card(out)
    assert card.mode == "lora" and card.lora_rank == 4 and card.lora_alpha == 4.0
    assert load_model(out).card.mode == "lora"


def test_lora_starts_from_a_frozen_models_head(shared_data, tmp_path, fast_trainer_base, monkeypatch):
    """--init-from: LoRA mode begins exactly at a frozen-mode model (its head; LoRA's B matrices are zero)."""
    common = dict(images=[str(shared_data / "ct_3mm.nii.gz")], labels=[str(shared_data / "ct_3mm_labels.nii.gz")],
                  classes=parse_class_list("5:liver"), head="linear", batch_size=2, max_labeled_slices=2,
                  background_fraction=0, validate_every=100, device="cpu", augmentation=NO_AUGMENTATION)
    frozen = tmp_path / "frozen.safetensors"
    train(TrainConfig(**common, output=str(frozen), mode="frozen", iterations=8, learning_rate=5e-3,
                      views_per_slice=1), stop_flag=StopAfter(10**6))
    source = load_file(str(frozen))
    lora = tmp_path / "lora.safetensors"
    train(TrainConfig(**common, output=str(lora), mode="lora", iterations=1, learning_rate=1e-9,
                      init_from=str(frozen)), stop_flag=StopAfter(10**6))
    stored = load_file(str(lora))
    heads = [k for k in source if k.startswith("head.")]
    assert heads and all(torch.allclose(stored[k], source[k], atol=1e-6) for k in heads)
    assert max(v.abs().max().item() for k, v in stored.items() if k.endswith("lora_B")) < 1e-6
    assert read_model_card(lora).training["init_from"] == "frozen.safetensors"
    cold = tmp_path / "cold.safetensors"  # the same run without --init-from starts from a fresh head
    train(TrainConfig(**common, output=str(cold), mode="lora", iterations=1, learning_rate=1e-9, seed=7),
          stop_flag=StopAfter(10**6))
    assert not all(torch.allclose(load_file(str(cold))[k], source[k], atol=1e-3) for k in heads)

    # With validation slices the start competes: a run whose validation only falls gives the start back.
    validation = tmp_path / "two_slices.nii.gz"
    sitk.WriteImage(read_volume(shared_data / "ct_3mm.nii.gz")[:, :, 94:96], str(validation))
    calls, real_dice = [], trainer_module._dice_per_class
    monkeypatch.setattr(trainer_module, "_dice_per_class",  # the start validates at 0.8, every later state at 0.3
                        lambda logits, targets, n: calls.append(1) or np.full(n, 0.8 if len(calls) == 1 else 0.3))
    worse, events = tmp_path / "worse.safetensors", []
    train(TrainConfig(**{**common, "validate_every": 1}, output=str(worse), mode="lora", iterations=2,
                      learning_rate=5e-3, init_from=str(frozen), validation_image=str(validation),
                      validation_labels=str(shared_data / "ct_3mm_labels.nii.gz")),
          progress=events.append, stop_flag=StopAfter(10**6))
    checks = [(e["iteration"], e["best"]) for e in events if e["event"] == "validation"]
    assert checks == [(0, True), (1, False), (2, False)], checks
    assert all(torch.allclose(load_file(str(worse))[k], source[k], atol=1e-6) for k in heads)
    assert read_model_card(worse).training["validation_mean_dice"] == 0.8
    monkeypatch.setattr(trainer_module, "_dice_per_class", real_dice)

    with pytest.raises(CheckpointError, match="differs from this training run in classes"):
        train(TrainConfig(**{**common, "classes": parse_class_list("1:spleen")}, output=str(tmp_path / "x.safetensors"),
                          mode="lora", iterations=1, init_from=str(frozen)), stop_flag=StopAfter(10**6))
    with pytest.raises(CheckpointError, match="a LoRA model's head belongs to its adapted encoder"):
        train(TrainConfig(**common, output=str(tmp_path / "y.safetensors"), mode="frozen", iterations=1,
                          init_from=str(lora)), stop_flag=StopAfter(10**6))
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="OpenVINO not installed (part of [test])")
def test_openvino_encodes_the_frozen_views_under_its_own_cache_key(shared_data, tmp_path, fast_trainer_base):
    common = dict(images=[str(shared_data / "ct_3mm.nii.gz")], labels=[str(shared_data / "ct_3mm_labels.nii.gz")],
                  classes=parse_class_list("5:liver"), head="linear", iterations=2, batch_size=2, views_per_slice=1,
                  max_labeled_slices=2, background_fraction=0, validate_every=100, device="cpu",
                  cache_dir=str(tmp_path / "cache"), augmentation=NO_AUGMENTATION)
    train(TrainConfig(**common, output=str(tmp_path / "torch.safetensors"), mode="frozen"), stop_flag=StopAfter(10**6))
    torch_files = set((tmp_path / "cache").glob("*.safetensors"))
    fast = tmp_path / "openvino.safetensors"
    train(TrainConfig(**common, output=str(fast), mode="frozen", openvino=True), stop_flag=StopAfter(10**6))
    openvino_files = set((tmp_path / "cache").glob("*.safetensors")) - torch_files
    assert len(torch_files) == len(openvino_files) == 2  # the runtimes never share a cached embedding
    torch_embeddings = [load_file(str(f))["embedding"].float().flatten() for f in torch_files]
    for f in openvino_files:  # each OpenVINO embedding is one of the torch ones to bf16 rounding
        embedding = load_file(str(f))["embedding"].float().flatten()
        assert max(F.cosine_similarity(embedding, t, dim=0).item() for t in torch_embeddings) > 0.995
    assert read_model_card(fast).training["view_encoder"] == "openvino"
    with pytest.raises(SAMedError, match="frozen-mode views on the CPU"):
        train(TrainConfig(**common, output=str(tmp_path / "lora.safetensors"), mode="lora", openvino=True),
              stop_flag=StopAfter(10**6))


# --------------------------------------------------------------------------- torchrun


def _stop_on_rank_zero_only(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    flag = trainer_module._StopFlag()
    if rank == 0:
        flag()  # the Stop reached rank 0 only
    results[rank] = [flag.agreed(True, "cpu"), flag.stop]
    dist.destroy_process_group()


def test_a_stop_on_one_rank_stops_every_rank(tmp_path):
    """Under torchrun a rank that stopped alone would leave the other waiting in the all-reduce for ever."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_stop_on_rank_zero_only, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
        assert dict(results) == {0: [True, True], 1: [True, True]}


def test_torchrun_two_cpu_processes(shared_data, tmp_path):
    out = tmp_path / "ddp.safetensors"
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "SAMedLib.cli", "train",
               "--image", str(shared_data / "ct_3mm.nii.gz"), "--labels", str(shared_data / "ct_3mm_labels.nii.gz"),
               "--classes", "5:liver", "--mode", "frozen", "--head", "linear", "--views-per-slice", "1",
               "--max-labeled-slices", "2", "--iterations", "4", "--batch-size", "2", "--validate-every", "2",
               "--device", "cpu", "--progress-json", "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "SAMedSegmenter")}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert all(line.startswith("{") for line in result.stdout.splitlines() if line.strip()), result.stdout
    steps = [e for e in events if e["event"] == "iteration"]
    assert [e["iteration"] for e in steps] == [1, 2, 3, 4]  # rank 0 alone reports
    assert all(ITERATION_KEYS <= set(e) for e in steps)
    assert events[-1]["event"] == "done"
    loaded = load_model(out)
    assert loaded.card.training["iterations"] == 4 and [c.name for c in loaded.card.classes] == ["liver"]
    assert not Path(str(out) + ".resume.pt").exists()


# --------------------------------------------------------------------------- head start


def test_probe_start_finds_the_liver_before_any_fine_tuning(shared_data, lite):
    """SAMed's head starts every class from the same token and MLP: on real CT the liver and background logits are
    (nearly) equal. The probe fits each class's output bias on the frozen features: the liver is then found on the
    slices, the loss falls, and nothing but the hypernetworks' output biases moved."""
    from SAMedLib.heads import build_head
    from SAMedLib.probe_start import probe_start

    prep = Preprocessing(input_size=lite.input_size)
    volume = load_training_pair(str(shared_data / "ct_3mm.nii.gz"), str(shared_data / "ct_3mm_labels.nii.gz"),
                                               parse_class_list("5:liver"), prep)
    slices = volume.foreground_slices[np.linspace(0, len(volume.foreground_slices) - 1, 6).astype(int)]
    views = trainer_module._make_views(volume, slices, [[ViewAugmentation.identity()]] * len(slices), prep,
                                       4 * lite.embedding_size, 0.0)
    with torch.no_grad():
        embeddings = torch.cat([lite.image_encoder(views.inputs[i:i + 2]) for i in range(0, len(slices), 2)])
    head = build_head("samed", lite, 1, seed=0).eval()
    before = {k: v.clone() for k, v in head.state_dict().items()}

    def liver_dice() -> float:
        with torch.no_grad():
            return dice(head(embeddings).argmax(1).numpy() == 1, views.targets.numpy() == 1)

    start_dice = liver_dice()
    fit = probe_start(head, embeddings, views.targets, dice_weight=0.8)
    assert fit["loss_after"] < 0.8 * fit["loss_before"], fit
    assert start_dice < 0.2 and liver_dice() > 0.45, (start_dice, liver_dice())  # 0.12 -> 0.58 here
    moved = {k for k, v in head.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == {f"mask_decoder.output_hypernetworks_mlps.{k}.layers.2.bias" for k in range(2)}, moved
    with pytest.raises(ValueError, match="no hypernetwork outputs"):
        probe_start(build_head("cnn", lite, 1), embeddings, views.targets, dice_weight=0.8)


def test_head_start_is_recorded_and_checked(shared_data, tmp_path, fast_trainer_base):
    """--head-start probe fits the class outputs first (a probe_start event, validation at iteration 0, the card
    says so) and is what a run gets without the option (the default since stop 23); symmetric skips it; an unknown
    start is refused before anything is written."""
    validation = tmp_path / "two_slices.nii.gz"
    sitk.WriteImage(read_volume(shared_data / "ct_3mm.nii.gz")[:, :, 94:96], str(validation))
    common = dict(images=[str(shared_data / "ct_3mm.nii.gz")], labels=[str(shared_data / "ct_3mm_labels.nii.gz")],
                  classes=parse_class_list("5:liver"), mode="frozen", iterations=1, batch_size=2, views_per_slice=1,
                  max_labeled_slices=2, background_fraction=0, validate_every=100, device="cpu",
                  validation_image=str(validation), validation_labels=str(shared_data / "ct_3mm_labels.nii.gz"),
                  refinement="box", cache_dir=str(tmp_path / "cache"), augmentation=NO_AUGMENTATION)
    for start in ("probe", "symmetric", None):
        out, events = tmp_path / f"{start}.safetensors", []
        chosen = {"head_start": start} if start else {}
        train(TrainConfig(**common, output=str(out), **chosen), progress=events.append,
              stop_flag=StopAfter(10**6))
        training = read_model_card(out).training
        probes = [e for e in events if e["event"] == "probe_start"]
        checks = [e["iteration"] for e in events if e["event"] == "validation"]
        assert training["head_start"] == (start or "probe")
        if start != "symmetric":
            assert len(probes) == 1 and probes[0]["loss_after"] < probes[0]["loss_before"]
            assert training["probe_start"]["loss_after"] == probes[0]["loss_after"] and checks == [0, 1]
        else:
            assert not probes and "probe_start" not in training and checks == [1]
    with pytest.raises(SAMedError, match="unknown head start 'linear'"):
        train(TrainConfig(**common, output=str(tmp_path / "x.safetensors"), head_start="linear"),
              stop_flag=StopAfter(10**6))
    assert not (tmp_path / "x.safetensors").exists()


def test_probe_start_in_lora_mode_encodes_plain_views(shared_data, lite):
    """LoRA mode has no encoded pool: the probe encodes plain views of the training slices with the model's own
    encoder (LoRA's B matrices are zero, so that is the pretrained encoder) and fits the head's output biases."""
    prep = Preprocessing(input_size=lite.input_size)
    volume = load_training_pair(str(shared_data / "ct_3mm.nii.gz"), str(shared_data / "ct_3mm_labels.nii.gz"),
                                               parse_class_list("5:liver"), prep)
    model = build_model(copy.deepcopy(lite), "samed", 1, "lora", 4, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(images=[], labels=[], classes=parse_class_list("5:liver"), output="unused.safetensors",
                         mode="lora", device="cpu", precision="fp32")
    fit = trainer_module._probe_start(model, None, [(volume, volume.foreground_slices[[20, 40]])], "lora", prep,
                                      4 * lite.embedding_size, "cpu", config)
    assert fit["loss_after"] < fit["loss_before"]
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == {f"head.mask_decoder.output_hypernetworks_mlps.{k}.layers.2.bias" for k in range(2)}, moved
