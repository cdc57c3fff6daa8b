"""Put 256x256 slices back into the volume they were cut from: the inverse of the slicing builders.

A volume builder (SynthRAD2023) cuts a canonical (LPS) volume into 2D slices along one axis
(:func:`vlhealth.volumes.slice_volume`: display orientation, non-square pixels resampled to square
ones), windows the intensities into 8/16 bits and fits each slice to 256x256
(:func:`vlhealth.volumes.fit_square`: aspect kept, centred padding). Everything needed to undo that
is recorded per sample in ``provenance.grid`` (:func:`slice_grid` writes it, :class:`SliceGrid`
reads it): the slicing axis, the volume's shape/spacing/origin/direction, the slice shape before
and after the square-pixel resampling, and the box the slice occupies in the 256x256 image.

Undoing the two resizes: both are linear maps that act on rows and columns separately, so a slice
``X`` (rows x cols on the source grid) becomes ``A_r @ X @ A_c.T`` inside its box, with ``A_r`` and
``A_c`` the very matrices the forward resize applies (:func:`vlhealth.volumes._resize_operator`).
The inverse is the least-squares solution of that system (exact up to quantisation whenever the
forward map enlarged the slice, which it does for every slice smaller than 256 pixels; a slice
that was shrunk loses detail that no inverse brings back). When the builder set the outside of
the body to the background *after* the resize (``provenance.mask_background``), only the pixels
inside the sample's 256x256 body mask are trusted as observations.

Public API::

    slice_grid(volume, axis, size) -> dict            # the provenance block (builder side)
    SliceGrid.from_provenance(prov) -> SliceGrid
    unfit_slice(values, grid, observed=None) -> ndarray   # 256x256 -> the source slice grid
    decode_window(image, window) -> ndarray               # 8/16-bit grey -> intensities
    VolumeAssembly(grid, background).put(index, slice2d); .volume() -> Volume
    write_prediction(volume, path, like=source_file) -> Path   # stored like the source file
    file_sha256(path) -> str
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from vlhealth.volumes import (
    Volume,
    Window,
    _resize_operator,
    fit_box,
    grey_levels,
    square_pixel_shape,
    volume_suffix,
    write_volume,
)

__all__ = [
    "GridError",
    "SliceGrid",
    "VolumeAssembly",
    "decode_window",
    "file_sha256",
    "slice_grid",
    "unfit_slice",
    "write_prediction",
]

_AXIS_INDEX = {"axial": 0, "coronal": 1, "sagittal": 2}


class GridError(ValueError):
    """A sample whose provenance cannot place it back into its volume, or a volume on another grid."""


def file_sha256(path: os.PathLike[str] | str) -> str:
    """Hex SHA-256 of a file's bytes (read in 4 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _slice_plane(shape: Sequence[int], spacing: Sequence[float], axis: str) -> tuple[tuple[int, int], tuple[float, float]]:
    """(rows, cols) and pixel spacing of one slice along ``axis`` before any resampling (as slice_volume cuts it)."""
    z, y, x = (int(v) for v in shape)
    sz, sy, sx = (float(v) for v in spacing)
    if axis == "axial":
        return (y, x), (sy, sx)
    if axis == "coronal":
        return (z, x), (sz, sx)
    if axis == "sagittal":
        return (z, y), (sz, sy)
    raise GridError(f"unknown slicing axis {axis!r} (axial, coronal, sagittal)")


def slice_grid(volume: Volume, axis: str, size: int) -> dict[str, Any]:
    """The ``provenance.grid`` block of every slice cut from ``volume`` along ``axis`` and fitted to ``size``."""
    plane, plane_spacing = _slice_plane(volume.shape, volume.spacing, axis)
    square = square_pixel_shape(plane, plane_spacing)
    fit_shape, fit_offset = fit_box(square, size)
    return {
        "axis": axis,
        "volume": {
            "shape": list(volume.shape),
            "spacing": [float(s) for s in volume.spacing],
            "origin": [float(v) for v in volume.origin],
            "direction": [float(v) for v in np.asarray(volume.direction, dtype=np.float64).ravel()],
        },
        "slice_shape": list(plane),
        "square_shape": list(square),
        "size": int(size),
        "fit_shape": list(fit_shape),
        "fit_offset": list(fit_offset),
    }


@dataclass(frozen=True)
class SliceGrid:
    """What ``provenance.grid`` records (see :func:`slice_grid`)."""

    axis: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    slice_shape: tuple[int, int]
    square_shape: tuple[int, int]
    size: int
    fit_shape: tuple[int, int]
    fit_offset: tuple[int, int]

    @classmethod
    def from_provenance(cls, provenance: dict[str, Any], where: str = "sample") -> SliceGrid:
        grid = provenance.get("grid") if isinstance(provenance, dict) else None
        if not isinstance(grid, dict):
            raise GridError(f"{where}: provenance has no 'grid' block (shards built before volume reassembly "
                            "was recorded; rebuild them with this version of the builder)")
        try:
            vol = grid["volume"]
            out = cls(
                axis=str(grid["axis"]), shape=tuple(int(v) for v in vol["shape"]),  # type: ignore[arg-type]
                spacing=tuple(float(v) for v in vol["spacing"]),  # type: ignore[arg-type]
                origin=tuple(float(v) for v in vol["origin"]),  # type: ignore[arg-type]
                direction=tuple(float(v) for v in vol["direction"]),
                slice_shape=tuple(int(v) for v in grid["slice_shape"]),  # type: ignore[arg-type]
                square_shape=tuple(int(v) for v in grid["square_shape"]),  # type: ignore[arg-type]
                size=int(grid["size"]), fit_shape=tuple(int(v) for v in grid["fit_shape"]),  # type: ignore[arg-type]
                fit_offset=tuple(int(v) for v in grid["fit_offset"]),  # type: ignore[arg-type]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise GridError(f"{where}: provenance.grid is incomplete ({exc!r})") from exc
        if out.axis not in _AXIS_INDEX or len(out.shape) != 3 or len(out.direction) != 9:
            raise GridError(f"{where}: provenance.grid has an unknown axis or a malformed volume block")
        return out

    @property
    def geometry_key(self) -> tuple[Any, ...]:
        """The volume's grid (slices of one volume share it)."""
        return (self.shape, self.spacing, self.origin, self.direction)

    @property
    def n_slices(self) -> int:
        return self.shape[_AXIS_INDEX[self.axis]]

    def matches(self, volume: Volume, tol: float = 1e-3) -> str | None:
        """None when ``volume`` lies on this grid, else what differs."""
        if tuple(volume.shape) != self.shape:
            return f"shape {volume.shape} (z, y, x) instead of {self.shape}"
        for name, mine, theirs in (("spacing", self.spacing, volume.spacing), ("origin", self.origin, volume.origin),
                                   ("direction", self.direction, np.asarray(volume.direction).ravel())):
            if not np.allclose(mine, theirs, rtol=0, atol=tol):
                shown = tuple(round(float(v), 4) for v in theirs)
                return f"{name} {shown} instead of {tuple(round(v, 4) for v in mine)}"
        return None

    @cached_property
    def operators(self) -> tuple[Any, Any]:
        """Sparse (fit_rows x slice_rows) and (fit_cols x slice_cols) forward maps: square-pixel resize, then fit."""
        mats = []
        for n, square, fitted in zip(self.slice_shape, self.square_shape, self.fit_shape, strict=True):
            mats.append((_axis_operator(square, fitted) @ _axis_operator(n, square)).tocsr())
        return mats[0], mats[1]

    @cached_property
    def pseudo_inverses(self) -> tuple[np.ndarray, np.ndarray]:
        a_r, a_c = self.operators
        return np.linalg.pinv(a_r.toarray()), np.linalg.pinv(a_c.toarray())


def _axis_operator(n: int, m: int) -> Any:
    """The (m x n) linear map (scipy sparse) the builder's resize applies along one axis (identity when n == m)."""
    from scipy.sparse import identity

    if n == m:
        return identity(n, format="csr")
    return _resize_operator(n, m, 1, m < n)


def decode_window(image: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """Grey levels back to intensities: ``lo + v / top * (hi - lo)`` with top 255 (uint8) or 65535 (uint16).

    RGB images (a VQGAN's output) count as grey when their channels are equal, else their luma
    (ITU-R 601) is used.
    """
    arr = np.asarray(image)
    if arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected an 8- or 16-bit image, got {arr.dtype}")
    top = float(np.iinfo(arr.dtype).max)
    return Window(float(window[0]), float(window[1]), "recorded").decode(grey_levels(arr), top=top)


def unfit_slice(values: np.ndarray, grid: SliceGrid, observed: np.ndarray | None = None,
                clip: Sequence[float] | None = None) -> np.ndarray:
    """A ``size x size`` slice (intensities) back on the source slice grid (display orientation kept).

    ``observed`` (bool, ``size x size``) restricts the least-squares fit to the pixels to trust
    (inside the body when the builder blanked the outside after resizing); None trusts them all.
    ``clip`` (lo, hi), the window the slice was made with, bounds the result: no 8/16-bit image holds
    values outside it, while a least-squares inverse of a noisy prediction can overshoot.
    """
    solved = _unfit(values, grid, observed)
    return solved if clip is None else np.clip(solved, float(clip[0]), float(clip[1]))


def _unfit(values: np.ndarray, grid: SliceGrid, observed: np.ndarray | None) -> np.ndarray:
    y = np.asarray(values, dtype=np.float64)
    if y.shape != (grid.size, grid.size):
        raise GridError(f"slice of shape {y.shape} where the grid records {grid.size}x{grid.size}")
    (top, left), (h, w) = grid.fit_offset, grid.fit_shape
    box = y[top:top + h, left:left + w]
    a_r, a_c = grid.operators
    p_r, p_c = grid.pseudo_inverses
    first = p_r @ box @ p_c.T
    if observed is None:
        return first
    keep = np.asarray(observed, dtype=bool)[top:top + h, left:left + w]
    if keep.all() or not keep.any():
        return first
    return _masked_refine(first, box, keep, a_r, a_c)


def _masked_refine(start: np.ndarray, box: np.ndarray, keep: np.ndarray, a_r: Any, a_c: Any,
                   iterations: int = 60, tol: float = 1e-7) -> np.ndarray:
    """Least squares on the observed pixels only (CGLS: conjugate gradients on the normal equations),
    started from the unmasked solution.

    Written out with sparse products and element-wise reductions rather than ``scipy.sparse.linalg.lsqr``:
    its BLAS vector calls and tiny dense products slow down 50x when the cores are oversubscribed.
    """
    w = keep.astype(np.float64)

    def forward(x: np.ndarray) -> np.ndarray:
        return (a_c @ (a_r @ x).T).T * w

    def adjoint(r: np.ndarray) -> np.ndarray:
        return (a_c.T @ (a_r.T @ (r * w)).T).T

    x = start.copy()
    residual = box * w - forward(x)
    s = adjoint(residual)
    p = s.copy()
    gamma = float((s * s).sum())
    stop = tol * tol * max(float((adjoint(box * w) ** 2).sum()), 1e-300)
    for _ in range(iterations):
        if gamma <= stop:
            break
        q = forward(p)
        alpha = gamma / max(float((q * q).sum()), 1e-300)
        x += alpha * p
        residual -= alpha * q
        s = adjoint(residual)
        gamma, previous = float((s * s).sum()), gamma
        p = s + (gamma / previous) * p
    return x


class VolumeAssembly:
    """A volume on a :class:`SliceGrid` filled slice by slice; unwritten slices keep ``background``."""

    def __init__(self, grid: SliceGrid, background: float) -> None:
        self.grid = grid
        self.array = np.full(grid.shape, background, dtype=np.float32)
        self.written: set[int] = set()

    def put(self, index: int, slice2d: np.ndarray) -> None:
        """Place one slice (display orientation, source slice grid) at ``index`` along the grid's axis."""
        g = self.grid
        if not 0 <= index < g.n_slices:
            raise GridError(f"{g.axis} slice {index} outside the volume's 0..{g.n_slices - 1}")
        s = np.asarray(slice2d)
        if s.shape != g.slice_shape:
            raise GridError(f"slice {index}: shape {s.shape} instead of {g.slice_shape}")
        if g.axis == "axial":
            self.array[index] = s
        elif g.axis == "coronal":  # slice_volume shows superior at the top: rows run against z
            self.array[:, index, :] = s[::-1]
        else:
            self.array[:, :, index] = s[::-1]
        self.written.add(int(index))

    def volume(self, source: str = "") -> Volume:
        g = self.grid
        return Volume(self.array, g.spacing, g.origin, np.asarray(g.direction).reshape(3, 3), source)


def write_prediction(volume: Volume, path: os.PathLike[str] | str, like: os.PathLike[str] | str | None = None) -> Path:
    """Write ``volume`` (canonical LPS) as ``.mha``/``.nii.gz``/``.nii``/``.nrrd``.

    With ``like`` (the source file the target came from) the voxels are stored in that file's own
    axis order and flips, so the array SimpleITK reads from the prediction lines up voxel by voxel
    with the array it reads from the source file (which is how the challenge's scripts compare
    them); the written geometry is checked against the source header.
    """
    out = Path(path)
    if volume_suffix(out) is None:
        raise ValueError(f"{out.name}: unsupported prediction suffix (use .mha or .nii.gz)")
    image = volume.to_sitk()
    if like is not None:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(like))
        reader.ReadImageInformation()
        orient = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(reader.GetDirection())
        image = sitk.DICOMOrient(image, orient)
        ref = (reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
        got = (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
        if ref[0] != got[0] or not all(np.allclose(a, b, rtol=0, atol=1e-3) for a, b in zip(ref[1:], got[1:], strict=True)):
            raise GridError(f"{out.name}: the reassembled volume does not lie on the grid of {Path(like).name}")
    array = sitk.GetArrayFromImage(image)
    spacing = tuple(reversed(image.GetSpacing()))
    return write_volume(array, out, spacing, image.GetOrigin(), np.asarray(image.GetDirection()).reshape(3, 3))
