"""PathVQA: pathology visual question answering (He et al., 2020).

Reads ``pvqa/images/{train,val,test}/<image>.jpg`` and ``pvqa/qas/{split}/{split}_qa.pkl`` (a
pickled list of dicts with image, question, answer). The pickles are opened with a restricted
unpickler that only admits builtin containers and scalars. Questions answered yes/no are closed,
all others open. PathVQA rows have no id: the key is ``pathvqa-<split>-<row number>``. The source
root is the folder holding ``pvqa/`` (or ``pvqa/`` itself).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlhealth.build import BuildContext, Item, Reject, Rejected
from vlhealth.schema import Sample
from vlhealth.vqa import (
    QA,
    VQAOptions,
    clean_upstream_answer,
    is_yes_no,
    items_by_image,
    load_pickle,
    normalise_text,
    process_image_item,
    rows_to_reject,
    text_value,
)

NAME = "pathvqa"
MANIFEST = "pathvqa"
SPLITS = "upstream"  # records carry the source's own split
SPLIT_NAMES = ("train", "val", "test")
EXAMPLE = f"vlhealth build pathvqa /data/PathVQA --out shards/{NAME}"


@dataclass
class Options(VQAOptions):
    pass


def base_of(root: Path) -> str:
    """``"pvqa/"`` when the root holds ``pvqa/``, ``""`` when the root is ``pvqa/`` itself."""
    return "pvqa/" if (root / "pvqa").is_dir() else ""


def _qa(row: Any, i: int, split: str, file: str) -> tuple[str, QA]:
    if not isinstance(row, dict):
        raise ValueError("bad row: not a dict")
    missing = [k for k in ("image", "question", "answer") if k not in row]
    if missing:
        raise ValueError(f"bad row: lacks {', '.join(missing)}")
    image = normalise_text(row["image"])
    if not image:
        raise ValueError("bad row: empty image name")
    answer = clean_upstream_answer(text_value(row["answer"], "answer"))
    qid = f"{split}-{i:06d}"
    qa = QA(id=qid, question=text_value(row["question"], "question"), answer=answer,
            answer_type="closed" if is_yes_no(answer) else "open", split=split, modality="pathology",
            provenance={"file": file, "row": i})
    name = image if "." in image.rsplit("/", 1)[-1] else f"{image}.jpg"
    return f"images/{split}/{name}", qa


def discover(ctx: BuildContext) -> Iterator[Item | Reject]:
    base = base_of(ctx.root)
    entries = []
    found = False
    for split in SPLIT_NAMES:
        rel = f"qas/{split}/{split}_qa.pkl"
        path = ctx.root / base / rel
        if not path.is_file():
            continue
        found = True
        try:
            rows = load_pickle(path, base + rel, ctx.root, ctx.limits)
        except Rejected as exc:
            yield Reject(exc.file, exc.reason)
            continue
        if not isinstance(rows, list):
            yield Reject(base + rel, f"bad pickle: expected a list of dicts, got {type(rows).__name__}")
            continue
        for i, row in enumerate(rows):
            try:
                image, qa = _qa(row, i, split, base + rel)
            except ValueError as exc:
                yield rows_to_reject(base + rel, i, exc)
                continue
            entries.append((image, qa, base + rel))
    if not found:
        raise FileNotFoundError("no pvqa/qas/<split>/<split>_qa.pkl under the source root")
    yield from items_by_image(entries, image_base=base)


def process(item: Item, ctx: BuildContext) -> Iterator[Sample | Reject]:
    yield from process_image_item(item, ctx, NAME)
