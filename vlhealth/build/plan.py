"""The build plan: splits, partitions, the resume fingerprint and journal, and what ``build.json`` records.

``assign_splits`` (seeded, group-level) and ``_splits_for`` (upstream splits where a builder gives them);
``parse_partition`` / ``partition_suffix`` / ``partition_groups`` (``--partition i/n``);
``_fingerprint`` and ``_load_journal`` (``--resume`` refuses a journal of other inputs or changed tars);
``splits_record`` and ``_build_record`` (``splits.json``, ``build.json``: command without absolute paths,
versions, manifest, options, counts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from vlhealth.build.contract import BuildContext, builder_hook
from vlhealth.itemstore import ItemStore
from vlhealth.limits import Limits

SPLITS_NAME = "splits.json"


DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


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


class ResumeError(RuntimeError):
    """A resume that cannot give the output of an uninterrupted build (other options, lost shards)."""


def _fingerprint(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


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
