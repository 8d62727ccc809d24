"""Self-prompted refinement, prompts from masks, 3D clean-up and the phase (class level) augmentation."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from SAMedLib.augmentation import (AugmentationConfig, ViewAugmentation, apply_class_levels, apply_tissue_shift,
                                   sample_view, tissue_weight)
from SAMedLib.checkpoint import load_model
from SAMedLib.cleanup import (class_profiles, clean_label_image, co_occurrence_slice, keep_main_extent,
                              keep_plausible_components, main_extent)
from SAMedLib.inference import segment_image
from SAMedLib.metrics import dice
from SAMedLib.model_card import Postprocessing, Preprocessing
from SAMedLib.preprocessing import slice_to_model_theta, to_model_grid
from SAMedLib.prompting import clean_mask, mask_prompt, native_to_model_xy
from SAMedLib.selftest import untrained_checkpoint
from SAMedLib.volume_io import read_volume, resample_to_reference, to_canonical

LIVER, AORTA = 5, 52


# --------------------------------------------------------------------------- prompts from masks


def test_empty_mask_gives_no_prompt():
    assert mask_prompt(np.zeros((64, 64), bool), scale=1.0) is None


def test_tiny_islands_are_ignored_by_the_box():
    mask = np.zeros((64, 64), bool)
    mask[20:40, 10:30] = True  # the organ
    mask[60, 60] = True  # a one-pixel island far away
    prompt = mask_prompt(mask, scale=1.0)
    assert prompt.box == (10.0, 20.0, 29.0, 39.0)
    only_islands = np.zeros((64, 64), bool)
    only_islands[5, 5] = only_islands[50, 50] = True
    assert mask_prompt(only_islands, scale=1.0) is None  # below min_pixels: nothing to prompt with
    assert not clean_mask(only_islands).any()


def test_one_prompt_per_island_so_a_box_never_spans_two_blobs():
    from SAMedLib.prompting import mask_prompts

    mask = np.zeros((64, 64), bool)
    mask[5:15, 5:15] = True  # the vessel
    mask[40:52, 40:50] = True  # a second blob far away (a true second piece, or a false positive)
    mask[60, 0] = True  # a speck: ignored
    boxes = sorted(p.box for p in mask_prompts(mask, scale=1.0))
    assert boxes == [(5.0, 5.0, 14.0, 14.0), (40.0, 40.0, 49.0, 51.0)]
    assert mask_prompts(np.zeros((64, 64), bool), scale=1.0) == []


def test_box_margin_scale_and_point():
    mask = np.zeros((64, 64), bool)
    mask[20:40, 10:30] = True
    prompt = mask_prompt(mask, scale=4.0, margin=3, with_point=True)
    assert prompt.box == (7 * 4.0, 17 * 4.0, 32 * 4.0, 42 * 4.0)  # grown by 3 mask pixels, in input pixels
    x, y = prompt.point
    assert 18 * 4 <= x <= 21 * 4 and 28 * 4 <= y <= 31 * 4  # distance-transform maximum: the centre
    edge = np.zeros((64, 64), bool)
    edge[0:10, 0:10] = True
    assert mask_prompt(edge, scale=1.0, margin=5).box[:2] == (0.0, 0.0)  # clipped to the grid


def test_native_to_model_xy_inverts_the_slice_affine():
    theta = slice_to_model_theta((100, 120), (2.0, 1.5), Preprocessing())
    centre = native_to_model_xy(np.array([[59.5, 49.5]]), theta, (100, 120), 256)
    assert np.allclose(centre, [[127.5, 127.5]])  # slice centre -> grid centre
    # 10 native pixels of 1.5 mm = 15 mm = 9.375 model pixels of 1.6 mm
    step = native_to_model_xy(np.array([[69.5, 49.5]]), theta, (100, 120), 256) - centre
    assert np.allclose(step, [[15 / 1.6, 0.0]])


# --------------------------------------------------------------------------- refinement on a real CT slice


class FixedHead(nn.Module):
    """A deliberately coarse head: the same given logits for every slice (tests use two adjacent slices)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(embeddings.shape[0], -1, -1, -1).to(embeddings.device)


class CountingEncoder(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.slices = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.slices += images.shape[0]
        return self.encoder(images)


@pytest.fixture(scope="module")
def dicom_slab(shared_data):
    """Three middle slices of the ct_dicom series and the reference liver + aorta on them."""
    image = read_volume(shared_data / "ct_dicom")[:, :, 9:12]
    reference = resample_to_reference(read_volume(shared_data / "ct_dicom_labels.nii.gz", allow_constant=True), image)
    reference = sitk.Mask(reference, sitk.Cast((reference == LIVER) | (reference == AORTA), reference.GetPixelID()))
    return image, reference


@pytest.fixture(scope="module")
def coarse_model(tmp_path_factory, dicom_slab):
    """An untrained LiteMedSAM checkpoint whose head outputs the reference in 8-pixel blocks (12.8 mm)."""
    image, reference = dicom_slab
    loaded = load_model(untrained_checkpoint(tmp_path_factory.mktemp("coarse") / "m.safetensors",
                                             f"{LIVER}:liver,{AORTA}:aorta"))
    canonical, _ = to_canonical(reference[:, :, 1:2])
    labels = torch.from_numpy(sitk.GetArrayFromImage(canonical)[0].astype(np.float32))[None, None]
    spacing_x, spacing_y = canonical.GetSpacing()[:2]
    theta = slice_to_model_theta(labels.shape[-2:], (spacing_y, spacing_x), loaded.card.preprocessing)
    on_grid = to_model_grid(labels, theta, 256, mode="nearest")[0, 0]
    logits = torch.zeros(1, 3, 256, 256)
    for channel, value in ((1, LIVER), (2, AORTA)):
        blocky = nn.functional.max_pool2d((on_grid == value).float()[None, None], 8)
        logits[0, channel] = 4 * nn.functional.interpolate(blocky, scale_factor=8)[0, 0] - 2
    loaded.model.head = FixedHead(logits)
    return loaded


def _dice(pred: sitk.Image, reference: sitk.Image, value: int) -> float:
    return dice(sitk.GetArrayFromImage(pred) == value, sitk.GetArrayFromImage(reference) == value)


def test_refinement_sharpens_a_coarse_head_on_real_ct(dicom_slab, coarse_model):
    image, reference = dicom_slab
    one_slice, one_reference = image[:, :, 1:3], reference[:, :, 1:3]  # two adjacent slices, 2 mm apart
    coarse = segment_image(one_slice, coarse_model, device="cpu", refinement="none", cleanup="none")
    refined = segment_image(one_slice, coarse_model, device="cpu", refinement="box", cleanup="none")
    for value in (LIVER, AORTA):
        before, after = _dice(coarse, one_reference, value), _dice(refined, one_reference, value)
        assert after > before + 0.05, (value, before, after)
        assert after > 0.85, (value, after)
    assert refined.GetMetaData("SAMed_refinement") == "liver:box,aorta:box"


def test_refinement_chosen_per_class_keeps_the_head_for_unrefined_classes(dicom_slab, coarse_model):
    """The card may refine the liver but trust the head for the aorta: the aorta stays exactly the head's."""
    image, reference = dicom_slab
    one_slice, one_reference = image[:, :, 1:3], reference[:, :, 1:3]
    coarse = segment_image(one_slice, coarse_model, device="cpu", refinement="none", cleanup="none")
    card_post = coarse_model.card.postprocessing
    coarse_model.card.postprocessing = Postprocessing(refinement="none", refinement_by_class={"liver": "box"})
    try:
        mixed = segment_image(one_slice, coarse_model, device="cpu", cleanup="none")
    finally:
        coarse_model.card.postprocessing = card_post
    head_aorta = sitk.GetArrayFromImage(coarse) == AORTA
    # The head's own aorta, up to where resampling puts its edge (the head's logits vs its mask).
    assert dice(sitk.GetArrayFromImage(mixed) == AORTA, head_aorta) > 0.97
    assert _dice(mixed, one_reference, LIVER) > _dice(coarse, one_reference, LIVER) + 0.05
    assert mixed.GetMetaData("SAMed_refinement") == "liver:box,aorta:none"


def test_refinement_reuses_the_embedding_one_encoder_pass_per_slice(dicom_slab, coarse_model):
    image, _ = dicom_slab
    counter = CountingEncoder(coarse_model.model.image_encoder)
    original = coarse_model.model.image_encoder
    coarse_model.model.image_encoder = counter
    try:
        segment_image(image, coarse_model, device="cpu", refinement="box", cleanup="none", batch_size=1)
    finally:
        coarse_model.model.image_encoder = original
    assert counter.slices == image.GetSize()[2] == 3


def test_refined_output_keeps_geometry_and_label_values(dicom_slab, coarse_model):
    image, reference = dicom_slab
    one_slice, one_reference = image[:, :, 1:3], reference[:, :, 1:3]  # two adjacent slices, 2 mm apart
    # The same physical image stored with flipped x and y axes (direction diag(-1,-1,1)).
    flipped = sitk.Flip(one_slice, [True, True, False])
    assert flipped.GetDirection() != one_slice.GetDirection()
    out = segment_image(flipped, coarse_model, device="cpu", refinement="box", cleanup="none")
    for attribute in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(out, attribute)() == getattr(flipped, attribute)()
    assert set(np.unique(sitk.GetArrayFromImage(out))) <= {0, LIVER, AORTA}
    plain = segment_image(one_slice, coarse_model, device="cpu", refinement="box", cleanup="none")
    back = resample_to_reference(out, one_slice)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(plain))
    assert _dice(out, resample_to_reference(one_reference, flipped), LIVER) > 0.85


# --------------------------------------------------------------------------- 3D clean-up


def test_cleanup_keeps_two_plausible_components_and_drops_a_stray_island():
    labels = np.zeros((20, 40, 40), np.uint8)
    labels[2:9, 5:20, 5:20] = 6  # stomach, part one
    labels[12:18, 22:35, 22:35] = 6  # part two, separate but as large and as confident
    labels[19, 0:3, 37:40] = 6  # a small stray island
    confidence = np.full(labels.shape, 230, np.uint8)
    confidence[19] = 120  # the island is also unconfident
    out = keep_plausible_components(labels, confidence, [6], (3.0, 1.0, 1.0))
    assert (out[2:9, 5:20, 5:20] == 6).all() and (out[12:18, 22:35, 22:35] == 6).all()
    assert not (out[19] == 6).any()
    # Keeping the largest only would have deleted the second true part.
    from SAMedLib.cleanup import keep_largest_component

    assert not (keep_largest_component(labels, [6])[12:18, 22:35, 22:35] == 6).any()


def test_cleanup_drops_a_large_but_unconfident_component():
    labels = np.zeros((10, 30, 30), np.uint8)
    labels[0:4, 0:10, 0:10] = 1
    labels[6:10, 15:30, 15:30] = 1  # larger, but the head barely believed it
    confidence = np.full(labels.shape, 240, np.uint8)
    confidence[6:10] = 100
    out = keep_plausible_components(labels, confidence, [1], (2.0, 1.0, 1.0))
    assert (out[0:4, 0:10, 0:10] == 1).all() and not (out[6:10] == 1).any()



def test_component_cleanup_in_each_class_box_equals_scoring_over_the_whole_volume():
    """The per-class bounding-box shortcut keeps exactly what scoring every component over the whole volume keeps."""
    from scipy import ndimage

    from SAMedLib.cleanup import CONNECTIVITY

    rng = np.random.default_rng(3)
    blobs = ndimage.gaussian_filter(rng.random((24, 48, 48)), 1.5)
    labels = np.select([blobs > 0.53, blobs < 0.47], [5, 6], 0).astype(np.uint8)
    labels[0, 0, 0] = labels[-1, -1, -1] = 5  # one-voxel islands at both corners: the box is the whole volume
    labels[:, :, :20][labels[:, :, :20] == 6] = 0  # class 6 lives in part of the volume only: a smaller box
    confidence = rng.integers(60, 256, labels.shape).astype(np.uint8)
    expected = labels.copy()
    for value in (5, 6):
        components, count = ndimage.label(labels == value, structure=CONNECTIVITY)
        index = np.arange(1, count + 1)
        volume = ndimage.sum_labels(np.ones(labels.shape), components, index) * 2.0 / 1000.0
        mean_conf = ndimage.mean(confidence.astype(float), components, index) / 255.0
        score = volume * mean_conf
        keep = (score >= 0.1 * score.max()) & (mean_conf >= 0.5) & (volume >= 0.1)
        keep[np.argmax(score)] = True
        expected[(labels == value) & ~np.isin(components, index[keep])] = 0
    out = keep_plausible_components(labels, confidence, [5, 6], (2.0, 1.0, 1.0))
    assert (labels != expected).sum() > 0 and (expected == 6).any()  # the example removes and keeps something
    assert np.array_equal(out, expected)


def _organ_with_attached_false_positive() -> tuple[np.ndarray, np.ndarray]:
    """Liver (5) and stomach (6) side by side on slices 20-39; the liver's label runs on, connected, as a
    bowel-sized plateau over slices 0-17 (what a model trained on 40 mm predicts on pelvic slices)."""
    labels = np.zeros((40, 60, 60), np.uint8)
    for z in range(20, 40):
        radius = 4 + (z - 20)  # the liver's tip at slice 20, growing upwards
        yy, xx = np.ogrid[:60, :60]
        labels[z][(yy - 30) ** 2 + (xx - 25) ** 2 <= min(radius, 22) ** 2] = 5
    labels[24:40, 40:55, 45:58] = 6
    labels[0:20, 22:38, 17:33] = 5  # the false plateau, touching the tip: one 3D component with the liver
    confidence = np.full(labels.shape, 240, np.uint8)
    return labels, confidence


def test_extent_cuts_a_false_plateau_connected_to_the_organ():
    labels, confidence = _organ_with_attached_false_positive()
    out = keep_main_extent(labels, confidence, [5, 6], (3.0, 1.0, 1.0))
    assert not (out[:18] == 5).any(), "the plateau beyond the liver's tip survived"
    assert (out[22:] == labels[22:]).all(), "the true liver or stomach lost voxels"
    # Components alone keep it: it is the same 3D component as the liver.
    assert (keep_plausible_components(labels, confidence, [5, 6], (3.0, 1.0, 1.0))[:18] == 5).any()


def test_extent_keeps_the_mode_where_classes_co_occur_even_when_a_false_one_is_bigger():
    labels, confidence = _organ_with_attached_false_positive()
    labels[:20][labels[:20] == 5] = 0  # the liver without its plateau
    labels[0:14, 10:50, 10:50] = 6  # a stomach-like false mode, bigger than the true one, alone on slices 0-13
    out = keep_main_extent(labels, confidence, [5, 6], (3.0, 1.0, 1.0))
    assert not (out[:14] == 6).any() and (out[24:40, 40:55, 45:58] == 6).all()


def test_extent_keeps_an_organ_with_a_missed_slice_and_real_reference_organs(shared_data):
    labels = np.zeros((30, 20, 20), np.uint8)
    for z in range(30):
        labels[z, 2:2 + max(2, 16 - abs(z - 15)), 2:18] = 1  # rises and falls once
    labels[10] = 0  # one slice missed by the head: not a waist
    assert (keep_main_extent(labels, None, [1], (2.0, 1.0, 1.0)) == labels).all()
    # A thin tube (the aorta) whose head nearly misses two of three slices (slab-bright selection split, 3 mm).
    tube = np.zeros((40, 20, 20), np.uint8)
    tube[:, 8:13, 8:13] = 1
    for z, kept in ((18, 2), (20, 1)):  # slices 18 and 20: a voxel or two of the 25 left
        tube[z] = 0
        tube[z, 8, 8:8 + kept] = 1
    assert (keep_main_extent(tube, None, [1], (3.0, 1.0, 1.0)) == tube).all()
    tube[16:24] = 0  # 24 mm without it is a real waist, before a smaller structure
    tube[:16, 8:11] = 0
    out = keep_main_extent(tube, None, [1], (3.0, 1.0, 1.0))
    assert not out[:16].any() and (out[24:] == tube[24:]).all()
    # Real organs of both scans (reference labels) pass untouched, whatever the orientation.
    for name in ("ct_3mm_labels.nii.gz", "ct_dicom_labels.nii.gz"):
        reference = read_volume(shared_data / name, allow_constant=True)
        array = sitk.GetArrayFromImage(reference)
        organs = [1, 2, 3, 5, 6, 52]
        kept = np.where(np.isin(array, organs), array, 0).astype(np.uint8)
        image = sitk.GetImageFromArray(kept)
        image.CopyInformation(reference)
        assert (sitk.GetArrayFromImage(clean_label_image(image, None, organs, "extent")) == kept).all(), name


def _four_organs_on_every_slice(depth: int = 20) -> np.ndarray:
    """Spleen, liver, stomach and aorta side by side on every slice: a 40 mm contrast series like ct_dicom."""
    labels = np.zeros((depth, 60, 60), np.uint8)
    labels[:, 5:25, 5:30] = 5
    labels[:, 5:20, 40:55] = 1
    labels[:, 30:45, 40:55] = 6
    labels[:, 40:45, 20:25] = 52
    return labels


def test_extent_keeps_an_organ_the_head_missed_on_slices_where_the_other_organs_carry_on():
    labels = _four_organs_on_every_slice()
    labels[4:9][labels[4:9] == 5] = 0
    labels[4:9, 5:8, 5:9] = 5  # the liver found faintly on five slices: a deep waist, then a rise
    labels[4:7][labels[4:7] == 52] = 0  # the aorta missed on three slices; found above and below
    organs, spacing = [1, 5, 6, 52], (2.0, 1.0, 1.0)
    out = keep_main_extent(labels, None, organs, spacing)
    assert (out == labels).all(), "a side of the waist was cut although every other organ is on those slices"
    # Each waist alone is deep enough to cut: the walk from the shared slice stops at both (stop 23's `extent`).
    profiles = class_profiles(labels, None, organs, spacing)
    start = co_occurrence_slice(profiles)
    assert main_extent(profiles[5], start) != (0, 19) and main_extent(profiles[52], start) != (0, 19)


def test_extent_still_cuts_a_false_mode_where_only_a_minority_of_the_other_organs_reach():
    labels = np.zeros((40, 60, 60), np.uint8)
    labels[20:40] = _four_organs_on_every_slice(20)
    labels[0:20, 40:45, 20:25] = 52  # the aorta runs on into the pelvis (true)
    labels[0:14, 10:30, 10:30] = 5  # a pelvic "liver" beyond a deep waist, where only the aorta is
    out = keep_main_extent(labels, None, [1, 5, 6, 52], (3.0, 1.0, 1.0))
    assert not (out[:18] == 5).any(), "the pelvic false liver survived"
    assert (out[:, 40:45, 20:25] == 52).all() and (out[20:] == labels[20:]).all()


def test_extent_on_a_label_image_finds_the_body_axis_in_any_orientation():
    labels, confidence = _organ_with_attached_false_positive()
    expected = keep_main_extent(labels, confidence, [5, 6], (3.0, 1.0, 1.0))
    # The same volume stored with the body axis as the image's first (x) axis, flipped.
    stored = np.ascontiguousarray(np.flip(np.moveaxis(labels, 0, 2), 2))  # numpy (y', x', z') -> x' is body axis
    image = sitk.GetImageFromArray(stored)
    image.SetSpacing((3.0, 1.0, 1.0))
    image.SetDirection((0, 0, 1, 0, 1, 0, -1, 0, 0))  # image x runs towards inferior: flipped body axis
    weight = sitk.GetImageFromArray(np.full(stored.shape, 240, np.uint8))
    weight.CopyInformation(image)
    out = sitk.GetArrayFromImage(clean_label_image(image, weight, [5, 6], "extent"))
    assert (np.moveaxis(np.flip(out, 2), 2, 0) == expected).all()


# --------------------------------------------------------------------------- phase augmentation


def test_class_levels_shift_a_real_aorta_both_ways(shared_data):
    """Drawn levels move the real non-contrast aorta of ct_3mm both darker and brighter, up to saturation."""
    from SAMedLib.preprocessing import normalize_intensity

    image = read_volume(shared_data / "ct_3mm.nii.gz")
    labels = resample_to_reference(read_volume(shared_data / "ct_3mm_labels.nii.gz", allow_constant=True), image)
    array = normalize_intensity(sitk.GetArrayFromImage(image), Preprocessing())
    z = int(np.argmax((sitk.GetArrayFromImage(labels) == AORTA).sum(axis=(1, 2))))
    slice_image = torch.from_numpy(array[z])[None, None]
    slice_labels = torch.from_numpy((sitk.GetArrayFromImage(labels)[z] == AORTA).astype(np.float32))[None, None]
    aorta = slice_labels.bool()
    before = float(slice_image[aorta].mean())
    rng = np.random.default_rng(0)
    shifts_hu = []
    for _ in range(200):
        view = sample_view(rng, AugmentationConfig(), 1)
        after = apply_class_levels(slice_image, slice_labels, view)
        assert torch.equal(after[~aorta], slice_image[~aorta])  # other tissue untouched
        shifts_hu.append(400.0 * (float(after[aorta].mean()) - before))
    assert min(shifts_hu) < -10 and max(shifts_hu) > 180  # darker and much brighter (arterial, saturating)
    assert sum(s < 0 for s in shifts_hu) > 5 and sum(s > 100 for s in shifts_hu) > 50


def test_tissue_shift_moves_the_unlabeled_soft_tissue_of_a_real_slice_and_nothing_else(shared_data):
    """The rest of the body changes phase: unlabeled soft tissue moves by the drawn shift, in both directions;
    labeled organs, fat, air and dense bone keep their values, and the remapping never inverts two intensities."""
    from SAMedLib.preprocessing import normalize_intensity

    image = read_volume(shared_data / "ct_3mm.nii.gz")
    labels = resample_to_reference(read_volume(shared_data / "ct_3mm_labels.nii.gz", allow_constant=True), image)
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    label_array = sitk.GetArrayFromImage(labels)
    z = int(np.argmax((label_array == LIVER).sum(axis=(1, 2))))
    classes = np.isin(label_array[z], [1, LIVER, 6, AORTA])
    slice_image = torch.from_numpy(normalize_intensity(hu, Preprocessing())[z])[None, None]
    slice_labels = torch.from_numpy(classes.astype(np.float32))[None, None]
    organ, outside = torch.from_numpy(classes)[None, None], ~torch.from_numpy(classes)[None, None]
    soft = torch.from_numpy((hu[z] > -25) & (hu[z] < 115))[None, None] & outside
    fat_or_bone = torch.from_numpy((hu[z] < -85) | (hu[z] > 275))[None, None]
    assert soft.sum() > 1000 and (fat_or_bone & outside).sum() > 1000
    for shift in (-0.1, 0.25):
        view = replace(ViewAugmentation.identity(), tissue_shift=shift)
        after = apply_tissue_shift(slice_image, slice_labels, view)
        assert torch.equal(after[organ], slice_image[organ])
        assert torch.equal(after[fat_or_bone], slice_image[fat_or_bone])
        moved = (after - slice_image)[soft & (slice_image + shift > 0) & (slice_image + shift < 1)]
        assert torch.allclose(moved, torch.full_like(moved, shift), atol=1e-6)
        ramp = torch.linspace(0, 1, 4001)
        assert bool((torch.diff(ramp + shift * tissue_weight(ramp)) > 0).all())  # monotone: no folded intensities
    # The trainer's views carry it: the shifted view's encoder input is brighter than the plain one.
    from SAMedLib.trainer import _make_views
    from SAMedLib.training_data import TrainingVolume

    volume = TrainingVolume("slice", slice_image[0].numpy(), slice_labels[0].numpy().astype(np.uint8),
                            tuple(reversed(image.GetSpacing()[:2])))
    plain, shifted = _make_views(volume, np.array([0]), [[ViewAugmentation.identity(), view]], Preprocessing(), 64,
                                 noise_std=0.0).inputs
    assert float((shifted - plain).max()) == pytest.approx(0.25, abs=0.01)
    drawn = [sample_view(np.random.default_rng(s), AugmentationConfig(p_tissue_shift=1.0), 4).tissue_shift
             for s in range(200)]
    assert min(drawn) < -0.05 and max(drawn) > 0.2  # both directions: -40..+100 HU
    # Drawn last: a seed's other choices are the same with the option on or off.
    for s in range(20):
        on = sample_view(np.random.default_rng(s), AugmentationConfig(p_tissue_shift=1.0), 4)
        off = sample_view(np.random.default_rng(s), AugmentationConfig(p_tissue_shift=0.0), 4)
        assert off.tissue_shift == 0.0 and on.class_levels == off.class_levels and on.matrix == off.matrix


def test_absent_organ_views_appear_in_the_training_pool(shared_data):
    """Every slice of ct_dicom shows all four organs; the default views still include some without each."""
    from SAMedLib.classes import parse_class_list
    from SAMedLib.trainer import _make_views
    from SAMedLib.training_data import load_training_pair
    from SAMedLib.augmentation import ViewAugmentation

    classes = parse_class_list("1:spleen,5:liver,6:stomach,52:aorta")
    prep = Preprocessing()
    volume = load_training_pair(shared_data / "ct_dicom", shared_data / "ct_dicom_labels.nii.gz", classes, prep)
    rng = np.random.default_rng(1)
    plan = [ViewAugmentation.identity()] + [sample_view(rng, AugmentationConfig(), 4) for _ in range(60)]
    made = _make_views(volume, np.array([10]), [plan], prep, 64, noise_std=0.0)
    present = np.array([[bool((target == c).any()) for c in range(1, 5)] for target in made.targets])
    assert present[0].all()  # the plain view shows every organ
    assert (~present[1:, [0, 2, 3]]).any(axis=0).all()  # spleen, stomach and aorta are each absent from some views
    assert (~present[1:]).any(axis=1).sum() >= 4  # several views lack an organ
    liver_area = np.array([int((target == 2).sum()) for target in made.targets])
    assert liver_area[1:].min() < 0.5 * liver_area[0]  # the big liver is at least pushed half out of view
