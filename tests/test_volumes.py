"""Volume IO: format round trips into canonical LPS, DICOM series, errors, slicing, windows."""

from __future__ import annotations

import dataclasses
import gzip
import locale
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from vlhealth.volumes import (
    CT_HU_RANGE,
    Volume,
    VolumeError,
    Window,
    apply_window,
    ct_window,
    fit_square,
    list_dicom_series,
    mr_window,
    num_slices,
    read_volume,
    same_geometry,
    slice_volume,
    window_ct,
    window_mr,
    write_volume,
)

PATIENT_NAME = "DOE^JANE"
PATIENT_ID = "PID-998877"


def _marked_array(shape: tuple[int, int, int] = (6, 7, 8)) -> np.ndarray:
    """Distinct value per voxel so any axis mix-up shows."""
    return np.arange(int(np.prod(shape)), dtype=np.int16).reshape(shape) - 100


# A non-canonical, axis-permuted and flipped direction (columns = index axes in LPS):
# i runs posterior->anterior, j runs left->right, k runs inferior->superior.
NONCANON_DIRECTION = (0.0, -1.0, 0.0,
                      -1.0, 0.0, 0.0,
                      0.0, 0.0, 1.0)


def _sitk_image(array: np.ndarray, spacing_xyz: tuple[float, float, float], origin, direction) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing_xyz)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def _value_at(vol: Volume, point_lps) -> float:
    img = vol.to_sitk()
    idx = img.TransformPhysicalPointToIndex(tuple(float(v) for v in point_lps))
    return float(vol.array[idx[2], idx[1], idx[0]])


def _assert_same_content(original: sitk.Image, vol: Volume) -> None:
    """Every voxel of the original sits at the same physical point in the canonical volume."""
    arr = sitk.GetArrayFromImage(original)
    size = original.GetSize()
    for i in range(size[0]):
        for j in range(0, size[1], 2):
            for k in range(size[2]):
                point = original.TransformIndexToPhysicalPoint((i, j, k))
                assert _value_at(vol, point) == arr[k, j, i]


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".mha", ".nrrd"])
def test_round_trip_non_canonical_to_lps(tmp_path: Path, suffix: str) -> None:
    array = _marked_array()
    original = _sitk_image(array, (0.8, 1.5, 3.0), (12.0, -30.0, 7.5), NONCANON_DIRECTION)
    path = tmp_path / f"vol{suffix}"
    sitk.WriteImage(original, str(path))

    vol = read_volume(path, root=tmp_path)

    assert np.allclose(vol.direction, np.eye(3))
    # index axis i (0.8 mm) ran along y and j (1.5 mm) along x: canonical (z, y, x) spacing
    assert vol.spacing == pytest.approx((3.0, 0.8, 1.5))
    assert vol.shape == (6, 8, 7)
    assert vol.array.dtype == np.int16
    assert vol.source == f"vol{suffix}"
    _assert_same_content(original, vol)
    # the corner voxel's physical position is consistent with origin/direction/spacing
    assert np.allclose(vol.physical_point((0, 0, 0)), vol.origin)
    assert np.allclose(vol.physical_point((1, 2, 3)), np.asarray(vol.origin) + [3 * 1.5, 2 * 0.8, 3.0])


def test_nibabel_ras_nifti_read_canonical(tmp_path: Path) -> None:
    array_xyz = np.arange(5 * 6 * 4, dtype=np.float32).reshape(5, 6, 4)  # nibabel order (i, j, k)
    # nibabel affines are RAS+: i runs towards the patient's Right, j Anterior (LPS -x, -y)
    affine = np.diag([2.0, 1.0, 2.5, 1.0])
    affine[:3, 3] = (-4.0, 10.0, 3.0)
    nib.save(nib.Nifti1Image(array_xyz, affine), str(tmp_path / "ras.nii.gz"))

    vol = read_volume(tmp_path / "ras.nii.gz")

    assert np.allclose(vol.direction, np.eye(3))
    assert vol.spacing == pytest.approx((2.5, 1.0, 2.0))
    for ijk in [(0, 0, 0), (4, 5, 3), (2, 1, 3), (1, 4, 0)]:
        ras = affine @ np.array([*ijk, 1.0])
        lps = (-ras[0], -ras[1], ras[2])
        assert _value_at(vol, lps) == array_xyz[ijk]


def test_source_is_relative_and_never_absolute(tmp_path: Path) -> None:
    sub = tmp_path / "Task1" / "brain" / "1BA001"
    write_volume(_marked_array(), sub / "ct.nii.gz")
    vol = read_volume(sub / "ct.nii.gz", root=tmp_path)
    assert vol.source == "Task1/brain/1BA001/ct.nii.gz"
    assert not Path(read_volume(sub / "ct.nii.gz").source).is_absolute()
    other = tmp_path.parent / f"{tmp_path.name}_other"
    with pytest.raises(VolumeError, match="not inside the source root"):
        read_volume(sub / "ct.nii.gz", root=other)


def test_write_volume_nii_gz_is_byte_deterministic(tmp_path: Path) -> None:
    a = write_volume(_marked_array(), tmp_path / "a.nii.gz", (2.0, 1.0, 1.0))
    b = write_volume(_marked_array(), tmp_path / "b.nii.gz", (2.0, 1.0, 1.0))
    data = a.read_bytes()
    assert data == b.read_bytes()
    assert data[4:8] == b"\x00\x00\x00\x00"  # gzip mtime field
    assert data[3] & 0x08 == 0  # no FNAME field


# ----------------------------------------------------------------------------------------- DICOM


def _write_dicom_series(folder: Path, array: np.ndarray, spacing_xyz, series_uid: str,
                        positions_z: list[float] | None = None, modality: str = "CT") -> None:
    # SimpleITK's GDCM *writer* switches the process locale to "C" (ASCII file encoding for every
    # later open()); reading does not. Restore it so later tests see the real locale.
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_dicom_slices(folder, array, spacing_xyz, series_uid, positions_z, modality)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_slices(folder: Path, array: np.ndarray, spacing_xyz, series_uid: str,
                        positions_z: list[float] | None, modality: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin((-20.0, -15.0, 40.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        pos = list(image.TransformIndexToPhysicalPoint((0, 0, k)))
        if positions_z is not None:
            pos[2] = positions_z[k]
        for tag, value in (
            ("0010|0010", PATIENT_NAME),
            ("0010|0020", PATIENT_ID),
            ("0010|0030", "19700101"),
            ("0008|0020", "20200202"),
            ("0008|0060", modality),
            ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
            ("0020|000e", series_uid),
            ("0008|0018", f"{series_uid}.{k + 1}"),
            ("0020|0037", "1\\0\\0\\0\\1\\0"),
            ("0020|0032", "\\".join(f"{v:.4f}" for v in pos)),
            ("0020|0013", str(k + 1)),
            ("0028|0030", f"{spacing_xyz[1]}\\{spacing_xyz[0]}"),
        ):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid[-3:]}_{k:03d}.dcm"))
        writer.Execute(sl)


def _all_text(vol: Volume) -> str:
    fields = {f.name: getattr(vol, f.name) for f in dataclasses.fields(vol) if f.name != "array"}
    return repr(fields) + repr(vol)


def test_dicom_series_folder_read_without_identifiers(tmp_path: Path) -> None:
    array = (_marked_array((5, 6, 7)) * 3).astype(np.int16)
    _write_dicom_series(tmp_path / "series", array, (0.7, 0.9, 2.5), "1.2.3.4.5.100")

    vol = read_volume(tmp_path / "series", root=tmp_path)

    assert vol.shape == (5, 6, 7)
    assert vol.spacing == pytest.approx((2.5, 0.9, 0.7))
    assert np.array_equal(vol.array, array)
    assert vol.modality == "CT"
    assert vol.source == "series"
    text = _all_text(vol)
    for secret in (PATIENT_NAME, "DOE", PATIENT_ID, "19700101", "20200202"):
        assert secret not in text
    assert PATIENT_NAME.encode() not in vol.array.tobytes()


def test_dicom_folder_with_two_series_needs_a_choice(tmp_path: Path) -> None:
    a = _marked_array((4, 5, 6))
    _write_dicom_series(tmp_path / "mixed", a, (1.0, 1.0, 2.0), "1.2.3.4.5.111")
    _write_dicom_series(tmp_path / "mixed", a[::-1].copy(), (1.0, 1.0, 3.0), "1.2.3.4.5.222")

    with pytest.raises(VolumeError, match="2 DICOM series") as info:
        read_volume(tmp_path / "mixed")
    assert set(info.value.series_uids) == {"1.2.3.4.5.111", "1.2.3.4.5.222"}
    assert "1.2.3.4.5.111" not in str(info.value)
    assert list_dicom_series(tmp_path / "mixed") == ["1.2.3.4.5.111", "1.2.3.4.5.222"]

    vol = read_volume(tmp_path / "mixed", series_uid="1.2.3.4.5.222")
    assert vol.spacing[0] == pytest.approx(3.0)
    with pytest.raises(VolumeError, match="not among"):
        read_volume(tmp_path / "mixed", series_uid="9.9.9")


def test_dicom_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeError, match="no readable DICOM series"):
        read_volume(tmp_path / "empty")
    _write_dicom_series(tmp_path / "gappy", _marked_array((4, 5, 6)), (1.0, 1.0, 2.0), "1.2.3.9",
                        positions_z=[0.0, 2.0, 4.0, 9.0])
    with pytest.raises(VolumeError, match="not uniform"):
        read_volume(tmp_path / "gappy")


# ----------------------------------------------------------------------------------------- errors


def test_truncated_gzip_is_refused(tmp_path: Path) -> None:
    path = write_volume(np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32),
                        tmp_path / "ct.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match=r"ct\.nii\.gz: truncated gzip"):
        read_volume(path)


def test_truncated_uncompressed_nifti_is_refused(tmp_path: Path) -> None:
    path = write_volume(_marked_array(), tmp_path / "mr.nii")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(VolumeError, match=r"mr\.nii: truncated data"):
        read_volume(path)


def test_corrupt_gzip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.nii.gz"
    raw = gzip.compress(b"\x5c\x01" + b"\x00" * 400)
    path.write_bytes(raw[:10] + b"\xff" * (len(raw) - 10))
    with pytest.raises(VolumeError, match=r"bad\.nii\.gz"):
        read_volume(path)


@pytest.mark.parametrize("name", ["junk.mha", "junk.nrrd", "junk.nii"])
def test_unreadable_file_is_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"this is not an image" * 20)
    with pytest.raises(VolumeError, match=name.replace(".", r"\.")):
        read_volume(tmp_path / name)


def test_missing_and_unsupported(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="does not exist"):
        read_volume(tmp_path / "nope.nii.gz", root=tmp_path)
    (tmp_path / "x.png").write_bytes(b"png")
    with pytest.raises(VolumeError, match="unsupported file type"):
        read_volume(tmp_path / "x.png")


def test_nan_voxels_refused_unless_disabled(tmp_path: Path) -> None:
    arr = np.ones((4, 5, 6), dtype=np.float32)
    arr[1, 2, 3] = np.nan
    arr[0, 0, 0] = 2.0
    path = write_volume(arr, tmp_path / "nan.nii.gz")
    with pytest.raises(VolumeError, match=r"nan\.nii\.gz: 1 non-finite"):
        read_volume(path)
    # ITK's NIfTI reader itself turns NaN into 0, which is why the check reads the raw data
    assert read_volume(path, check_finite=False).array[1, 2, 3] == 0.0
    mha = write_volume(arr, tmp_path / "nan.mha")
    with pytest.raises(VolumeError, match=r"nan\.mha: 1 non-finite"):
        read_volume(mha)
    assert np.isnan(read_volume(mha, check_finite=False).array).sum() == 1


def test_2d_where_3d_expected(tmp_path: Path) -> None:
    img = sitk.GetImageFromArray(np.arange(20, dtype=np.int16).reshape(4, 5))
    sitk.WriteImage(img, str(tmp_path / "flat.nii.gz"))
    with pytest.raises(VolumeError, match=r"flat\.nii\.gz: 2D image"):
        read_volume(tmp_path / "flat.nii.gz")
    one_slice = write_volume(np.arange(20, dtype=np.int16).reshape(1, 4, 5), tmp_path / "one.mha")
    with pytest.raises(VolumeError, match="a single slice"):
        read_volume(one_slice)
    assert read_volume(tmp_path / "flat.nii.gz", require_3d=False).shape == (1, 4, 5)


def test_empty_volume_refused(tmp_path: Path) -> None:
    path = write_volume(np.full((4, 5, 6), -1000, dtype=np.int16), tmp_path / "empty.nrrd")
    with pytest.raises(VolumeError, match=r"empty\.nrrd: empty volume"):
        read_volume(path)
    mask = write_volume(np.zeros((4, 5, 6), dtype=np.uint8), tmp_path / "mask.nii.gz")
    assert read_volume(mask, allow_empty=True).array.max() == 0


def test_volume_error_carries_path_and_reason() -> None:
    err = VolumeError("a/b.nii.gz", "truncated gzip")
    assert err.path == "a/b.nii.gz" and err.reason == "truncated gzip"
    assert str(err) == "a/b.nii.gz: truncated gzip"
    assert isinstance(err, ValueError)


# ---------------------------------------------------------------------------------------- slicing


def _zyx_volume(shape=(4, 6, 5), spacing=(3.0, 1.0, 1.0), dtype=np.int16) -> Volume:
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    array = (100 * z + 10 * y + x).astype(dtype)
    return Volume(array=array, spacing=spacing, origin=(0.0, 0.0, 0.0))


def test_axial_slice_orientation_and_spacing() -> None:
    vol = _zyx_volume()
    image, spacing = slice_volume(vol, "axial", 2)
    assert image.shape == (6, 5) and spacing == (1.0, 1.0)
    # rows = y (anterior at top), columns = x (patient's left on the right)
    assert image[0, 0] == 200 and image[5, 0] == 250 and image[0, 4] == 204
    assert num_slices(vol, "axial") == 4 and num_slices(vol, "sagittal") == 5


@pytest.mark.parametrize("axis,cols", [("coronal", 5), ("sagittal", 6)])
def test_coronal_sagittal_square_pixels_superior_up(axis: str, cols: int) -> None:
    vol = _zyx_volume()
    image, spacing = slice_volume(vol, axis, 1)
    assert spacing == (1.0, 1.0)
    assert image.shape == (12, cols)  # 4 slices x 3 mm resampled to 1 mm rows
    assert image.dtype == np.int16
    assert image[0, 0] == (301 if axis == "sagittal" else 310)  # superior at the top
    assert image[-1, 0] == (1 if axis == "sagittal" else 10)
    assert np.all(np.diff(image[:, 0].astype(int)) <= 0)  # monotone: linear interpolation
    raw, raw_spacing = slice_volume(vol, axis, 1, square_pixels=False)
    assert raw.shape == (4, cols) and raw_spacing == (3.0, 1.0)


def test_mask_slices_use_nearest_neighbour() -> None:
    labels = np.zeros((4, 6, 5), dtype=np.uint8)
    labels[1:3, 2:4, 1:4] = 3
    labels[3, :, :] = 7
    vol = Volume(array=labels, spacing=(2.5, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    image, _ = slice_volume(vol, "coronal", 2, mask=True)
    assert set(np.unique(image).tolist()) <= {0, 3, 7}
    smooth, _ = slice_volume(vol, "coronal", 2)
    assert len(np.unique(smooth)) > 3


def test_slice_out_of_range_and_bad_axis() -> None:
    vol = _zyx_volume()
    with pytest.raises(IndexError):
        slice_volume(vol, "axial", 4)
    with pytest.raises(ValueError, match="axis"):
        slice_volume(vol, "oblique", 0)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- windows


def test_ct_window_clips_hu_and_scales() -> None:
    hu = np.array([[-3000, -1024, 988, 3000, 4000]], dtype=np.int16)
    img8, window = window_ct(hu)
    assert window == ct_window() and (window.lo, window.hi) == CT_HU_RANGE
    assert img8.dtype == np.uint8 and img8.tolist() == [[0, 0, 128, 255, 255]]
    img16, _ = window_ct(hu, np.uint16)
    assert img16.dtype == np.uint16 and img16[0, 0] == 0 and img16[0, 3] == 65535
    assert window.as_dict() == {"kind": "ct_hu", "lo": -1024.0, "hi": 3000.0}


def test_mr_window_percentiles_per_volume_and_mask() -> None:
    rng = np.random.default_rng(0)
    volume = rng.uniform(0, 1000, size=(10, 20, 20))
    window = mr_window(volume)
    assert window.lo == pytest.approx(np.percentile(volume, 0.5))
    assert window.hi == pytest.approx(np.percentile(volume, 99.5))
    assert window.as_dict()["percentiles"] == [0.5, 99.5]
    # one window for the whole volume: every slice uses it
    slice_img, used = window_mr(volume[3], volume=volume)
    assert used == window and slice_img.dtype == np.uint8
    mask = np.zeros(volume.shape, dtype=bool)
    mask[:, :10] = True
    volume[~mask] = 5000.0  # outside the body: must not move a masked window
    masked = mr_window(volume, mask)
    assert masked.hi < 1000
    img16, _ = window_mr(volume, np.uint16, mask=mask)
    assert img16.dtype == np.uint16 and img16.max() == 65535
    with pytest.raises(ValueError, match="empty"):
        mr_window(volume, np.zeros(volume.shape, dtype=bool))


def test_apply_window_rejects_other_dtypes() -> None:
    with pytest.raises(ValueError, match="uint8 or uint16"):
        apply_window(np.zeros((2, 2)), Window(0, 1, "x"), np.float32)


# ------------------------------------------------------------------------------------- fit square


def test_fit_square_keeps_aspect_and_pads_with_background() -> None:
    image = np.full((100, 50), 200, dtype=np.uint8)
    image[0, 0] = 10  # the minimum = background
    out = fit_square(image, 256)
    assert out.shape == (256, 256) and out.dtype == np.uint8
    cols = np.nonzero((out > 100).any(axis=0))[0]
    assert 126 <= len(cols) <= 129  # 50 * 2.56 = 128 wide, centred
    assert abs((cols[0] + cols[-1]) / 2 - 127.5) <= 1.5
    assert out[128, 0] == 10 and out[128, 255] == 10
    assert fit_square(image, 64, pad_value=0)[32, 0] == 0


def test_fit_square_masks_rgb_and_upscaling() -> None:
    labels = np.zeros((30, 60), dtype=np.uint8)
    labels[10:20, 10:50] = 4
    out = fit_square(labels, 256, order=0)
    assert set(np.unique(out).tolist()) == {0, 4}
    rgb = np.zeros((40, 20, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    out_rgb = fit_square(rgb, 128)
    assert out_rgb.shape == (128, 128, 3) and out_rgb[64, 64, 0] == 255 and out_rgb[64, 0, 0] == 0
    float_img = np.linspace(0, 1, 256 * 256).reshape(256, 256)
    assert np.array_equal(fit_square(float_img, 256), float_img)


@pytest.mark.parametrize(
    ("shape", "new", "dtype"),
    [((410, 586), (179, 256), np.uint16), ((285, 233), (256, 209), np.int16), ((37, 19), (256, 131), np.uint8),
     ((256, 384), (256, 256), np.float32), ((40, 20, 3), (128, 64, 3), np.uint8), ((64, 56), (256, 224), np.bool_)],
)
def test_resize_matches_skimage_resize(shape, new, dtype) -> None:
    # _resize applies skimage's Gaussian anti-aliasing + zoom as cached sparse matrices: same result
    # up to float rounding (an integer pixel may round the other way at a .5 tie)
    from skimage.transform import resize

    from vlhealth.volumes import _resize

    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, shape) > 0 if dtype == np.bool_ else (rng.random(shape) * 250).astype(dtype)
    for order in (0, 1):
        shrink = any(n < o for n, o in zip(new, shape, strict=True))
        want = resize(image.astype(np.float64), new, order=order, mode="edge", preserve_range=True,
                      anti_aliasing=bool(order and shrink))
        got = _resize(image, new, order)
        assert got.shape == new and got.dtype == image.dtype
        if dtype == np.bool_:
            want = want > 0.5
        elif dtype != np.float32:
            want = np.rint(want)
        diff = np.abs(got.astype(np.float64) - want)
        if order == 0 or dtype == np.float32:
            assert diff.max() <= (1e-3 if order else 0)
        else:
            assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3


# --------------------------------------------------------------------------------------- geometry


def test_same_geometry(tmp_path: Path) -> None:
    a = _zyx_volume()
    b = Volume(array=a.array.copy() * 0, spacing=a.spacing, origin=a.origin)
    assert same_geometry(a, b)
    assert not same_geometry(a, Volume(array=a.array, spacing=(3.0, 1.0, 1.1), origin=a.origin))
    assert not same_geometry(a, Volume(array=a.array, spacing=a.spacing, origin=(0.0, 0.5, 0.0)))
    assert not same_geometry(a, Volume(array=a.array[:, :, :4], spacing=a.spacing, origin=a.origin))
    flipped = np.diag([-1.0, 1.0, 1.0])
    assert not same_geometry(a, Volume(array=a.array, spacing=a.spacing, origin=a.origin, direction=flipped))
    assert same_geometry(a, Volume(array=a.array, spacing=(3.0004, 1.0, 1.0), origin=a.origin))
