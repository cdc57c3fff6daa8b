"""Where training samples come from: local tars read by seeking, or shard URLs streamed.

Both sources serve :class:`~healthgpt.training.data.TaskBatchStream` through one small interface,
:class:`RowSource`: ``fill(source, task, stats) -> (task, rows)`` gives the rows of one micro-batch
(one example per row, or whole examples packed per row), ``position(batches, stats)`` the worker's
data position after it (what a checkpoint stores) and ``close()`` releases open files.

* :class:`LocalTarRows` (the default for local shard folders): each source's part for this
  reading slot is a :class:`_SlotView`, an infinite shuffled sequence; samples are read by seeking
  into the tars, and the position is a cursor per (source, task) stream (exact resume).
* :class:`StreamedRows` (URLs, patterns, or ``--stream``): a ``webdataset`` pipeline per source
  (:class:`_StreamSource`); a resumed stream restarts with a new shuffle.

Tokenisation stays with the stream: both take its ``encode(stats, where, key, rec, members)``,
which returns an :class:`_Example` or None to skip the sample. See :mod:`healthgpt.training.data`
for the order, batches and resume.
"""

from __future__ import annotations

import json
import logging
import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from vlhealth.schema import TASKS
from vlhealth.shards import ShardError, TarReader

__all__ = ["LocalTarRows", "RowSource", "StreamedRows", "slot_views"]

log = logging.getLogger("healthgpt.training.data")

Rows = list[list["_Example"]]
Encode = Callable[[dict[str, int], Path, str, Mapping[str, Any], Mapping[str, bytes]], "_Example | None"]


def _url_name(url: str) -> str:
    """A short display name of a shard URL (no host, no command)."""
    tail = url.rstrip("/").rsplit("/", 1)[-1]
    return tail.split()[-1] if tail.split() else url


@dataclass
class _Shard:
    path: Path
    samples: int
    first: int  # index of its first sample within the source


def _load_json(members: Mapping[str, bytes], path: Path, key: str) -> dict[str, Any]:
    if "json" not in members:
        raise ShardError(path, "sample has no json member", key)
    try:
        rec = json.loads(members["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(path, f"json member is not valid JSON ({exc})", key) from exc
    if not isinstance(rec, dict):
        raise ShardError(path, "json member is not an object", key)
    return rec


def _rng(*parts: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts])))


class _SlotView:
    """The part of one source that one reading slot owns, as an infinite shuffled sequence."""

    def __init__(self, shards: list[_Shard], source: int, slot: int, n_slots: int, seed: int) -> None:
        self.source, self.slot, self.seed = source, slot, seed
        self.whole_shards = len(shards) >= n_slots
        self.parts: list[tuple[_Shard, np.ndarray]] = []  # (shard, local sample indices owned)
        if self.whole_shards:
            for shard in shards[slot::n_slots]:
                self.parts.append((shard, np.arange(shard.samples)))
        else:
            for shard in shards:
                local = np.arange(shard.samples)
                mine = local[(shard.first + local) % n_slots == slot]
                if len(mine):
                    self.parts.append((shard, mine))
        self.per_pass = int(sum(len(m) for _, m in self.parts))
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    def _pass_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is None or self._cache[0] != epoch:
            order = _rng(self.seed, 1, self.source, self.slot, epoch).permutation(len(self.parts))
            sizes = np.array([len(self.parts[i][1]) for i in order], dtype=np.int64)
            self._cache = (epoch, order, np.cumsum(sizes))
            self._perm_cache.clear()
        return self._cache[1], self._cache[2]

    def locate(self, position: int) -> tuple[Path, int]:
        """(tar, sample index in the tar) at ``position`` of the infinite sequence."""
        epoch, within = divmod(position, self.per_pass)
        order, ends = self._pass_layout(epoch)
        j = int(np.searchsorted(ends, within, side="right"))
        part = int(order[j])
        start = int(ends[j - 1]) if j else 0
        perm = self._perm_cache.get((epoch, part))
        if perm is None:
            shard, mine = self.parts[part]
            perm = mine[_rng(self.seed, 2, self.source, self.slot, epoch, part).permutation(len(mine))]
            self._perm_cache[(epoch, part)] = perm
        return self.parts[part][0].path, int(perm[within - start])


@dataclass
class _Example:
    task: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    image: Image.Image | None
    positions: int  # sequence positions in the model (images expanded)
    key: str = ""


class _StreamSource:
    """One source in streaming mode for one reading slot: a ``webdataset`` pipeline (resampled
    shards of this slot, tar samples, shuffle buffer) plus the samples that were read while
    looking for another task (kept in order, bounded)."""

    MAX_PENDING = 4096  # samples kept for the other task before the oldest are dropped
    MAX_SCAN = 100_000  # samples read without finding a usable one -> the source cannot serve

    def __init__(self, urls: Sequence[str], name: str, slot: int, n_slots: int, seed: int, source: int,
                 restart: int, shuffle_buffer: int) -> None:
        import webdataset as wds

        self.name = name
        # split by node and worker: whole shards per reading slot when there are enough shards;
        # otherwise every slot resamples all shards in its own random order (not disjoint)
        mine = list(urls[slot::n_slots]) if len(urls) >= n_slots else list(urls)
        parts = [int(seed), 4, source, slot, restart]
        shard_seed = int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])
        pipeline = [
            wds.ResampledShards(mine, seed=shard_seed, worker_seed=lambda: 0, deterministic=True),
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
        ]
        if shuffle_buffer > 1:
            pipeline.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100),
                                        rng=random.Random(shard_seed + 1)))
        self.samples = iter(wds.DataPipeline(*pipeline))
        self.pending: deque[tuple[dict[str, Any], dict[str, Any]]] = deque()

    def _read(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The next (raw sample, json record) from the pipeline; None for an unreadable json."""
        sample = next(self.samples)
        key = str(sample.get("__key__", "?"))
        where = Path(_url_name(str(sample.get("__url__", self.name))))
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        try:
            return sample, _load_json(members, where, key)
        except ShardError as err:
            log.warning("skipping sample: %s", err)
            return None

    def take(self, task: str | None, split: str, stats: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The next sample of ``split`` and ``task`` (None: any task), pending ones first."""
        for i, (sample, rec) in enumerate(self.pending):
            if task is None or rec.get("task") == task:
                del self.pending[i]
                return sample, rec
        for _ in range(self.MAX_SCAN):
            got = self._read()
            if got is None:
                stats["bad"] = stats.get("bad", 0) + 1
                continue
            sample, rec = got
            if rec.get("split") != split or rec.get("task") not in TASKS:
                continue
            if task is None or rec["task"] == task:
                return sample, rec
            self.pending.append((sample, rec))
            if len(self.pending) > self.MAX_PENDING:
                self.pending.popleft()
                stats["dropped"] = stats.get("dropped", 0) + 1
        raise ValueError(f"--shards {self.name}: no usable {split!r} {task or ''} sample in {self.MAX_SCAN} "
                         "streamed samples")

    def push_back(self, sample: dict[str, Any], rec: dict[str, Any]) -> None:
        self.pending.appendleft((sample, rec))


class RowSource(Protocol):
    """What :class:`~healthgpt.training.data.TaskBatchStream` reads micro-batches from."""

    def fill(self, source: int, task: str | None, stats: dict[str, int]) -> tuple[str, Rows]:
        """The rows of one micro-batch of ``task`` from source ``source`` (task None: a streamed source
        in mixed training, whose next sample sets the task); returns the task and the rows."""
        ...

    def position(self, batches: int, stats: dict[str, int]) -> dict[str, Any]:
        """The worker's data position after ``batches`` micro-batches (stored in checkpoints)."""
        ...

    def close(self) -> None:
        ...


def slot_views(sources: Sequence[Sequence[_Shard]], cfg: Any, slot: int, n_slots: int) -> list[_SlotView]:
    """Each local source's part for reading slot ``slot`` of ``n_slots`` (``cfg``: the ``DataConfig``)."""
    views = []
    for i, shards in enumerate(sources):
        view = _SlotView(shards, i, slot, n_slots, cfg.seed)
        if view.per_pass == 0:
            raise ValueError(f"--shards {cfg.specs[i].path.name}: {sum(s.samples for s in shards)} "
                             f"samples are fewer than the {n_slots} reading slots (ranks x workers)")
        views.append(view)
    return views


class LocalTarRows:
    """Rows read by seeking into local tars; the position is a cursor per (source, task) stream."""

    def __init__(self, cfg: Any, views: list[_SlotView], cursors: Mapping[str, Any], encode: Encode,
                 members: Mapping[str, Sequence[str]],
                 on_bad: Callable[[dict[str, int], Path, str, str], None] | None = None) -> None:
        self.cfg, self.views, self.encode, self.members = cfg, views, encode, members
        self.on_bad = on_bad  # a sample whose json cannot be read: counted and named, then skipped
        self.cursors: dict[str, int] = {k: int(v) for k, v in cursors.items()}
        self.reader = TarReader()

    def fill(self, source: int, task: str | None, stats: dict[str, int]) -> tuple[str, Rows]:
        assert task is not None  # local sources know their task mix
        name = f"{source}:{task}"
        return task, self._fill(self.views[source], name, task, stats)

    def position(self, batches: int, stats: dict[str, int]) -> dict[str, Any]:
        return {"batches": batches, "cursors": dict(self.cursors), "skipped": dict(stats)}

    def close(self) -> None:
        self.reader.close()

    def _next_example(self, view: _SlotView, name: str, task: str, stats: dict[str, int]) -> tuple[_Example, int]:
        """The next usable example of ``task`` from ``view``; returns it and the cursor before it."""
        scanned = 0
        while True:
            pos = self.cursors.get(name, 0)
            self.cursors[name] = pos + 1
            scanned += 1
            if scanned > view.per_pass + 1:
                raise ValueError(f"--shards {self.cfg.specs[view.source].path.name}: reading slot {view.slot} "
                                 f"found no usable {self.cfg.split!r} {task} sample in a whole pass")
            tar, idx = view.locate(pos)
            key = self.reader.index(tar).keys[idx]
            try:
                rec = _load_json(self.reader.read(tar, key, ("json",)), tar, key)
            except ShardError as err:
                if self.on_bad is None:
                    raise
                self.on_bad(stats, tar, key, str(err))
                continue
            if rec.get("split") != self.cfg.split or rec.get("task") != task:
                continue
            ex = self.encode(stats, tar, key, rec, self.reader.read(tar, key, self.members[task][1:]))
            if ex is not None:
                return ex, pos

    def _fill(self, view: _SlotView, name: str, task: str, stats: dict[str, int]) -> list[list[_Example]]:
        """Rows of examples: one example per row (padding) or whole examples packed per row."""
        rows: list[list[_Example]] = []
        if not self.cfg.pack:
            for _ in range(self.cfg.batch_size):
                ex, _ = self._next_example(view, name, task, stats)
                rows.append([ex])
            return rows
        used = 0
        while True:
            ex, before = self._next_example(view, name, task, stats)
            if rows and used + ex.positions <= self.cfg.max_len:
                rows[-1].append(ex)
                used += ex.positions
                continue
            if len(rows) == self.cfg.batch_size:
                self.cursors[name] = before  # does not fit: it opens the next batch instead
                return rows
            rows.append([ex])
            used = ex.positions


class StreamedRows:
    """Rows from ``webdataset`` pipelines (see "Streaming mode" in :mod:`healthgpt.training.data`)."""

    def __init__(self, cfg: Any, urls: Sequence[Sequence[str]], slot: int, n_slots: int, restart: int,
                 encode: Encode) -> None:
        self.cfg, self.encode = cfg, encode
        self.sources = [_StreamSource(u, spec.path.name, slot, n_slots, cfg.seed, i, restart, cfg.shuffle_buffer)
                        for i, (spec, u) in enumerate(zip(cfg.specs, urls, strict=True))]

    def fill(self, source: int, task: str | None, stats: dict[str, int]) -> tuple[str, Rows]:
        return self._fill_streaming(self.sources[source], task, stats)

    def position(self, batches: int, stats: dict[str, int]) -> dict[str, Any]:
        return {"batches": batches, "cursors": {}, "skipped": dict(stats), "streaming": True}

    def close(self) -> None:
        pass

    def _next_streamed(self, src: _StreamSource, task: str | None,
                       stats: dict[str, int]) -> tuple[_Example, dict[str, Any], dict[str, Any]]:
        while True:
            sample, rec = src.take(task, self.cfg.split, stats)
            key = str(sample.get("__key__", "?"))
            where = Path(_url_name(str(sample.get("__url__", src.name))))
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            ex = self.encode(stats, where, key, rec, members)
            if ex is not None:
                return ex, sample, rec

    def _fill_streaming(self, src: _StreamSource, task: str | None,
                        stats: dict[str, int]) -> tuple[str, list[list[_Example]]]:
        """Like :meth:`_fill`; ``task`` None takes the task of the source's next sample."""
        first, _, _ = self._next_streamed(src, task, stats)
        task = first.task
        rows: list[list[_Example]] = [[first]]
        used = first.positions
        while True:
            if not self.cfg.pack:
                if len(rows) == self.cfg.batch_size:
                    return task, rows
                rows.append([self._next_streamed(src, task, stats)[0]])
                continue
            ex, sample, rec = self._next_streamed(src, task, stats)
            if used + ex.positions <= self.cfg.max_len:
                rows[-1].append(ex)
                used += ex.positions
                continue
            if len(rows) == self.cfg.batch_size:
                src.push_back(sample, rec)  # does not fit: it opens the next batch instead
                return task, rows
            rows.append([ex])
            used = ex.positions
