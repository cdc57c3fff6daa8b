"""Running a builder on items: samples or rejects per item, encoded for the writer, in worker processes.

``process_item`` runs ``builder.process`` on one item (any exception rejects the whole item, never
the build); ``_encode_item`` serialises its samples (PNG encoding in the worker); ``_ordered_results``
yields the results in item order from a process pool (``--workers``); ``encode_targets`` /
``_encode_written_targets`` fill the VQ codes of generation targets, one batch per item.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from vlhealth.build.contract import BuildContext, Item, ItemReport, Reject, Rejected
from vlhealth.schema import Sample, SchemaError, encode_png
from vlhealth.vocab import canonicalise_record


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
