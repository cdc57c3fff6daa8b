"""Image reliance ("does the model look?"): the evaluation repeated with every input image swapped.

The evaluator (:mod:`healthgpt.evaluation.evaluate`) scores the model a second time with each test
image replaced by another evaluated sample's image **of the same task**, and the report puts that pass
beside the true-image numbers as the row ``model, shuffled images``. A model that reads its image
must do clearly worse with someone else's; one that answers from the text alone does not notice.

Which image replaces which (:func:`plan_donors`)
    A seeded derangement per task (comprehension, generation): no sample keeps its own image, and the
    same seed gives the same permutation. Inside a task, images move within the same *kind* of sample
    wherever that kind has at least two samples (generation: the same subtask and body part, with
    reconstruction split by target modality, as the report's rows; comprehension: the same source),
    so a swapped image is of the same kind and from another patient. Samples alone of their kind are
    deranged among themselves (a single one is spliced into another kind's cycle). Samples without an
    input image (text-only prompts) take no part. A task with fewer than two such samples cannot be
    deranged: it is said so (``notes``) and skipped.

What is scored
    Comprehension: the same answers and metrics with the swapped image (``close``/``open``/``all``/
    ``choice`` per benchmark). Generation: the greedy image's SSIM/PSNR/MSE (and HU metrics) against
    the true target, and the teacher-forced loss of the *true* target (:func:`teacher_forced_loss`:
    the sample encoded exactly as training encodes it, scored by the model's forward with labels, the
    loss training minimises) with the true image and with the swapped one. The shuffled pass decodes
    every generation sample a second time, so ``--shuffled-limit`` bounds it (per subtask and body
    part of each shard folder, like ``--generation-limit``); the comparisons in ``image_reliance``
    use only samples scored both ways.

Public API::

    derangement(keys, seed, *names) -> {key: donor key}
    plan_donors(entries, seed) -> (donors, notes)
    shuffled_selection(entries, donors, limit) -> [keys in stream order]
    teacher_forced_loss(model, sample, image, n_codes) -> (loss, n label tokens) | None
    reliance_summary(records, shuffled, info) -> report.json's ``image_reliance``
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from healthgpt.evaluation.answer_metrics import VQAItem, summarize_vqa
from healthgpt.evaluation.samples import benchmark_name, spread_selection

__all__ = ["RELIANCE_DEFINITION", "SHUFFLED_NAME", "ShuffleEntry", "derangement", "plan_donors",
           "reliance_summary", "shuffled_selection", "teacher_forced_loss", "token_weighted"]

SHUFFLED_NAME = "model, shuffled images"
RELIANCE_DEFINITION = (
    "the model scored again with each input image swapped for another evaluated sample's image of the same task "
    "(a seeded derangement: no sample keeps its own image; within the same subtask/body part for generation and "
    "the same source for comprehension wherever that kind has >= 2 samples); generation `loss` is the "
    "teacher-forced cross-entropy of the true target (its VQ codes, given prompt + input image) as training "
    "computes it, mean over label tokens")


@dataclass(frozen=True)
class ShuffleEntry:
    """One evaluated sample as the derangement sees it (collected while the samples stream past)."""

    key: str
    task: str
    kind: str  # generation: subtask[/body part]; comprehension: source
    has_image: bool
    tar: Any  # Path of the tar holding the sample (the donor image is read from it)
    limit_group: tuple[Any, ...]  # (shard folder, subtask, body part): what --shuffled-limit counts in
    group: str = ""  # the patient / image group: a donor from the same one would be a near copy


def _rng(seed: int, *names: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF] + [zlib.crc32(n.encode("utf-8")) for n in names])


def derangement(keys: Sequence[str], seed: int, *names: str,
                groups: Mapping[str, str] | None = None) -> dict[str, str]:
    """A seeded random derangement of ``keys`` (sorted first, so the stream order does not matter):
    ``{key: donor}`` with ``donor != key``; ``names`` (task, kind) make each group's draw its own.

    ``groups`` (key -> patient/image group): when no group holds more than half of the keys, no donor
    comes from its sample's own group (another slice of the same patient, another question on the same
    image, would be a near copy): the keys are laid out group by group (groups and members in seeded
    random order) and each takes the image of the key as many places on as the largest group has
    members. Otherwise (or without ``groups``) a uniform random derangement (rejection sampling)."""
    order = sorted(keys)
    if len(order) < 2:
        raise ValueError("a derangement needs at least two samples")
    rng = _rng(seed, *names)
    if groups is not None:
        members: dict[str, list[str]] = defaultdict(list)
        for k in order:
            members[str(groups.get(k, k))].append(k)
        largest = max(len(v) for v in members.values())
        if len(members) > 1 and 2 * largest <= len(order):
            layout = [k for g in rng.permutation(sorted(members)) for k in rng.permutation(members[str(g)])]
            n = len(layout)
            return {str(layout[i]): str(layout[(i + largest) % n]) for i in range(n)}
    ident = np.arange(len(order))
    while True:  # rejection sampling: about e draws on average, uniform over derangements
        perm = rng.permutation(len(order))
        if not bool(np.any(perm == ident)):
            return {k: order[int(j)] for k, j in zip(order, perm, strict=True)}


def plan_donors(entries: Sequence[ShuffleEntry], seed: int) -> tuple[dict[str, str], list[str]]:
    """``{key: key of the sample whose image it gets}`` for every sample that takes part, and notes on
    what could not (see the module docstring for the rule)."""
    donors: dict[str, str] = {}
    notes: list[str] = []
    tasks: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    group_of = {e.key: e.group or e.key for e in entries}
    no_image: dict[str, int] = defaultdict(int)
    for e in entries:
        if e.has_image:
            tasks[e.task][e.kind].append(e.key)
        else:
            no_image[e.task] += 1
    for task, n in sorted(no_image.items()):
        notes.append(f"{task}: {n} sample(s) without an input image take no part")
    for task in sorted({e.task for e in entries}):
        kinds = tasks.get(task, {})
        total = sum(len(v) for v in kinds.values())
        if total < 2:
            notes.append(f"{task}: {total} sample(s) with an image; one sample cannot be deranged: "
                         "no shuffled-image pass for this task")
            continue
        singles: list[str] = []
        for kind in sorted(kinds):
            if len(kinds[kind]) >= 2:
                donors.update(derangement(kinds[kind], seed, task, kind, groups=group_of))
            else:
                singles += kinds[kind]
        if len(singles) >= 2:
            donors.update(derangement(singles, seed, task, "(alone of their kind)"))
        elif singles:  # splice the lone sample into another kind's cycle: x takes y's donor, y takes x's image
            x = singles[0]
            placed = sorted(k for ks in kinds.values() if len(ks) >= 2 for k in ks)
            y = placed[int(_rng(seed, task, "(splice)").integers(len(placed)))]
            donors[x], donors[y] = donors[y], x
    same = sum(group_of[k] == group_of[d] for k, d in donors.items())
    notes.append(f"{same} of {len(donors)} donor images come from the sample's own patient/image group")
    return donors, notes


def shuffled_selection(entries: Sequence[ShuffleEntry], donors: Mapping[str, str], limit: int | None) -> list[str]:
    """The keys the shuffled pass scores, in stream order: every sample with a donor, generation cut at
    ``limit`` per subtask and body part of each shard folder, spread over patients as the true pass is
    (:func:`~healthgpt.evaluation.samples.spread_selection`)."""
    cells: dict[tuple[Any, ...], list[tuple[str, str]]] = defaultdict(list)
    for e in entries:
        if e.key in donors and e.task == "generation":
            cells[e.limit_group].append((e.group or e.key, e.key))
    keep = None if limit is None else {k for items in cells.values() for k in spread_selection(items, limit)}
    return [e.key for e in entries if e.key in donors and (e.task != "generation" or keep is None or e.key in keep)]


# -------------------------------------------------------------------------------- teacher-forced loss


def _pil(image: Any) -> Any:
    from PIL import Image

    from healthgpt.model.vision import decode_input_image

    if isinstance(image, bytes | bytearray):
        return decode_input_image(bytes(image), "input image")
    arr = np.asarray(image)
    return Image.fromarray(arr)


def teacher_forced_loss(model: Any, sample: Any, image: Any, n_codes: int | None = None) -> tuple[float, int] | None:
    """Cross-entropy of ``sample``'s target (``target.vq.npy``) given its prompt and ``image``, exactly as
    training computes it: the conversation encoded as ``TaskBatchStream._encode`` does (same template,
    image positions, labels), the image decoded as training decodes it, and the model's forward with
    labels (``n_codes`` when the VQGAN has fewer than 8192 codes). Returns (mean loss over the label
    tokens, their number), or None for a sample without target codes. Run it under ``torch.no_grad``."""
    import torch

    from healthgpt.model.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID, encode_conversation

    if sample.target_vq is None:
        return None
    rec = sample.record
    enc = encode_conversation(model.tokenizer, [dict(t) for t in rec.conversations], template=model.template,
                              vq_indices=sample.target_vq, max_len=1 << 30, image_tokens=model.vision.num_patches)
    ids, labels = enc["input_ids"], enc["labels"]
    n_img = int((ids == IMAGE_TOKEN_ID).sum())
    if n_img and image is None:
        return None
    device = model.device
    pixel_values = model.vision.preprocess([_pil(image)]).to(device) if n_img else None
    out = model(input_ids=ids[None].to(device), attention_mask=torch.ones_like(ids)[None].to(device),
                labels=labels[None].to(device), pixel_values=pixel_values, task="generation",
                return_logits=False, n_codes=n_codes)
    return float(out.loss), int((labels[1:] != IGNORE_INDEX).sum())


def token_weighted(records: Sequence[Mapping[str, Any]], field: str = "loss") -> float | None:
    """Mean loss over all label tokens of ``records`` (one big batch's loss, as validation reports it)."""
    pairs = [(r[field], r.get("n_loss_tokens") or 1) for r in records
             if r.get(field) is not None and math.isfinite(r[field])]
    if not pairs:
        return None
    return float(sum(v * n for v, n in pairs) / sum(n for _, n in pairs))


# -------------------------------------------------------------------------------- report


def _items(records: Sequence[Mapping[str, Any]]) -> list[VQAItem]:
    items = []
    for r in records:
        item = VQAItem(key=r["key"], benchmark=benchmark_name(r["source"]), answer_type=r["answer_type"],
                       prediction=r["prediction"], reference=r["reference"], options=r.get("options"),
                       modality=r.get("modality"), subtask=r.get("subtask", "vqa"))
        try:
            item.score  # noqa: B018 - left out like the model's unscorable items
        except ValueError:
            continue
        items.append(item)
    return items


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _generation_pair(true: Sequence[Mapping[str, Any]], shuf: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {"n": len(shuf),
            "ssim_true": _mean([r["metrics"]["ssim"] for r in true]),
            "ssim_shuffled": _mean([r["metrics"]["ssim"] for r in shuf]),
            "loss_true": token_weighted(true), "loss_shuffled": token_weighted(shuf),
            "n_loss": sum(1 for r in shuf if r.get("loss") is not None)}


def reliance_summary(records: Sequence[Mapping[str, Any]], shuffled: Sequence[Mapping[str, Any]] | None,
                     info: Mapping[str, Any], group_of: Any) -> dict[str, Any]:
    """report.json's ``image_reliance``: true-image vs shuffled-image numbers on the same samples.

    ``records``: the model's predictions; ``shuffled``: the shuffled pass (None: not run); ``info``:
    ``seed``, ``notes``, ``status``; ``group_of(record)``: a generation record's report row name."""
    out: dict[str, Any] = {"definition": RELIANCE_DEFINITION, **dict(info)}
    if shuffled is None:
        return out
    by_key = {r["key"]: r for r in records}
    pairs = [(by_key[s["key"]], s) for s in shuffled if s["key"] in by_key]
    comp = [(t, s) for t, s in pairs if t["task"] == "comprehension"]
    gen = [(t, s) for t, s in pairs if t["task"] == "generation"]
    out["n_same_kind"] = sum(1 for _, s in pairs if s.get("donor_same_kind"))
    out["comprehension"] = {"n": len(comp), "true": summarize_vqa(_items([t for t, _ in comp])),
                            "shuffled": summarize_vqa(_items([s for _, s in comp]))} if comp else None
    groups: dict[str, list[tuple[Mapping[str, Any], Mapping[str, Any]]]] = defaultdict(list)
    for t, s in gen:
        groups[group_of(t)].append((t, s))
    out["generation"] = {g: _generation_pair([t for t, _ in v], [s for _, s in v]) for g, v in sorted(groups.items())}
    out["generation_pooled"] = _generation_pair([t for t, _ in gen], [s for _, s in gen]) if gen else None
    return out


def load_members_image(members: Mapping[str, bytes]) -> tuple[str, bytes] | None:
    """The input image member (name, bytes) of a sample, if it has one."""
    for name in ("input.png", "input.jpg"):
        if name in members:
            return name, members[name]
    return None


def with_image(members: Mapping[str, bytes], donor: tuple[str, bytes]) -> dict[str, bytes]:
    """``members`` with the input image replaced by the donor's (its own member name and format)."""
    out = {k: v for k, v in members.items() if k not in ("input.png", "input.jpg")}
    out[donor[0]] = donor[1]
    return out

