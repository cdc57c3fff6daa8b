"""LLaVA-Med: biomedical image-text alignment and instruction data from PMC (Li et al., 2023).

Reads the JSON files at the source root whose names start with ``llava_med_`` (alignment:
``llava_med_alignment_500k.json`` -> ``caption``; instruction: ``llava_med_instruct_*.json`` ->
``conversation``), rows with id, image, conversations (the misspelt ``conversatons`` of some
releases is accepted) and the images under ``images/`` (or the root). Everything is train:
LLaVA-Med's evaluation sets are separate. Pick files with ``--files`` (60k and 60k_inline_mention
are two renderings of the same conversations: build one of them).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from vlhealth.build import BuildContext, Item, Reject
from vlhealth.schema import Sample
from vlhealth.vqa import VQAOptions, discover_chats, process_chat_item

NAME = "llava_med"
MANIFEST = "llava_med"
SPLITS = "upstream"  # records carry the source's own split
PREFIX = "llava_med_"
EXAMPLE = f"vlhealth build llava-med /data/llava_med --files llava_med_instruct_60k_inline_mention.json --out shards/{NAME}"


@dataclass
class Options(VQAOptions):
    files: list[str] = field(default_factory=list, metadata={
        "help": "Annotation files at the root to build (repeatable); default: every llava_med_*.json / .jsonl."})


def tag_of(name: str) -> str:
    stem = name.split(".")[0]
    return stem[len(PREFIX):] if stem.startswith(PREFIX) else stem


def discover(ctx: BuildContext) -> Iterator[Item | Reject]:
    names = list(ctx.options.files) or sorted(
        p.name for p in ctx.root.iterdir() if p.name.startswith(PREFIX) and p.suffix in (".json", ".jsonl"))
    if not names:
        raise FileNotFoundError("no llava_med_*.json annotation file at the source root")
    for name in names:
        if not (ctx.root / name).is_file():
            yield Reject(name, "missing file: named by --files but not found")
            continue
        subtask = "caption" if "alignment" in name else "conversation"
        yield from discover_chats(ctx, name, tag=tag_of(name), subtask=subtask, image_dirs=("images", ""))


def process(item: Item, ctx: BuildContext) -> Iterator[Sample | Reject]:
    yield from process_chat_item(item, ctx, NAME)
