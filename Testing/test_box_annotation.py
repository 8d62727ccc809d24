"""Box annotation (SAMedLib.annotation, ``samed annotate``) on real CT with pretrained LiteMedSAM."""
from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SAMedLib.annotation import (AnnotationError, Annotator, PropagationSettings, SliceBox, box_from_cli, box_from_ijk,
                                 slice_from_cli)
from SAMedLib.cli import main as samed
from SAMedLib.gap_fill import fill_gaps, gap_slices
from SAMedLib.metrics import dice
from SAMedLib.model_card import Preprocessing
from SAMedLib.prompting import OUTSIDE_LOGIT, Prompt, PromptDecoder
from SAMedLib.volume_io import read_volume, resample_to_reference, to_canonical

SPLEEN = 1
GALLBLADDER = 4
CROP = (74, 92)  # canonical slices of ct_3mm around the spleen's inferior end (the spleen starts at slice 82)


@pytest.fixture(scope="module")
def spleen_volume(shared_data):
    """ct_3mm cut to CROP on the canonical grid (a valid LPS volume of its own) and its spleen reference mask."""
    image = read_volume(shared_data / "ct_3mm.nii.gz")
    reference = resample_to_reference(read_volume(shared_data / "ct_3mm_labels.nii.gz", allow_constant=True), image)
    canonical, canonical_ref = to_canonical(image)[0], to_canonical(reference)[0]
    crop = canonical[:, :, CROP[0]:CROP[1]]
    spleen = sitk.GetArrayFromImage(canonical_ref[:, :, CROP[0]:CROP[1]]) == SPLEEN
    return crop, spleen


@pytest.fixture(scope="module")
def annotator(spleen_volume, lite):
    backbone = copy.deepcopy(lite)  # prepare_encoder folds BatchNorm in place: keep the shared backbone pristine
    return Annotator(spleen_volume[0], backbone.image_encoder,
                     PromptDecoder(backbone.prompt_encoder, backbone.mask_decoder), Preprocessing())


def reference_box(mask: np.ndarray, z: int) -> SliceBox:
    ys, xs = np.nonzero(mask[z])
    return SliceBox(z, int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


@pytest.mark.slow
def test_box_segments_its_slice_and_propagation_stops_at_the_organs_end(annotator, spleen_volume):
    _, spleen = spleen_volume
    present = np.flatnonzero(spleen.any(axis=(1, 2)))
    top = len(spleen) - 2
    one_slice = annotator.annotate([reference_box(spleen, top)], propagate=False)
    assert np.flatnonzero(one_slice.any(axis=(1, 2))).tolist() == [top]
    assert dice(one_slice[top], spleen[top]) > 0.85

    mask = annotator.annotate([reference_box(spleen, top)])
    annotated = np.flatnonzero(mask.any(axis=(1, 2)))
    assert annotated.max() == len(spleen) - 1  # walked up to the end of the volume
    assert annotated.min() >= present.min() - 3  # and stopped at the spleen's inferior end
    assert annotated.min() <= present.min() + 3  # ... not long before it
    assert np.array_equal(annotated, np.arange(annotated.min(), annotated.max() + 1))  # no gaps
    assert dice(mask, spleen) > 0.8


@pytest.mark.slow
def test_distant_boxes_join_and_the_encoder_runs_once_per_slice(annotator, spleen_volume):
    _, spleen = spleen_volume
    present = np.flatnonzero(spleen.any(axis=(1, 2)))
    low, high = int(present.min()) + 1, len(spleen) - 1
    boxes = [reference_box(spleen, low), reference_box(spleen, high)]
    encoder_runs, decoder_runs = annotator.encoder_runs, annotator.decoder_runs
    first = annotator.annotate(boxes, propagate=False)
    assert np.flatnonzero(first.any(axis=(1, 2))).tolist() == [low, high]
    joined = annotator.annotate(boxes)
    assert np.all(joined[low:high + 1].any(axis=(1, 2)))  # one mask from one box to the other
    assert dice(joined[low:high + 1], spleen[low:high + 1]) > 0.8
    # Every slice was encoded once, however many boxes and walks decoded it (the earlier test filled the cache).
    assert annotator.encoder_runs == len(annotator._embeddings) <= len(spleen)
    assert annotator.encoder_runs - encoder_runs <= 2  # at most the two box slices were new
    assert annotator.decoder_runs - decoder_runs >= high - low - 1  # the walks between the boxes were decoded


@pytest.mark.slow
def test_a_box_drawn_inside_the_organ_still_gives_the_whole_organ(annotator, spleen_volume):
    """The user's box is grown before it prompts: a box 2 voxels (6 mm) inside the spleen on every side cut the
    mask at the box (Dice 0.64-0.77 on these slices) before the growth."""
    _, spleen = spleen_volume
    scores = {0.0: [], PropagationSettings().box_margin_mm: []}
    for z in range(12, 17):
        ys, xs = np.nonzero(spleen[z])
        inside = SliceBox(z, int(xs.min()) + 2, int(ys.min()) + 2, int(xs.max()) - 2, int(ys.max()) - 2)
        for margin, values in scores.items():
            mask = annotator.annotate([inside], propagate=False, settings=PropagationSettings(box_margin_mm=margin))
            values.append(dice(mask[z], spleen[z]))
    assert min(scores[PropagationSettings().box_margin_mm]) > 0.93
    assert np.mean(scores[0.0]) < 0.85  # the case is real: the bare box cuts the organ


@pytest.mark.slow
def test_a_prompt_is_decoded_on_its_window_with_the_same_mask(annotator, spleen_volume):
    _, spleen = spleen_volume
    z = len(spleen) - 2
    embedding = annotator.embedding(z).float()
    prompt = Prompt(annotator.model_box(annotator.grown(reference_box(spleen, z), 6.0)))
    whole = PromptDecoder(annotator.decoder.prompt_encoder, annotator.decoder.mask_decoder, context_tokens=None)
    with torch.inference_mode():
        windowed_logits, _ = annotator.decoder(embedding, [prompt])
        whole_logits, _ = whole(embedding, [prompt])
        (y0, y1), (x0, x1) = annotator.decoder.window(prompt.box, embedding.shape[-2:])
        assert y0 > 0 and (y1 - y0) * (x1 - x0) < embedding.shape[-1] * embedding.shape[-2] / 2  # a real saving
        outside = torch.zeros_like(embedding)  # the decoder never sees the embedding outside the window
        outside[..., y0:y1, x0:x1] = embedding[..., y0:y1, x0:x1]
        outside_logits, _ = annotator.decoder(outside, [prompt])
    assert torch.equal(outside_logits, windowed_logits)
    assert (windowed_logits[0, :4 * y0] == OUTSIDE_LOGIT).all()
    assert dice(windowed_logits[0].numpy() > 0, whole_logits[0].numpy() > 0) > 0.97



def test_the_decoder_runs_in_fp32_under_any_autocast(annotator, spleen_volume):
    """Refinement and annotation decode inside the encoder's bf16 autocast; the masks must not depend on it."""
    _, spleen = spleen_volume
    z = len(spleen) - 2
    # The same values both ways: on a CPU without native bf16 the encoder runs in fp32, and rounding its embedding
    # to bf16 would change the input, not test the decoder.
    embedding = annotator.embedding(z).to(torch.bfloat16)
    prompt = Prompt(annotator.model_box(annotator.grown(reference_box(spleen, z), 6.0)))
    with torch.inference_mode():
        plain_logits, plain_iou = annotator.decoder(embedding.float(), [prompt])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_logits, autocast_iou = annotator.decoder(embedding, [prompt])
    assert autocast_logits.dtype == torch.float32
    assert torch.equal(autocast_logits, plain_logits) and torch.equal(autocast_iou, plain_iou)


@pytest.mark.slow
def test_an_end_mark_stops_propagation_before_its_slice(annotator, spleen_volume):
    _, spleen = spleen_volume
    present = np.flatnonzero(spleen.any(axis=(1, 2)))
    top, end = len(spleen) - 2, int(present.min()) + 3
    box = reference_box(spleen, top)
    unmarked = np.flatnonzero(annotator.annotate([box]).any(axis=(1, 2)))
    marked = np.flatnonzero(annotator.annotate([box], ends=[end]).any(axis=(1, 2)))
    assert unmarked.min() <= end  # without the mark the walk goes through that slice
    assert marked.min() == end + 1 and marked.max() == unmarked.max()  # with it, it stops just before


def test_annotate_needs_a_box_inside_the_volume(annotator):
    with pytest.raises(AnnotationError, match="no box"):
        annotator.annotate([])
    with pytest.raises(AnnotationError, match="outside the volume"):
        annotator.annotate([SliceBox(99, 10, 10, 20, 20)])
    with pytest.raises(AnnotationError, match="end mark slice 99 is outside"):
        annotator.annotate([SliceBox(3, 10, 10, 20, 20)], ends=[99])
    with pytest.raises(AnnotationError, match="both a box and an end mark"):
        annotator.annotate([SliceBox(3, 10, 10, 20, 20)], ends=[3])


# --------------------------------------------------------------------------- boxes and the CLI (no model)


def _permuted_image() -> sitk.Image:
    """A volume stored with its axial axis first: the third storage axis is not superior-inferior."""
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 100, (12, 10, 8)).astype(np.int16))
    image.SetDirection((0, 1, 0, 0, 0, 1, 1, 0, 0))  # columns: i -> S, j -> L, k -> P
    image.SetSpacing((2.0, 1.0, 1.5))
    return image


def test_box_from_ijk_follows_flips_and_permutations():
    image = _permuted_image()
    canonical, restore = to_canonical(image)
    original = sitk.GetArrayFromImage(image)
    values = np.arange(original.size).reshape(original.shape)
    labelled = sitk.GetImageFromArray(values)
    labelled.CopyInformation(image)
    on_canonical = sitk.GetArrayFromImage(to_canonical(labelled)[0])
    a, b = (4, 1, 2), (4, 6, 9)  # (i, j, k): the same i, the axial axis of this image
    box = box_from_ijk(restore, a, b)
    inside = on_canonical[box.slice, box.y0:box.y1 + 1, box.x0:box.x1 + 1]
    expected = values[2:10, 1:7, 4]  # [k, j, i]
    assert sorted(inside.ravel()) == sorted(expected.ravel())


@pytest.mark.parametrize("args, message", [
    (["--box", "3,1,1,5,5"], "axial"),  # the third axis of this image is not superior-inferior
])
def test_cli_refuses_a_box_on_a_non_axial_third_axis(tmp_path, capsys, args, message):
    path = tmp_path / "permuted.nii.gz"
    sitk.WriteImage(_permuted_image(), str(path))
    assert samed(["annotate", str(path), *args, "--output", str(tmp_path / "out.nii.gz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("samed: error:") and message in err[0]
    assert not (tmp_path / "out.nii.gz").exists()


@pytest.mark.parametrize("box, message", [
    ("3,1,1,50,5", "outside the image"),
    ("30,1,1,5,5", "outside the image"),
    ("3,4,1,4,6", "empty"),
    ("3,1,1,5", "five integers"),
    ("3,1,1,5,5 --end 30", "--end 30: outside the image's 12 slices (0 to 11)"),
    ("3,1,1,5,5 --end top", "expected K, a slice index"),
])
def test_cli_box_validation(tmp_path, capsys, box, message):
    image = sitk.GetImageFromArray(np.random.default_rng(1).normal(0, 100, (12, 10, 8)).astype(np.int16))
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(path))
    box, *more = box.split()
    assert samed(["annotate", str(path), "--box", box, *more, "--output", str(tmp_path / "out.nii.gz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("samed: error:") and message in err[0], err
    assert not (tmp_path / "out.nii.gz").exists()


def test_box_from_cli_maps_voxel_indices():
    image = sitk.GetImageFromArray(np.zeros((12, 10, 8), np.int16))
    image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, -1))  # x and z stored reversed
    restore = to_canonical(image)[1]
    box = box_from_cli(restore, "3,1,2,5,6")
    assert box == SliceBox(12 - 1 - 3, 8 - 1 - 5, 2, 8 - 1 - 1, 6)
    assert slice_from_cli(restore, "3") == box.slice
    with pytest.raises(AnnotationError, match="--end slices the image's third axis"):
        slice_from_cli(to_canonical(_permuted_image())[1], "3")


@pytest.mark.slow
def test_cli_annotate_writes_the_value_on_the_input_grid(tmp_path, spleen_volume, tiny_checkpoint):
    crop, spleen = spleen_volume
    # Stored with the x axis reversed (RAS-like), so the voxel box must be mapped to the canonical grid.
    flipped = sitk.Flip(crop, [True, False, False])
    path, out = tmp_path / "ct.nii.gz", tmp_path / "spleen.nrrd"
    sitk.WriteImage(flipped, str(path))
    z = len(spleen) - 1
    ys, xs = np.nonzero(spleen[z])
    width = crop.GetSize()[0]
    box = f"{z},{width - 1 - xs.max()},{ys.min()},{width - 1 - xs.min()},{ys.max()}"
    assert samed(["annotate", str(path), "--box", box, "--value", "7", "--no-propagate", "-q",
                  "--output", str(out), "--device", "cpu"]) == 0
    result = sitk.ReadImage(str(out))
    assert result.GetSize() == flipped.GetSize() and np.allclose(result.GetDirection(), flipped.GetDirection())
    assert np.allclose(result.GetOrigin(), flipped.GetOrigin()) and np.allclose(result.GetSpacing(), flipped.GetSpacing())
    labels = sitk.GetArrayFromImage(result)
    assert set(np.unique(labels)) == {0, 7}
    assert np.flatnonzero(labels.any(axis=(1, 2))).tolist() == [z]
    assert dice(labels[z][:, ::-1] == 7, spleen[z]) > 0.85
    # --model: a fine-tuned model's encoder with the base decoder; a frozen-encoder model's encoder is the base one
    with_model = tmp_path / "with_model.nrrd"
    assert samed(["annotate", str(path), "--box", box, "--value", "7", "--no-propagate", "-q", "--output",
                  str(with_model), "--device", "cpu", "--model", str(tiny_checkpoint)]) == 0
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(with_model))), labels)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="OpenVINO not installed (part of [test])")
def test_cli_annotate_with_openvino_gives_torchs_spleen(tmp_path, annotator, spleen_volume):
    crop, spleen = spleen_volume
    box = reference_box(spleen, len(spleen) - 2)
    path, out = tmp_path / "ct.nii.gz", tmp_path / "spleen.nrrd"
    sitk.WriteImage(crop, str(path))  # canonical already: voxel indices are the box's pixels
    assert samed(["annotate", str(path), "--box", f"{box.slice},{box.x0},{box.y0},{box.x1},{box.y1}", "-q",
                  "--output", str(out), "--device", "cpu", "--openvino"]) == 0
    fast = sitk.GetArrayFromImage(sitk.ReadImage(str(out))) == 1
    assert dice(fast, annotator.annotate([box])) > 0.97 and dice(fast, spleen) > 0.8


def test_gap_slices_are_only_between_found_slices():
    area = np.array([0, 0, 10, 12, 0, 11, 3, 0, 0])
    assert gap_slices(area, window=2) == [4]  # slice 6 (3 px, then nothing) is the organ's end, not a gap
    assert gap_slices(np.array([9, 8, 5, 8, 9]), window=1) == []  # a waist above half its neighbours stays
    assert gap_slices(np.array([9, 0, 0, 9]), window=2) == [1, 2]  # two missed slices in a row


@pytest.mark.slow
def test_a_missed_slice_inside_the_spleen_is_filled_and_its_end_is_not(annotator, spleen_volume):
    _, spleen = spleen_volume
    present = np.flatnonzero(spleen.any(axis=(1, 2)))
    first, middle = int(present.min()), int(present[len(present) // 2])
    labels = spleen.astype(np.uint8) * SPLEEN
    labels[first] = 0  # the organ's end missed: nothing above-and-below says it is a gap
    labels[middle] = 0  # missed between two found slices
    ys, xs = np.nonzero(spleen[middle])
    other = (slice(int(ys.min()), int(ys.min()) + 4), slice(int(xs.min()), int(xs.max()) + 1))
    labels[middle][other] = 5  # another class on part of the gap slice keeps its pixels
    filled, slices = fill_gaps(labels, annotator, [SPLEEN])
    assert slices == {SPLEEN: [middle]}
    assert dice(filled[middle] == SPLEEN, spleen[middle]) > 0.85
    assert (filled[middle][other] == 5).all()
    unchanged = np.ones(len(labels), bool)
    unchanged[middle] = False
    assert np.array_equal(filled[unchanged], labels[unchanged])


@pytest.fixture(scope="module")
def gallbladder_annotator(shared_data, lite):
    """ct_3mm cut to canonical slices 76-103 (the gallbladder is on 84-95) and its gallbladder reference mask."""
    image = read_volume(shared_data / "ct_3mm.nii.gz")
    reference = resample_to_reference(read_volume(shared_data / "ct_3mm_labels.nii.gz", allow_constant=True), image)
    canonical, canonical_ref = to_canonical(image)[0], to_canonical(reference)[0]
    crop = canonical[:, :, 76:104]
    gallbladder = sitk.GetArrayFromImage(canonical_ref[:, :, 76:104]) == GALLBLADDER
    backbone = copy.deepcopy(lite)
    return Annotator(crop, backbone.image_encoder, PromptDecoder(backbone.prompt_encoder, backbone.mask_decoder),
                     Preprocessing()), gallbladder


@pytest.mark.slow
def test_propagation_stops_where_the_mask_moves_onto_tissue_of_another_intensity(gallbladder_annotator):
    """The gallbladder (bile, ~5 HU) walked from its middle slice: the decoder keeps finding the liver and the
    duodenum next to it with a high predicted IoU and a similar area, so only the intensity check stops the walk."""
    annotator, gallbladder = gallbladder_annotator
    present = np.flatnonzero(gallbladder.any(axis=(1, 2)))
    box = reference_box(gallbladder, int(present[len(present) // 2]))
    unchecked = annotator.annotate([box], settings=PropagationSettings(min_intensity_overlap=0.0))
    checked = annotator.annotate([box])
    walked = np.flatnonzero(checked.any(axis=(1, 2)))
    overrun = np.flatnonzero(unchecked.any(axis=(1, 2)))
    assert overrun.max() > present.max() + 3  # without it, the walk runs on into the liver (8 slices here)
    assert walked.max() <= present.max() + 1 and walked.min() >= present.min() - 2
    assert dice(checked, gallbladder) > 0.85 > dice(unchecked, gallbladder)
