"""``run_build``: one source into a shard folder (discovery, splits, items, shards, metadata).

Any exception raised while processing an item turns the whole item into a reject (file + reason)
and the build goes on; ``strict`` makes the final exit status non-zero.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

from vlhealth.build.contract import BuildContext, Reject
from vlhealth.build.plan import (
    SPLITS_NAME,
    _build_record,
    _meta_name,
    _path_free,
    _splits_for,
    parse_partition,
    partition_suffix,
    splits_record,
)
from vlhealth.build.writing import _BuildPlan, _reject_line
from vlhealth.itemstore import ItemStore
from vlhealth.limits import Limits
from vlhealth.manifests import load_manifest
from vlhealth.shards import (
    BUILD_NAME,
    INDEX_NAME,
    REJECTS_NAME,
    write_atomic,
    write_index,
    write_json_atomic,
)


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
        raise FileNotFoundError(f"{root}: the source root is not a folder; give the folder the source ships as")
    manifest = manifest if manifest is not None else load_manifest(builder.MANIFEST)
    options = options if options is not None else builder.Options()
    limits = limits if limits is not None else Limits()
    part = parse_partition(partition)
    if workers == 0:
        workers = os.cpu_count() or 1
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    ctx = BuildContext(root=root, options=options, manifest=manifest, seed=seed, out=out, limits=limits)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with ItemStore(out, f".items{partition_suffix(part)}.sqlite") as store:
        _discover_into(builder, ctx, store)
        if store.count() == 0 and not any(True for _ in store.reject_lines()):
            _refuse_empty_source(builder, root, manifest, store, out, part, created)
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
    if build_info.get("vq") and getattr(vq, "path_given", None):
        build_info["vq"].update(_vq_file_record(vq.path_given, out))
    write_json_atomic(out / _meta_name(BUILD_NAME, plan.suffix), build_info)
    plan.journal_path.unlink(missing_ok=True)
    return BuildSummary(out, result.samples, sum(rejects.values()), plan.n_items, len(result.shards),
                        dict(result.counts), dict(rejects), time.perf_counter() - start)


def _refuse_empty_source(builder: ModuleType, root: Path, manifest: dict[str, Any], store: ItemStore, out: Path,
                         part: tuple[int, int] | None, created: bool) -> NoReturn:
    """Discovery found neither an item nor a reject: remove the item store (and ``out`` when this build
    created it and it is empty) and raise ``NoItemsError`` naming the layout the builder reads."""
    store.close()
    (out / f".items{partition_suffix(part)}.sqlite").unlink(missing_ok=True)
    if created and not any(out.iterdir()):
        out.rmdir()
    raise NoItemsError(_nothing_found(builder, root, manifest))


def _vq_file_record(given: str | os.PathLike[str], out: Path) -> dict[str, str]:
    """Where training runs find the build's VQGAN file again: ``path`` as typed (a relative path; an absolute one
    keeps its name only) and ``at_shards``, where it lies from the shard folder (relative, so kept even when typed
    as an absolute path; left out on another drive)."""
    record = {"path": _path_free(given)}
    try:
        record["at_shards"] = Path(os.path.relpath(os.path.abspath(given), os.path.abspath(out))).as_posix()
    except ValueError:  # another drive
        pass
    return record


class NoItemsError(ValueError):
    """The source root holds nothing of the builder's layout (e.g. another source's folder)."""


def _nothing_found(builder: ModuleType, root: Path, manifest: dict[str, Any]) -> str:
    layout = "; ".join(" ".join(line.split()) for line in str(manifest.get("layout") or "").strip().splitlines())
    return (f"{root}: no {builder.NAME} items found, {builder.NAME} reads {layout or 'its upstream layout'}; "
            "point the command at the folder that holds this layout")


def _discover_into(builder: ModuleType, ctx: BuildContext, store: ItemStore) -> None:
    """Run ``builder.discover`` into ``store``: items spilled to disk, rejects kept as lines; then the later
    copies of a repeated item id are refused (the first discovered is kept)."""
    try:
        for entry in builder.discover(ctx):
            if isinstance(entry, Reject):
                store.add_reject(_reject_line(entry))
            else:
                store.add(entry)
    except (ValueError, FileNotFoundError) as err:  # e.g. no annotation file of the layout: name the root
        raise NoItemsError(f"{ctx.root}: {err}; point the command at the source's root folder") from err
    for ident, file, kept in store.drop_duplicates():  # e.g. a second copy of a scan elsewhere under the root
        store.add_reject(_reject_line(Reject(file, f"duplicate item {ident!r}: already built from {kept}", ident)))
