"""The build runner shared by every builder: discovery, splits, rejects, VQ encoding, shards.

A builder (``builders/<source>.py``) is a small module satisfying :class:`Builder` (the required
``NAME``, ``MANIFEST``, ``Options``, ``discover``, ``process``), plus any of the optional hooks in
``OPTIONAL_HOOKS`` (``SPLITS``, ``GENERATES``, ``EXAMPLE``, ``split_strata``, ``preset_splits``),
read only through :func:`builder_hook`. ``tests/test_build.py`` checks every registered builder.

Builders never touch tars, the CLI or the VQ model: they yield :class:`~vlhealth.schema.Sample`
objects whose generation targets are 256x256 arrays; the runner fills ``target_vq`` in one batch
per item. Any exception raised while processing an item turns the whole item into a reject
(file + reason) and the build goes on; ``strict`` makes the final exit status non-zero.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import platform
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

from vlhealth.itemstore import ItemStore
from vlhealth.limits import Limits, plain_reason
from vlhealth.manifests import load_manifest, pick_template
from vlhealth.schema import Sample, SchemaError, encode_png
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
from vlhealth.vocab import canonicalise_record


@runtime_checkable
class Builder(Protocol):
    """What the runner needs of a builder module.

    * ``NAME``      the source name used in keys and shard names (e.g. ``"synthrad2023"``);
    * ``MANIFEST``  the manifest name in ``manifests/`` (usually equal to ``NAME``);
    * ``Options``   a dataclass of builder-specific options (fields may carry
      ``metadata={"help": "..."}``; the CLI turns them into ``--flags``);
    * ``discover(ctx) -> Iterable[Item | Reject]``  cheap listing of work items from ``ctx.root``;
    * ``process(item, ctx) -> Iterable[Sample | Reject]``  the samples of one item.
    """

    NAME: str
    MANIFEST: str
    Options: type

    def discover(self, ctx: BuildContext) -> Iterable[Item | Reject]: ...

    def process(self, item: Item, ctx: BuildContext) -> Iterable[Sample | Reject]: ...


# Optional builder hooks: name -> (what it is, default when the builder leaves it out).
OPTIONAL_HOOKS: dict[str, tuple[str, Any]] = {
    "SPLITS": ('"upstream" when records carry the source\'s own splits (splits.json then says so instead '
               'of listing a seeded group assignment); "assigned" otherwise', "assigned"),
    "GENERATES": ("True for generation sources: the CLI adds --vqgan/--device and the runner VQ-encodes "
                  "targets", False),
    "EXAMPLE": ("the command line shown in the builder's --help", None),
    "split_strata": ("split_strata(items) -> {group: stratum}: seeded splits are balanced per stratum "
                     "(e.g. SynthRAD's anatomy)", None),
    "preset_splits": ("preset_splits(items, ctx) -> {group: split}: the source's official splits for some "
                      "groups; the rest are seeded", None),
}


def builder_hook(builder: Any, name: str) -> Any:
    """An optional hook of ``builder`` (see ``OPTIONAL_HOOKS``), or its default."""
    if name not in OPTIONAL_HOOKS:
        raise KeyError(f"{name!r} is not a builder hook; the optional hooks are {sorted(OPTIONAL_HOOKS)}")
    return getattr(builder, name, OPTIONAL_HOOKS[name][1])


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
        # Library messages can hold memory addresses (``<_io.BytesIO object at 0x7f..>``): two runs
        # over the same input must write the same rejects.jsonl.
        return {"file": self.file, "reason": plain_reason(self.reason), "item": self.item}


@dataclass(frozen=True)
class ItemReport:
    """Yield from ``process`` to record facts about the item in build.json under ``items.<item id>``
    (e.g. registration metrics); merged per item, never written into the shards."""

    data: dict[str, Any]


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
    out: Path | None = None  # the shard folder (builders may write side files, e.g. figures, under it)
    limits: Limits = field(default_factory=Limits)  # what any single input may cost (vlhealth.limits)

    def rel(self, path: os.PathLike | str) -> str:
        """Path relative to the source root, POSIX style (never absolute in outputs)."""
        from vlhealth.paths import root_relative

        rel = root_relative(path, self.root)
        return rel if rel is not None else Path(path).name

    def scrub(self, text: str) -> str:
        """Remove the building machine's absolute source path from a message."""
        # Longest first: with a relative root, "<root>" is a suffix of "/abs/<root>", and replacing it
        # first would leave "/abs" in the message (a set's order here once depended on the hash seed).
        prefixes = {str(self.root.resolve()), str(self.root.absolute()), str(self.root)}
        for prefix in sorted(prefixes, key=lambda s: (-len(s), s)):
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
    return {k: _path_free(v) for k, v in raw.items()}


def _path_free(value: Any) -> Any:
    """A value for build.json: a path of the building machine (a Path, or an absolute path given as
    a string, e.g. ``--reports /data/mimic-cxr-reports``) keeps only its last name."""
    if isinstance(value, Path):
        return value.name
    if isinstance(value, str) and (os.path.isabs(value) or re.match(r"^[A-Za-z]:[\\/]", value)):
        return Path(value).name
    return value


def parse_partition(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"i/n"`` (0-based i, as SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX give it) -> ``(i, n)``."""
    if text is None or text == "":
        return None
    if isinstance(text, tuple):
        i, n = text
    else:
        try:
            a, b = str(text).split("/")
            i, n = int(a), int(b)
        except ValueError as exc:
            raise ValueError(f"partition must look like i/n (e.g. 0/4), got {text!r}") from exc
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"partition {i}/{n}: need n >= 1 and 0 <= i < n")
    return int(i), int(n)


def partition_suffix(partition: tuple[int, int] | None) -> str:
    return "" if partition is None else f"-p{partition[0]:04d}of{partition[1]:04d}"


def partition_groups(groups: Iterable[str], n: int) -> dict[str, int]:
    """Group -> partition number: round-robin over the sorted groups (balanced, same on every machine)."""
    return {g: i % n for i, g in enumerate(sorted(set(groups)))}


def _meta_name(name: str, suffix: str) -> str:
    """``index.json`` -> ``index-p0001of0004.json`` for a partition's own metadata files."""
    stem, _, ext = name.partition(".")
    return f"{stem}{suffix}.{ext}" if suffix else name


# Flags that change how a build runs, never what it writes: left out of build.json's command so a
# resumed or parallel build records the same build.json as a plain one.
_EXECUTION_FLAGS = {"--workers": True, "-j": True, "--resume": False, "--no-resume": False}


def _recorded_command(command: Sequence[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in command:
        if skip:
            skip = False
            continue
        flag = arg.split("=", 1)[0]
        if flag in _EXECUTION_FLAGS:
            skip = _EXECUTION_FLAGS[flag] and "=" not in arg
            continue
        # Command lines can carry absolute paths of the building machine: keep only their names.
        if arg.startswith("--") and "=" in arg:
            out.append(f"{flag}={_path_free(arg.split('=', 1)[1])}")
        else:
            out.append(_path_free(arg))
    return out


@dataclass
class _Written:
    """One sample as it travels from a worker to the writer: encoded members + target for VQ."""

    key: str
    members: dict[str, bytes]
    target: Any  # np.ndarray | None, the 256x256 target still to be VQ-encoded
    label: str  # "<split>/<subtask>" for the counts


@dataclass
class _ItemResult:
    samples: list[_Written]
    rejects: list[Reject]
    reports: dict[str, Any]


def _encode_item(builder: ModuleType, item: Item, ctx: BuildContext, encode_vq: bool) -> _ItemResult:
    """Run the builder on one item and serialise its samples (PNG encoding happens here, in the worker)."""
    good, bad, reports = process_item(builder, item, ctx, None, with_reports=True)
    written = []
    pngs: dict[bytes, bytes] = {}  # the same slice is often input of one sample and target of others
    by_object: dict[int, tuple[Any, bytes]] = {}  # builders usually pass the very same array object

    def png(array: Any) -> bytes:
        hit = by_object.get(id(array))
        if hit is not None and hit[0] is array:
            return hit[1]
        digest = hashlib.sha256(array.tobytes() + f"{array.shape}{array.dtype}".encode()).digest()
        if digest not in pngs:
            pngs[digest] = encode_png(array)
        by_object[id(array)] = (array, pngs[digest])  # keeps the array alive, so its id stays unique
        return pngs[digest]

    for sample in good:
        canonicalise_record(sample.record)  # one spelling per modality/body part, whatever the builder
        target, image = sample.target, sample.input_image
        pending_vq = encode_vq and target is not None and sample.target_vq is None
        # Serialise through Sample.to_members (the one definition of the format), with the image
        # arrays swapped for their PNG bytes from the per-item cache (encode_png is deterministic).
        sample.target = None
        if image is not None and not isinstance(image, bytes):
            sample.input_image = png(image)
        try:
            members = sample.to_members()
        finally:
            sample.target, sample.input_image = target, image
        if target is not None:
            members["target.png"] = png(target)
        written.append(_Written(sample.key, members, target if pending_vq else None,
                                f"{sample.record.split}/{sample.record.subtask}"))
    return _ItemResult(written, bad, reports)


_WORKER: dict[str, Any] = {}


def _worker_init(builder: ModuleType | str, ctx: BuildContext, encode_vq: bool) -> None:
    import importlib

    _WORKER["builder"] = importlib.import_module(builder) if isinstance(builder, str) else builder
    _WORKER["ctx"] = ctx
    _WORKER["encode_vq"] = encode_vq
    try:  # one ITK thread per worker process: the pool already uses the cores
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    except ImportError:  # pragma: no cover
        pass


def _worker_run(item: Item) -> _ItemResult:
    return _encode_item(_WORKER["builder"], item, _WORKER["ctx"], _WORKER["encode_vq"])


def _make_pool(builder: ModuleType, ctx: BuildContext, encode_vq: bool, workers: int):
    import importlib
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    try:
        importable = importlib.import_module(builder.__name__) is builder
    except ImportError:
        importable = False
    if importable:  # a clean interpreter per worker: safe with torch/ITK thread pools in the parent
        return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                   initargs=(builder.__name__, ctx, encode_vq))
    # Builders made on the fly (tests) cannot be imported by name: fork inherits them.
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_worker_init,
                               initargs=(builder, ctx, encode_vq))


def _ordered_results(builder: ModuleType, items: Iterator[Item], n_items: int, ctx: BuildContext, encode_vq: bool,
                     workers: int) -> Iterator[tuple[Item, _ItemResult]]:
    """``(item, result)`` in item order; at most ``2 * workers`` items in flight so memory stays bounded."""
    if workers <= 1 or n_items <= 1:
        for item in items:
            yield item, _encode_item(builder, item, ctx, encode_vq)
        return
    from collections import deque

    with _make_pool(builder, ctx, encode_vq, workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append((item, pool.submit(_worker_run, item)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            item, future = pending.popleft()
            result = future.result()
            nxt = next(items, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_worker_run, nxt)))
            yield item, result


class ResumeError(RuntimeError):
    """A resume that cannot give the output of an uninterrupted build (other options, lost shards)."""


def _fingerprint(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


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
    workers: int = 1,
    partition: tuple[int, int] | str | None = None,
    resume: bool = False,
    limits: Limits | None = None,
) -> BuildSummary:
    """Build one source into a shard folder. ``vq`` is a VQ tokenizer (see ``vlhealth.vq``) or None.

    ``workers`` > 1 runs ``builder.process`` in a process pool (0 = one per CPU); samples are
    still written in item-id order, so the shards are byte-identical for any worker count. VQ
    encoding stays in this process (one batch per item, on ``vq``'s device).

    ``partition=(i, n)`` (or ``"i/n"``, 0-based) builds only the groups (patients) of partition i
    of n — round-robin over the sorted groups, after the splits were assigned on all of them — and
    names its tars ``<NAME>-p<iiii>of<nnnn>-NNNNNN.tar`` and its metadata ``index-p<iiii>of<nnnn>.json``,
    ``rejects-…jsonl``, ``build-…json``; :func:`merge_partitions` joins finished partitions.

    ``resume`` continues a killed build from its journal (``.progress[-pXofN].json``, written
    after every finished tar): finished tars are kept (their sha256 is checked), the item that was
    cut in the middle is processed again and its already written samples skipped, so the result
    is byte-identical to an uninterrupted build. The journal is removed when the build completes.

    Memory stays bounded whatever the source's size: discovered items are spilled into an
    :class:`~vlhealth.itemstore.ItemStore` (a temporary SQLite file in ``out``) and streamed back in id
    order; written keys are remembered as 64-bit digests. ``limits`` (:class:`~vlhealth.limits.Limits`)
    bounds what any single input may cost (pixels, bytes, text length, JSON depth).
    """
    start = time.perf_counter()
    root = Path(root)
    out = Path(out)
    if not root.is_dir():
        raise FileNotFoundError(f"source root {root} is not a folder")
    manifest = manifest if manifest is not None else load_manifest(builder.MANIFEST)
    options = options if options is not None else builder.Options()
    limits = limits if limits is not None else Limits()
    part = parse_partition(partition)
    if workers == 0:
        workers = os.cpu_count() or 1
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    ctx = BuildContext(root=root, options=options, manifest=manifest, seed=seed, out=out, limits=limits)
    out.mkdir(parents=True, exist_ok=True)
    with ItemStore(out, f".items{partition_suffix(part)}.sqlite") as store:
        _discover_into(builder, ctx, store)
        ctx.splits = _splits_for(builder, store, ctx, manifest, seed)
        if part is not None:
            store.set_partition(part[1])
        plan = _BuildPlan(builder, ctx, store, part, vq, max_count, max_bytes, workers, progress)
        result = plan.write_shards(resume)
        write_atomic(out / _meta_name(REJECTS_NAME, plan.suffix),
                     b"".join(line.encode("utf-8") + b"\n" for line in plan.reject_lines()))
    rejects = plan.rejects_counted
    write_index(out, result.shards, index_name=_meta_name(INDEX_NAME, plan.suffix), source=builder.NAME,
                **({"partition": list(part)} if part else {}))
    write_json_atomic(out / SPLITS_NAME, splits_record(builder, manifest, ctx.splits, seed))
    build_info = _build_record(builder, manifest, options, seed, vq, command, limits, part, plan, result, rejects)
    write_json_atomic(out / _meta_name(BUILD_NAME, plan.suffix), build_info)
    plan.journal_path.unlink(missing_ok=True)
    return BuildSummary(out, result.samples, sum(rejects.values()), plan.n_items, len(result.shards),
                        dict(result.counts), dict(rejects), time.perf_counter() - start)


def _build_record(builder: ModuleType, manifest: dict[str, Any], options: Any, seed: int, vq: Any,
                  command: Sequence[str] | None, limits: Limits, part: tuple[int, int] | None, plan: Any,
                  result: Any, rejects: Counter) -> dict[str, Any]:
    """The content of ``build.json``: command (relative paths only), versions, manifest, options, counts."""
    build_info: dict[str, Any] = {
        "command": _recorded_command(command if command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]]),
        "source": builder.NAME,
        "manifest": {"name": manifest["name"], "sha256": manifest["sha256"], "access": manifest["access"],
                     "license": manifest["license"]},
        "options": options_to_json(options),
        "seed": seed,
        "versions": versions(),
        "vq": vq.describe() if vq is not None else None,
        "counts": {"items": plan.n_items, "samples": result.samples, "rejects": sum(rejects.values()),
                   "by_split_subtask": dict(sorted(result.counts.items()))},
    }
    if limits != Limits():  # recorded when they differ from the defaults (they decide what is refused)
        build_info["limits"] = limits.to_json()
    if part is not None:
        build_info["partition"] = list(part)
    if result.reports:
        build_info["items"] = dict(sorted(result.reports.items()))
    return build_info


def _discover_into(builder: ModuleType, ctx: BuildContext, store: ItemStore) -> None:
    """Run ``builder.discover`` into ``store``: items spilled to disk, rejects kept as lines; then the later
    copies of a repeated item id are refused (the first discovered is kept)."""
    for entry in builder.discover(ctx):
        if isinstance(entry, Reject):
            store.add_reject(_reject_line(entry))
        else:
            store.add(entry)
    for ident, file, kept in store.drop_duplicates():  # e.g. a second copy of a scan elsewhere under the root
        store.add_reject(_reject_line(Reject(file, f"duplicate item {ident!r}: already built from {kept}", ident)))


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


def splits_record(builder: ModuleType, manifest: dict[str, Any], assigned: dict[str, str], seed: int) -> dict[str, Any]:
    """The content of ``splits.json``: the stored group-level assignment, or, for builders whose
    records carry the source's own splits (``SPLITS = "upstream"``), a statement saying so."""
    if builder_hook(builder, "SPLITS") == "upstream":
        return {"seed": seed, "upstream": True, "groups": {},
                "note": str(manifest.get("splits", {}).get("upstream", "splits are the source's own"))}
    return {"seed": seed, "upstream": False, "groups": dict(sorted(assigned.items()))}


def _splits_for(builder: ModuleType, store: ItemStore, ctx: BuildContext, manifest: dict[str, Any],
                seed: int) -> dict[str, str]:
    """Upstream (official) splits from ``builder.preset_splits`` where given, seeded ones for the rest.

    Builders whose records carry the source's own splits (``SPLITS = "upstream"``) get none: their
    sources are the large ones (up to 1.3M groups) and nothing of theirs asks ``ctx.split_of``."""
    preset_fn = builder_hook(builder, "preset_splits")
    strata = builder_hook(builder, "split_strata")
    if builder_hook(builder, "SPLITS") == "upstream" and not preset_fn and not strata:
        return {}
    fractions = manifest.get("splits", {}).get("fractions")
    if not preset_fn and not strata:  # only the groups are needed: streamed from the store
        return assign_splits(store.groups(), fractions, seed=seed)
    items = store.load_all()  # patient-level sources: a few thousand items
    preset = dict(preset_fn(items, ctx) or {}) if preset_fn else {}
    rest = [it for it in items if it.group not in preset]
    assigned = assign_splits([it.group for it in rest], fractions, seed=seed,
                             strata=strata(rest) if strata and rest else None)
    present = {it.group for it in items}
    return {**assigned, **{g: s for g, s in preset.items() if g in present}}


def _load_journal(path: Path, out: Path, fingerprint: str, id_at: Callable[[int], str | None],
                  n_items: int) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ResumeError(f"{path.name}: unreadable resume journal ({exc}); delete it to build from scratch") from exc
    if state.get("fingerprint") != fingerprint:
        raise ResumeError(f"{path.name}: the interrupted build used other inputs or options; "
                          "rerun with the same ones, or without --resume to start again")
    nxt = int(state["next_item"])
    if nxt < n_items and state.get("next_item_id") != id_at(nxt):
        raise ResumeError(f"{path.name}: the item list changed since the interrupted build")
    for shard in state["shards"]:
        tar = out / shard["name"]
        if not tar.is_file() or hashlib.sha256(tar.read_bytes()).hexdigest() != shard["sha256"]:
            raise ResumeError(f"{shard['name']}: missing or changed since the interrupted build; "
                              "rerun without --resume")
    return state


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


def process_item(builder: ModuleType, item: Item, ctx: BuildContext, vq: Any, *, with_reports: bool = False):
    """All samples of one item, or a reject for the whole item if anything in it fails.

    Returns ``(samples, rejects)``, or ``(samples, rejects, reports)`` with ``with_reports``
    (the merged ``data`` of the :class:`ItemReport` entries the builder yielded).
    """
    good: list[Sample] = []
    bad: list[Reject] = []
    reports: dict[str, Any] = {}

    def done(g: list[Sample], b: list[Reject]):
        return (g, b, reports if g or not b else {}) if with_reports else (g, b)

    try:
        for entry in builder.process(item, ctx):
            if isinstance(entry, Reject):
                bad.append(entry)
            elif isinstance(entry, ItemReport):
                reports.update(entry.data)
            else:
                good.append(entry)
        encode_targets(good, vq)
    except Rejected as exc:
        return done([], [Reject(ctx.scrub(exc.file), ctx.scrub(exc.reason), item.id)])
    except SchemaError as exc:
        return done([], [Reject(item.files[0] if item.files else item.id, f"schema: {ctx.scrub(str(exc))}", item.id)])
    except Exception as exc:  # noqa: BLE001 - any failure refuses the item, never the build
        file = getattr(exc, "path", None) or (item.files[0] if item.files else item.id)
        return done([], [Reject(ctx.rel(file) if os.path.isabs(str(file)) else str(file),
                                f"{type(exc).__name__}: {ctx.scrub(str(exc))}", item.id)])
    return done(good, bad)


def _target_batch(targets: list[Any]):
    import numpy as np

    return np.stack([t if t.ndim == 3 else np.repeat(t[..., None], 3, -1) for t in targets])


def _unique_targets(targets: list[Any]) -> tuple[list[Any], list[int]]:
    """Distinct targets (by bytes) and, per input, the position of its distinct one."""
    seen: dict[bytes, int] = {}
    by_object: dict[int, int] = {}  # the same array object needs no hashing (targets stay alive here)
    unique: list[Any] = []
    where: list[int] = []
    for t in targets:
        if id(t) not in by_object:
            digest = hashlib.sha256(t.tobytes() + str(t.shape).encode()).digest()
            if digest not in seen:
                seen[digest] = len(unique)
                unique.append(t)
            by_object[id(t)] = seen[digest]
        where.append(by_object[id(t)])
    return unique, where


def encode_targets(samples: list[Sample], vq: Any) -> None:
    """Fill ``target_vq`` of generation samples in one batch (identical targets are encoded once)."""
    if vq is None:
        return
    todo = [s for s in samples if s.target is not None and s.target_vq is None]
    if not todo:
        return
    unique, where = _unique_targets([s.target for s in todo])
    codes = vq.encode(_target_batch(unique))
    for sample, k in zip(todo, where, strict=True):
        sample.target_vq = codes[k].astype("int16")


def _encode_written_targets(samples: list[_Written], vq: Any) -> None:
    if vq is None:
        return
    from vlhealth.schema import check_vq, npy_bytes

    todo = [w for w in samples if w.target is not None]
    if not todo:
        return
    unique, where = _unique_targets([w.target for w in todo])
    codes = vq.encode(_target_batch(unique))
    for w, k in zip(todo, where, strict=True):
        w.members["target.vq.npy"] = npy_bytes(check_vq(codes[k], w.key))
        w.target = None
