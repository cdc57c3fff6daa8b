"""VQA-RAD layout: ``VQA_RAD Dataset Public.json`` and ``VQA_RAD Image Folder/synpic<N>.jpg``.

The JSON is one list of question records with the release's fields: ``qid``, ``phrase_type``
(``freeform``/``para`` for training, ``test_freeform``/``test_para`` for the test set),
``qid_linked_id`` (shared by a free-form question and its paraphrase), ``image_case_url``,
``image_name``, ``image_organ`` (HEAD/CHEST/ABD), ``evaluation``, ``question``,
``question_rephrase``, ``question_relation``, ``question_frame``, ``question_type``
(PRES, ABN, MODALITY, ORGAN, PLANE, POS, COUNT, ...), ``answer`` and ``answer_type``
(CLOSED/OPEN). As upstream, counting answers are JSON integers (not strings), yes/no answers
come in mixed case, and absent fields hold the string ``"NULL"``. Images are phantom
renderings whose content matches the answers.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

from vlhealth.demo import phantom
from vlhealth.demo._io import write_jpeg, write_json

NAME = "vqa_rad"
JSON_NAME = "VQA_RAD Dataset Public.json"
IMAGE_DIR = "VQA_RAD Image Folder"

# (scan kind, lesion count, (rows, cols), is test image)
IMAGES = (
    ("ct_head", 1, (256, 256), False),
    ("ct_head", 0, (224, 256), False),
    ("mr_head", 2, (256, 224), False),
    ("ct_pelvis", 1, (192, 256), False),
    ("xray_chest", 1, (256, 240), False),
    ("xray_chest", 0, (240, 256), False),
    ("mr_head", 0, (224, 224), True),
    ("ct_head", 2, (256, 256), True),
    ("ct_pelvis", 0, (192, 256), True),
)
ORGAN = {"head": "HEAD", "chest": "CHEST", "pelvis": "ABD"}
ORGAN_WORD = {"head": "brain", "chest": "chest", "pelvis": "pelvis"}
MODALITY_WORD = {"CT": "CT", "MRI": "MRI", "X-ray": "x-ray"}


def _questions(scan: phantom.Scan2D, rng: np.random.Generator) -> list[tuple[str, str, object, str, str]]:
    """(question, paraphrase or "", answer, answer_type, question_type) for one image."""
    n = len(scan.lesions)
    where = ORGAN_WORD[scan.region]
    yes, no = ("Yes", "No") if rng.integers(0, 2) else ("yes", "no")
    out: list[tuple[str, str, object, str, str]] = [
        (f"Is there a lesion in the {where}?", f"Does the {where} show a lesion?",
         yes if n else no, "CLOSED", "PRES"),
        ("What imaging modality was used?", "How was this image taken?",
         MODALITY_WORD[scan.modality], "OPEN", "MODALITY"),
        ("What organ system is shown?", "", ORGAN_WORD[scan.region], "OPEN", "ORGAN"),
        ("How many lesions are there?", "How many lesions can be seen?", n, "OPEN", "COUNT"),
    ]
    if scan.plane == "axial":
        out.append(("Is this an axial image?", "Was this image taken in the axial plane?", yes, "CLOSED",
                    "PLANE"))
    if n == 1:
        out.append(("Which side is the lesion on?", "", scan.lesions[0].side, "OPEN", "POS"))
        out.append(("Is the lesion on the patient's left?", "", yes if scan.lesions[0].side == "left" else no,
                    "CLOSED", "POS"))
    if scan.modality == "MRI":
        out.append(("Is this a T2 weighted image?", "", yes, "CLOSED", "ATTRIB"))
    return out


def write(root: Path, rng: np.random.Generator) -> None:
    numbers = sorted(int(v) for v in rng.choice(np.arange(15000, 60000), size=len(IMAGES), replace=False))
    records: list[dict[str, object]] = []
    qid = 0
    for (kind, n_lesions, size, is_test), number in zip(IMAGES, numbers, strict=True):
        scan = phantom.scan_2d(rng, kind, n_lesions, size)
        image_name = f"synpic{number}.jpg"
        write_jpeg(root / IMAGE_DIR / image_name, scan.image)
        case_url = f"https://medpix.nlm.nih.gov/case?id={uuid.UUID(int=int(rng.integers(0, 2**62)))}"
        prefix = "test_" if is_test else ""
        for question, paraphrase, answer, answer_type, qtype in _questions(scan, rng):
            linked = str(uuid.UUID(int=int(rng.integers(0, 2**62)) << 64 | int(rng.integers(0, 2**62))))
            base = {
                "qid": qid,
                "phrase_type": prefix + "freeform",
                "qid_linked_id": linked,
                "image_case_url": case_url,
                "image_name": image_name,
                "image_organ": ORGAN[scan.region],
                "evaluation": "given" if rng.integers(0, 3) else "not evaluated",
                "question": question,
                "question_rephrase": paraphrase or "NULL",
                "question_relation": "NULL",
                "question_frame": "NULL",
                "question_type": qtype,
                "answer": answer,
                "answer_type": answer_type,
            }
            records.append(base)
            qid += 1
            if paraphrase:
                records.append({**base, "qid": qid, "phrase_type": prefix + "para", "question": paraphrase,
                                "question_rephrase": "NULL", "question_relation": "strict agreement"})
                qid += 1
    write_json(root / JSON_NAME, records)
