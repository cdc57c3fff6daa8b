"""SLAKE: a semantically-labelled knowledge-enhanced bilingual medical VQA dataset (Liu et al., 2021).

Reads ``imgs/xmlab<N>/source.jpg`` and the split files ``train.json``, ``validate.json`` (also
spelt ``validation.json``) and ``test.json`` with rows img_id, img_name, question, answer, q_lang,
answer_type, content_type, modality, location, base_type, qid. ``--lang`` keeps English (``en``),
Chinese (``zh``) or all questions. The group is the image folder (``xmlab<N>``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
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

NAME = "slake"
MANIFEST = "slake"
SPLITS = "upstream"  # records carry the source's own split
SPLIT_FILES = {"train.json": "train", "validate.json": "val", "validation.json": "val", "test.json": "test"}
LANGS = ("en", "zh", "all")
EXAMPLE = f"vlhealth build slake /data/Slake1.0 --out shards/{NAME} --lang en"


@dataclass
class Options(VQAOptions):
    lang: str = field(default="en", metadata={"help": "Question language: en, zh or all."})


def _parser(split: str, file: str, lang: str) -> Any:
    def parse(row: Any, i: int) -> tuple[str, QA] | None:
        if not isinstance(row, dict):
            raise ValueError("bad row: not an object")
        missing = [k for k in ("img_name", "question", "answer") if k not in row]
        if missing:
            raise ValueError(f"bad row: lacks {', '.join(missing)}")
        q_lang = str(row.get("q_lang", "en")).strip().lower()
        if lang != "all" and q_lang != lang:
            return None
        qid = normalise_text(row.get("qid", f"{split}_{i}"))
        qa = QA(
            id=qid,
            question=text_value(row["question"], "question"),
            answer=clean_upstream_answer(text_value(row["answer"], "answer")),
            answer_type="closed" if str(row.get("answer_type", "")).strip().upper() == "CLOSED" else "open",
            split=split,
            modality=normalise_text(row.get("modality")) or None,
            body_part=normalise_text(row.get("location")).lower() or None,
            provenance={"file": file, "qid": qid},
            extra={k: normalise_text(row[k]) for k in ("q_lang", "content_type", "base_type") if k in row},
        )
        return f"imgs/{normalise_text(row['img_name'])}", qa

    return parse


def discover(ctx: BuildContext) -> Iterator[Item | Reject]:
    lang = ctx.options.lang
    if lang not in LANGS:
        raise ValueError(f"--lang must be one of {', '.join(LANGS)}, got {lang!r}")
    present = [f for f in SPLIT_FILES if (ctx.root / f).is_file()]
    if not present:
        raise FileNotFoundError(f"none of {', '.join(SPLIT_FILES)} in the source root")
    yield from discover_annotated(ctx, ((file, _parser(SPLIT_FILES[file], file, lang)) for file in present))


def process(item: Item, ctx: BuildContext) -> Iterator[Sample | Reject]:
    yield from process_image_item(item, ctx, NAME)
