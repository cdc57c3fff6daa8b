"""MIMIC-CXR-VQA: chest X-ray VQA over MIMIC-CXR-JPG (Bae et al., 2023). Credentialed data.

Reads ``mimiccxrvqa/dataset/{train,valid,test}.json`` (rows with idx, image_id, image_path relative
to MIMIC-CXR-JPG ``files/``, question, semantic_type verify/choose/query, content_type, answer as a
list) and the images from MIMIC-CXR-JPG (``--mimic-cxr-jpg``, default: the source root, which then
holds ``files/p10/...``). ``verify`` questions are closed (yes/no), the others open; a list answer is
joined with ``", "`` and an empty list of a choose/query question means ``none``.

MIMIC data is credentialed (PhysioNet): shards built from it must never be published.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlhealth.build import BuildContext, Item, Reject
from vlhealth.limits import check_text_value
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

NAME = "mimic_cxr_vqa"
MANIFEST = "mimic_cxr_vqa"
SPLITS = "upstream"  # records carry the source's own split
SPLIT_FILES = {"train.json": "train", "valid.json": "val", "test.json": "test"}
EXAMPLE = (f"vlhealth build mimic-cxr-vqa /data/mimic-cxr-vqa --mimic-cxr-jpg /data/physionet.org/files/mimic-cxr-jpg/2.0.0 "
           f"--out shards/{NAME}")


@dataclass
class Options(VQAOptions):
    mimic_cxr_jpg: str = field(default="", metadata={
        "path": True,
        "help": "MIMIC-CXR-JPG root (the folder holding files/); default: the source root."})


def dataset_dir(root: Path) -> str:
    for rel in ("mimiccxrvqa/dataset", "dataset", ""):
        if (root / rel / "train.json").is_file() or (root / rel / "test.json").is_file():
            return f"{rel}/" if rel else ""
    raise FileNotFoundError("no mimiccxrvqa/dataset/{train,valid,test}.json under the source root")


def _parser(split: str, file: str) -> Any:
    def parse(row: Any, i: int) -> tuple[str, QA]:
        if not isinstance(row, dict):
            raise ValueError("bad row: not an object")
        missing = [k for k in ("image_path", "question", "answer") if k not in row]
        if missing:
            raise ValueError(f"bad row: lacks {', '.join(missing)}")
        semantic = normalise_text(row.get("semantic_type")).lower()
        raw = check_text_value(row["answer"], "answer", allow_list=True)  # list answers are MIMIC-CXR-VQA's own
        if isinstance(raw, list) and not [a for a in raw if normalise_text(a)] and semantic in ("choose", "query"):
            answer = "none"
        else:
            answer = clean_upstream_answer(raw)
        image = normalise_text(row["image_path"]).lstrip("/")
        if image.startswith("files/"):
            image = image[len("files/"):]
        idx = normalise_text(row.get("idx", i))
        qa = QA(id=f"{split}-{idx}", question=text_value(row["question"], "question"), answer=answer,
                answer_type="closed" if semantic == "verify" else "open", split=split, modality="X-ray",
                body_part="chest", provenance={"file": file, "idx": idx},
                extra={k: normalise_text(row[k]) for k in ("semantic_type", "content_type", "template") if k in row})
        return f"files/{image}", qa

    return parse


def discover(ctx: BuildContext) -> Iterator[Item | Reject]:
    base = dataset_dir(ctx.root)
    files = [(base + name, split) for name, split in SPLIT_FILES.items() if (ctx.root / (base + name)).is_file()]
    yield from discover_annotated(ctx, ((file, _parser(split, file)) for file, split in files))


def process(item: Item, ctx: BuildContext) -> Iterator[Sample | Reject]:
    jpg_root = Path(ctx.options.mimic_cxr_jpg) if ctx.options.mimic_cxr_jpg else ctx.root
    yield from process_image_item(item, ctx, NAME, image_path=jpg_root / item.data["image"])
