"""Volume IO shared by every volume builder: read, canonicalise, slice, window, fit to 256x256.

Conventions (all builders rely on them):

* **Canonical orientation is LPS** (the DICOM/ITK patient frame). Every volume that
  :func:`read_volume` returns has been reoriented with ``SimpleITK.DICOMOrient(image, "LPS")``,
  so the voxel index axes run, as closely as the acquisition allows, along
  x = patient Left, y = Posterior, z = Superior. For axis-aligned data the direction matrix is
  then the identity; for oblique acquisitions the nearest axis permutation/flip is applied and the
  residual rotation stays in :attr:`Volume.direction` (no resampling happens on read).
* **Array order is (z, y, x)** — NumPy order, as ``SimpleITK.GetArrayFromImage`` gives it —
  so ``vol.array[k]`` is the k-th axial slice (inferior to superior), and ``vol.spacing`` is in
  the same (z, y, x) order, in millimetres. ``vol.origin`` is the physical LPS position
  (x, y, z) of voxel ``array[0, 0, 0]`` and ``vol.direction`` the 3x3 ITK direction matrix
  (column j = unit vector of index axis j in LPS, index axes in ITK (i=x, j=y, k=z) order).
* **Display orientation of slices** (:func:`slice_volume`): axial slices have anterior at the
  top and the patient's right on the image's left (radiological convention, which LPS gives
  directly); coronal and sagittal slices have superior at the top, the patient's right on the
  left (coronal) and anterior on the left (sagittal).
* **No DICOM header reaches the output.** A :class:`Volume` carries only voxels, geometry, a
  root-relative ``source`` path and, for DICOM, the ``Modality`` code (CT/MR/...). Patient
  name, IDs and dates are never read into it. Series UIDs appear only on
  :class:`VolumeError.series_uids` so a caller can pick one; they are not in error messages.
* **One exception**, :class:`VolumeError` (path, reason), for every bad input: builders turn it
  into a reject. Its message names the file (root-relative when ``root`` was given) and the
  reason: missing, unreadable, truncated gzip/data, non-finite voxels, 2D where 3D is expected,
  empty (a single value), several DICOM series in one folder.

Intensity windows (:func:`window_ct`, :func:`window_mr`) return the :class:`Window` they used so
it can be recorded in a sample's provenance (``Window.as_dict()``).
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

from vlhealth.paths import root_relative

__all__ = [
    "CANONICAL_ORIENTATION",
    "CT_HU_RANGE",
    "MR_PERCENTILES",
    "VOLUME_SUFFIXES",
    "Axis",
    "Volume",
    "VolumeError",
    "Window",
    "apply_window",
    "ct_window",
    "fit_box",
    "fit_square",
    "list_dicom_series",
    "mr_window",
    "num_slices",
    "read_volume",
    "same_geometry",
    "slice_volume",
    "square_pixel_shape",
    "volume_suffix",
    "window_ct",
    "window_mr",
    "write_volume",
]

CANONICAL_ORIENTATION = "LPS"
CT_HU_RANGE = (-1024.0, 3000.0)
MR_PERCENTILES = (0.5, 99.5)
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")

Axis = Literal["axial", "coronal", "sagittal"]
_AXES: tuple[str, ...] = ("axial", "coronal", "sagittal")
# Array axis that an `axis` name slices through, in (z, y, x) order.
_AXIS_INDEX = {"axial": 0, "coronal": 1, "sagittal": 2}


class VolumeError(ValueError):
    """A volume that cannot be used. ``path`` names the file, ``reason`` says why.

    ``series_uids`` is filled only for a DICOM folder holding several series, so that the caller
    can choose one with ``read_volume(folder, series_uid=...)``.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, series_uids: Sequence[str] = ()):
        self.path = str(path)
        self.reason = reason
        self.series_uids = tuple(series_uids)
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image in canonical LPS orientation; see the module docstring for the conventions."""

    array: np.ndarray  # (z, y, x)
    spacing: tuple[float, float, float]  # mm, (z, y, x)
    origin: tuple[float, float, float]  # LPS mm (x, y, z) of array[0, 0, 0]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))  # 3x3, ITK convention
    source: str = ""  # path relative to the source root (never absolute)
    modality: str | None = None  # DICOM Modality code when read from DICOM, else None

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.array.shape
        return int(z), int(y), int(x)

    def to_sitk(self) -> sitk.Image:
        """The volume as a SimpleITK image (geometry included)."""
        return _to_sitk(self.array, self.spacing, self.origin, self.direction)

    def physical_point(self, index_zyx: Sequence[int]) -> np.ndarray:
        """LPS position (x, y, z) in mm of the voxel ``array[z, y, x]``."""
        ijk = np.asarray(index_zyx, dtype=np.float64)[::-1]
        return np.asarray(self.origin) + self.direction @ (ijk * np.asarray(self.spacing[::-1]))


@dataclass(frozen=True)
class Window:
    """An intensity window ``[lo, hi]`` mapped linearly onto the output integer range."""

    lo: float
    hi: float
    kind: str  # "ct_hu" or "mr_percentile"
    percentiles: tuple[float, float] | None = None

    def decode(self, levels: np.ndarray, top: float | None = None) -> np.ndarray:
        """The inverse of :func:`apply_window`: grey levels back to intensities (HU for CT),
        ``lo + levels / top * (hi - lo)`` in float64. ``top`` is the level of ``hi`` (255 for uint8,
        65535 for uint16); it defaults to the maximum of an unsigned integer ``levels`` dtype.
        Values clipped by the window stay clipped."""
        arr = np.asarray(levels)
        if top is None:
            if arr.dtype not in (np.dtype(np.uint8), np.dtype(np.uint16)):
                raise ValueError(f"window levels must be uint8 or uint16 (or give top=), got {arr.dtype}")
            top = float(np.iinfo(arr.dtype).max)
        return float(self.lo) + arr.astype(np.float64) / float(top) * (float(self.hi) - float(self.lo))

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"kind": self.kind, "lo": round(float(self.lo), 4)}
        d["hi"] = round(float(self.hi), 4)
        if self.percentiles is not None:
            d["percentiles"] = [float(p) for p in self.percentiles]
        return d


def grey_levels(image: np.ndarray) -> np.ndarray:
    """The grey levels of an image as float64: a 2D image as it is; an ``HxWx1`` image's channel; an RGB(A)
    image's first channel when R, G and B are equal (a VQGAN decodes grey as equal channels), else its
    luma (ITU-R 601 weights). :meth:`Window.decode` then maps the levels back to intensities."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        return arr.astype(np.float64)
    if arr.shape[-1] == 1 or (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
        return arr[..., 0].astype(np.float64)
    return arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])


# --------------------------------------------------------------------------------------- reading


def volume_suffix(path: str | os.PathLike[str]) -> str | None:
    """The volume suffix of a path (``.nii.gz``, ``.nii``, ``.mha``, ``.nrrd``) or None."""
    name = Path(path).name.lower()
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def _display_path(path: Path, root: Path | None) -> str:
    rel = root_relative(path, root) if root is not None else None
    if rel is not None:
        return rel
    return path.as_posix() if not path.is_absolute() else path.name


def _relative_source(path: Path, root: Path | None) -> str:
    if root is None:
        return path.name
    rel = root_relative(path, root)
    if rel is None:
        raise VolumeError(path.name, f"is not inside the source root {root.name!r}")
    return rel


def _check_nifti(path: Path, shown: str, check_finite: bool) -> None:
    """Checks ITK's NIfTI reader cannot do: it zero-fills truncated data and turns NaN into 0."""
    import nibabel as nib

    try:
        proxy = nib.load(str(path)).dataobj  # header only; the proxy knows offset, shape, dtype
        offset, shape, dtype = int(proxy.offset), tuple(proxy.shape), np.dtype(proxy.dtype)
        pixdim = _raw_pixdim(path)[: min(len(shape), 3)]
    except Exception as exc:  # nibabel raises several types for corrupt headers
        raise VolumeError(shown, f"unreadable NIfTI header ({_short(exc)})") from exc
    if any(not np.isfinite(v) or v <= 0 for v in pixdim):
        # ITK would read a flipped or degenerate grid; the orientation belongs in qform/sform, not here
        raise VolumeError(shown, f"voxel spacing (pixdim) must be positive, got {pixdim}")
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if str(path).lower().endswith(".gz"):
        actual = 0
        try:
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(1 << 20):
                    actual += len(chunk)
        except EOFError as exc:
            raise VolumeError(shown, "truncated gzip stream (file ended before the end marker)") from exc
        except (gzip.BadGzipFile, zlib.error, OSError) as exc:
            raise VolumeError(shown, f"corrupt gzip stream ({_short(exc)})") from exc
    else:
        actual = path.stat().st_size
    if actual < expected:
        raise VolumeError(shown, f"truncated data: {actual} bytes, header needs {expected}")
    if check_finite and dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(np.asarray(proxy.get_unscaled()))))
        if bad:
            raise VolumeError(shown, f"{bad} non-finite (NaN/Inf) voxels")


def _raw_pixdim(path: Path) -> list[float]:
    """pixdim[1:4] as stored in a NIfTI-1/2 header (nibabel silently replaces negative values by their abs)."""
    import struct

    with (gzip.open(path, "rb") if str(path).lower().endswith(".gz") else open(path, "rb")) as fh:
        head = fh.read(540)
    for endian in ("<", ">"):
        size = struct.unpack(endian + "i", head[:4])[0]
        if size == 348:  # NIfTI-1: pixdim is float32[8] at byte 76
            return list(struct.unpack(endian + "8f", head[76:108])[1:4])
        if size == 540:  # NIfTI-2: pixdim is float64[8] at byte 104
            return list(struct.unpack(endian + "8d", head[104:168])[1:4])
    return []


def _short(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text[:200]


def list_dicom_series(folder: str | os.PathLike[str]) -> list[str]:
    """SeriesInstanceUIDs of the DICOM series found directly in ``folder`` (sorted)."""
    return sorted(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ())


def _read_dicom_series(folder: Path, shown: str, series_uid: str | None) -> tuple[sitk.Image, str | None]:
    uids = list_dicom_series(folder)
    if not uids:
        raise VolumeError(shown, "folder holds no readable DICOM series")
    if series_uid is None:
        if len(uids) > 1:
            raise VolumeError(
                shown,
                f"folder holds {len(uids)} DICOM series; pick one with series_uid= "
                "(the UIDs are on VolumeError.series_uids)",
                series_uids=uids,
            )
        series_uid = uids[0]
    elif series_uid not in uids:
        raise VolumeError(shown, f"requested series is not among the {len(uids)} series in the folder")
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid))
    modality = _check_dicom_headers(files, shown)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    # Keep ITK from loading the per-slice tag dictionaries: nothing from the header travels on.
    reader.MetaDataDictionaryArrayUpdateOff()
    reader.LoadPrivateTagsOff()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise VolumeError(shown, f"unreadable DICOM series ({_short(exc)})") from exc
    return image, modality


def _check_dicom_headers(files: list[str], shown: str) -> str | None:
    """Header sanity with pydicom (no pixel data, only geometry tags and the modality code)."""
    import pydicom

    tags = ["Modality", "Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient"]
    sizes: set[tuple[int, int]] = set()
    modalities: set[str] = set()
    positions: list[np.ndarray] = []
    normal: np.ndarray | None = None
    for name in files:
        try:
            ds = pydicom.dcmread(name, stop_before_pixels=True, specific_tags=tags)
        except Exception as exc:
            where = f"{shown}/{Path(name).name}"
            raise VolumeError(where, f"unreadable DICOM header ({_short(exc)})") from exc
        if "Rows" in ds and "Columns" in ds:
            sizes.add((int(ds.Rows), int(ds.Columns)))
        if "Modality" in ds:
            modalities.add(str(ds.Modality))
        if "ImagePositionPatient" in ds:
            positions.append(np.asarray([float(v) for v in ds.ImagePositionPatient]))
        if normal is None and "ImageOrientationPatient" in ds:
            iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
            normal = np.cross(iop[:3], iop[3:])
    if len(sizes) > 1:
        raise VolumeError(shown, f"DICOM slices of one series differ in size: {sorted(sizes)}")
    if normal is not None and len(positions) >= 3:
        offsets = np.sort(np.asarray(positions) @ normal)
        gaps = np.diff(offsets)
        if np.any(gaps < 1e-4):
            raise VolumeError(shown, "DICOM series has duplicate slice positions")
        if gaps.max() - gaps.min() > max(0.01 * float(np.median(gaps)), 1e-3):
            raise VolumeError(
                shown, f"DICOM slice spacing is not uniform ({gaps.min():.3g}-{gaps.max():.3g} mm)"
            )
    return modalities.pop() if len(modalities) == 1 else None


def _read_image(p: Path, shown: str, series_uid: str | None, check_finite: bool) -> tuple[Any, str | None]:
    """The SimpleITK image of a DICOM folder or a volume file, and the DICOM modality if any."""
    if p.is_dir():
        return _read_dicom_series(p, shown, series_uid)
    suffix = volume_suffix(p)
    if suffix is None:
        raise VolumeError(shown, f"unsupported file type (expected one of {', '.join(VOLUME_SUFFIXES)})")
    if suffix in (".nii", ".nii.gz"):
        _check_nifti(p, shown, check_finite)
    try:
        return sitk.ReadImage(str(p)), None
    except RuntimeError as exc:
        raise VolumeError(shown, f"unreadable ({_short(exc)})") from exc


def _as_scalar_3d(image: Any, shown: str, require_3d: bool) -> Any:
    """``image`` as a scalar 3D volume (a 2D image becomes one slice unless ``require_3d``), or a clear refusal."""
    dim = image.GetDimension()
    if dim == 4 or image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(shown, f"expected a scalar 3D volume, got {dim}D with "
                          f"{image.GetNumberOfComponentsPerPixel()} component(s)")
    if dim == 2:
        if require_3d:
            raise VolumeError(shown, f"2D image {image.GetSize()} where a 3D volume is expected")
        image = sitk.JoinSeries(image)
    elif dim != 3:
        raise VolumeError(shown, f"unsupported image dimension {dim}")
    if min(image.GetSize()) == 0:
        raise VolumeError(shown, f"volume has no voxels (size {image.GetSize()})")
    if require_3d and min(image.GetSize()) < 2:
        raise VolumeError(shown, f"a single slice (size {image.GetSize()}) where a 3D volume is expected")
    return image


def read_volume(
    path: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    series_uid: str | None = None,
    check_finite: bool = True,
    require_3d: bool = True,
    allow_empty: bool = False,
) -> Volume:
    """Read a ``.nii``/``.nii.gz``/``.mha``/``.nrrd`` file or a folder of DICOM slices.

    The image is reoriented to canonical LPS (no resampling) and returned as a :class:`Volume`
    with the array in (z, y, x) order and spacing in mm in the same order. ``source`` is the
    path relative to ``root`` (just the file name when no root is given) — never absolute.

    A folder must hold one DICOM series, or ``series_uid`` must pick one.

    Note: ITK's NIfTI reader turns NaN voxels into 0, so for NIfTI the finiteness check reads the
    raw data with nibabel; with ``check_finite=False`` NaNs in NIfTI files arrive as 0.

    Raises :class:`VolumeError` naming the file and the reason for: a missing or unreadable file,
    truncated gzip or data, non-finite voxels (when ``check_finite``), a 2D image or a volume
    with a single slice (when ``require_3d``), 4D images, and a volume holding a single value
    (unless ``allow_empty``; masks may legitimately be empty).
    """
    p = Path(path)
    root_p = Path(root) if root is not None else None
    shown = _display_path(p, root_p)
    source = _relative_source(p, root_p)
    if not p.exists():
        raise VolumeError(shown, "does not exist")
    if root_p is not None:  # a symlink that leaves the source root would smuggle outside data in
        from vlhealth.limits import LimitError, resolve_inside

        try:
            resolve_inside(p, root_p)
        except LimitError as exc:
            raise VolumeError(shown, str(exc)) from exc
    image, modality = _read_image(p, shown, series_uid, check_finite)
    image = _as_scalar_3d(image, shown, require_3d)
    image = sitk.DICOMOrient(image, CANONICAL_ORIENTATION)
    array = sitk.GetArrayFromImage(image)
    if array.size == 0:
        raise VolumeError(shown, "volume has no voxels")
    if check_finite and np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise VolumeError(shown, f"{bad} non-finite (NaN/Inf) voxels")
    if not allow_empty:
        lo, hi = np.nanmin(array), np.nanmax(array)
        if lo == hi:
            raise VolumeError(shown, f"empty volume (every voxel is {lo.item()!r})")
    spacing_xyz = image.GetSpacing()
    return Volume(
        array=array,
        spacing=(float(spacing_xyz[2]), float(spacing_xyz[1]), float(spacing_xyz[0])),
        origin=tuple(float(v) for v in image.GetOrigin()),  # type: ignore[arg-type]
        direction=np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3),
        source=source,
        modality=modality,
    )


# --------------------------------------------------------------------------------------- writing


def _to_sitk(
    array: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    direction: np.ndarray | Sequence[float] | None,
) -> sitk.Image:
    arr = np.asarray(array)
    if arr.ndim != 3:
        raise ValueError(f"expected a (z, y, x) array, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    image.SetSpacing(tuple(float(s) for s in reversed(tuple(spacing))))
    image.SetOrigin(tuple(float(v) for v in origin))
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
    image.SetDirection(tuple(float(v) for v in d.ravel()))
    return image


def write_volume(
    array: np.ndarray,
    path: str | os.PathLike[str],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: np.ndarray | Sequence[float] | None = None,
    *,
    compress_level: int = 6,
) -> Path:
    """Write a (z, y, x) array with geometry to ``.nii``/``.nii.gz``/``.mha``/``.nrrd``.

    ``spacing`` is in (z, y, x) order like the array; ``origin`` (x, y, z) LPS mm and
    ``direction`` (3x3, ITK convention) are as on :class:`Volume`. The data are written as given
    (no reorientation), so tests can write deliberately non-canonical files. ``.nii.gz`` files
    are byte-deterministic: the gzip header carries no file name and mtime 0.
    """
    out = Path(path)
    suffix = volume_suffix(out)
    if suffix is None:
        raise ValueError(f"{out.name}: unsupported volume suffix (expected one of {VOLUME_SUFFIXES})")
    image = _to_sitk(array, spacing, origin, direction)
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".nii.gz":
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "volume.nii"
            sitk.WriteImage(image, str(raw), False)
            data = raw.read_bytes()
        with open(out, "wb") as fh, gzip.GzipFile(
            filename="", mode="wb", fileobj=fh, mtime=0, compresslevel=compress_level
        ) as gz:
            gz.write(data)
    else:
        sitk.WriteImage(image, str(out), suffix in (".mha", ".nrrd"))
    return out


# -------------------------------------------------------------------------------------- geometry


def same_geometry(a: Volume, b: Volume, tol: float = 1e-3) -> bool:
    """True when two volumes share shape, spacing, origin and direction (within ``tol``)."""
    if a.shape != b.shape:
        return False
    return bool(
        np.allclose(a.spacing, b.spacing, rtol=0, atol=tol)
        and np.allclose(a.origin, b.origin, rtol=0, atol=tol)
        and np.allclose(a.direction, b.direction, rtol=0, atol=tol)
    )


def num_slices(vol: Volume, axis: Axis) -> int:
    """How many slices ``vol`` has along ``axis``."""
    return vol.shape[_axis_index(axis)]


def _axis_index(axis: str) -> int:
    if axis not in _AXIS_INDEX:
        raise ValueError(f"axis must be one of {list(_AXES)}, got {axis!r}")
    return _AXIS_INDEX[axis]


def slice_volume(
    vol: Volume,
    axis: Axis,
    index: int,
    *,
    square_pixels: bool = True,
    mask: bool = False,
) -> tuple[np.ndarray, tuple[float, float]]:
    """One 2D slice in display orientation (module docstring) and its pixel spacing (row, col).

    With ``square_pixels`` (default), the in-plane axis with the larger spacing is resampled to
    the smaller spacing — linear interpolation for intensities, nearest neighbour when ``mask``
    is true — so the returned pixels are square. The dtype of the volume is kept (interpolated
    integer intensities are rounded).
    """
    ax = _axis_index(axis)
    n = vol.shape[ax]
    if not -n <= index < n:
        raise IndexError(f"{vol.source or 'volume'}: {axis} slice {index} out of range 0..{n - 1}")
    sz, sy, sx = vol.spacing
    if ax == 0:
        image = vol.array[index]
        spacing = (sy, sx)
    elif ax == 1:
        image = vol.array[:, index, :][::-1]
        spacing = (sz, sx)
    else:
        image = vol.array[:, :, index][::-1]
        spacing = (sz, sy)
    image = np.array(image, copy=True, order="C")  # never a view into the volume
    if not square_pixels or np.isclose(spacing[0], spacing[1], rtol=1e-4):
        return image, (float(spacing[0]), float(spacing[1]))
    fine = min(spacing)
    shape = square_pixel_shape(image.shape[:2], spacing)
    resampled = _resize(image, shape, order=0 if mask else 1)
    return resampled, (float(fine), float(fine))


def square_pixel_shape(shape: Sequence[int], spacing: Sequence[float]) -> tuple[int, int]:
    """The (rows, cols) that :func:`slice_volume` resamples a slice of ``shape`` and pixel ``spacing`` to.

    The axis with the larger spacing is resampled to the smaller one; square pixels keep the shape.
    """
    rows, cols = int(shape[0]), int(shape[1])
    if np.isclose(spacing[0], spacing[1], rtol=1e-4):
        return rows, cols
    fine = min(spacing)
    return max(1, round(rows * spacing[0] / fine)), max(1, round(cols * spacing[1] / fine))


def fit_box(shape: Sequence[int], size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where :func:`fit_square` puts an image of ``shape``: its resized (rows, cols) and (top, left) offset."""
    h, w = int(shape[0]), int(shape[1])
    scale = size / max(h, w)
    new_h = min(size, max(1, round(h * scale)))
    new_w = min(size, max(1, round(w * scale)))
    return (new_h, new_w), ((size - new_h) // 2, (size - new_w) // 2)


def _resize(image: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """skimage ``resize`` (edge mode, anti-aliasing when shrinking with order > 0) that keeps the dtype
    (integers rounded and clipped to their range).

    2D images and (H, W, C) images with C kept go through :func:`_resize_operator`, the same linear
    map as skimage's Gaussian filter + ``ndimage.zoom`` applied as two cached sparse matrices (~4-7x
    faster; equal to skimage up to float rounding, so a rounded integer pixel can differ by 1 at a
    .5 tie). Anything else (other shapes, non-finite floats) goes through skimage itself.
    """
    shrinking = any(new < old for new, old in zip(shape, image.shape, strict=False))
    anti_aliasing = bool(order > 0 and shrinking)
    data = image.astype(np.float64, copy=False)
    fast = (
        image.ndim in (2, 3) and len(shape) == image.ndim and shape[2:] == image.shape[2:]
        and order in (0, 1) and min(shape) > 0 and min(image.shape) > 0
        and (not np.issubdtype(image.dtype, np.floating) or bool(np.isfinite(data).all()))
    )
    if fast:
        (h, w), (new_h, new_w), rest = image.shape[:2], shape[:2], image.shape[2:]
        rows = _resize_operator(h, new_h, order, anti_aliasing)
        cols = _resize_operator(w, new_w, order, anti_aliasing)
        out = rows @ data.reshape(h, -1)  # (new_h, w * C)
        out = out.reshape(new_h, w, -1).transpose(1, 0, 2).reshape(w, -1)
        out = (cols @ out).reshape(new_w, new_h, -1).transpose(1, 0, 2).reshape(new_h, new_w, *rest)
        if order > 0:  # skimage clips interpolated output to the input's range
            np.clip(out, data.min(), data.max(), out=out)
    else:
        from skimage.transform import resize

        out = resize(data, shape, order=order, mode="edge", preserve_range=True, anti_aliasing=anti_aliasing)
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    elif image.dtype == np.bool_:
        out = out > 0.5
    return out.astype(image.dtype, copy=False)


@lru_cache(maxsize=256)
def _resize_operator(n: int, m: int, order: int, anti_aliasing: bool):  # -> scipy.sparse.csr_matrix
    """The (m, n) matrix skimage ``resize`` applies along one axis of length n resized to m.

    Built by pushing the identity through the very operations skimage uses (``gaussian_filter1d``
    with sigma ``(n/m - 1) / 2`` when shrinking and anti-aliasing, then ``ndimage.zoom`` with
    ``grid_mode=True``, mode ``nearest``, spline order 0 or 1, which needs no prefilter); both are
    linear and act on each axis separately, so the 2D resize is ``rows @ image @ cols.T``.
    """
    import scipy.ndimage as ndi
    from scipy.sparse import csr_matrix

    basis = np.eye(n)
    if anti_aliasing and n > m:
        basis = ndi.gaussian_filter1d(basis, (n / m - 1) / 2, axis=0, mode="nearest")
    return csr_matrix(ndi.zoom(basis, (m / n, 1), order=order, mode="nearest", grid_mode=True))


# --------------------------------------------------------------------------------------- windows


def ct_window(lo: float = CT_HU_RANGE[0], hi: float = CT_HU_RANGE[1]) -> Window:
    """The CT window: HU clipped to [-1024, 3000] unless told otherwise."""
    if not hi > lo:
        raise ValueError(f"CT window needs hi > lo, got [{lo}, {hi}]")
    return Window(float(lo), float(hi), "ct_hu")


def mr_window(
    array: np.ndarray,
    mask: np.ndarray | None = None,
    percentiles: tuple[float, float] = MR_PERCENTILES,
) -> Window:
    """The MR window: 0.5-99.5 percentiles of the whole volume (or of the voxels in ``mask``).

    Compute it once per volume and apply it to every slice, so slices share one scale.
    """
    values = np.asarray(array)
    if mask is not None:
        m = np.asarray(mask).astype(bool)
        if m.shape != values.shape:
            raise ValueError(f"mask shape {m.shape} differs from volume shape {values.shape}")
        if not m.any():
            raise ValueError("MR window mask is empty")
        values = values[m]
    values = values[np.isfinite(values)] if np.issubdtype(values.dtype, np.floating) else values.ravel()
    if values.size == 0:
        raise ValueError("MR window: no finite voxels")
    lo, hi = (float(v) for v in np.percentile(values, percentiles))
    if not hi > lo:
        # A (nearly) constant region: fall back to the full range rather than divide by zero.
        lo, hi = float(values.min()), float(values.max())
        if not hi > lo:
            raise ValueError("MR window: the region holds a single value")
    return Window(lo, hi, "mr_percentile", (float(percentiles[0]), float(percentiles[1])))


def apply_window(
    image: np.ndarray, window: Window, dtype: type[np.integer] | np.dtype = np.uint8
) -> np.ndarray:
    """Clip ``image`` to ``window`` and scale linearly to the full range of ``dtype``."""
    out_dtype = np.dtype(dtype)
    if out_dtype not in (np.dtype(np.uint8), np.dtype(np.uint16)):
        raise ValueError(f"window output dtype must be uint8 or uint16, got {out_dtype}")
    top = float(np.iinfo(out_dtype).max)
    # (clip(x) - lo) / (hi - lo) * top, rounded: the same float64 operations in the same order,
    # done in place on one buffer (a volume-sized temporary per step cost several passes of memory)
    scaled = np.clip(np.asarray(image, dtype=np.float64), window.lo, window.hi)
    scaled -= window.lo
    scaled /= window.hi - window.lo
    scaled *= top
    return np.rint(scaled, out=scaled).astype(out_dtype)


def window_ct(
    image: np.ndarray, dtype: type[np.integer] | np.dtype = np.uint8, window: Window | None = None
) -> tuple[np.ndarray, Window]:
    """CT HU to uint8/uint16 with the [-1024, 3000] window; returns (image, window used)."""
    w = window or ct_window()
    return apply_window(image, w, dtype), w


def window_mr(
    image: np.ndarray,
    dtype: type[np.integer] | np.dtype = np.uint8,
    *,
    window: Window | None = None,
    volume: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, Window]:
    """MR to uint8/uint16 with a percentile window; returns (image, window used).

    The window is ``window`` when given, else computed by :func:`mr_window` from ``volume``
    (the whole volume the slice came from — the recommended use) or from ``image`` itself,
    optionally restricted to ``mask`` (same shape as what the window is computed from).
    """
    w = window or mr_window(image if volume is None else volume, mask)
    return apply_window(image, w, dtype), w


# ----------------------------------------------------------------------------------- fit square


def fit_square(
    image: np.ndarray,
    size: int = 256,
    order: int = 1,
    pad_value: float | None = None,
) -> np.ndarray:
    """Resize ``image`` so its longer side is ``size`` (aspect kept) and pad it to size x size.

    ``order`` is the skimage spline order (1 linear for intensities, 0 nearest for masks).
    Padding is centred and uses ``pad_value``, by default the image's minimum (its background).
    Works on (H, W) and (H, W, C) arrays and keeps the dtype.
    """
    img = np.asarray(image)
    if img.ndim not in (2, 3) or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"fit_square expects a non-empty (H, W) or (H, W, C) image, got {img.shape}")
    h, w = img.shape[:2]
    (new_h, new_w), (top, left) = fit_box((h, w), size)
    if (new_h, new_w) != (h, w):
        img = _resize(img, (new_h, new_w, *img.shape[2:]), order=order)
    fill = img.min() if pad_value is None else pad_value
    out = np.full((size, size, *img.shape[2:]), fill, dtype=img.dtype)
    out[top : top + new_h, left : left + new_w] = img
    return out
