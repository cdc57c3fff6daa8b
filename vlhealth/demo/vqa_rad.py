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


def _appearance_questions(scan: phantom.Scan2D, rng: np.random.Generator) -> list[tuple[str, str, object, str, str]]:
    """Closed questions about what the whole image shows (modality, organ), asked of the scaled-up images.

    VQA-RAD asks many of these ("Is this a CT?", "Is this the brain?"); the answer is in the pixels
    even at low resolution, and each asks about one of several possibilities, so yes and no both occur.
    """
    yes, no = ("Yes", "No") if rng.integers(0, 2) else ("yes", "no")
    modality = str(rng.choice(["CT", "MRI", "x-ray"]))
    organ = str(rng.choice(["brain", "chest", "pelvis"]))
    shown_modality = MODALITY_WORD[scan.modality]
    return [
        (f"Is this {'an' if modality[0] in 'Mx' else 'a'} {modality} image?", "", yes if modality == shown_modality else no,
         "CLOSED", "MODALITY"),
        (f"Does this image show the {organ}?", "", yes if organ == ORGAN_WORD[scan.region] else no, "CLOSED", "ORGAN"),
    ]


def _extra_images(count: int, rng: np.random.Generator) -> list[tuple[str, int, tuple[int, int], bool]]:
    """Scaled-up image list: every scan kind with and without a lesion in turn, one in five held out."""
    out = []
    for i in range(count):
        kind = phantom.SCAN_KINDS[i % len(phantom.SCAN_KINDS)]
        size = (int(rng.integers(7, 9)) * 32, int(rng.integers(7, 9)) * 32)
        out.append((kind, (i // len(phantom.SCAN_KINDS)) % 2, size, i % 5 == 4))
    return out


def write(root: Path, rng: np.random.Generator, scale: int = 1) -> None:
    records = _write_images(root, rng, IMAGES, 15000, qid=0, appearance=False)
    if scale > 1:  # drawn after the fixed images, from a generator of its own: those stay byte-identical
        extra = np.random.default_rng(int(rng.integers(2**62)))
        images = _extra_images((scale - 1) * len(IMAGES), extra)
        records += _write_images(root, extra, images, 60001, qid=len(records), appearance=True)
    write_json(root / JSON_NAME, records)


def _write_images(root: Path, rng: np.random.Generator, images: tuple | list, first_number: int, qid: int,
                  appearance: bool) -> list[dict[str, object]]:
    span = np.arange(first_number, first_number + 45000)
    numbers = sorted(int(v) for v in rng.choice(span, size=len(images), replace=False))
    records: list[dict[str, object]] = []
    for (kind, n_lesions, size, is_test), number in zip(images, numbers, strict=True):
        scan = phantom.scan_2d(rng, kind, n_lesions, size)
        image_name = f"synpic{number}.jpg"
        write_jpeg(root / IMAGE_DIR / image_name, scan.image)
        case_url = f"https://medpix.nlm.nih.gov/case?id={uuid.UUID(int=int(rng.integers(0, 2**62)))}"
        prefix = "test_" if is_test else ""
        questions = _questions(scan, rng) + (_appearance_questions(scan, rng) if appearance else [])
        for question, paraphrase, answer, answer_type, qtype in questions:
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
    return records
