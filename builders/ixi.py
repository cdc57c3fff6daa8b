"""IXI brain MRI -> 4x super-resolution pairs (``sr4x``) from central slices.

Layout: ``IXI<nnn>-<site>-<nnnn>-<T1|T2|PD>.nii.gz`` anywhere under the root (usually in
``IXI-T1/``, ``IXI-T2/``, ``IXI-PD/``), plus ``IXI.xls`` (or ``IXI.csv``) whose ``SEX_ID`` and
``AGE`` are joined per subject into ``extra.sex`` / ``extra.age`` when present.

Per volume, ``--slices`` central slices along the acquisition plane (``--axis native``: the
axis with the coarsest spacing, so T1 sagittal, T2/PD axial) are windowed (0.5-99.5 percentile
of the volume), fitted to the 256x256 target and degraded to a 64x64 input: ``--degradation
bicubic`` (anti-aliased bicubic downsampling) or ``kspace`` (central 1/4 x 1/4 of the 2D
spectrum kept, the way a lower-resolution acquisition would sample it; Gibbs ringing included).
The input is stored at its low resolution (64x64); ``provenance.scale`` = 4. Split by subject.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from vlhealth.build import BuildContext, Item, Reject, Rejected
from vlhealth.schema import Record, Sample
from vlhealth.volumes import apply_window, fit_square, mr_window, read_volume, slice_volume

NAME = "ixi"
MANIFEST = "ixi"
GENERATES = True
EXAMPLE = "vlhealth build ixi /data/IXI --out shards/ixi --degradation kspace"

FILE_RE = re.compile(r"^(IXI\d{3})-([A-Za-z]+)-(\d{4})-(T1|T2|PD)\.nii(\.gz)?$")
SIZE = 256
SCALE = 4


@dataclass
class Options:
    degradation: str = field(default="bicubic", metadata={"help": "Low-resolution input: bicubic or kspace."})
    slices: int = field(default=8, metadata={"help": "Central slices per volume."})
    slice_step: int = field(default=1, metadata={"help": "Distance between the chosen central slices."})
    axis: str = field(default="native", metadata={"help": "native (acquisition plane), axial, coronal or sagittal."})
    contrasts: str = field(default="T1,T2,PD", metadata={"help": "Comma-separated contrasts to use."})


def discover(ctx: BuildContext) -> Iterator[Item | Reject]:
    opts: Options = ctx.options
    if opts.degradation not in ("bicubic", "kspace"):
        raise ValueError(f"--degradation must be bicubic or kspace, got {opts.degradation!r}")
    if opts.axis not in ("native", "axial", "coronal", "sagittal"):
        raise ValueError(f"--axis must be native, axial, coronal or sagittal, got {opts.axis!r}")
    wanted = {c.strip() for c in opts.contrasts.split(",") if c.strip()}
    for path in sorted(ctx.root.rglob("*.nii*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        m = FILE_RE.match(path.name)
        if not m:
            yield Reject(ctx.rel(path), "file name does not follow IXI<nnn>-<site>-<nnnn>-<T1|T2|PD>.nii.gz")
            continue
        subject, _site, _n, contrast = m.group(1), m.group(2), m.group(3), m.group(4)
        if contrast not in wanted:
            continue
        yield Item(id=f"{subject}-{contrast}", group=subject, files=(ctx.rel(path),),
                   data={"site": m.group(2), "contrast": contrast})


@cache
def _demographics(root: str) -> dict[str, dict[str, object]]:
    """Subject ('IXI002') -> {'sex': 'M'/'F', 'age': float} from IXI.xls or IXI.csv."""
    base = Path(root)
    rows: list[dict[str, object]] = []
    if (base / "IXI.xls").is_file():
        import xlrd

        sheet = xlrd.open_workbook(str(base / "IXI.xls")).sheet_by_index(0)
        header = [str(v).strip() for v in sheet.row_values(0)]
        rows = [dict(zip(header, sheet.row_values(r), strict=False)) for r in range(1, sheet.nrows)]
    elif (base / "IXI.csv").is_file():
        with open(base / "IXI.csv", newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    out: dict[str, dict[str, object]] = {}
    for row in rows:
        sex_col = next((k for k in row if k.upper().startswith("SEX_ID")), None)
        try:
            subject = f"IXI{int(float(row['IXI_ID'])):03d}"  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            continue
        info: dict[str, object] = {}
        try:
            info["sex"] = {1: "M", 2: "F"}[int(float(row[sex_col]))]  # type: ignore[index,arg-type]
        except (KeyError, TypeError, ValueError):
            pass
        try:
            info["age"] = round(float(row.get("AGE", "")), 2)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            pass
        out[subject] = info
    return out


def degrade(image: np.ndarray, how: str, scale: int = SCALE) -> np.ndarray:
    """A float image in [0, 1] (H, W) -> its (H/scale, W/scale) low-resolution version in [0, 1]."""
    h, w = image.shape
    lh, lw = h // scale, w // scale
    if how == "bicubic":
        from PIL import Image

        low = Image.fromarray(image.astype(np.float32), mode="F").resize((lw, lh), Image.Resampling.BICUBIC)
        return np.clip(np.asarray(low, dtype=np.float64), 0.0, 1.0)
    spectrum = np.fft.fftshift(np.fft.fft2(image))
    top, left = (h - lh) // 2, (w - lw) // 2
    low = np.fft.ifft2(np.fft.ifftshift(spectrum[top : top + lh, left : left + lw])) / (scale * scale)
    return np.clip(np.abs(low), 0.0, 1.0)


def process(item: Item, ctx: BuildContext) -> Iterator[Sample]:
    opts: Options = ctx.options
    vol = read_volume(ctx.root / item.files[0], root=ctx.root)
    if opts.axis == "native":
        axis = ("axial", "coronal", "sagittal")[int(np.argmax(vol.spacing))]
    else:
        axis = opts.axis
    n = vol.shape[{"axial": 0, "coronal": 1, "sagittal": 2}[axis]]
    step = max(1, opts.slice_step)
    count = min(max(1, opts.slices), (n - 1) // step + 1)
    span = (count - 1) * step
    first = min(n // 2 - span // 2, n - 1 - span)  # centred, but never past the last slice (even n)
    indices = [first + i * step for i in range(count)]
    try:
        window = mr_window(vol.array)
    except ValueError as exc:
        raise Rejected(item.files[0], f"MR window: {exc}") from exc
    demo = _demographics(str(ctx.root)).get(item.group, {})
    split = ctx.split_of(item.group)
    for k in indices:
        plane, _spacing = slice_volume(vol, axis, k)  # type: ignore[arg-type]
        hr = fit_square(plane.astype(np.float64), SIZE, order=1, pad_value=window.lo)
        unit = (np.clip(hr, window.lo, window.hi) - window.lo) / (window.hi - window.lo)
        target = apply_window(hr, window, np.uint8)
        low = np.rint(degrade(unit, opts.degradation) * 255.0).astype(np.uint8)
        key = f"{NAME}-{item.id}-{axis}-{k:04d}"
        record = Record(
            task="generation", subtask="sr4x", source=NAME, split=split,
            conversations=[{"from": "human", "value": "<image>\n" + ctx.template("sr4x", key)},
                           {"from": "gpt", "value": "<target_image>"}],
            group=item.group, license=ctx.license, modality="MR", body_part="brain",
            provenance={"file": item.files[0], "axis": axis, "slice": k, "n_slices": n, "window": window.as_dict(),
                        "degradation": opts.degradation, "scale": SCALE, "input_size": list(low.shape)},
            extra={"contrast": item.data["contrast"], "site": item.data["site"], **demo},
        )
        yield Sample(key=key, record=record, input_image=low, target=target)
