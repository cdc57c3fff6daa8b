"""The build runner shared by every builder: discovery, splits, rejects, VQ encoding, shards.

A builder (``builders/<source>.py``) is a small module with

* ``NAME``      the source name used in keys and shard names (e.g. ``"synthrad2023"``),
* ``MANIFEST``  the manifest name in ``manifests/`` (usually equal to ``NAME``),
* ``Options``   a dataclass of builder-specific options (fields may carry
  ``metadata={"help": "..."}``; the CLI turns them into ``--flags``),
* ``discover(ctx) -> Iterable[Item | Reject]``  cheap listing of work items from ``ctx.root``,
* ``process(item, ctx) -> Iterable[Sample | Reject]``  the samples of one item.

Builders never touch tars, the CLI or the VQ model: they yield :class:`~vlhealth.schema.Sample`
objects whose generation targets are 256x256 arrays; the runner fills ``target_vq`` in one batch
per item. Any exception raised while processing an item turns the whole item into a reject
(file + reason) and the build goes on; ``strict`` makes the final exit status non-zero.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from vlhealth.manifests import load_manifest, pick_template
from vlhealth.schema import Sample, SchemaError
from vlhealth.shards import (
    BUILD_NAME,
    REJECTS_NAME,
    ShardWriter,
    write_atomic,
    write_index,
    write_json_atomic,
)

SPLITS_NAME = "splits.json"
DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


@dataclass(frozen=True)
class Item:
    """One unit of work: typically one patient/volume pair or one upstream record file row."""

    id: str
    group: str
    files: tuple[str, ...] = ()  # paths relative to the source root, for rejects and provenance
    data: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Reject:
    file: str
    reason: str
    item: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "reason": self.reason, "item": self.item}


class Rejected(Exception):
    """Raise from a builder to refuse an item (or a row) with a reason."""

    def __init__(self, file: str, reason: str):
        self.file = file
        self.reason = reason
        super().__init__(f"{file}: {reason}")


@dataclass
class BuildContext:
    root: Path
    options: Any
    manifest: dict[str, Any]
    seed: int = 0
    splits: dict[str, str] = field(default_factory=dict)

    def rel(self, path: os.PathLike | str) -> str:
        """Path relative to the source root, POSIX style (never absolute in outputs)."""
        p = Path(path)
        try:
            return p.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return p.name

    def scrub(self, text: str) -> str:
        """Remove the building machine's absolute source path from a message."""
        for prefix in {str(self.root.resolve()), str(self.root.absolute()), str(self.root)}:
            if prefix not in (".", ""):
                text = text.replace(prefix + os.sep, "").replace(prefix, ".")
        return text

    def template(self, subtask: str, key: str) -> str:
        return pick_template(self.manifest, subtask, key)

    def split_of(self, group: str) -> str:
        try:
            return self.splits[group]
        except KeyError as exc:
            raise KeyError(f"group {group!r} has no split assignment") from exc

    @property
    def license(self) -> str:
        return str(self.manifest["license"])


@dataclass
class BuildSummary:
    out: Path
    samples: int
    rejects: int
    items: int
    shards: int
    counts: dict[str, int]
    reject_reasons: dict[str, int]
    seconds: float

    @property
    def ok(self) -> bool:
        return self.rejects == 0


def _stable_rank(seed: int, name: str) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def assign_splits(
    groups: Iterable[str],
    fractions: dict[str, float] | None = None,
    *,
    seed: int = 0,
    strata: dict[str, str] | None = None,
) -> dict[str, str]:
    """Deterministic group-level (patient-level) split.

    Groups are ordered by a seeded hash within each stratum (e.g. anatomy), then cut by the
    fractions; each split with a non-zero fraction gets at least one group when there are enough
    groups, so small sets still have held-out patients.
    """
    fractions = dict(fractions or DEFAULT_FRACTIONS)
    names = [s for s in ("train", "val", "test") if fractions.get(s, 0) > 0]
    total = sum(fractions[s] for s in names)
    by_stratum: dict[str, list[str]] = {}
    for g in sorted(set(groups)):
        by_stratum.setdefault((strata or {}).get(g, ""), []).append(g)
    out: dict[str, str] = {}
    for members in by_stratum.values():
        members.sort(key=lambda g: _stable_rank(seed, g))
        n = len(members)
        held_out = [s for s in ("test", "val") if s in names]
        counts = {s: int(n * fractions[s] / total) for s in held_out}
        for s in held_out:  # each held-out split gets a group while train keeps at least one
            if counts[s] == 0 and n - sum(counts.values()) > 1:
                counts[s] = 1
        if "train" in names:
            counts["train"] = n - sum(counts.values())
        i = 0
        for s in names:
            for g in members[i : i + counts[s]]:
                out[g] = s
            i += counts[s]
    return out


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("vlhealth", "numpy", "SimpleITK", "nibabel", "pydicom", "pillow", "torch", "webdataset"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def options_to_json(options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    raw = dataclasses.asdict(options)
    return {k: (v.name if isinstance(v, Path) else v) for k, v in raw.items()}


def run_build(
    builder: ModuleType,
    root: os.PathLike | str,
    out: os.PathLike | str,
    *,
    options: Any = None,
    vq: Any = None,
    seed: int = 0,
    max_count: int = 1000,
    max_bytes: int = 512 * 1024 * 1024,
    command: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    manifest: dict[str, Any] | None = None,
) -> BuildSummary:
    """Build one source into a shard folder. ``vq`` is a VQ tokenizer (see ``vlhealth.vq``) or None."""
    start = time.perf_counter()
    root = Path(root)
    out = Path(out)
    if not root.is_dir():
        raise FileNotFoundError(f"source root {root} is not a folder")
    manifest = manifest if manifest is not None else load_manifest(builder.MANIFEST)
    options = options if options is not None else builder.Options()
    ctx = BuildContext(root=root, options=options, manifest=manifest, seed=seed)

    items: list[Item] = []
    rejects: list[Reject] = []
    for entry in builder.discover(ctx):
        (rejects if isinstance(entry, Reject) else items).append(entry)
    items.sort(key=lambda it: it.id)
    if len({it.id for it in items}) != len(items):
        raise ValueError(f"builder {builder.NAME} produced duplicate item ids")
    strata = getattr(builder, "split_strata", None)
    ctx.splits = assign_splits(
        [it.group for it in items],
        manifest.get("splits", {}).get("fractions"),
        seed=seed,
        strata=strata(items) if strata else None,
    )

    counts: Counter[str] = Counter()
    n_samples = 0
    out.mkdir(parents=True, exist_ok=True)
    with ShardWriter(out, prefix=builder.NAME, max_count=max_count, max_bytes=max_bytes) as writer:
        for done, item in enumerate(items, 1):
            good, bad = process_item(builder, item, ctx, vq)
            rejects.extend(bad)
            for sample in good:
                writer.write(sample)
                rec = sample.record
                counts[f"{rec.split}/{rec.subtask}"] += 1
            n_samples += len(good)
            if progress:
                progress(done, len(items))
        shards = writer.close()

    write_index(out, shards, source=builder.NAME)
    write_atomic(out / REJECTS_NAME, "".join(json.dumps(r.to_json(), sort_keys=True) + "\n" for r in rejects).encode())
    write_json_atomic(out / SPLITS_NAME, {"seed": seed, "groups": dict(sorted(ctx.splits.items()))})
    reasons = Counter(r.reason.split(":")[0] for r in rejects)
    build_info = {
        "command": list(command) if command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]],
        "source": builder.NAME,
        "manifest": {"name": manifest["name"], "sha256": manifest["sha256"], "access": manifest["access"],
                     "license": manifest["license"]},
        "options": options_to_json(options),
        "seed": seed,
        "versions": versions(),
        "vq": vq.describe() if vq is not None else None,
        "counts": {"items": len(items), "samples": n_samples, "rejects": len(rejects), "by_split_subtask": dict(sorted(counts.items()))},
    }
    # Command lines can carry absolute paths of the building machine: keep only their names.
    build_info["command"] = [Path(a).name if os.path.isabs(a) else a for a in build_info["command"]]
    write_json_atomic(out / BUILD_NAME, build_info)
    return BuildSummary(out, n_samples, len(rejects), len(items), len(shards), dict(counts), dict(reasons),
                        time.perf_counter() - start)


def process_item(builder: ModuleType, item: Item, ctx: BuildContext, vq: Any) -> tuple[list[Sample], list[Reject]]:
    """All samples of one item, or a reject for the whole item if anything in it fails."""
    good: list[Sample] = []
    bad: list[Reject] = []
    try:
        for entry in builder.process(item, ctx):
            if isinstance(entry, Reject):
                bad.append(entry)
            else:
                good.append(entry)
        encode_targets(good, vq)
    except Rejected as exc:
        return [], [Reject(ctx.scrub(exc.file), ctx.scrub(exc.reason), item.id)]
    except SchemaError as exc:
        return [], [Reject(item.files[0] if item.files else item.id, f"schema: {ctx.scrub(str(exc))}", item.id)]
    except Exception as exc:  # noqa: BLE001 - any failure refuses the item, never the build
        file = getattr(exc, "path", None) or (item.files[0] if item.files else item.id)
        return [], [Reject(ctx.rel(file) if os.path.isabs(str(file)) else str(file),
                           f"{type(exc).__name__}: {ctx.scrub(str(exc))}", item.id)]
    return good, bad


def encode_targets(samples: list[Sample], vq: Any) -> None:
    """Fill ``target_vq`` of generation samples in one batch."""
    if vq is None:
        return
    todo = [s for s in samples if s.target is not None and s.target_vq is None]
    if not todo:
        return
    import numpy as np

    batch = np.stack([s.target if s.target.ndim == 3 else np.repeat(s.target[..., None], 3, -1) for s in todo])
    codes = vq.encode(batch)
    for sample, row in zip(todo, codes, strict=True):
        sample.target_vq = row.astype(np.int16)
