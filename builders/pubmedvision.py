"""PubMedVision: 1.3M medical VQA pairs from PubMed images, reformatted by GPT-4V (Chen et al., 2024).

Reads ``PubMedVision_Alignment_VQA.json`` (-> ``caption``) and ``PubMedVision_InstructionTuning_VQA.json``
(-> ``conversation``): rows with id, image (a **list** of paths relative to the root, e.g.
``images/pmc_....jpg``), conversations, modality, body_part. ``<image>`` is added to the first human
turn where missing; records with several images are dropped and counted (``multi-image``, as in the
paper). Everything is train.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vlhealth.build import BuildContext, Item, Reject
from vlhealth.schema import Sample
from vlhealth.vqa import VQAOptions, discover_chats, normalise_text, process_chat_item

NAME = "pubmedvision"
MANIFEST = "pubmedvision"
SPLITS = "upstream"  # records carry the source's own split
FILES = {"PubMedVision_Alignment_VQA.json": ("alignment", "caption"),
         "PubMedVision_InstructionTuning_VQA.json": ("instruction", "conversation")}
EXAMPLE = f"vlhealth build pubmedvision /data/PubMedVision --out shards/{NAME}"


@dataclass
class Options(VQAOptions):
    pass


def _meta(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key in ("modality", "body_part"):
        value = normalise_text(row.get(key))
        if value:
            out[key] = value
    return out


def discover(ctx: BuildContext) -> Iterator[Item | Reject]:
    present = [f for f in FILES if (ctx.root / f).is_file()]
    if not present:
        raise FileNotFoundError(f"none of {', '.join(FILES)} at the source root")
    for name in present:
        tag, subtask = FILES[name]
        yield from discover_chats(ctx, name, tag=tag, subtask=subtask, meta=_meta)


def process(item: Item, ctx: BuildContext) -> Iterator[Sample | Reject]:
    yield from process_chat_item(item, ctx, NAME)
