"""The builder contract: what a builder module is and what it yields.

A builder (``builders/<source>.py``) is a small module satisfying :class:`Builder` (the required
``NAME``, ``MANIFEST``, ``Options``, ``discover``, ``process``), plus any of the optional hooks in
``OPTIONAL_HOOKS`` (``SPLITS``, ``GENERATES``, ``EXAMPLE``, ``split_strata``, ``preset_splits``),
read only through :func:`builder_hook`. ``discover(ctx)`` yields :class:`Item` or :class:`Reject`;
``process(item, ctx)`` yields :class:`~vlhealth.schema.Sample`, :class:`Reject` or
:class:`ItemReport`, or raises :class:`Rejected`. :class:`BuildContext` is what both receive.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from vlhealth.limits import Limits, plain_reason
from vlhealth.manifests import pick_template
from vlhealth.schema import Sample


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
