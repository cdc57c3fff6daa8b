"""Held-out validation loss per task: fixed batches, scored in eval mode, without touching training.

Learning is read from a loss on data the optimizer never sees, the same batches every time: a
training-batch loss on small, heterogeneous micro-batches says more about which batch came up than
about the model (a stage-2 run read its "start" as 0.58 where its next seven steps averaged 1.7).

Where the batches come from
    Per task, the ``val`` split of every ``--shards`` source that has one. A source without a ``val``
    split for a task (VQA-RAD's release has only train and test; a ``vlhealth mix``) validates on a
    fixed slice of its *train* groups instead (:func:`~healthgpt.training.data.held_out`: 1 in 20
    patient/image groups, by a hash of the group id). No training reads that slice, in any source,
    whether validation is on or not (nor ``pretrain-text`` / ``pretrain-vision``), so switching
    validation on or off cannot change what is trained on, and a stage-2 mix drawn from sources that
    other stages train on validates only on groups no stage saw. The test split is never read.

    The examples are taken in key order, round-robin over the sources, encoded exactly as training
    encodes them (:meth:`TaskBatchStream._encode`) and collated into ``batches`` micro-batches of the
    training micro-batch size, once, at set-up.

Scoring
    ``model.eval()`` (no dropout) under ``torch.no_grad()`` with the RNG state forked and restored,
    so a validation pass consumes nothing of the training RNG stream: the training losses are the
    same bit for bit with and without it (``tests/test_validation.py``). The loss of a task is the
    mean over all label tokens of its batches (one big batch's loss).

Public API::

    (healthgpt.training.data: held_out(group, key) -> bool, the held-out train groups no training reads;
    holdout_streams(specs) -> {(source, task)}: the sources that validate on them, having no val split;
    is_validation(rec, key, lent) and validation_filter(folder): the same pool, for the evaluator)
    ValidationSet.build(data_cfg, tokenizer, preprocess, batches) -> ValidationSet | None
    ValidationSet.loss(model, device, amp=None, n_codes=None) -> {task: loss}
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from healthgpt.model.conversation import IGNORE_INDEX
from healthgpt.training.data import HOLDOUT_EVERY, TaskBatchStream, holdout_streams, is_validation
from vlhealth.schema import TASKS
from vlhealth.shards import TarReader

__all__ = ["ValidationSet"]

@dataclass
class ValidationSet:
    """Fixed validation micro-batches per task (collated like training batches)."""

    batches: dict[str, list[dict[str, Any]]]
    sources: dict[str, list[str]]  # task -> the sources and splits its examples came from

    @classmethod
    def build(cls, data_cfg: Any, tokenizer: Any, preprocess: Callable[[Sequence[Any]], torch.Tensor] | None,
              batches: int) -> ValidationSet | None:
        """``batches`` micro-batches per task of ``data_cfg``'s task(s); None when no source has any."""
        if batches < 1:
            return None
        # the stream only encodes and collates here; its tars were verified when training opened them
        stream = TaskBatchStream(dataclasses.replace(data_cfg, verify=False), tokenizer, preprocess)
        wanted = TASKS if data_cfg.task == "mixed" else (data_cfg.task,)
        lend = holdout_streams(data_cfg.specs)
        need = batches * data_cfg.batch_size
        out: dict[str, list[dict[str, Any]]] = {}
        used: dict[str, list[str]] = {}
        reader = TarReader()
        try:
            for task in wanted:
                examples, names = _collect(stream, reader, data_cfg.specs, task, lend, need)
                if examples:
                    size = data_cfg.batch_size
                    out[task] = [stream._collate(task, [[e] for e in examples[i:i + size]])
                                 for i in range(0, len(examples), size)]
                    used[task] = names
        finally:
            reader.close()
        return cls(out, used) if out else None

    @property
    def tasks(self) -> list[str]:
        return sorted(self.batches)

    def n_samples(self, task: str) -> int:
        return sum(b["n_samples"] for b in self.batches.get(task, []))

    @torch.no_grad()
    def loss(self, model: Any, device: torch.device | str, amp: Any = None, n_codes: int | None = None,
             forward: Callable[..., Any] | None = None) -> dict[str, float]:
        """Validation loss per task; the model's train/eval mode and every RNG are left as they were.
        ``forward``: what to call instead of ``model`` (its DDP/FSDP wrapper, which gathers sharded weights)."""
        forward = forward or model
        was_training = model.training
        tower_training = model.vision.tower.training
        devices = [device] if torch.device(device).type == "cuda" else []
        out: dict[str, float] = {}
        with torch.random.fork_rng(devices=devices):
            model.eval()
            try:
                for task, items in self.batches.items():
                    total, weight = 0.0, 0
                    for b in items:
                        n = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
                        with amp if amp is not None else contextlib.nullcontext():
                            res = forward(input_ids=b["input_ids"].to(device),
                                        attention_mask=b["attention_mask"].to(device),
                                        labels=b["labels"].to(device),
                                        pixel_values=None if b["pixel_values"] is None else b["pixel_values"].to(device),
                                        task=task, return_logits=False, n_codes=n_codes)
                        total += float(res.loss) * n
                        weight += n
                    out[task] = total / max(1, weight)
            finally:
                model.train(was_training)
                model.vision.tower.train(tower_training)
        return out


def _collect(stream: Any, reader: TarReader, specs: Sequence[Any], task: str, lend: set[tuple[int, str]],
             need: int) -> tuple[list[Any], list[str]]:
    """Up to ``need`` encoded ``task`` examples, round-robin over the sources, each in key order."""
    per_source: list[list[Any]] = []
    names: list[str] = []
    for i, spec in enumerate(specs):
        if spec.remote:
            continue
        lent = (i, task) in lend
        found = _source_examples(stream, reader, stream.sources[i], task, lent, need)
        if found:
            per_source.append(found)
            names.append(f"{spec.path.name} ({'1 in ' + str(HOLDOUT_EVERY) + ' train groups' if lent else 'val'})")
    examples: list[Any] = []
    k = 0
    while len(examples) < need and any(k < len(f) for f in per_source):
        examples.extend(f[k] for f in per_source if k < len(f))
        k += 1
    return examples[:need], names


def _source_examples(stream: Any, reader: TarReader, shards: Sequence[Any], task: str, lent: bool,
                     need: int) -> list[Any]:
    from healthgpt.training.sources import _load_json

    found: list[Any] = []
    members = stream.members[task][1:]
    for shard in shards:
        path = Path(shard.path)
        for key in sorted(reader.index(path).keys):
            rec = _load_json(reader.read(path, key, ("json",)), path, key)
            if rec.get("task") != task:
                continue
            if not is_validation(rec, key, lent):
                continue
            try:
                ex = stream._encode(path, key, rec, reader.read(path, key, members))
            except (ValueError, KeyError, TypeError):
                continue  # a bad sample is counted where training meets it
            if ex is not None:
                found.append(ex)
                if len(found) >= need:
                    return found
    return found
