"""metrics: Dice and HD95 against hand-computed and brute-force answers, empty-mask conventions."""
from __future__ import annotations

import math

import numpy as np
import pytest

from SAMedLib.classes import SegmentClass
from SAMedLib.metrics import ScoreAccumulator, dice, format_table, hd95, score_label_maps


def _cube(shape=(12, 12, 12), start=(3, 3, 3), size=4) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def _brute_force_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """Independent HD95: explicit 6-neighbour surface test and all pairwise distances."""
    def surface_points(mask):
        padded = np.pad(mask, 1)
        inner = padded[1:-1, 1:-1, 1:-1]
        neighbours_all_in = np.ones_like(mask)
        for axis in range(3):
            for shift in (-1, 1):
                neighbours_all_in &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(inner & ~neighbours_all_in) * np.asarray(spacing, dtype=float)

    pa, pb = surface_points(a), surface_points(b)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


def test_dice_two_cubes_half_overlap():
    a = _cube()
    b = _cube(start=(3, 3, 5))  # shifted 2 voxels along x: overlap 4*4*2 = 32 of 64 each
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(a, _cube(start=(8, 8, 8))) == 0.0


def test_dice_counts_not_fraction_of_union():
    a = np.zeros((2, 2, 2), bool)
    b = np.zeros((2, 2, 2), bool)
    a[0, 0, :] = True  # 2 voxels
    b[0, :, :] = True  # 4 voxels, contains a
    assert dice(a, b) == pytest.approx(2 * 2 / 6)


def test_hd95_one_voxel_shift_along_z_is_one_z_spacing():
    a = _cube()
    b = _cube(start=(4, 3, 3))  # one slice further along z
    assert hd95(a, b, (3.0, 1.0, 1.0)) == pytest.approx(3.0)
    assert hd95(b, a, (3.0, 1.0, 1.0)) == pytest.approx(3.0)


def test_hd95_one_voxel_shift_along_x_is_one_x_spacing():
    a = _cube()
    b = _cube(start=(3, 3, 4))
    assert hd95(a, b, (3.0, 1.0, 0.5)) == pytest.approx(0.5)


def test_hd95_single_voxels_anisotropic_distance():
    a = np.zeros((5, 5, 6), bool)
    b = np.zeros((5, 5, 6), bool)
    a[0, 0, 0] = True
    b[2, 3, 4] = True
    expected = math.sqrt((2 * 3.0) ** 2 + (3 * 2.0) ** 2 + (4 * 0.5) ** 2)
    assert hd95(a, b, (3.0, 2.0, 0.5)) == pytest.approx(expected)


def test_hd95_identical_masks_is_zero():
    a = _cube()
    assert hd95(a, a, (2.0, 0.8, 0.8)) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_brute_force_on_random_blobs(seed):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = (10, 14, 13)
    # Smoothed noise thresholded: irregular blobs, several components, some touching edges.
    a = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) > 0.1
    b = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) > 0.1
    assert a.any() and b.any()
    spacing = (2.5, 0.7, 1.1)
    value = hd95(a, b, spacing)
    assert value == pytest.approx(_brute_force_hd95(a, b, spacing))
    assert value > 0


def test_hd95_same_with_masks_touching_the_array_edge_and_padded():
    # Edge voxels count as surface (outside = background), so zero padding changes nothing;
    # this also checks that the internal bounding-box crop is exact.
    a = _cube(shape=(6, 7, 8), start=(0, 0, 0), size=5)
    b = _cube(shape=(6, 7, 8), start=(1, 2, 3), size=5)
    spacing = (2.0, 1.0, 0.6)
    padded = hd95(np.pad(a, 4), np.pad(b, 4), spacing)
    assert hd95(a, b, spacing) == pytest.approx(padded)
    assert padded == pytest.approx(_brute_force_hd95(a, b, spacing))


def test_empty_mask_conventions():
    empty = np.zeros((6, 6, 6), bool)
    present = _cube(shape=(6, 6, 6), start=(1, 1, 1), size=2)
    spacing = (1.0, 1.0, 1.0)
    # both empty: nothing to score
    assert math.isnan(dice(empty, empty)) and math.isnan(hd95(empty, empty, spacing))
    # missed organ (prediction empty): Dice 0, HD95 missing
    assert dice(empty, present) == 0.0 and math.isnan(hd95(empty, present, spacing))
    # false positive organ (reference empty): Dice 0, HD95 missing
    assert dice(present, empty) == 0.0 and math.isnan(hd95(present, empty, spacing))


def test_shape_and_spacing_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="spacing"):
        hd95(_cube(), _cube(), (1.0, 1.0))


CLASSES = [SegmentClass.named(1, "spleen"), SegmentClass.named(5, "liver"),
           SegmentClass.named(6, "stomach"), SegmentClass.named(52, "aorta")]


def _label_maps():
    pred = np.zeros((12, 12, 12), np.uint8)
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[_cube()] = 1                      # spleen: reference cube
    pred[_cube(start=(4, 3, 3))] = 1      # predicted one slice higher
    ref[0:2, 0:2, 0:2] = 5                # liver: present in reference, missed by prediction
    pred[10:12, 10:12, 10:12] = 52        # aorta: false positive
    pred[0, 11, 11] = 99                  # value outside the class list: ignored
    return pred, ref                      # stomach (6): absent in both


def test_score_label_maps_per_class_and_means():
    pred, ref = _label_maps()
    scores = score_label_maps(pred, ref, CLASSES, (3.0, 1.0, 1.0))
    spleen, liver, stomach, aorta = (scores["classes"][c.name] for c in CLASSES)
    assert spleen["dice"] == pytest.approx(2 * 48 / 128) and spleen["hd95_mm"] == pytest.approx(3.0)
    assert (spleen["pred_voxels"], spleen["ref_voxels"], spleen["value"]) == (64, 64, 1)
    assert liver["dice"] == 0.0 and math.isnan(liver["hd95_mm"]) and liver["ref_voxels"] == 8
    assert math.isnan(stomach["dice"]) and math.isnan(stomach["hd95_mm"])
    assert aorta["dice"] == 0.0 and math.isnan(aorta["hd95_mm"]) and aorta["pred_voxels"] == 8
    # mean Dice over spleen, liver, aorta (stomach excluded); mean HD95 only spleen
    assert scores["mean_dice"] == pytest.approx((0.75 + 0.0 + 0.0) / 3)
    assert scores["mean_hd95_mm"] == pytest.approx(3.0)


def test_score_label_maps_rejects_different_grids():
    with pytest.raises(ValueError, match="resample"):
        score_label_maps(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)), CLASSES, (1, 1, 1))


def test_format_table_rows_and_na():
    pred, ref = _label_maps()
    table = format_table(score_label_maps(pred, ref, CLASSES, (3.0, 1.0, 1.0)), CLASSES)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["class", "Dice", "HD95", "mm"]
    rows = {ln.split()[0]: ln.split() for ln in lines[2:] if not ln.startswith("-")}
    assert rows["spleen"][1:3] == ["0.7500", "3.00"]
    assert rows["liver"][1:3] == ["0.0000", "n/a"]
    assert rows["stomach"][1:3] == ["n/a", "n/a"]
    assert rows["mean"][1:3] == ["0.2500", "3.00"]
    assert list(rows) == ["spleen", "liver", "stomach", "aorta", "mean"]


def test_accumulator_averages_cases_skipping_nan():
    pred, ref = _label_maps()
    acc = ScoreAccumulator()
    acc.add(score_label_maps(pred, ref, CLASSES, (3.0, 1.0, 1.0)))
    acc.add(score_label_maps(ref, ref, CLASSES, (3.0, 1.0, 1.0)))  # perfect case
    agg = acc.aggregate()
    assert len(acc) == 2 and agg["cases"] == 2
    assert agg["classes"]["spleen"]["dice"] == pytest.approx((0.75 + 1.0) / 2)
    assert agg["classes"]["spleen"]["hd95_mm"] == pytest.approx((3.0 + 0.0) / 2)
    assert agg["classes"]["liver"]["dice"] == pytest.approx(0.5)
    assert agg["classes"]["liver"]["hd95_mm"] == 0.0  # the missed case has no HD95
    assert math.isnan(agg["classes"]["stomach"]["dice"])


# --------------------------------------------------------------------------- evaluate_files


def test_evaluate_files_resamples_reference_onto_prediction_grid(shared_data, tmp_path):
    import SimpleITK as sitk

    from SAMedLib.evaluation import evaluate_files
    from SAMedLib.volume_io import read_volume, resample_to_reference

    # A "prediction" equal to the reference but stored on the DICOM grid (y not flipped):
    # correct evaluation must give Dice 1 although the raw arrays are mirrored.
    ct = read_volume(shared_data / "ct_dicom")
    reference_path = shared_data / "ct_dicom_labels.nii.gz"
    reference = read_volume(reference_path, allow_constant=True)
    prediction = resample_to_reference(reference, ct)
    prediction_path = tmp_path / "pred.nii.gz"
    sitk.WriteImage(prediction, str(prediction_path))

    classes = [c for c in CLASSES if c.name != "stomach"] + [SegmentClass.named(2, "kidney_right")]
    scores = evaluate_files(prediction_path, reference_path, classes)
    assert scores["prediction"] == str(prediction_path) and scores["reference"] == str(reference_path)
    for name in ("spleen", "liver", "aorta"):
        assert scores["classes"][name]["dice"] == 1.0
        assert scores["classes"][name]["hd95_mm"] == 0.0
        assert scores["classes"][name]["ref_voxels"] > 1000
    assert math.isnan(scores["classes"]["kidney_right"]["dice"])  # not in this scan
    assert scores["mean_dice"] == 1.0


def test_evaluate_files_known_overlap_and_spacing(tmp_path):
    import SimpleITK as sitk

    from SAMedLib.evaluation import evaluate_files

    def save(arr, name, flip_z=False):
        image = sitk.GetImageFromArray(arr[::-1] if flip_z else arr)
        image.SetSpacing((1.0, 1.0, 3.0))
        if flip_z:  # same physical voxels stored bottom-up
            image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
            image.SetOrigin((0.0, 0.0, 3.0 * (arr.shape[0] - 1)))
        path = tmp_path / name
        sitk.WriteImage(image, str(path))
        return path

    ref = np.zeros((12, 12, 12), np.uint8)
    pred = np.zeros((12, 12, 12), np.uint8)
    ref[_cube()] = 1
    pred[_cube(start=(4, 3, 3))] = 1
    scores = evaluate_files(save(pred, "pred.nrrd"), save(ref, "ref.nii.gz", flip_z=True), CLASSES[:1])
    assert scores["classes"]["spleen"]["dice"] == pytest.approx(0.75)
    assert scores["classes"]["spleen"]["hd95_mm"] == pytest.approx(3.0)


def test_evaluate_files_rejects_reference_outside_prediction_grid(tmp_path):
    import SimpleITK as sitk

    from SAMedLib.evaluation import evaluate_files
    from SAMedLib.volume_io import VolumeError

    arr = np.zeros((6, 6, 6), np.uint8)
    arr[2:4, 2:4, 2:4] = 1
    pred = sitk.GetImageFromArray(arr)
    ref = sitk.GetImageFromArray(arr)
    ref.SetOrigin((500.0, 0.0, 0.0))
    sitk.WriteImage(pred, str(tmp_path / "pred.nii.gz"))
    sitk.WriteImage(ref, str(tmp_path / "ref.nii.gz"))
    with pytest.raises(VolumeError, match=r"ref\.nii\.gz.*no labelled voxel"):
        evaluate_files(tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", CLASSES[:1])
