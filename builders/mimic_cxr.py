"""MIMIC-CXR-JPG + reports -> report-to-chest-X-ray generation (``report2cxr``). Credentialed.

Layout: ``files/p1X/p1XXXXXXX/sXXXXXXXX/<dicom_id>.jpg`` (MIMIC-CXR-JPG 2.0.0), the study's
report ``files/p1X/p1XXXXXXX/sXXXXXXXX.txt`` (mimic-cxr-reports; ``--reports`` when it lives
elsewhere), ``mimic-cxr-2.0.0-split.csv[.gz]`` and ``mimic-cxr-2.0.0-metadata.csv[.gz]``.

One item per study (group = subject). Each frontal image (``--views``, default PA and AP, from the
metadata's ``ViewPosition``) gives one text-only sample: the human turn is an instruction
template plus the report's FINDINGS and IMPRESSION (``--report-section``), the gpt turn
``<target_image>``; the target is the radiograph fitted to 256x256 (grey, aspect kept). Splits
come from the official split CSV (``validate`` -> ``val``) when present, else a seeded
subject-level split. Studies without a usable report, and unreadable images, are refused.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from vlhealth.build import BuildContext, Item, Reject, Rejected
from vlhealth.limits import LimitError, read_image_file
from vlhealth.schema import Record, Sample
from vlhealth.volumes import fit_square

NAME = "mimic_cxr"
MANIFEST = "mimic_cxr"
GENERATES = True
EXAMPLE = "vlhealth build mimic-cxr /data/mimic-cxr-jpg/2.0.0 --reports /data/mimic-cxr-reports --out shards/mimic_cxr"

STUDY_RE = re.compile(r"^p\d{2}/p(\d+)/s(\d+)$")
SPLIT_NAMES = {"train": "train", "validate": "val", "val": "val", "test": "test"}
SIZE = 256


@dataclass
class Options:
    reports: str = field(default="", metadata={"help": "Folder holding files/pXX/pXXXXXXXX/sXXXXXXXX.txt (default: the root)."})
    views: str = field(default="PA,AP", metadata={"help": "ViewPosition values to use (comma-separated)."})
    report_section: str = field(default="both", metadata={"help": "findings, impression or both."})
    official_split: bool = field(default=True, metadata={"help": "Use mimic-cxr-2.0.0-split.csv when present."})


def _read_csv(root: Path, stem: str) -> list[dict[str, str]] | None:
    for name in (f"{stem}.csv", f"{stem}.csv.gz"):
        path = root / name
        if path.is_file():
            raw = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
            return list(csv.DictReader(io.StringIO(raw.decode("utf-8"))))
    return None


@cache
def _tables(root: str) -> tuple[dict[str, str], dict[str, str]]:
    """(dicom_id -> split, dicom_id -> ViewPosition)."""
    base = Path(root)
    split = {r["dicom_id"]: SPLIT_NAMES.get(r.get("split", "").strip(), "") for r in _read_csv(base, "mimic-cxr-2.0.0-split") or []}
    views = {r["dicom_id"]: r.get("ViewPosition", "").strip().upper() for r in _read_csv(base, "mimic-cxr-2.0.0-metadata") or []}
    return split, views


def discover(ctx: BuildContext) -> Iterator[Item | Reject]:
    if ctx.options.report_section not in ("findings", "impression", "both"):
        raise ValueError(f"--report-section must be findings, impression or both, got {ctx.options.report_section!r}")
    files = ctx.root / "files"
    if not files.is_dir():
        raise FileNotFoundError(f"{ctx.root.name}: no files/ folder (MIMIC-CXR-JPG layout)")
    _split, views = _tables(str(ctx.root))
    wanted = {v.strip().upper() for v in ctx.options.views.split(",") if v.strip()}
    studies: dict[str, list[Path]] = defaultdict(list)
    for jpg in sorted(files.glob("p*/p*/s*/*.jpg")):
        studies[jpg.parent.relative_to(files).as_posix()].append(jpg)
    for rel, images in sorted(studies.items()):
        m = STUDY_RE.match(rel)
        if not m:
            yield Reject(f"files/{rel}", "folder does not follow files/pXX/pXXXXXXXX/sXXXXXXXX")
            continue
        subject, study = m.group(1), m.group(2)
        chosen = [p for p in images if not views or views.get(p.stem, "") in wanted]
        if not chosen:
            continue
        yield Item(id=f"s{study}", group=f"p{subject}",
                   files=tuple(ctx.rel(p) for p in chosen), data={"study": f"files/{rel}"})


def preset_splits(items: Iterable[Item], ctx: BuildContext) -> dict[str, str]:
    if not ctx.options.official_split:
        return {}
    split, _views = _tables(str(ctx.root))
    out: dict[str, str] = {}
    for it in items:
        for f in it.files:
            s = split.get(Path(f).stem)
            if s:
                out.setdefault(it.group, s)
    return out


SECTION_RE = re.compile(r"^\s*([A-Z][A-Z /&]+):", re.MULTILINE)


def report_text(text: str, section: str = "both") -> str:
    """FINDINGS and/or IMPRESSION of a MIMIC-CXR report, whitespace collapsed ('' if neither)."""
    parts: dict[str, str] = {}
    marks = list(SECTION_RE.finditer(text))
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        parts[m.group(1).strip()] = " ".join(text[m.end():end].split())
    find, imp = parts.get("FINDINGS", ""), parts.get("IMPRESSION", "")
    if section == "findings":
        return find
    if section == "impression":
        return imp
    return " ".join(p for p in (f"Findings: {find}" if find else "", f"Impression: {imp}" if imp else "") if p)


def process(item: Item, ctx: BuildContext) -> Iterator[Sample | Reject]:
    from PIL import UnidentifiedImageError

    reports_root = Path(ctx.options.reports) if ctx.options.reports else ctx.root
    report_rel = item.data["study"] + ".txt"
    path = reports_root / report_rel
    if not path.is_file():
        raise Rejected(report_rel, "no report for this study")
    text = report_text(path.read_text("utf-8", errors="replace"), ctx.options.report_section)
    if not text:
        raise Rejected(report_rel, f"report has no {ctx.options.report_section} section text")
    split = ctx.split_of(item.group)
    for rel in item.files:
        try:
            _, opened = read_image_file(ctx.root / rel, ctx.root, ctx.limits)
            with opened as img:
                grey = np.asarray(img.convert("L"))
        except LimitError as exc:
            yield Reject(rel, str(exc), item.id)
            continue
        except (OSError, UnidentifiedImageError) as exc:
            yield Reject(rel, f"unreadable JPEG ({ctx.scrub(str(exc))[:160]})", item.id)
            continue
        target = fit_square(grey, SIZE, order=1, pad_value=0)
        key = f"{NAME}-{item.id}-{Path(rel).stem}"
        key = re.sub(r"[^A-Za-z0-9_-]", "_", key)
        record = Record(
            task="generation", subtask="report2cxr", source=NAME, split=split,
            conversations=[{"from": "human", "value": f"{ctx.template('report2cxr', key)}\n{text}"},
                           {"from": "gpt", "value": "<target_image>"}],
            group=item.group, license=ctx.license, modality="X-ray", body_part="chest",
            provenance={"file": rel, "report": report_rel, "section": ctx.options.report_section,
                        "original_size": list(grey.shape)},
        )
        yield Sample(key=key, record=record, target=target)
