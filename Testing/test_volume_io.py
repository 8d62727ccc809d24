"""volume_io: reading/validation errors, canonical reorientation round trips, resampling, writing."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SAMedLib.metrics import dice
from SAMedLib.volume_io import (VolumeError, read_volume, resample_to_reference, to_canonical, validate_volume,
                                write_image)


def _rot(axis: str, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


# Axis permutation: image x points posterior, y inferior, z right (a sagittal stack).
PERMUTED = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
OBLIQUE = _rot("x", 10) @ _rot("z", 20)
DIRECTIONS = {
    "identity": np.eye(3),
    "flip_x_z": np.diag([-1.0, 1.0, -1.0]),
    "nifti_ras_like": np.diag([-1.0, -1.0, 1.0]),
    "permuted": PERMUTED,
    "oblique": OBLIQUE,
    "oblique_permuted_flipped": OBLIQUE @ np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [-1.0, 0.0, 0.0]]),
}


def _test_image(direction: np.ndarray) -> sitk.Image:
    """Anisotropic 7x6x5 (x,y,z) volume with unique voxel values."""
    arr = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((0.7, 1.3, 3.0))
    image.SetOrigin((12.5, -40.25, 101.0))
    image.SetDirection(direction.ravel().tolist())
    return image


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_canonical_round_trip_is_voxel_and_geometry_exact(name):
    image = _test_image(DIRECTIONS[name])
    canonical, restore = to_canonical(image)
    back = restore(canonical)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert back.GetSize() == image.GetSize()
    assert back.GetSpacing() == image.GetSpacing()
    assert back.GetOrigin() == image.GetOrigin()
    assert back.GetDirection() == image.GetDirection()
    assert back.GetPixelID() == image.GetPixelID()
    # The numpy-level inverse agrees with the image-level one.
    np.testing.assert_array_equal(restore.array(sitk.GetArrayFromImage(canonical)), sitk.GetArrayFromImage(image))


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_canonical_keeps_physical_positions_and_points_lps(name):
    image = _test_image(DIRECTIONS[name])
    canonical, _ = to_canonical(image)
    # Same voxel set, only reordered: a marker keeps its value at the same physical point.
    for index in [(0, 0, 0), (6, 5, 4), (2, 3, 1), (5, 0, 3)]:
        point = image.TransformIndexToPhysicalPoint(index)
        c_index = canonical.TransformPhysicalPointToIndex(point)
        np.testing.assert_allclose(canonical.TransformIndexToPhysicalPoint(c_index), point, atol=1e-6)
        assert canonical[c_index] == image[index]
    # Each canonical axis points mostly to +L, +P, +S (the diagonal dominates its column).
    d = np.array(canonical.GetDirection()).reshape(3, 3)
    for j in range(3):
        assert d[j, j] > 0.8 and d[j, j] == pytest.approx(np.abs(d[:, j]).max())
    assert sorted(canonical.GetSize()) == sorted(image.GetSize())
    assert sorted(canonical.GetSpacing()) == pytest.approx(sorted(image.GetSpacing()))


def test_canonical_array_axes_point_left_posterior_superior():
    # NIfTI-style RAS storage: x grows to patient right, y to anterior.
    image = _test_image(np.diag([-1.0, -1.0, 1.0]))
    canonical, _ = to_canonical(image)
    arr = sitk.GetArrayFromImage(canonical)  # [z, y, x]
    for z, y, x in [(1, 2, 3), (4, 0, 6)]:
        here = np.array(canonical.TransformIndexToPhysicalPoint((x, y, z)))
        step_x = np.array(canonical.TransformIndexToPhysicalPoint((x + 1, y, z))) - here if x < 6 else None
        step_y = np.array(canonical.TransformIndexToPhysicalPoint((x, y + 1, z))) - here
        step_z = np.array(canonical.TransformIndexToPhysicalPoint((x, y, z + 1))) - here
        if step_x is not None:
            assert step_x[0] > 0  # +L in LPS
        assert step_y[1] > 0 and step_z[2] > 0  # +P, +S
        assert arr[z, y, x] == canonical[x, y, z]


def test_restore_rejects_wrong_grid():
    canonical, restore = to_canonical(_test_image(PERMUTED))
    with pytest.raises(ValueError, match="canonical grid"):
        restore(sitk.Image([3, 3, 3], sitk.sitkUInt8))


def test_restore_keeps_label_pixel_type():
    image = _test_image(DIRECTIONS["oblique_permuted_flipped"])
    canonical, restore = to_canonical(image)
    labels = sitk.Cast(sitk.Modulus(sitk.Cast(canonical, sitk.sitkInt32), 3), sitk.sitkUInt8)
    back = restore(labels)
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image) % 3)


# --------------------------------------------------------------------------- bad inputs


def _write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def test_missing_file(tmp_path):
    with pytest.raises(VolumeError, match=r"nope\.nii\.gz.*no such file"):
        read_volume(tmp_path / "nope.nii.gz")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.touch()
    with pytest.raises(VolumeError, match=r"empty\.nii\.gz.*empty"):
        read_volume(path)


def test_non_image_file(tmp_path):
    path = tmp_path / "notes.nrrd"
    path.write_text("this is not an image\n")
    with pytest.raises(VolumeError, match=r"notes\.nrrd.*not a readable image") as info:
        read_volume(path)
    assert "\n" not in str(info.value)


def test_2d_image(tmp_path):
    path = _write(sitk.Image([8, 9], sitk.sitkInt16) + 1, tmp_path / "slice.nii.gz")
    with pytest.raises(VolumeError, match=r"slice\.nii\.gz.*2D"):
        read_volume(path)


def test_4d_image(tmp_path):
    path = _write(sitk.Image([4, 5, 6, 3], sitk.sitkFloat32), tmp_path / "series4d.nii.gz")
    with pytest.raises(VolumeError, match=r"series4d\.nii\.gz.*4D"):
        read_volume(path)


def test_vector_image(tmp_path):
    path = _write(sitk.Image([4, 5, 6], sitk.sitkVectorUInt8, 3), tmp_path / "rgb.mha")
    with pytest.raises(VolumeError, match=r"rgb\.mha.*3 components"):
        read_volume(path)


def test_constant_volume(tmp_path):
    path = _write(sitk.Image([4, 5, 6], sitk.sitkInt16) - 1000, tmp_path / "blank.nrrd")
    with pytest.raises(VolumeError, match=r"blank\.nrrd.*same value \(-1000\)"):
        read_volume(path)
    # A background-only label map is still a valid label map.
    assert read_volume(path, allow_constant=True).GetSize() == (4, 5, 6)


def test_single_slice_volume(tmp_path):
    path = _write(sitk.GetImageFromArray(np.arange(20, dtype=np.int16).reshape(1, 4, 5)), tmp_path / "one.nii.gz")
    with pytest.raises(VolumeError, match=r"one\.nii\.gz.*single slice"):
        read_volume(path)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(VolumeError, match="no DICOM series"):
        read_volume(tmp_path)


def test_validate_volume_uses_name():
    with pytest.raises(VolumeError, match="^my labels: .*components"):
        validate_volume(sitk.Image([3, 3, 3], sitk.sitkVectorFloat32, 2), "my labels")


# --------------------------------------------------------------------------- writing


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd"])
def test_write_read_round_trip(tmp_path, ext):
    image = sitk.Cast(_test_image(DIRECTIONS["oblique"]), sitk.sitkInt16) - 1024
    out = write_image(image, tmp_path / "sub" / f"ct{ext}")
    assert out.exists() and [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left
    back = read_volume(out)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-6)


def test_write_unsupported_extension(tmp_path):
    with pytest.raises(VolumeError, match=r"ct\.png.*unsupported output extension"):
        write_image(_test_image(np.eye(3)), tmp_path / "ct.png")


def test_failed_write_leaves_existing_file_untouched(tmp_path, monkeypatch):
    target = tmp_path / "labels.nii.gz"
    target.write_bytes(b"previous")

    def half_write(image, path, useCompression=False):
        Path(path).write_bytes(b"half")  # a crash mid-write leaves a partial file behind
        raise RuntimeError("Exception thrown in SimpleITK WriteImage\nITK ERROR: NiftiImageIO(0x1): disk full")

    monkeypatch.setattr("SAMedLib.volume_io.sitk.WriteImage", half_write)
    with pytest.raises(VolumeError, match=r"labels\.nii\.gz: cannot write image: disk full"):
        write_image(_test_image(np.eye(3)), target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["labels.nii.gz"]


# --------------------------------------------------------------------------- real data


def test_real_dicom_series_and_label_geometry_trap(shared_data):
    ct = read_volume(shared_data / "ct_dicom")
    labels = read_volume(shared_data / "ct_dicom_labels.nii.gz", allow_constant=True)
    assert ct.GetSize() == (512, 512, 20)
    np.testing.assert_allclose(ct.GetSpacing(), (0.9765625, 0.9765625, 2.0), atol=1e-4)
    hu = sitk.GetArrayViewFromImage(ct)
    assert hu.min() <= -1000 and hu.max() > 500  # rescaled to HU, not raw stored values
    # The label file stores y flipped relative to the series: raw arrays do not line up.
    assert labels.GetDirection() != ct.GetDirection()
    raw = sitk.GetArrayFromImage(labels)
    aligned = sitk.GetArrayFromImage(resample_to_reference(labels, ct))
    assert aligned.dtype == raw.dtype

    # Slices sorted by position: z points superior and follows the slice order.
    assert ct.GetDirection()[8] > 0
    # Resampling is exactly the y flip here (same voxel grid, mirrored axis).
    np.testing.assert_array_equal(aligned, raw[:, ::-1, :])
    # Raw arrays disagree badly: left/right-asymmetric organs hardly overlap at all.
    assert dice(raw == 1, aligned == 1) < 0.1  # spleen
    assert dice(raw == 52, aligned == 52) < 0.1  # aorta
    assert dice(raw == 5, aligned == 5) < 0.7  # liver
    # Aligned labels sit on the right tissue: contrast-filled aorta is bright, spleen is soft tissue.
    assert np.median(hu[aligned == 52]) > 100 > np.median(hu[raw == 52])
    assert 40 < np.median(hu[aligned == 1]) < 200
    assert np.median(hu[raw == 1]) < 0  # raw spleen mask lands on fat/air


def test_real_canonical_forms_share_identity_direction(shared_data):
    nifti = read_volume(shared_data / "ct_3mm.nii.gz")
    dicom = read_volume(shared_data / "ct_dicom")
    assert nifti.GetDirection() != dicom.GetDirection()  # RAS-style vs LPS storage
    c_nifti, restore = to_canonical(nifti)
    c_dicom, _ = to_canonical(dicom)
    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert c_nifti.GetDirection() == pytest.approx(identity)
    assert c_dicom.GetDirection() == pytest.approx(identity)
    back = restore(c_nifti)
    assert back.GetDirection() == nifti.GetDirection() and back.GetOrigin() == nifti.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(nifti))


def _write_small_dicom_series(folder: Path, n_slices: int) -> None:
    """A tiny CT series written by SimpleITK (own SeriesInstanceUID) to mix into a folder."""
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.999.1"
    for k in range(n_slices):
        slice_ = sitk.GetImageFromArray(np.full((1, 16, 16), 40 * k, dtype=np.int16))
        slice_.SetSpacing((1.0, 1.0, 5.0))
        tags = {"0008|0060": "CT", "0020|000e": series_uid, "0020|000d": "1.2.826.0.1.3680043.2.1125.999",
                "0008|0018": f"{series_uid}.{k + 1}", "0020|0013": str(k + 1),
                "0020|0032": f"0\\0\\{5.0 * k}", "0020|0037": "1\\0\\0\\0\\1\\0"}
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"zz_other_{k}.dcm"))
        writer.Execute(slice_)


def test_dicom_folder_picks_largest_series_sorted_by_position(shared_data, tmp_path):
    import shutil

    reference = read_volume(shared_data / "ct_dicom")
    # File names in reverse slice order, so name order and position order disagree.
    sources = sorted((shared_data / "ct_dicom").iterdir())
    for i, src in enumerate(sources):
        shutil.copy(src, tmp_path / f"{len(sources) - i:03d}.dcm")
    _write_small_dicom_series(tmp_path, 3)
    image = read_volume(tmp_path)
    assert image.GetSize() == (512, 512, 20)
    assert image.GetOrigin() == pytest.approx(reference.GetOrigin())
    assert image.GetDirection() == pytest.approx(reference.GetDirection())
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(reference))
