"""VQA-RAD: radiology visual question answering (Lau et al., 2018).

Reads ``VQA_RAD Dataset Public.json`` (rows with qid, image_name, image_organ, question, answer,
answer_type CLOSED/OPEN, phrase_type) and ``VQA_RAD Image Folder/``. The standard test split is the
rows whose phrase_type is ``test_freeform`` or ``test_para``; every other row is train (VQA-RAD has
no validation split). Numeric answers (``2``, ``2.0``) become text (``"2"``). Note that upstream
test questions ask about images that also have training questions: ``vlhealth check-leaks``
reports them, as it should.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vlhealth.build import BuildContext, Item, Reject
from vlhealth.schema import Sample
from vlhealth.vqa import (
    QA,
    VQAOptions,
    clean_upstream_answer,
    discover_annotated,
    normalise_text,
    process_image_item,
    text_value,
)

NAME = "vqa_rad"
MANIFEST = "vqa_rad"
SPLITS = "upstream"  # records carry the source's own split
JSON_NAME = "VQA_RAD Dataset Public.json"
IMAGE_DIR = "VQA_RAD Image Folder"
TEST_PHRASES = ("test_freeform", "test_para")
ORGANS = {"HEAD": "head", "CHEST": "chest", "ABD": "abdomen"}
EXAMPLE = f"vlhealth build vqa-rad /data/VQA_RAD --out shards/{NAME} --forms both"


@dataclass
class Options(VQAOptions):
    pass


def _qa(row: Any, i: int) -> tuple[str, QA]:
    if not isinstance(row, dict):
        raise ValueError("bad row: not an object")
    missing = [k for k in ("qid", "image_name", "question", "answer") if k not in row]
    if missing:
        raise ValueError(f"bad row: lacks {', '.join(missing)}")
    atype = str(row.get("answer_type", "")).strip().upper()
    answer = clean_upstream_answer(text_value(row["answer"], "answer"))
    phrase = str(row.get("phrase_type", "")).strip().lower()
    organ = str(row.get("image_organ", "")).strip().upper()
    qa = QA(
        id=normalise_text(row["qid"]),
        question=text_value(row["question"], "question"),
        answer=answer,
        answer_type="closed" if atype == "CLOSED" else "open",
        split="test" if phrase in TEST_PHRASES else "train",
        body_part=ORGANS.get(organ, organ.lower() or None),
        provenance={"file": JSON_NAME, "qid": normalise_text(row["qid"]), "phrase_type": phrase},
        extra={k: normalise_text(row[k]) for k in ("question_type",) if k in row},
    )
    return f"{IMAGE_DIR}/{normalise_text(row['image_name'])}", qa


def discover(ctx: BuildContext) -> Iterator[Item | Reject]:
    if not (ctx.root / JSON_NAME).is_file():
        raise FileNotFoundError(f"{JSON_NAME} not found in the source root")
    yield from discover_annotated(ctx, [(JSON_NAME, _qa)])


def process(item: Item, ctx: BuildContext) -> Iterator[Sample | Reject]:
    yield from process_image_item(item, ctx, NAME)
