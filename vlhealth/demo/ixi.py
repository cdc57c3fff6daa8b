"""IXI layout: one folder per modality tar (``IXI-T1/``, ``IXI-T2/``, ``IXI-PD/``) plus ``IXI.xls``.

The official download is one tar per modality (``IXI-T1.tar`` ...) holding flat files named
``IXI<nnn>-<site>-<nnnn>-<mod>.nii.gz`` (sites Guys, HH, IOP); users extract each into a folder
of the same name. T1 is a sagittal acquisition (stored sagittally here, so readers must
reorient); T2 and PD come from one dual-echo acquisition and share geometry (stored RAS-flipped).
As in the real release not every subject has every modality (one here lacks PD), and the
spreadsheet lists a subject without images and has a blank AGE. ``IXI.xls`` is written with
xlwt when importable (the dev extra), else the same table as ``IXI.csv``.
"""

from __future__ import annotations

import csv
import io
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from vlhealth.demo import phantom
from vlhealth.volumes import write_volume

NAME = "ixi"

SUBJECTS = ("IXI002-Guys-0828", "IXI012-HH-1211", "IXI016-Guys-0697", "IXI035-IOP-0873",
            "IXI048-HH-1326")
MISSING = {("IXI048-HH-1326", "PD")}
EXTRA_SPREADSHEET_ONLY = ("IXI050-Guys-0711",)
COLUMNS = ("IXI_ID", "SEX_ID (1=m, 2=f)", "HEIGHT", "WEIGHT", "ETHNIC_ID", "MARITAL_ID",
           "OCCUPATION_ID", "QUALIFICATION_ID", "DOB", "DATE_AVAILABLE", "STUDY_DATE", "AGE")
LOOKUPS = {
    "Ethnicity": ("ETHNIC_ID", "ETHNIC", ["White", "Black or Black British", "Asian or Asian British",
                                          "Chinese", "Other"]),
    "Marital status": ("MARITAL_ID", "MARITAL", ["Single", "Married", "Cohabiting",
                                                 "Divorced/separated", "Widowed"]),
    "Occupation": ("OCCUPATION_ID", "OCCUPATION", ["Go out to full time employment",
                                                   "Go out to part time employment (<25hrs)",
                                                   "Study at college or university",
                                                   "Full-time housework", "Retired"]),
    "Qualification": ("QUALIFICATION_ID", "QUALIFICATION", ["No qualifications", "O-levels, GCSEs, or CSEs",
                                                             "A-levels", "Further education",
                                                             "University or Polytechnic degree"]),
}

T1_SHAPE, T1_SPACING = (48, 64, 40), (3.6, 3.2, 4.0)  # canonical (z, y, x)
T2_SHAPE, T2_SPACING = (30, 64, 56), (6.0, 3.2, 3.2)


def _demographics(rng: np.random.Generator) -> list[list[object]]:
    rows: list[list[object]] = []
    for sid in (*SUBJECTS, *EXTRA_SPREADSHEET_ONLY):
        number = int(sid[3:6])
        sex = int(rng.integers(1, 3))
        dob = date(1930, 1, 1) + timedelta(days=int(rng.integers(0, 365 * 55)))
        study = date(2005, 6, 1) + timedelta(days=int(rng.integers(0, 365 * 2)))
        age: object = round((study - dob).days / 365.25, 2)
        if sid == "IXI016-Guys-0697":
            age = ""  # real sheet has gaps
        rows.append([number, sex, int(rng.integers(150, 195)), int(rng.integers(48, 110)),
                     int(rng.integers(1, 6)), int(rng.integers(1, 6)), int(rng.integers(1, 6)),
                     int(rng.integers(1, 6)), dob, 1, study, age])
    return rows


def _write_xls(path: Path, rows: list[list[object]]) -> None:
    import xlwt  # type: ignore[import-untyped]

    book = xlwt.Workbook(encoding="utf-8")
    sheet = book.add_sheet("Table")
    date_style = xlwt.easyxf(num_format_str="YYYY-MM-DD")
    for c, name in enumerate(COLUMNS):
        sheet.write(0, c, name)
    for r, row in enumerate(rows, start=1):
        for c, value in enumerate(row):
            if isinstance(value, date):
                sheet.write(r, c, value, date_style)
            elif value != "":
                sheet.write(r, c, value)
    for title, (id_col, name_col, names) in LOOKUPS.items():
        ws = book.add_sheet(title)
        ws.write(0, 0, id_col)
        ws.write(0, 1, name_col)
        for i, name in enumerate(names, start=1):
            ws.write(i, 0, i)
            ws.write(i, 1, name)
    buf = io.BytesIO()
    book.save(buf)
    path.write_bytes(buf.getvalue())


def _write_csv(path: Path, rows: list[list[object]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([v.isoformat() if isinstance(v, date) else v for v in row])
    path.write_text(buf.getvalue(), encoding="utf-8")


def write(root: Path, rng: np.random.Generator) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for sid in SUBJECTS:
        site_gain = {"Guys": 1.0, "HH": 1.35, "IOP": 0.8}[sid.split("-")[1]]
        # T1: its own acquisition (pose differs from T2/PD), stored sagittally:
        # i along y (A->P), j along z flipped (S->I), k along x (R->L).
        t1_labels = phantom.head(T1_SHAPE, T1_SPACING, phantom.random_pose(rng)).labels
        t1 = phantom.render_mr(t1_labels, rng, "T1", gain=site_gain)
        t1_origin = (-T1_SHAPE[2] * T1_SPACING[2] / 2, -T1_SHAPE[1] * T1_SPACING[1] / 2, -60.0)
        data, sp, org, direction = phantom.stored_orientation(
            np.clip(np.rint(t1), 0, 32767).astype(np.int16), T1_SPACING, t1_origin, (1, 2, 0),
            (False, True, False))
        write_volume(data, root / "IXI-T1" / f"{sid}-T1.nii.gz", sp, org, direction)
        # T2 and PD: one dual-echo acquisition, same labels and geometry, stored RAS-flipped.
        labels = phantom.head(T2_SHAPE, T2_SPACING, phantom.random_pose(rng)).labels
        origin = (-T2_SHAPE[2] * T2_SPACING[2] / 2, -T2_SHAPE[1] * T2_SPACING[1] / 2, -70.0)
        for contrast in ("T2", "PD"):
            image = phantom.render_mr(labels, rng, contrast, gain=site_gain)
            if (sid, contrast) in MISSING:
                continue
            data, sp, org, direction = phantom.stored_orientation(
                np.clip(np.rint(image), 0, 32767).astype(np.int16), T2_SPACING, origin, (0, 1, 2),
                (True, True, False))
            write_volume(data, root / f"IXI-{contrast}" / f"{sid}-{contrast}.nii.gz", sp, org, direction)
    rows = _demographics(rng)
    try:
        import xlwt  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        _write_csv(root / "IXI.csv", rows)
    else:
        _write_xls(root / "IXI.xls", rows)
