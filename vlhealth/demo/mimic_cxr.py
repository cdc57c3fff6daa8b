"""MIMIC-CXR-JPG 2.0.0 + MIMIC-CXR reports layout (report -> chest X-ray generation).

``files/p1X/p1XXXXXXX/sXXXXXXXX/<dicom_id>.jpg`` (frontal PA/AP and some lateral views),
``files/p1X/p1XXXXXXX/sXXXXXXXX.txt`` (the free-text report with ``FINDINGS:`` and
``IMPRESSION:`` sections, ``___`` where the release removed PHI), ``mimic-cxr-2.0.0-split.csv``
(``dicom_id,study_id,subject_id,split`` with train/validate/test) and
``mimic-cxr-2.0.0-metadata.csv`` (``dicom_id,...,ViewPosition``). Quirks: a study without a
report, a report without FINDINGS (impression only), an image listed in the CSVs but missing
from ``files/``, a corrupt JPEG. All identifiers are synthetic (MIMIC is credentialed).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from vlhealth.demo import phantom
from vlhealth.demo._io import write_jpeg

NAME = "mimic_cxr"
SUBJECTS = 7
META_COLUMNS = ("dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning")


def _uuid(rng: np.random.Generator) -> str:
    h = "".join(f"{int(v):x}" for v in rng.integers(0, 16, 40))
    return f"{h[:8]}-{h[8:16]}-{h[16:24]}-{h[24:32]}-{h[32:40]}"


def _report(scan: phantom.Scan2D, findings: bool) -> str:
    sides = sorted({les.side for les in scan.lesions})
    if sides:
        where = " and ".join(f"{s} lung" for s in sides)
        find = f"There is a focal opacity in the {where}. No pleural effusion or pneumothorax."
        imp = f"Focal opacity in the {where}, possibly pneumonia in the appropriate clinical setting."
    else:
        find = "The lungs are clear. The cardiomediastinal silhouette is normal. No effusion or pneumothorax."
        imp = "No acute cardiopulmonary process."
    parts = ["                                 FINAL REPORT",
             " EXAMINATION:  CHEST (PA AND LAT)", "",
             " INDICATION:  ___F with cough and fever, evaluate for pneumonia.", "",
             " COMPARISON:  None.", ""]
    if findings:
        parts += [" FINDINGS:", "", " " + find, ""]
    parts += [" IMPRESSION:", "", " " + imp, ""]
    return "\n".join(parts)


def _csv(rows: list[list[object]], header: tuple[str, ...]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write(root: Path, rng: np.random.Generator) -> None:
    split_rows: list[list[object]] = []
    meta_rows: list[list[object]] = []
    subject = 10000032
    for s in range(SUBJECTS):
        subject += int(rng.integers(1, 500))
        split = "test" if s == 5 else "validate" if s == 4 else "train"
        for _study in range(1 + int(rng.integers(0, 2))):
            study = int(rng.integers(50_000_000, 59_999_999))
            folder = root / "files" / f"p{str(subject)[:2]}" / f"p{subject}"
            scan = phantom.scan_2d(rng, "xray_chest", int(rng.integers(0, 3)), (256, 224))
            views = ["PA", "LATERAL"] if rng.integers(0, 2) else ["AP"]
            for view in views:
                dicom = _uuid(rng)
                image = scan.image if view != "LATERAL" else np.ascontiguousarray(scan.image[:, ::-1])
                write_jpeg(folder / f"s{study}" / f"{dicom}.jpg", image)
                split_rows.append([dicom, study, subject, split])
                meta_rows.append([dicom, subject, study, "CHEST (PA AND LAT)", view, 256, 224, 21800101,
                                  120000.0, "CHEST (PA AND LAT)", "postero-anterior", "Erect"])
            if not (s == 2 and _study == 0):  # quirk: one study without a report
                (folder / f"s{study}.txt").write_text(_report(scan, findings=s != 3), encoding="utf-8")
    # Quirks: an image in the CSVs but not on disk, and a corrupt JPEG.
    first = split_rows[0]
    split_rows.append(["missing-" + str(first[0])[8:], first[1], first[2], first[3]])
    meta_rows.append(["missing-" + str(first[0])[8:], first[2], first[1], "CHEST", "PA", 256, 224, 21800101,
                      120000.0, "CHEST", "postero-anterior", "Erect"])
    corrupt = root / "files" / f"p{str(first[2])[:2]}" / f"p{first[2]}" / f"s{first[1]}" / "corrupt-0000.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + bytes(40))
    split_rows.append(["corrupt-0000", first[1], first[2], first[3]])
    meta_rows.append(["corrupt-0000", first[2], first[1], "CHEST", "PA", 256, 224, 21800101, 120000.0,
                      "CHEST", "postero-anterior", "Erect"])
    (root / "mimic-cxr-2.0.0-split.csv").write_text(
        _csv(split_rows, ("dicom_id", "study_id", "subject_id", "split")), encoding="utf-8")
    (root / "mimic-cxr-2.0.0-metadata.csv").write_text(_csv(meta_rows, META_COLUMNS), encoding="utf-8")
