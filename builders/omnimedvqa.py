"""OmniMedVQA: a large medical VQA evaluation benchmark (Hu et al., 2024). Test split only.

Reads ``QA_information/{Open-access,Restricted-access}/<Dataset>.json`` (rows with question_id,
dataset, question_type, question, option_A..option_D, gt_answer as the option's text, image_path
relative to the source root, and ``modality_type`` — some files say ``modality``) and the images
under ``Images/``. Every item is single-choice with its upstream options; a gt_answer that is none
of the options is refused. ``--access open`` skips the Restricted-access part.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vlhealth.build import BuildContext, Item, Reject
from vlhealth.schema import Sample
from vlhealth.vqa import QA, VQAOptions, discover_annotated, normalise_text, process_image_item, text_value

NAME = "omnimedvqa"
MANIFEST = "omnimedvqa"
SPLITS = "upstream"  # records carry the source's own split
PARTS = ("Open-access", "Restricted-access")
OPTION_KEYS = ("option_A", "option_B", "option_C", "option_D", "option_E")
EXAMPLE = f"vlhealth build omnimedvqa /data/OmniMedVQA --out shards/{NAME}"


@dataclass
class Options(VQAOptions):
    access: str = field(default="all", metadata={"help": "Which parts: 'open' (Open-access only) or 'all'."})


def _parser(file: str, dataset: str) -> Any:
    def parse(row: Any, i: int) -> tuple[str, QA]:
        if not isinstance(row, dict):
            raise ValueError("bad row: not an object")
        missing = [k for k in ("question", "gt_answer", "image_path") if k not in row]
        if missing:
            raise ValueError(f"bad row: lacks {', '.join(missing)}")
        options = [normalise_text(row[k]) for k in OPTION_KEYS if normalise_text(row.get(k))]
        modality = normalise_text(row.get("modality_type") or row.get("modality")) or None
        qid = normalise_text(row.get("question_id")) or f"{dataset}-{i}"
        qa = QA(id=qid, question=text_value(row["question"], "question"), answer=text_value(row["gt_answer"], "answer"),
                answer_type="choice", split="test", options=options, modality=modality,
                provenance={"file": file, "question_id": qid},
                extra={"dataset": normalise_text(row.get("dataset")) or dataset,
                       **({"question_type": normalise_text(row["question_type"])} if "question_type" in row else {})})
        image = normalise_text(row["image_path"])
        while image.startswith("./"):  # a leading "./" only; "../" stays and is refused as unsafe
            image = image[2:]
        return image, qa

    return parse


def discover(ctx: BuildContext) -> Iterator[Item | Reject]:
    if ctx.options.access not in ("open", "all"):
        raise ValueError(f"--access must be 'open' or 'all', got {ctx.options.access!r}")
    parts = PARTS[:1] if ctx.options.access == "open" else PARTS
    files = sorted(p for part in parts for p in (ctx.root / "QA_information" / part).glob("*.json"))
    if not files:
        raise FileNotFoundError("no QA_information/<part>/<Dataset>.json under the source root")
    yield from discover_annotated(ctx, ((ctx.rel(path), _parser(ctx.rel(path), path.stem)) for path in files))


def process(item: Item, ctx: BuildContext) -> Iterator[Sample | Reject]:
    yield from process_image_item(item, ctx, NAME)
