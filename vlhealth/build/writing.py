"""Shard writing: items streamed in id order into tars, with a resume journal; partitions merged.

``_BuildPlan`` is the writing half of :func:`~vlhealth.build.runner.run_build` (fingerprint,
journal after every finished tar, duplicate keys refused, rejects counted); ``merge_partitions``
joins finished ``--partition`` outputs into one ``index.json``, ``rejects.jsonl`` and ``build.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from vlhealth.build.contract import BuildContext, Reject
from vlhealth.build.items import _encode_written_targets, _ordered_results
from vlhealth.build.plan import _fingerprint, _load_journal, _meta_name, options_to_json, partition_suffix
from vlhealth.itemstore import ItemStore
from vlhealth.limits import Limits
from vlhealth.shards import (
    BUILD_NAME,
    INDEX_NAME,
    REJECTS_NAME,
    ShardWriter,
    iter_tar,
    write_atomic,
    write_index,
    write_json_atomic,
)


def _reject_line(reject: Reject) -> str:
    return json.dumps(reject.to_json(), sort_keys=True)


@dataclass
class _ShardsWritten:
    shards: list[Any]
    samples: int
    counts: Counter[str]
    reports: dict[str, Any]


class _BuildPlan:
    """The writing half of :func:`run_build`: items streamed from the store, in id order, into tars."""

    def __init__(self, builder: ModuleType, ctx: BuildContext, store: ItemStore, part: tuple[int, int] | None,
                 vq: Any, max_count: int, max_bytes: int, workers: int,
                 progress: Callable[[int, int], None] | None) -> None:
        self.builder, self.ctx, self.store, self.part, self.vq = builder, ctx, store, part, vq
        self.max_count, self.max_bytes, self.workers, self.progress = max_count, max_bytes, workers, progress
        self.part_no = part[0] if part is not None else None
        self.suffix = partition_suffix(part)
        self.out = ctx.out
        assert self.out is not None
        self.journal_path = self.out / f".progress{self.suffix}.json"
        self.n_items = store.count(self.part_no)
        self.item_rejects: list[Reject] = []
        self.rejects_counted: Counter[str] = Counter()

    def fingerprint(self) -> str:
        ids = hashlib.sha256()
        for i, ident in enumerate(self.store.ids(self.part_no)):  # as "\n".join(ids), without the list
            ids.update((f"\n{ident}" if i else ident).encode())
        return _fingerprint(
            source=self.builder.NAME, manifest=self.ctx.manifest.get("sha256"),
            options=options_to_json(self.ctx.options), seed=self.ctx.seed, max_count=self.max_count,
            max_bytes=self.max_bytes, partition=self.part, vq=self.vq.describe() if self.vq is not None else None,
            items=ids.hexdigest(),
            **({"limits": self.ctx.limits.to_json()} if self.ctx.limits != Limits() else {}),
        )

    def reject_lines(self) -> Iterator[str]:
        """``rejects.jsonl``: discovery rejects (listed once, by partition 0), then those of the items."""
        lines: Iterable[str] = self.store.reject_lines() if self.part_no in (None, 0) else ()
        for line in itertools.chain(lines, (_reject_line(r) for r in self.item_rejects)):
            self.rejects_counted[json.loads(line)["reason"].split(":")[0]] += 1
            yield line

    def write_shards(self, resume: bool) -> _ShardsWritten:
        out, builder, store = self.out, self.builder, self.store
        assert out is not None
        fingerprint = self.fingerprint()
        state = {"next_item": 0, "next_sample": 0, "shards": [], "rejects": [], "reports": {}, "counts": {},
                 "samples": 0}
        if resume and self.journal_path.is_file():
            state = _load_journal(self.journal_path, out, fingerprint,
                                  lambda i: store.id_at(i, self.part_no), self.n_items)
        elif self.journal_path.exists():
            self.journal_path.unlink()  # a fresh build: an old journal describes other output
        counts: Counter[str] = Counter(state["counts"])
        n_samples = int(state["samples"])
        reports: dict[str, Any] = dict(state["reports"])
        self.item_rejects = [Reject(**r) for r in state["rejects"]]
        first, skip = int(state["next_item"]), int(state["next_sample"])
        position: list[Any] = [first, skip, None]  # (item index, sample index in it, item id) of the next sample

        def journal(_info: Any) -> None:
            write_json_atomic(self.journal_path, {
                "fingerprint": fingerprint, "next_item": position[0], "next_sample": position[1],
                "next_item_id": position[2] if position[0] < self.n_items else None,
                "shards": [dataclasses.asdict(s) for s in writer.shards],
                "rejects": [r.to_json() for r in self.item_rejects], "reports": reports,
                "counts": dict(counts), "samples": n_samples,
            })

        from vlhealth.shards import ShardInfo

        if not state["shards"]:
            # A fresh build replaces an earlier one in the same folder: its tars (this prefix only, so
            # other partitions stay) would otherwise linger for anything that globs *.tar.
            # Its index goes first: until this build finishes, no index.json may list tars it does not describe.
            (out / _meta_name(INDEX_NAME, self.suffix)).unlink(missing_ok=True)
            stale = re.compile(re.escape(builder.NAME + self.suffix) + r"-\d{6}\.tar")
            for old in out.glob(f"{builder.NAME}{self.suffix}-*.tar"):
                if stale.fullmatch(old.name):
                    old.unlink()
        writer = ShardWriter(out, prefix=builder.NAME + self.suffix, max_count=self.max_count,
                             max_bytes=self.max_bytes, start_number=len(state["shards"]),
                             shards=[ShardInfo(**s) for s in state["shards"]], on_shard=journal)
        for shard in state["shards"]:  # resumed: keys of the finished tars count as written
            writer.remember(key for key, _ in iter_tar(out / shard["name"]))
        with writer:
            items = store.iter_items(self.part_no, first)
            results = _ordered_results(builder, items, self.n_items - first, self.ctx, self.vq is not None,
                                       self.workers)
            for idx, (item, result) in enumerate(results, first):
                _encode_written_targets(result.samples, self.vq)
                position[2] = item.id
                for j, w in enumerate(result.samples):
                    if idx == first and j < skip:
                        continue  # written into a finished tar before the interruption
                    position[:2] = [idx, j]
                    if w.key in writer:  # e.g. one patient id under two anatomies: keep the first, refuse the rest
                        self.item_rejects.append(Reject(item.files[0] if item.files else item.id,
                                                        f"duplicate sample key {w.key!r}: an earlier item wrote it",
                                                        item.id))
                        continue
                    writer.write_members(w.key, w.members)
                    counts[w.label] += 1
                    n_samples += 1
                self.item_rejects.extend(result.rejects)
                if result.reports:
                    reports[item.id] = result.reports
                if self.progress:
                    self.progress(idx + 1, self.n_items)
            position[:2] = [self.n_items, 0]
            shards = writer.close()
        if self.progress and not self.n_items:
            self.progress(0, 0)
        return _ShardsWritten(shards, n_samples, counts, reports)


def merge_partitions(out: os.PathLike | str, expect: int | None = None, *, allow_partial: bool = False) -> dict[str, Any]:
    """Join the partition indexes of ``out`` (``index-pXXXXofNNNN.json``) into ``index.json``.

    Also concatenates the partitions' rejects into ``rejects.jsonl`` and writes a ``build.json``
    whose counts are the sums and which lists the partitions. Refuses when a partition of the
    ``n`` is missing (unless ``allow_partial``), or when partitions disagree (source, splits file).
    Returns the merged index.
    """
    out = Path(out)
    found: dict[tuple[int, int], dict[str, Any]] = {}
    for path in sorted(out.glob("index-p*of*.json")):
        index = json.loads(path.read_text("utf-8"))
        if "partition" not in index:
            raise ValueError(f"{path.name}: not a partition index")
        found[tuple(index["partition"])] = index  # type: ignore[index]
    if not found:
        raise FileNotFoundError(f"{out.name}: no partition indexes (index-pXXXXofNNNN.json) to merge")
    totals = {n for _, n in found}
    if len(totals) != 1:
        raise ValueError(f"{out.name}: partitions of different counts {sorted(totals)} in one folder")
    n = totals.pop()
    if expect is not None and expect != n:
        raise ValueError(f"{out.name}: partitions are i/{n}, expected /{expect}")
    missing = [i for i in range(n) if (i, n) not in found]
    if missing and not allow_partial:
        raise ValueError(f"{out.name}: partitions {missing} of {n} are not finished (no index-p….json)")
    sources = {idx.get("source") for idx in found.values()}
    if len(sources) != 1:
        raise ValueError(f"{out.name}: partitions of different sources {sorted(map(str, sources))}")
    from vlhealth.shards import ShardInfo

    shards = [ShardInfo(**s) for key in sorted(found) for s in found[key]["shards"]]
    rejects: list[str] = []
    builds: list[dict[str, Any]] = []
    for i, _ in sorted(found):
        suffix = partition_suffix((i, n))
        rj = out / _meta_name(REJECTS_NAME, suffix)
        if rj.is_file():
            rejects.extend(line for line in rj.read_text("utf-8").splitlines() if line.strip())
        bj = out / _meta_name(BUILD_NAME, suffix)
        if bj.is_file():
            builds.append(json.loads(bj.read_text("utf-8")))
    for what in ("seed", "options", "vq", "manifest"):  # what decides the splits and the bytes written
        values = {json.dumps(b.get(what), sort_keys=True) for b in builds}
        if len(values) > 1:
            raise ValueError(f"{out.name}: partitions were built with different {what} "
                             f"({' vs '.join(sorted(values))}); rebuild them with the same command")
    index = write_index(out, shards, source=sources.pop(), partitions=[i for i, _ in sorted(found)], of=n)
    write_atomic(out / REJECTS_NAME, "".join(line + "\n" for line in rejects).encode())
    if builds:
        merged = {k: v for k, v in builds[0].items() if k not in ("counts", "partition", "items", "command")}
        by: Counter[str] = Counter()
        for b in builds:
            by.update(b["counts"]["by_split_subtask"])
        merged["counts"] = {
            "items": sum(b["counts"]["items"] for b in builds),
            "samples": sum(b["counts"]["samples"] for b in builds),
            "rejects": len(rejects),
            "by_split_subtask": dict(sorted(by.items())),
        }
        merged["partitions"] = {f"{b['partition'][0]}/{n}": {"command": b["command"], "counts": b["counts"]}
                                for b in builds}
        item_reports = {k: v for b in builds for k, v in b.get("items", {}).items()}
        if item_reports:
            merged["items"] = dict(sorted(item_reports.items()))
        write_json_atomic(out / BUILD_NAME, merged)
    return index
