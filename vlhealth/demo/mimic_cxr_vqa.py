"""MIMIC-CXR-VQA layout: ``mimiccxrvqa/dataset/{train,valid,test}.json`` plus the MIMIC-CXR-JPG
images they point to (``files/p1X/p1XXXXXXX/sXXXXXXXX/<dicom_id>.jpg``, relative to the root).

Rows carry the release's fields: ``split``, ``idx``, ``image_id``, ``question``, ``answer`` (a
**list**: ``["yes"]``, several findings, or ``[]`` when none), ``content_type``,
``semantic_type`` (verify/choose/query), ``template``, ``template_program``,
``template_arguments``, ``subject_id``, ``study_id``, ``image_path`` (relative to ``files/``).
Quirks: an empty answer list, a row whose image is missing from MIMIC-CXR-JPG, a row without
``question``. The identifiers are synthetic (MIMIC is credentialed; nothing here is real).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlhealth.demo import phantom
from vlhealth.demo._io import write_jpeg, write_json

NAME = "mimic_cxr_vqa"
SPLITS = {"train": 3, "valid": 1, "test": 2}


def _uuid(rng: np.random.Generator) -> str:
    h = "".join(f"{int(v):x}" for v in rng.integers(0, 16, 40))
    return f"{h[:8]}-{h[8:16]}-{h[16:24]}-{h[24:32]}-{h[32:40]}"


def _questions(scan: phantom.Scan2D) -> list[tuple[str, list[str], str, str, str]]:
    """(question, answer list, semantic_type, content_type, template) of one radiograph."""
    sides = sorted({les.side for les in scan.lesions})
    findings = ["lung opacity"] if scan.lesions else []
    return [
        ("Is there any abnormality in the left lung?", ["yes" if "left" in sides else "no"], "verify",
         "abnormality", "Is there any abnormality in the ${object}?"),
        ("Which anatomical location is related to lung opacity, the left lung or the right lung?",
         [f"{s} lung" for s in sides], "choose", "anatomy",
         "Which anatomical location is related to ${attribute}, the ${object_1} or the ${object_2}?"),
        ("List all abnormalities in the right lung.", findings if "right" in sides else [], "query",
         "abnormality", "List all abnormalities in the ${object}."),
        ("Does this image show any lung opacity?", ["yes" if findings else "no"], "verify", "attribute",
         "Does this image show any ${attribute}?"),
    ]


def write(root: Path, rng: np.random.Generator) -> None:
    idx = 0
    subject = 10000032
    for split, n_images in SPLITS.items():
        rows: list[dict[str, object]] = []
        for _ in range(n_images):
            subject += int(rng.integers(1, 400))
            study = int(rng.integers(50_000_000, 59_999_999))
            dicom = _uuid(rng)
            rel = f"p{str(subject)[:2]}/p{subject}/s{study}/{dicom}.jpg"
            scan = phantom.scan_2d(rng, "xray_chest", int(rng.integers(0, 3)), (256, 256))
            write_jpeg(root / "files" / rel, scan.image)
            for question, answer, semantic, content, template in _questions(scan):
                rows.append({
                    "split": split, "idx": idx, "image_id": dicom, "question": question, "answer": answer,
                    "content_type": content, "semantic_type": semantic, "template": template,
                    "template_program": f"program_{int(rng.integers(1, 40))}", "template_arguments": {},
                    "subject_id": str(subject), "study_id": str(study), "image_path": rel,
                })
                idx += 1
        if split == "train":
            # Quirks: an image MIMIC-CXR-JPG does not have, and a row that lost its question.
            rows.append({**rows[0], "idx": idx, "image_id": "missing", "image_path": "p10/p10999999/s50000000/missing.jpg"})
            rows.append({k: v for k, v in rows[1].items() if k != "question"} | {"idx": idx + 1})
            idx += 2
        write_json(root / "mimiccxrvqa" / "dataset" / f"{split}.json", rows)
