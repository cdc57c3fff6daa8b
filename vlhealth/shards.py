"""Sharded WebDataset tars: a deterministic, atomic writer and a defensive reader.

A shard folder holds ``<prefix>-NNNNNN.tar`` files plus

* ``index.json``   shard list with sample count, byte size and sha256 of each tar,
* ``rejects.jsonl`` every input that was refused, with file and reason (written by the build runner),
* ``build.json``   command, versions, manifest, counts (written by the build runner).

Determinism: members of a sample are written in sorted order with fixed mtime/uid/gid/mode and
empty user/group names, so the same samples in the same order give byte-identical tars.
Atomicity: a tar is written under a hidden temporary name, fsynced and renamed; a killed build
never leaves a ``*.tar`` that a reader would pick up.

Reading: ``iter_tar`` streams a tar; ``TarIndex`` / ``TarReader`` index a tar's member offsets once
(headers only) and then read single members by seeking, for the trainer's exact-resume loader and
any reader that wants a few members of a sample.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from vlhealth.itemstore import HashedKeySet
from vlhealth.schema import Sample

INDEX_NAME = "index.json"
REJECTS_NAME = "rejects.jsonl"
BUILD_NAME = "build.json"
INDEX_FORMAT = "vlhealth-shards/1"
FIXED_MTIME = 946684800  # 2000-01-01T00:00:00Z: a fixed, plausible timestamp for every member
MEMBER_MODE = 0o444
TMP_SUFFIX = ".tmp"
DEFAULT_MAX_COUNT = 1000
DEFAULT_MAX_BYTES = 512 * 1024 * 1024

_MAX_OPEN_FILES = 16  # TarReader: file handles kept open

# WebDataset's grouping rule: the key is everything before the first dot of the basename.
_KEY_EXT_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")


class ShardError(ValueError):
    """A shard that cannot be trusted; names the file (and member) and the reason."""

    def __init__(self, path: os.PathLike | str, reason: str, member: str | None = None):
        self.path = str(path)
        self.member = member
        where = f"{Path(path).name}" + (f" member {member!r}" if member else "")
        super().__init__(f"{where}: {reason}")


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)  # a full disk leaves neither a partial file nor a half-replaced one
        raise _naming(err, path) from err
    fsync_dir(path.parent)


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` (e.g. ENOSPC, which names no file) as an OSError naming ``folder/file``."""
    where = f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    return OSError(err.errno, f"{err.strerror or err} while writing {where}")


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))


class _HashingFile:
    """File wrapper that hashes and counts what is written through it."""

    def __init__(self, fh: io.BufferedWriter):
        self._fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self._fh.write(data)

    def tell(self) -> int:
        return self.size


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = FIXED_MTIME
    info.mode = MEMBER_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


# The member header ``tarfile`` writes in PAX format for our fixed metadata, built directly: when the
# name is ASCII and at most 100 characters (and the size below 8 GiB) it is one plain USTAR block;
# otherwise tarfile's own ``tobuf`` adds the pax extended header. Byte-identical to
# ``TarFile(format=PAX_FORMAT).addfile`` (tests/test_shards.py compares the two), ~10x cheaper.
_BLOCK = tarfile.BLOCKSIZE
_NUL_BLOCK = bytes(_BLOCK)
_USTAR_NAME = 100
_USTAR_MAX_SIZE = 8**11
_MODE_IDS = b"%07o\0" % MEMBER_MODE + b"%07o\0" % 0 + b"%07o\0" % 0  # mode, uid, gid
_MTIME_FIELD = b"%011o\0" % FIXED_MTIME
# typeflag, linkname, magic+version, uname, gname, devmajor, devminor, prefix, block padding
_TAIL = tarfile.REGTYPE + bytes(100) + tarfile.POSIX_MAGIC + bytes(32 + 32 + 8 + 8 + 155 + 12)
_CONST_SUM = sum(_MODE_IDS) + sum(_MTIME_FIELD) + sum(_TAIL) + 8 * ord(" ")  # checksum field counts as spaces


def _member_header(name: str, size: int) -> bytes:
    """The header block(s) of one member (see above)."""
    if name.isascii() and len(name) <= _USTAR_NAME and 0 <= size < _USTAR_MAX_SIZE:
        raw = name.encode("ascii")
        size_field = b"%011o\0" % size
        checksum = _CONST_SUM + sum(raw) + sum(size_field)
        return b"".join((raw, bytes(_USTAR_NAME - len(raw)), _MODE_IDS, size_field, _MTIME_FIELD,
                         b"%06o\0 " % checksum, _TAIL))
    return _tarinfo(name, size).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:06d}.tar"


class ShardWriter:
    """Write samples into size/count-limited tars.

    >>> with ShardWriter(out, prefix="synthrad") as w:   # doctest: +SKIP
    ...     for sample in samples:
    ...         w.write(sample)
    """

    def __init__(
        self,
        out_dir: os.PathLike | str,
        prefix: str = "shard",
        *,
        max_count: int = DEFAULT_MAX_COUNT,
        max_bytes: int = DEFAULT_MAX_BYTES,
        start_number: int = 0,
        shards: Iterable[ShardInfo] = (),
        on_shard: Callable[[ShardInfo], None] | None = None,
    ):
        """``shards`` lists tars already finished by an earlier (resumed) run; ``on_shard`` is called
        after each tar is renamed into place (the build runner journals its progress there)."""
        if max_count < 1 or max_bytes < 1:
            raise ValueError("max_count and max_bytes must be positive")
        if not re.match(r"^[A-Za-z0-9_-]+$", prefix):
            raise ValueError(f"shard prefix {prefix!r} must use only [A-Za-z0-9_-]")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.number = start_number
        self.shards: list[ShardInfo] = list(shards)
        self.on_shard = on_shard
        self._keys = HashedKeySet()  # 8 bytes per written key, not a set of strings (1.3M-sample sources)
        self._fh: io.BufferedWriter | None = None
        self._hashing: _HashingFile | None = None  # set while a tar is open
        self._count = 0
        self._payload = 0
        for stale in self.out_dir.glob(f".{prefix}-*.tar{TMP_SUFFIX}"):
            stale.unlink()  # left by a killed build: never complete, never read

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open(self) -> None:
        final = self.out_dir / shard_name(self.prefix, self.number)
        tmp = final.with_name(f".{final.name}{TMP_SUFFIX}")
        self._fh = open(tmp, "wb")
        self._hashing = _HashingFile(self._fh)
        self._count = 0
        self._payload = 0

    def _current(self) -> Path:
        return self.out_dir / shard_name(self.prefix, self.number)

    def _finish(self) -> None:
        try:
            self._finish_tar()
        except OSError as err:
            raise _naming(err, self._current()) from err

    def _finish_tar(self) -> None:
        assert self._fh is not None and self._hashing is not None
        # end of archive as tarfile writes it: two zero blocks, then zeros up to a whole record
        end = 2 * _BLOCK
        end += -(self._hashing.size + end) % tarfile.RECORDSIZE
        self._hashing.write(bytes(end))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        final = self.out_dir / shard_name(self.prefix, self.number)
        os.replace(final.with_name(f".{final.name}{TMP_SUFFIX}"), final)
        fsync_dir(self.out_dir)
        info = ShardInfo(final.name, self._count, self._hashing.size, self._hashing.sha.hexdigest())
        self.shards.append(info)
        self._fh = self._hashing = None
        self.number += 1
        if self.on_shard is not None:
            self.on_shard(info)

    def abort(self) -> None:
        """Drop the shard being written (its temporary file is removed)."""
        if self._fh is not None:
            name = Path(self._fh.name)
            try:
                self._fh.close()
            except OSError:  # flushing the rest failed too (a full disk): the file goes anyway
                pass
            name.unlink(missing_ok=True)
        self._fh = self._hashing = None

    def close(self) -> list[ShardInfo]:
        if self._hashing is not None:
            self._finish()
        return self.shards

    def __contains__(self, key: object) -> bool:
        """Whether a sample with this key was written (or :meth:`remember`-ed) already."""
        return key in self._keys

    def remember(self, keys: Iterable[str]) -> None:
        """Keys written by an earlier, interrupted run into the tars this writer continues."""
        self._keys.update(keys)

    # -- writing ---------------------------------------------------------------------------
    def write(self, sample: Sample) -> None:
        self.write_members(sample.key, sample.to_members())

    def write_members(self, key: str, members: dict[str, bytes]) -> None:
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        size = sum(len(v) for v in members.values())
        if self._hashing is not None and (
            self._count >= self.max_count or (self._count and self._payload + size > self.max_bytes)
        ):
            self._finish()
        if self._hashing is None:
            try:
                self._open()
            except OSError as err:
                raise _naming(err, self._current()) from err
        assert self._hashing is not None
        parts: list[bytes] = []  # the whole sample in one write (and one hash update)
        for suffix in sorted(members):
            data = members[suffix]
            parts += (_member_header(f"{key}.{suffix}", len(data)), data)
            if len(data) % _BLOCK:
                parts.append(_NUL_BLOCK[len(data) % _BLOCK :])
        try:
            self._hashing.write(b"".join(parts))
        except OSError as err:
            raise _naming(err, self._current()) from err
        self._keys.add(key)
        self._count += 1
        self._payload += size


# -- index ---------------------------------------------------------------------------------
def write_index(out_dir: os.PathLike | str, shards: Iterable[ShardInfo], *, index_name: str = INDEX_NAME,
                **extra: Any) -> dict[str, Any]:
    """Write ``index.json`` (or ``index_name``, e.g. a partition's ``index-p0000of0004.json``)."""
    shards = sorted(shards, key=lambda s: s.name)
    index = {
        "format": INDEX_FORMAT,
        "shards": [asdict(s) for s in shards],
        "total_samples": sum(s.samples for s in shards),
        "total_bytes": sum(s.bytes for s in shards),
        **extra,
    }
    write_json_atomic(Path(out_dir) / index_name, index)
    return index


def load_index(shard_dir: os.PathLike | str) -> dict[str, Any]:
    path = Path(shard_dir) / INDEX_NAME
    if not path.is_file():
        raise ShardError(path, "no index.json: not a finished shard folder")
    try:
        index = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise ShardError(path, f"not valid JSON ({exc})") from exc
    if index.get("format") != INDEX_FORMAT:
        raise ShardError(path, f"unknown format {index.get('format')!r}")
    return index


def list_shards(source: os.PathLike | str | Iterable[os.PathLike | str]) -> list[Path]:
    """Tar paths of a shard folder (from its index, else sorted glob), a tar, or a list of either."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.is_dir():
            if (path / INDEX_NAME).is_file():
                return [path / s["name"] for s in load_index(path)["shards"]]
            return sorted(path.glob("*.tar"))
        if path.suffix == ".tar" and path.is_file():
            return [path]
        raise ShardError(path, "neither a shard folder nor a .tar file")
    out: list[Path] = []
    for item in source:
        out.extend(list_shards(item))
    return out


def require_shards(paths: Iterable[os.PathLike | str], option: str) -> None:
    """Refuse, before any work, a path that is not a shard folder (with index.json or .tar files) or a .tar:
    a ``ShardPathError`` naming the option and the path as typed."""
    from vlhealth.cli_errors import shown_path

    for p in paths:
        raw = shown_path(p)
        path = Path(p)
        what = "give a shard folder written by `vlhealth build` (or a .tar of one)"
        if not path.exists():
            raise ShardPathError(f"{option} {raw}: no such folder or file; {what}")
        if path.is_dir() and not (path / INDEX_NAME).is_file() and not any(path.glob("*.tar")):
            raise ShardPathError(f"{option} {raw}: no shards here (no {INDEX_NAME}, no .tar files); {what}")
        if path.is_file() and path.suffix != ".tar":
            raise ShardPathError(f"{option} {raw}: not a .tar file; {what}")


class ShardPathError(ValueError):
    """A command-line path that is not a shard folder or tar."""


def verify_shards(shard_dir: os.PathLike | str) -> list[str]:
    """Problems found comparing the tars with index.json (empty list = all good)."""
    problems = []
    shard_dir = Path(shard_dir)
    for entry in load_index(shard_dir)["shards"]:
        path = shard_dir / entry["name"]
        if not path.is_file():
            problems.append(f"{entry['name']}: missing")
            continue
        digest = file_sha256(path)
        if digest != entry["sha256"]:
            problems.append(f"{entry['name']}: sha256 differs from index.json")
    return problems


_VERIFIED: dict[tuple[str, int, int], str] = {}  # (real path, size, mtime_ns) -> sha256, per process


def file_sha256(path: os.PathLike | str) -> str:
    """sha256 of a file, read in 1 MiB chunks (tars are up to 512 MiB)."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def verify_tars(tars: Iterable[os.PathLike | str]) -> int:
    """Check every tar against the sha256 that ``index.json`` of its folder records, before anything reads it.

    Raises :class:`ShardError` naming the tar when its bytes differ from what was built (bit rot, a
    partial copy, an edit), or when the folder's ``index.json`` does not list it. A tar without an
    ``index.json`` beside it has nothing to be compared with and passes. A tar is hashed once per
    process while its size and mtime stay the same. Returns the number of tars compared.
    """
    indexes: dict[Path, dict[str, str] | None] = {}
    checked = 0
    for tar in tars:
        path = Path(tar)
        folder = path.parent
        if folder not in indexes:
            indexes[folder] = ({s["name"]: s["sha256"] for s in load_index(folder)["shards"]}
                               if (folder / INDEX_NAME).is_file() else None)
        listed = indexes[folder]
        if listed is None:
            continue
        if path.name not in listed:
            raise ShardError(path, f"not listed in {INDEX_NAME}: it is not part of the build that wrote the folder")
        stat = path.stat()
        token = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        digest = _VERIFIED.get(token) or file_sha256(path)
        if digest != listed[path.name]:
            raise ShardError(path, f"sha256 {digest[:16]}... differs from {INDEX_NAME} ({listed[path.name][:16]}...): "
                                   "the file changed after the build (rebuild or re-copy it; --no-verify skips the check)")
        _VERIFIED[token] = digest
        checked += 1
    return checked


# -- reading -------------------------------------------------------------------------------
def check_member(path: os.PathLike | str, info: tarfile.TarInfo) -> tuple[str, str]:
    """(key, suffix) of a safe member; refuses links, devices, absolute paths and ``..``."""
    name = info.name
    if not info.isfile():
        raise ShardError(path, "not a regular file (links and devices are refused)", name)
    posix = PurePosixPath(name)
    if name.startswith(("/", "\\")) or posix.is_absolute() or re.match(r"^[A-Za-z]:", name):
        raise ShardError(path, "absolute member path refused", name)
    if ".." in posix.parts or "\\" in name:
        raise ShardError(path, "member path escapes the archive ('..' or backslash)", name)
    match = _KEY_EXT_RE.match(name)
    if not match:
        raise ShardError(path, "member name has no '<key>.<ext>' form", name)
    return match.group(1), match.group(2)


def iter_tar(path: os.PathLike | str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {suffix: bytes})`` per sample of one tar, in file order."""
    key: str | None = None
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                k, suffix = check_member(path, info)
                if k != key:
                    if key is not None:
                        yield key, members
                    key, members = k, {}
                if suffix in members:
                    raise ShardError(path, "duplicate member", info.name)
                fh = tar.extractfile(info)
                assert fh is not None
                members[suffix] = fh.read()
    except tarfile.TarError as exc:
        raise ShardError(path, f"unreadable tar ({exc})") from exc
    if key is not None:
        yield key, members


def iter_samples(source: os.PathLike | str | Iterable[os.PathLike | str]) -> Iterator[Sample]:
    """Validated :class:`Sample` objects from shard folders or tars."""
    for tar in list_shards(source):
        for key, members in iter_tar(tar):
            yield Sample.from_members(key, members)


def iter_records(source: os.PathLike | str | Iterable[os.PathLike | str]) -> Iterator[tuple[str, dict, dict[str, int]]]:
    """Cheap pass for statistics: ``(key, json record, {suffix: size})`` without decoding images."""
    for tar in list_shards(source):
        for key, members in iter_tar(tar):
            if "json" not in members:
                raise ShardError(tar, "sample without json member", key)
            yield key, json.loads(members["json"]), {k: len(v) for k, v in members.items()}


class TarIndex:
    """Member offsets of one tar: ``keys`` in file order, ``members[key][suffix] = (offset, size)``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: list[str] = []
        self.members: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            with tarfile.open(path, mode="r:") as tar:
                for info in tar:  # reads headers only; data is skipped by seeking
                    key, suffix = check_member(path, info)
                    entry = self.members.get(key)
                    if entry is None:
                        entry = self.members[key] = {}
                        self.keys.append(key)
                    elif self.keys[-1] != key:
                        raise ShardError(path, f"members of sample {key!r} are not contiguous", info.name)
                    if suffix in entry:
                        raise ShardError(path, "duplicate member", info.name)
                    entry[suffix] = (info.offset_data, info.size)
        except tarfile.TarError as exc:
            raise ShardError(path, f"unreadable tar ({exc})") from exc
        except OSError as exc:
            raise ShardError(path, f"cannot read ({exc.strerror or exc})") from exc


class TarReader:
    """Random access to members, with a few open file handles and member indexes cached."""

    def __init__(self) -> None:
        self._indexes: dict[Path, TarIndex] = {}
        self._files: OrderedDict[Path, Any] = OrderedDict()

    def index(self, path: Path) -> TarIndex:
        idx = self._indexes.get(path)
        if idx is None:
            idx = self._indexes[path] = TarIndex(path)
        return idx

    def _file(self, path: Path) -> Any:
        fh = self._files.get(path)
        if fh is None:
            fh = self._files[path] = open(path, "rb")  # noqa: SIM115 - cached handle
            if len(self._files) > _MAX_OPEN_FILES:
                _, old = self._files.popitem(last=False)
                old.close()
        else:
            self._files.move_to_end(path)
        return fh

    def read(self, path: Path, key: str, suffixes: Sequence[str]) -> dict[str, bytes]:
        """The wanted members of one sample (missing ones are left out)."""
        entry = self.index(path).members[key]
        fh = self._file(path)
        out: dict[str, bytes] = {}
        for suffix in suffixes:
            loc = entry.get(suffix)
            if loc is None:
                continue
            fh.seek(loc[0])
            data = fh.read(loc[1])
            if len(data) != loc[1]:
                raise ShardError(path, "member truncated", f"{key}.{suffix}")
            out[suffix] = data
        return out

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()
