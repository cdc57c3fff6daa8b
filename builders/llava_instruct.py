"""LLaVA-558k captions and LLaVA-v1.5 mix-665k instructions (Liu et al., 2023), as comprehension data.

Reads ``blip_laion_cc_sbu_558k.json`` (-> ``caption``, source ``llava_558k``; images under
``images/`` or the root) and ``llava_v1_5_mix665k.json`` (-> ``conversation``, source ``llava_665k``;
image paths with the prefixes coco/, gqa/, ocr_vqa/, textvqa/, vg/ relative to the root). Everything
is train. (``builders/llava_pretrain.py`` is the separate 558k *reconstruction* builder.)

Text-only records of 665k (no ``image``) are kept as text-only samples (a ``json`` member and no
image). Because the HF ``datasets`` WebDataset loader refuses folders whose samples carry
different members, they are built into their own folder: the default ``--text-only exclude``
writes the image records, a second run with ``--text-only only`` the text-only ones
(``--text-only include`` puts both in one folder, fine for the ``webdataset`` library).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from vlhealth.build import BuildContext, Item, Reject
from vlhealth.schema import Sample
from vlhealth.vqa import VQAOptions, discover_chats, process_chat_item

NAME = "llava_instruct"
MANIFEST = "llava_instruct"
SPLITS = "upstream"  # records carry the source's own split
FILES = {"blip_laion_cc_sbu_558k.json": ("llava_558k", "caption", ("images", "")),
         "llava_v1_5_mix665k.json": ("llava_665k", "conversation", ("",))}
EXAMPLE = (f"vlhealth build llava-instruct /data/llava --out shards/{NAME} && "
           f"vlhealth build llava-instruct /data/llava --text-only only --out shards/{NAME}_text")


@dataclass
class Options(VQAOptions):
    files: list[str] = field(default_factory=list, metadata={
        "help": "Which of blip_laion_cc_sbu_558k.json / llava_v1_5_mix665k.json to build (repeatable); default: both present."})
    text_only: str = field(default="exclude", metadata={
        "help": "Text-only records: 'exclude' (default), 'only' (build just them, into their own folder) or 'include'."})


def discover(ctx: BuildContext) -> Iterator[Item | Reject]:
    names = list(ctx.options.files) or [f for f in FILES if (ctx.root / f).is_file()]
    if not names:
        raise FileNotFoundError(f"none of {', '.join(FILES)} at the source root")
    for name in names:
        if name not in FILES:
            raise ValueError(f"--files: unknown file {name!r} (one of {', '.join(FILES)})")
        if not (ctx.root / name).is_file():
            yield Reject(name, "missing file: named by --files but not found")
            continue
        source, subtask, dirs = FILES[name]
        for entry in discover_chats(ctx, name, tag="", subtask=subtask, image_dirs=dirs,
                                    text_only=ctx.options.text_only):
            if isinstance(entry, Item):
                entry.data["source"] = source
                entry = Item(id=f"{source}-{entry.id}", group=entry.group, files=entry.files, data=entry.data)
            yield entry


def process(item: Item, ctx: BuildContext) -> Iterator[Sample | Reject]:
    yield from process_chat_item(item, ctx, item.data["source"])
