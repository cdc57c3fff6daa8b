"""Stage-2 mixing: a balanced, reproducible comprehension/generation sample of stage-1 shards.

HealthGPT's second training stage (plugin adaptation) uses a small mixed set, "Mixed-47k", drawn
from the comprehension and generation data. :func:`write_mix` draws ``n`` samples of one split
(default ``train``) from any number of shard folders:

* the quota of each task is ``round(n * ratio)`` comprehension and the rest generation;
* within a task every sample has the rank ``sha256(f"{seed}:{key}")`` and the lowest ranks win,
  so the choice depends only on the seed and the keys — not on the order of ``--from``, the
  shard sizes or the machine — and sources are represented in proportion to their size;
* a task with fewer samples than its quota gives all it has; ``fill=True`` hands the shortfall to
  the other task (otherwise the mix stays balanced and smaller, and ``build.json`` says so).

Members are copied byte for byte (no re-encoding). The output is a normal shard folder
(``mix-NNNNNN.tar``, ``index.json``, ``build.json``, empty ``rejects.jsonl``). It holds samples of
both tasks, so its members differ between samples: read it with ``webdataset`` (the trainer's
loader), not with the HF ``datasets`` WebDataset loader.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlhealth.schema import TASKS
from vlhealth.shards import (
    BUILD_NAME,
    REJECTS_NAME,
    ShardWriter,
    iter_records,
    iter_tar,
    list_shards,
    write_atomic,
    write_index,
    write_json_atomic,
)

PAPER_MIX_SIZE = 47_000


@dataclass
class MixSummary:
    out: Path
    samples: int
    by_task: dict[str, int]
    by_source: dict[str, int]
    available: dict[str, int]
    shortfall: dict[str, int]
    shards: int
    seconds: float


def rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def quotas(n: int, ratio: float, available: dict[str, int], fill: bool) -> tuple[dict[str, int], dict[str, int]]:
    """(samples per task, shortfall per task) for a mix of ``n`` with ``ratio`` comprehension."""
    if n < 0:
        raise ValueError("--n must be >= 0")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError("--ratio must be in [0, 1]")
    want = {"comprehension": round(n * ratio)}
    want["generation"] = n - want["comprehension"]
    take = {t: min(want[t], available.get(t, 0)) for t in TASKS}
    short = {t: want[t] - take[t] for t in TASKS}
    if fill:
        for t, other in (("comprehension", "generation"), ("generation", "comprehension")):
            extra = min(short[t], available.get(other, 0) - take[other])
            if extra > 0:
                take[other] += extra
    elif any(short.values()):
        # balanced: the largest mix of the asked ratio that the scarcer task allows (the other task is cut too)
        shares = {"comprehension": ratio, "generation": 1.0 - ratio}
        m = min([n] + [int(available.get(t, 0) / shares[t] + 1e-9) for t in TASKS if shares[t] > 0])
        while m > 0:
            c = round(m * ratio)
            if c <= available.get("comprehension", 0) and m - c <= available.get("generation", 0):
                break
            m -= 1
        c = round(m * ratio)
        take = {"comprehension": c, "generation": m - c}
        short = {t: want[t] - take[t] for t in TASKS}
    return take, short


def _ordered_tars(sources: Iterable[os.PathLike | str]) -> list[Path]:
    tars = list_shards(list(sources))
    if len({p.resolve() for p in tars}) != len(tars):
        raise ValueError("--from lists the same shards twice")
    return sorted(tars, key=lambda p: (p.parent.name, p.name, str(p)))


def select(tars: Sequence[Path], n: int, *, seed: int = 0, ratio: float = 0.5, split: str | None = "train",
           fill: bool = False) -> tuple[set[str], dict[str, Any]]:
    """The keys of the mix and a plan (available, quota, shortfall per task)."""
    ranked: dict[str, list[tuple[str, str]]] = {t: [] for t in TASKS}
    seen: set[str] = set()
    duplicates = 0
    for key, record, _sizes in iter_records(list(tars)):
        if split is not None and record.get("split") != split:
            continue
        if key in seen:  # the same sample reached twice (e.g. one source built into two folders)
            duplicates += 1
            continue
        seen.add(key)
        ranked[record["task"]].append((rank(seed, key), key))
    available = {t: len(v) for t, v in ranked.items()}
    take, short = quotas(n, ratio, available, fill)
    chosen: set[str] = set()
    for t in TASKS:
        chosen.update(k for _r, k in sorted(ranked[t])[: take[t]])
    plan = {"available": available, "taken": take, "shortfall": {t: v for t, v in short.items() if v > 0},
            "duplicate_keys_skipped": duplicates}
    return chosen, plan


def _sources_vq(tars: Sequence[Path]) -> dict[str, Any] | None:
    """The VQGAN the --from folders' generation samples were tokenized with (their build.json); several
    different ones are an error: their codes mean different images."""
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for folder in sorted({t.parent for t in tars}):
        try:
            vq = json.loads((folder / BUILD_NAME).read_text("utf-8")).get("vq")
        except (OSError, ValueError):
            continue
        if isinstance(vq, dict) and vq.get("sha256"):
            if vq.get("at_shards"):  # where the file lies from that folder: kept absolute here, re-anchored on --out
                vq = {**vq, "at_shards": os.path.abspath(folder / vq["at_shards"])}
            found.setdefault(vq["sha256"], (folder.name, vq))
    if len(found) > 1:
        names = ", ".join(f"{name} ({vq.get('name')})" for name, vq in found.values())
        raise ValueError(f"--from folders were tokenized with different VQGANs: {names}; rebuild them with one --vqgan")
    return next(iter(found.values()))[1] if found else None


def write_mix(
    sources: Iterable[os.PathLike | str],
    out: os.PathLike | str,
    n: int = PAPER_MIX_SIZE,
    *,
    seed: int = 0,
    ratio: float = 0.5,
    split: str | None = "train",
    fill: bool = False,
    max_count: int = 1000,
    max_bytes: int = 512 * 1024 * 1024,
    command: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> MixSummary:
    """Write the mix into the shard folder ``out`` (see the module docstring)."""
    start = time.perf_counter()
    out = Path(out)
    tars = _ordered_tars(sources)
    if any(out.resolve() == t.parent.resolve() for t in tars):
        raise ValueError("--out must not be one of the --from folders")
    chosen, plan = select(tars, n, seed=seed, ratio=ratio, split=split, fill=fill)
    vq = _sources_vq(tars)
    if vq is not None and vq.get("at_shards"):
        vq = {**vq, "at_shards": Path(os.path.relpath(vq["at_shards"], os.path.abspath(out))).as_posix()}
    by_task: Counter[str] = Counter()
    by_source: Counter[str] = Counter()
    written: set[str] = set()
    out.mkdir(parents=True, exist_ok=True)
    with ShardWriter(out, prefix="mix", max_count=max_count, max_bytes=max_bytes) as writer:
        for i, tar in enumerate(tars, 1):
            for key, members in iter_tar(tar):
                if key not in chosen or key in written:
                    continue
                record = json.loads(members["json"])
                writer.write_members(key, members)
                written.add(key)
                by_task[record["task"]] += 1
                by_source[str(record.get("source"))] += 1
            if progress:
                progress(i, len(tars))
        shards = writer.close()
    write_index(out, shards, source="mix")
    write_atomic(out / REJECTS_NAME, b"")
    argv = list(command) if command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]]
    write_json_atomic(out / BUILD_NAME, {
        "command": [Path(a).name if os.path.isabs(a) else a for a in argv],
        "source": "mix",
        "mix": {"n": n, "ratio": ratio, "seed": seed, "split": split, "fill": fill,
                "from": sorted({t.parent.name for t in tars}), **plan},
        "vq": vq,  # the VQGAN of the generation sources (one for all), so that runs trained on the mix record it
        "counts": {"samples": len(written), "by_task": dict(sorted(by_task.items())),
                   "by_source": dict(sorted(by_source.items()))},
    })
    return MixSummary(out, len(written), dict(by_task), dict(by_source), plan["available"], plan["shortfall"],
                      len(shards), time.perf_counter() - start)
