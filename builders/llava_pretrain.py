"""LLaVA-Pretrain LCS-558K images -> image reconstruction samples (input image -> same image tokens).

Layout: ``blip_laion_cc_sbu_558k.json`` (rows ``id``, ``image``, ``conversations``) and the
images under ``images/`` (or at the root, as images.zip extracts). Each image gives one
``recon`` sample: the input is the upstream JPEG, byte for byte; the target is the image in RGB,
fitted to 256x256 (aspect kept, padded with black). This is the generation-side alignment data
of HealthGPT stage 1 (the comprehension side uses the captions: ``vlhealth build llava-instruct``).
Missing and unreadable images are refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlhealth.build import BuildContext, Item, Reject, Rejected
from vlhealth.limits import LimitError, read_image_file
from vlhealth.paths import root_relative
from vlhealth.schema import Record, Sample, image_format, safe_key
from vlhealth.volumes import fit_square

NAME = "llava_pretrain"
MANIFEST = "llava_pretrain"
GENERATES = True
EXAMPLE = "vlhealth build llava-pretrain /data/LLaVA-Pretrain --out shards/llava_recon --limit 50000"

ANNOTATIONS = "blip_laion_cc_sbu_558k.json"
SIZE = 256


@dataclass
class Options:
    limit: int = field(default=0, metadata={"help": "Use only the first N rows (sorted by id); 0 = all."})


def _image_root(root: Path) -> Path:
    return root / "images" if (root / "images").is_dir() else root


def discover(ctx: BuildContext) -> Iterator[Item | Reject]:
    ann = ctx.root / ANNOTATIONS
    if not ann.is_file():
        raise FileNotFoundError(f"{ctx.root.name}: no {ANNOTATIONS}")
    try:
        rows = json.loads(ann.read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ANNOTATIONS}: not valid JSON ({exc})") from exc
    images = _image_root(ctx.root)
    seen: set[str] = set()
    kept = 0
    # i is the row's position in the file (rejects point at it), the rows are taken in id order
    by_id = sorted(enumerate(rows), key=lambda ir: str(ir[1].get("id", "")) if isinstance(ir[1], dict) else "")
    for i, row in by_id:
        if ctx.options.limit and kept >= ctx.options.limit:
            break
        if not isinstance(row, dict) or not row.get("image") or not row.get("id"):
            yield Reject(f"{ANNOTATIONS}#{i}", "row without id or image")
            continue
        if root_relative(images / str(row["image"]), images) is None:  # "../x.jpg", "/abs/x.jpg"
            yield Reject(f"{ANNOTATIONS}#{i}", "image path leaves the image folder")
            continue
        ident = safe_key(str(row["id"]))
        if ident in seen:
            yield Reject(f"{ANNOTATIONS}#{i}", f"duplicate id {row['id']!r}")
            continue
        seen.add(ident)
        kept += 1
        yield Item(id=ident, group=ident, files=(ctx.rel(images / str(row["image"])),))


def process(item: Item, ctx: BuildContext) -> Iterator[Sample]:
    from PIL import UnidentifiedImageError

    rel = item.files[0]
    path = ctx.root / rel
    if not path.is_file():
        raise Rejected(rel, "image file is missing")
    try:
        data, opened = read_image_file(path, ctx.root, ctx.limits)
        image_format(data)
        with opened as img:
            rgb = np.asarray(img.convert("RGB"))
    except LimitError as exc:
        raise Rejected(rel, str(exc)) from exc
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise Rejected(rel, f"unreadable image ({str(exc)[:120]})") from exc
    key = f"{NAME}-{item.id}"
    record = Record(
        task="generation", subtask="recon", source=NAME, split=ctx.split_of(item.group),
        conversations=[{"from": "human", "value": "<image>\n" + ctx.template("recon", key)},
                       {"from": "gpt", "value": "<target_image>"}],
        group=item.group, license=ctx.license, modality="photo",
        provenance={"file": rel, "original_size": [int(rgb.shape[0]), int(rgb.shape[1])]},
    )
    yield Sample(key=key, record=record, input_image=data, target=fit_square(rgb, SIZE, order=1, pad_value=0))
