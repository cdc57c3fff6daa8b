"""Streaming training data: WebDataset shard folders -> task-homogeneous, padded/packed batches.

Reading
    Shards are the project's WebDataset tars (``vlhealth.shards``). Instead of streaming every
    byte of every tar through a shuffle buffer, each tar's member offsets are indexed once (tar
    headers only) and samples are read by seeking to the members they need. That gives three
    things a plain ``webdataset`` pipeline cannot: exact, cheap resume (the data position is a
    few counters, fast-forwarded arithmetically from the sample counts in ``index.json``); exact
    node/worker splitting (disjoint data on every rank); and member-level laziness (a generation
    sample reads ``json``, ``input.*`` and ``target.vq.npy`` and never touches ``target.png``; a
    comprehension sample reads ``json`` and ``input.*``). This is the default for local shard
    folders; shards elsewhere are read in the streaming mode below.

Streaming mode (``webdataset``)
    A ``--shards`` value that is a URL or pattern (``https://host/vqa-{000000..000099}.tar``,
    ``pipe:curl -s https://...``, ``hf://...``, ``a.tar::b.tar``; ``file://`` = a local path; weight
    after the last colon as usual), or any source when ``DataConfig.streaming`` is set (``healthgpt
    train --stream``), is read by a ``webdataset`` pipeline per source and reading slot: the
    expanded shard list is split by node and worker (``shards[slot::n_slots]``; with fewer shards
    than slots every slot resamples all of them, not disjoint), shards are *resampled* (drawn with
    replacement, forever) and samples pass a shuffle buffer (``shuffle_buffer``). Samples of
    another split are skipped; decoding, tokenisation, batching (one task per micro-batch, the
    same ``(seed, m)`` draw of the stream) and collation are the local mode's. Task weights: a
    local folder's come from its counts as in the local mode; a URL source's task mix is unknown,
    so in ``mixed`` training its micro-batch takes the task of its next sample (others wait in a
    bounded buffer; ranks may then run different tasks at one step, which DDP's
    ``find_unused_parameters`` handles). Resume: the stream *restarts* (a new shuffle seeded by
    the batches made so far); only local shards in the default mode resume at the exact data
    position.

Order ("resampled and shuffled")
    Each ``--shards`` folder is a *source* with a mixing weight. Its shards are split over the
    ``world_size x num_workers`` reading *slots*: whole shards per slot when there are at least as
    many shards as slots, else every ``n_slots``-th sample. A slot reads its part forever, in
    passes (epochs); every pass draws a new shard order and a new sample order inside each shard
    from ``(seed, source, slot, pass)``. Samples of another split (default: only ``train``) or
    another task are skipped.

Batches
    A micro-batch is all one task. Micro-batch ``m`` (counted over a rank's stream) draws its
    (source, task) stream by weight from ``(seed, m)``, the same on every rank, so in ``mixed``
    training every rank runs the same task at the same step (no idle DDP buckets). ``pack=False``
    right-pads ``batch_size`` samples to the longest; ``pack=True`` fills ``batch_size`` rows of up
    to ``max_len`` positions with whole samples (an ``<image>`` counts as ``image_tokens``
    positions; samples attend across their row, positions run on: "naive" packing).

Tokenisation
    ``healthgpt.model.conversation.encode_conversation`` with the preset's template: labels only on gpt
    responses, ``<target_image>`` expanded from ``target.vq.npy``. A generation sample whose
    target would be cut by ``max_len`` is skipped (a cut image is no target); comprehension
    samples are truncated. Images go through the model's own pre-processing
    (``HierarchicalVision.preprocess``: pad to square + CLIP processor), by default through
    :class:`FastClipPreprocessor`, which gives the same numbers without the processor's overhead.

Resume
    ``TaskBatchStream`` yields dicts with ``state`` (the producing worker's position *after* the
    batch) and ``worker``; :class:`LoaderState` tracks what the trainer consumed and rebuilds the
    loader at exactly the next batch (workers are rotated so that the round-robin order of the
    DataLoader continues where it stopped).

Where samples come from (local tars by seeking, or streamed URLs) is :mod:`healthgpt.training.sources`,
behind one interface (``RowSource``); this module decides the order, batches, tokenisation and resume.

Public API::

    parse_shard_spec("DIR[:WEIGHT]" | "URL-PATTERN[:WEIGHT]") -> ShardSpec;  is_shard_url(text) -> bool
    DataConfig(shards, task, batch_size, max_len=2048, pack=False, split="train", seed=0,
               num_workers=0, template="chatml", image_tokens=576, streaming=False, shuffle_buffer=1000)
    VisionPreprocessor(processor, fast=False) / VisionPreprocessor.from_model(model, fast=True)
    FastClipPreprocessor.from_processor(processor) -> FastClipPreprocessor | None
    TaskBatchStream(cfg, tokenizer, preprocess, rank=0, world_size=1, state=None)
    make_loader(cfg, tokenizer, preprocess, rank=0, world_size=1, state=None) -> (DataLoader, LoaderState)
    LoaderState.update(batch) / .to_dict() / .from_dict()
    source_sample_counts(specs, split) -> dict[(source_index, task), int]
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from healthgpt.model.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID, encode_conversation
from healthgpt.model.vision import FastClipPreprocessor, VisionPreprocessor, decode_input_image
from healthgpt.training.sources import (
    LocalTarRows,
    RowSource,
    StreamedRows,
    _Example,
    _load_json,
    _rng,
    _Shard,
    _url_name,
    slot_views,
)
from vlhealth.schema import SUBTASKS, TASKS
from vlhealth.shards import (
    BUILD_NAME,
    INDEX_NAME,
    ShardError,
    TarIndex,
    TarReader,
    list_shards,
    load_index,
    verify_tars,
)

__all__ = [
    "HOLDOUT_EVERY",
    "MAX_NAMED_BAD",
    "DataConfig",
    "LoaderState",
    "ShardSpec",
    "FastClipPreprocessor",
    "TaskBatchStream",
    "VisionPreprocessor",
    "is_shard_url",
    "make_loader",
    "parse_shard_spec",
    "held_out",
    "holdout_streams",
    "is_validation",
    "validation_filter",
    "source_sample_counts",
]

log = logging.getLogger(__name__)

TRAIN_TASKS = ("comprehension", "generation", "mixed")
_SUBTASK_TASK = {sub: task for task, subs in SUBTASKS.items() for sub in subs}
_MAX_OPEN_FILES = 16


# ------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class ShardSpec:
    """One ``--shards`` argument: a shard folder (or a single ``.tar``) and its mixing weight, or
    (``url`` set) a shard URL pattern read in streaming mode; ``path`` then only names it."""

    path: Path
    weight: float = 1.0
    url: str | None = None

    def __post_init__(self) -> None:
        if not (self.weight > 0 and np.isfinite(self.weight)):
            raise ValueError(f"shards {self.path.name}: mixing weight must be a positive number, got {self.weight}")

    @property
    def remote(self) -> bool:
        return self.url is not None


_BRACE = re.compile(r"\{[^{}]*\.\.[^{}]*\}")


def is_shard_url(text: str) -> bool:
    """A URL or pattern for streaming mode: ``pipe:...``, ``scheme://...`` (``file://`` included),
    a brace range ``{000000..000099}`` or a ``::``-separated list."""
    return text.startswith("pipe:") or "://" in text or bool(_BRACE.search(text)) or "::" in text


def parse_shard_spec(text: str | os.PathLike[str] | ShardSpec) -> ShardSpec:
    """``"demo/shards/vqa_rad"`` or ``"demo/shards/vqa_rad:2.5"`` (weight after the last colon);
    URLs and patterns (:func:`is_shard_url`) become streaming sources, e.g.
    ``"https://host/data/vqa-{000000..000009}.tar:0.5"`` or ``"pipe:curl -s https://host/x.tar"``."""
    if isinstance(text, ShardSpec):
        return text
    raw = os.fspath(text)
    weight = 1.0
    head, sep, tail = raw.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
            raw = head
        except ValueError:
            pass  # the colon belongs to the path / URL
    if is_shard_url(raw):
        return ShardSpec(Path(_url_name(raw)), weight, url=raw)
    return ShardSpec(Path(raw), weight)


@dataclass
class DataConfig:
    shards: Sequence[ShardSpec | str]
    task: str  # comprehension | generation | mixed
    batch_size: int
    max_len: int = 2048
    pack: bool = False
    split: str = "train"
    seed: int = 0
    num_workers: int = 0
    template: str = "chatml"
    image_tokens: int = 576  # positions one <image> occupies in the model (vision.num_patches)
    pixel_newline: bool = False
    streaming: bool = False  # force the webdataset streaming mode (URLs always stream)
    shuffle_buffer: int = 1000  # streaming mode: samples in the shuffle buffer
    verify: bool = True  # compare each local tar's sha256 with its index.json before reading it
    specs: list[ShardSpec] = field(init=False)

    def __post_init__(self) -> None:
        if self.task not in TRAIN_TASKS:
            raise ValueError(f"task must be one of {TRAIN_TASKS}, got {self.task!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not self.shards:
            raise ValueError("no shard folders given (--shards DIR[:WEIGHT], may repeat)")
        self.specs = [parse_shard_spec(s) for s in self.shards]
        if any(s.remote for s in self.specs):
            self.streaming = True


# ------------------------------------------------------------------------------------ sources


def _source_shards(spec: ShardSpec, verify: bool = False) -> list[_Shard]:
    path = spec.path
    if not path.exists():
        raise FileNotFoundError(f"--shards {path.name}: no such folder or tar")
    if verify:
        verify_tars(list_shards(path))
    counts: dict[str, int] = {}
    if path.is_dir() and (path / INDEX_NAME).is_file():
        counts = {s["name"]: int(s["samples"]) for s in load_index(path)["shards"]}
    tars = list_shards(path)
    if not tars:
        raise ShardError(path, "no .tar shards found")
    out: list[_Shard] = []
    first = 0
    for tar in tars:
        n = counts.get(tar.name)
        if n is None:  # no index.json: count from the tar headers
            n = len(TarIndex(tar).keys)
        if not tar.is_file():
            raise ShardError(tar, "listed in index.json but missing")
        out.append(_Shard(tar, n, first))
        first += n
    if first == 0:
        raise ShardError(path, "the shards hold no samples")
    return out


def _task_counts_from_build(spec: ShardSpec, split: str) -> dict[str, int] | None:
    """Samples per task of one split, from ``build.json``'s ``by_split_subtask`` counts."""
    path = spec.path / BUILD_NAME if spec.path.is_dir() else None
    if path is None or not path.is_file():
        return None
    try:
        counts = json.loads(path.read_text("utf-8"))["counts"]["by_split_subtask"]
    except (KeyError, TypeError, json.JSONDecodeError):
        return None
    out = dict.fromkeys(TASKS, 0)
    for label, n in counts.items():
        sp, _, sub = str(label).partition("/")
        if sp == split and sub in _SUBTASK_TASK:
            out[_SUBTASK_TASK[sub]] += int(n)
    return out


def _task_counts_by_scan(shards: Sequence[_Shard], split: str, reader: TarReader) -> dict[str, int]:
    out = dict.fromkeys(TASKS, 0)
    for shard in shards:
        for key in reader.index(shard.path).keys:
            rec = _load_json(reader.read(shard.path, key, ("json",)), shard.path, key)
            if rec.get("split") == split and rec.get("task") in out:
                out[rec["task"]] += 1
    return out


def source_sample_counts(specs: Sequence[ShardSpec | str], split: str = "train") -> dict[tuple[int, str], int]:
    """``{(source index, task): samples of split}`` (from build.json, else by reading the jsons)."""
    reader = TarReader()
    out: dict[tuple[int, str], int] = {}
    try:
        for i, raw in enumerate(specs):
            spec = parse_shard_spec(raw)
            if spec.remote:
                raise ValueError(f"--shards {spec.path.name}: sample counts of a streamed URL source are not "
                                 "known in advance; give --steps")
            counts = _task_counts_from_build(spec, split)
            if counts is None:
                counts = _task_counts_by_scan(_source_shards(spec), split, reader)
            for task, n in counts.items():
                out[(i, task)] = n
    finally:
        reader.close()
    return out


# 1 in 20 train groups of every source are never trained on: a source without a val split validates on
# them, and a stage-2 mix (no val split, but drawn from sources whose other stages train on the rest)
# cannot validate on what an earlier stage trained on
HOLDOUT_EVERY = 20


def held_out(group: str | None, key: str = "") -> bool:
    """Whether a train sample (of patient/image ``group``, sample ``key``) belongs to the held-out slice that
    no training reads: 1 in ``HOLDOUT_EVERY`` groups, decided by the group (its key when it has none), so a
    group is never on both sides, and by the group alone, so the slice is the same in a source's own shards
    and in a mix of it."""
    digest = hashlib.sha256(str(group or key or "").encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % HOLDOUT_EVERY == 0


def holdout_streams(specs: Sequence[Any]) -> set[tuple[int, str]]:
    """``(source index, task)`` pairs with train samples but no ``val`` samples (local sources only)."""
    local = [(i, s) for i, s in enumerate(specs) if not s.remote]
    if not local:
        return set()
    train = source_sample_counts([s for _, s in local], "train")
    val = source_sample_counts([s for _, s in local], "val")
    out = set()
    for j, (i, _) in enumerate(local):
        for task in TASKS:
            if train.get((j, task), 0) and not val.get((j, task), 0):
                out.add((i, task))
    return out


def is_validation(rec: Mapping[str, Any], key: str, lent: bool) -> bool:
    """Whether a sample is in a validation pool: its ``val`` split, or (``lent``: its source and task have
    no val split) a train sample of the held-out groups (:func:`held_out`)."""
    if lent:
        return rec.get("split") == "train" and held_out(rec.get("group"), key)
    return rec.get("split") == "val"


def validation_filter(folder: os.PathLike[str] | str) -> Callable[[Mapping[str, Any], str], bool]:
    """``keep(record, key)``: the samples of one local shard folder that the trainer's validation batches are
    drawn from, decided per task as the trainer decides it (:func:`holdout_streams`): a task's ``val`` split,
    or its held-out train groups where it has no val samples."""
    lent_tasks = {task for _, task in holdout_streams([ShardSpec(Path(folder))])}
    return lambda rec, key: is_validation(rec, key, rec.get("task") in lent_tasks)



def _stream_urls(spec: ShardSpec, shards: Sequence[_Shard]) -> list[str]:
    """The shard URLs of a source in streaming mode (braces and ``::`` lists expanded;
    ``file://`` made a plain path; a local folder gives its tars)."""
    if not spec.remote:
        return [str(s.path) for s in shards]
    from webdataset.shardlists import expand_urls

    urls = [u[len("file://"):] if u.startswith("file://") else u for u in expand_urls(spec.url)]
    if not urls:
        raise ValueError(f"--shards {spec.path.name}: the pattern expands to no shard")
    return urls


MAX_NAMED_BAD = 1000  # distinct undecodable samples named per loader worker (all are counted)


# ------------------------------------------------------------------------------------ the stream


class TaskBatchStream(IterableDataset):
    """Infinite task-homogeneous micro-batches for one rank (see the module docstring)."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Any,
        preprocess: Callable[[Sequence[Any]], torch.Tensor] | None,
        *,
        rank: int = 0,
        world_size: int = 1,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.rank, self.world_size = rank, world_size
        self.n_workers = max(1, cfg.num_workers)
        self.state = dict(state) if state else {}
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0
        self.streaming = cfg.streaming
        self.sources = [[] if spec.remote else _source_shards(spec, cfg.verify) for spec in cfg.specs]
        self.urls = [_stream_urls(spec, shards) for spec, shards in zip(cfg.specs, self.sources, strict=True)] \
            if self.streaming else []
        local = [s for s in cfg.specs if not s.remote]
        counts = source_sample_counts(local, cfg.split) if local else {}
        local_index = {id(s): j for j, s in enumerate(local)}
        wanted = TASKS if cfg.task == "mixed" else (cfg.task,)
        # (source, task); task None: a streamed URL source in mixed training, whose task mix is not
        # known in advance -> each of its micro-batches takes the task of its next sample
        self.streams: list[tuple[int, str | None]] = []
        weights: list[float] = []
        for i, spec in enumerate(cfg.specs):
            if spec.remote:
                self.streams.append((i, cfg.task if cfg.task != "mixed" else None))
                weights.append(spec.weight)
                continue
            j = local_index[id(spec)]
            total = sum(counts.get((j, t), 0) for t in TASKS)
            for task in wanted:
                n = counts.get((j, task), 0)
                if n:
                    self.streams.append((i, task))
                    weights.append(spec.weight * n / total)
        if not self.streams:
            names = ", ".join(s.path.name for s in cfg.specs)
            raise ValueError(f"no {cfg.split!r} samples of task {cfg.task!r} in the shards ({names})")
        self.weights = np.asarray(weights) / sum(weights)
        self.members = {
            "comprehension": ("json", "input.png", "input.jpg"),
            "generation": ("json", "input.png", "input.jpg", "target.vq.npy"),
        }
        # the held-out train groups are never trained on, whether validation runs or not
        # (healthgpt.training.validation); only the train split has them
        self.skip_held_out = cfg.split == "train"

    # -- worker identity ---------------------------------------------------------------------
    def _logical_worker(self) -> int:
        info = get_worker_info()
        wid = info.id if info is not None else 0
        offset = int(self.state.get("rotate", 0))
        return (wid + offset) % self.n_workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Micro-batches of this rank and worker, from local tars or from streamed URLs (``sources``)."""
        worker = self._logical_worker()
        n_slots = self.world_size * self.n_workers
        slot = self.rank * self.n_workers + worker
        views = None if self.streaming else slot_views(self.sources, self.cfg, slot, n_slots)
        wstate = (self.state.get("workers") or {}).get(str(worker), {})
        local_batch = int(wstate.get("batches", 0))
        stats = {k: int(v) for k, v in wstate.get("skipped", {}).items()}
        self._bad_names = list(wstate.get("bad_samples", []))
        rows_from: RowSource
        if self.streaming:
            # a resumed stream restarts with a new shuffle: seeded by the batches this worker made before
            rows_from = StreamedRows(self.cfg, self.urls, slot, n_slots, local_batch, self._encode_counted)
        else:
            rows_from = LocalTarRows(self.cfg, views, wstate.get("cursors", {}), self._encode_counted, self.members,
                                     on_bad=self._note_bad)
        try:
            while True:
                m = local_batch * self.n_workers + worker  # rank-independent micro-batch number
                choice = int(_rng(self.cfg.seed, 3, m).choice(len(self.streams), p=self.weights))
                source, task = self.streams[choice]
                task, rows = rows_from.fill(source, task, stats)
                batch = self._collate(task, rows)
                local_batch += 1
                batch["worker"] = worker
                batch["state"] = rows_from.position(local_batch, stats)
                batch["state"]["bad_samples"] = list(self._bad_names)
                yield batch
        finally:
            rows_from.close()

    def _encode_counted(self, stats: dict[str, int], where: Path, key: str, rec: Mapping[str, Any],
                        members: Mapping[str, bytes]) -> _Example | None:
        """:meth:`_encode`, counting (and logging) bad samples and over-long ones in ``stats``; None skips
        (also the held-out train groups, counted as ``validation``)."""
        if self.skip_held_out and rec.get("split") == "train" and held_out(rec.get("group"), key):
            stats["validation"] = stats.get("validation", 0) + 1
            return None
        try:
            ex = self._encode(where, key, rec, members)
        except (ValueError, KeyError, TypeError) as err:
            self._note_bad(stats, where, key, str(err))
            return None
        if ex is None:
            stats["too_long"] = stats.get("too_long", 0) + 1
        return ex

    def _note_bad(self, stats: dict[str, int], where: Path, key: str, reason: str) -> None:
        """Count a sample that cannot be decoded, and name it (``tar:key`` and the reason; the first
        :data:`MAX_NAMED_BAD` distinct ones) in the worker's data position, which the trainer reads."""
        stats["bad"] = stats.get("bad", 0) + 1
        name = f"{where.name}:{key}"
        log.warning("skipping sample %s: %s", name, reason)
        names = getattr(self, "_bad_names", None)
        if names is None:
            names = self._bad_names = []
        if len(names) < MAX_NAMED_BAD and all(b["sample"] != name for b in names):
            names.append({"sample": name, "reason": reason.removeprefix(f"{name}: ")})

    def _encode(self, tar: Path, key: str, rec: Mapping[str, Any], members: Mapping[str, bytes]) -> _Example | None:
        task = rec["task"]
        vq = None
        if task == "generation":
            if "target.vq.npy" not in members:
                raise ValueError("generation sample without target.vq.npy")
            vq = np.load(io.BytesIO(members["target.vq.npy"]), allow_pickle=False)
        enc = encode_conversation(
            self.tokenizer, rec["conversations"], template=self.cfg.template, vq_indices=vq,
            max_len=self.cfg.max_len, image_tokens=self.cfg.image_tokens, pixel_newline=self.cfg.pixel_newline,
        )
        labels = enc["labels"]
        if (task == "generation" and enc["truncated"]) or not bool((labels != IGNORE_INDEX).any()):
            return None
        ids = enc["input_ids"]
        n_img = int((ids == IMAGE_TOKEN_ID).sum())
        image = None
        if n_img:
            data = members.get("input.png", members.get("input.jpg"))
            if data is None:
                raise ValueError("<image> in the conversation but no input image member")
            if n_img != 1:
                raise ValueError(f"{n_img} <image> placeholders; one input image per sample is supported")
            image = decode_input_image(data, f"{tar.name}:{key}")
        return _Example(task, ids, labels, image, len(ids) + n_img * (self.cfg.image_tokens - 1), key)

    def _collate(self, task: str, rows: list[list[_Example]]) -> dict[str, Any]:
        seqs = [torch.cat([e.input_ids for e in row]) for row in rows]
        labs = [torch.cat([e.labels for e in row]) for row in rows]
        n = max(len(s) for s in seqs)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, (s, lab) in enumerate(zip(seqs, labs, strict=True)):
            ids[i, : len(s)] = s
            labels[i, : len(s)] = lab
            mask[i, : len(s)] = 1
        images = [e.image for row in rows for e in row if e.image is not None]
        pixel_values = None
        if images:
            if self.preprocess is None:
                raise ValueError("samples have images but no image pre-processing was given")
            pixel_values = self.preprocess(images)
        return {
            "task": task,
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "pixel_values": pixel_values,
            "keys": [e.key for row in rows for e in row],
            "n_samples": sum(len(r) for r in rows),
            "n_tokens": int(sum(e.positions for row in rows for e in row)),
            "n_label_tokens": int((labels != IGNORE_INDEX).sum()),
        }


# ------------------------------------------------------------------------------------ loader + state


class LoaderState:
    """What the trainer consumed: per logical worker its position after its last consumed batch."""

    def bad_samples(self) -> list[dict[str, str]]:
        """The samples that failed to decode in what was consumed (``{"sample": "tar:key", "reason"}``), all workers."""
        out: list[dict[str, str]] = []
        for w in sorted(self.workers):
            out += [b for b in self.workers[w].get("bad_samples", []) if b not in out]
        return out

    def __init__(self, num_workers: int, consumed: int = 0, workers: Mapping[str, Any] | None = None) -> None:
        self.num_workers = max(1, num_workers)
        self.consumed = consumed
        self.workers: dict[str, Any] = dict(workers or {})

    def update(self, batch: Mapping[str, Any]) -> None:
        self.workers[str(batch["worker"])] = batch["state"]
        self.consumed += 1

    def stream_state(self) -> dict[str, Any]:
        """The ``state`` argument for a new ``TaskBatchStream`` that continues at the next batch."""
        return {"rotate": self.consumed % self.num_workers, "workers": dict(self.workers)}

    def to_dict(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "consumed": self.consumed, "workers": self.workers}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], num_workers: int) -> LoaderState:
        saved = max(1, int(data.get("num_workers", 1)))
        if saved != max(1, num_workers):
            raise ValueError(f"the checkpoint's data position was recorded with {saved} loader worker(s); "
                             f"resume with --num-workers {saved if saved > 1 else 0} to continue at the same "
                             "data position")
        return cls(num_workers, int(data.get("consumed", 0)), data.get("workers"))


def make_loader(
    cfg: DataConfig,
    tokenizer: Any,
    preprocess: Callable[[Sequence[Any]], torch.Tensor] | None,
    *,
    rank: int = 0,
    world_size: int = 1,
    state: LoaderState | None = None,
    prefetch_factor: int = 4,
) -> tuple[DataLoader, LoaderState]:
    """A DataLoader over :class:`TaskBatchStream` (batches come collated from the workers)."""
    state = state or LoaderState(cfg.num_workers)
    stream = TaskBatchStream(cfg, tokenizer, preprocess, rank=rank, world_size=world_size,
                             state=state.stream_state())
    kwargs: dict[str, Any] = {}
    if cfg.num_workers > 0:
        kwargs = {"prefetch_factor": prefetch_factor, "persistent_workers": False}
    loader = DataLoader(stream, batch_size=None, num_workers=cfg.num_workers, **kwargs)
    return loader, state
