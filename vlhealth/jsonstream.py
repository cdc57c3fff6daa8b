"""Rows of an annotation file, parsed incrementally: memory does not grow with the file.

Upstream annotation files come in three shapes, told apart by their first bytes:

* a JSON **list** of rows (``[{...}, {...}]``; PubMedVision, LLaVA, SLAKE, ...): parsed with ``ijson``
  one row at a time, rows numbered from 0;
* **JSON lines** (one object per line): parsed line by line, rows numbered by line (from 1);
* a JSON **object of objects** (``{"id": {...}, ...}``): each value is a row with its key as ``_id``.

Text must be UTF-8: bytes are decoded strictly (a UTF-8 BOM is skipped). In JSON lines a bad line
(invalid JSON, invalid UTF-8, nested too deep) refuses that row only; in a list, a syntax or
encoding error ends the file there: the rows before it are kept and one reject for the file says
where it broke. Every failure becomes a :class:`~vlhealth.build.Reject` with a deterministic reason.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from vlhealth.build import Reject, Rejected
from vlhealth.limits import Limits, json_depth_exceeds, plain_reason

_BOM = codecs.BOM_UTF8
_PEEK = 1 << 16


class NotUtf8Error(ValueError):
    def __init__(self, offset: int, byte: int):
        self.offset = offset
        super().__init__(f"not UTF-8: byte 0x{byte:02x} at offset {offset:,} does not decode")


class _Utf8Checked:
    """A binary reader that passes bytes through while checking that they decode as UTF-8."""

    def __init__(self, fh: IO[bytes], offset: int = 0):
        self._fh = fh
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self.offset = offset  # bytes handed out so far (absolute in the file)
        self._error: NotUtf8Error | None = None

    def read(self, size: int = -1) -> bytes:
        if self._error is not None:
            raise self._error
        data = self._fh.read(size)
        pending = len(self._decoder.getstate()[0])  # bytes of a sequence cut by the previous chunk
        try:
            self._decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            start = max(exc.start - pending, 0)
            self._error = NotUtf8Error(self.offset + start, data[start] if start < len(data) else 0)
            # hand out the good bytes before the bad one first: the rows they complete are kept
            data = data[:start]
            if not data:
                raise self._error from None
        self.offset += len(data)
        return data


def _first_byte(fh: IO[bytes]) -> tuple[bytes, int]:
    """The first non-blank byte and its offset (after a BOM); ``b""`` for an empty file."""
    head = fh.read(_PEEK)
    start = len(_BOM) if head.startswith(_BOM) else 0
    stripped = head[start:].lstrip()
    offset = start + (len(head) - start - len(stripped))
    return stripped[:1], offset


def iter_json_rows(path: Path, rel: str, limits: Limits | None = None) -> Iterator[tuple[int, Any] | Reject]:
    """``(row number, row)`` for every row of the annotation file ``path`` (shown as ``rel``), and
    :class:`Reject` entries for what cannot be read. A file that is no list of rows at all raises
    :class:`Rejected` before the first row."""
    limits = limits or Limits()
    with open(path, "rb") as fh:
        first, offset = _first_byte(fh)
        if first == b"[":
            fh.seek(offset)
            yield from _list_rows(fh, rel, limits)
            return
        if first != b"{":
            shown = "an empty file" if not first else f"starts with {first.decode('latin-1')!r}"
            raise Rejected(rel, f"bad json: {shown}, expected a list of rows, JSON lines or an object of rows")
        fh.seek(offset)
        if _looks_like_json_lines(fh):
            fh.seek(0)
            yield from _json_lines(fh, rel, limits)
            return
        fh.seek(offset)
        yield from _object_rows(fh, rel, limits, offset)


def _ijson_reason(exc: BaseException) -> str:
    """The first line of a parser message (yajl's carry a multi-line excerpt of the input)."""
    text = str(exc).strip()
    if text[:2] in ("b'", 'b"'):  # yajl messages arrive as the repr of bytes
        text = text[2:].replace("\\n", "\n")
    first = text.splitlines()[0].strip() if text else ""
    return plain_reason(first or type(exc).__name__)


def _looks_like_json_lines(fh: IO[bytes]) -> bool:
    """Whether the first line is a whole JSON object and another non-blank line follows."""
    line = fh.readline(_PEEK * 16)
    if not line.endswith(b"\n"):
        return False
    try:
        json.loads(line)
    except (ValueError, RecursionError):
        return False
    return any(more.strip() for more in iter(lambda: fh.readline(_PEEK), b""))


def _row_problem(row: Any, limits: Limits) -> str | None:
    if json_depth_exceeds(row, limits.max_json_depth):
        return f"nested deeper than {limits.max_json_depth} levels"
    return None


class _TooDeep:
    """Stands for a row that nests deeper than the limit (never built)."""


def _array_items(events: Iterator[tuple[str, Any]], max_depth: int) -> Iterator[Any]:
    """The elements of a top-level JSON array, built from ijson's ``basic_parse`` events."""
    for _key, value in _top_level_items(events, max_depth):
        yield value


def _top_level_items(events: Iterator[tuple[str, Any]], max_depth: int) -> Iterator[tuple[Any, Any]]:
    """``(key, value)`` of each member of the top-level JSON array (key None) or object, built from
    ijson's ``basic_parse`` events.

    Rows are built here rather than by ``ijson.items``, whose builder keeps a prefix string per open
    level: a 20 KB row nested 10,000 deep cost it ~250 MB. A row nested deeper than ``max_depth`` is
    skipped while it is read and comes as :class:`_TooDeep`."""
    depth = 0  # open containers, the top-level one included
    stack: list[Any] = []  # containers of the row being built
    keys: list[Any] = []  # per open container: the pending key of a map (None for a list)
    top_key: Any = None  # the key of the current row in a top-level object
    skipping = False
    for event, value in events:
        if event in ("start_map", "start_array"):
            depth += 1
            if depth == 1:
                continue
            if skipping or depth - 1 > max_depth:
                skipping = True
                continue
            container: Any = {} if event == "start_map" else []
            if stack:
                _attach(stack, keys, container)
            stack.append(container)
            keys.append(None)
        elif event in ("end_map", "end_array"):
            depth -= 1
            if depth == 0:
                return
            if skipping:
                if depth == 1:
                    skipping, stack, keys = False, [], []
                    yield top_key, _TooDeep()
                continue
            if depth - 1 < len(stack):
                done = stack.pop()
                keys.pop()
                if not stack:
                    yield top_key, done
        elif event == "map_key":
            if depth == 1:
                top_key = value
            elif not skipping:
                keys[-1] = value
        elif depth == 1:
            yield top_key, value  # a scalar row
        elif not skipping:
            _attach(stack, keys, value)


def _attach(stack: list[Any], keys: list[Any], value: Any) -> None:
    parent = stack[-1]
    if isinstance(parent, dict):
        parent[keys[-1]] = value
    else:
        parent.append(value)


def _list_rows(fh: IO[bytes], rel: str, limits: Limits) -> Iterator[tuple[int, Any] | Reject]:
    import ijson

    checked = _Utf8Checked(fh, fh.tell())
    n = 0
    try:
        for row in _array_items(ijson.basic_parse(checked, use_float=True), limits.max_json_depth):
            if isinstance(row, _TooDeep):
                yield Reject(rel, f"bad row: row {n} is nested deeper than {limits.max_json_depth} levels", f"row {n}")
            else:
                yield n, row
            n += 1
    except NotUtf8Error as exc:
        yield Reject(rel, f"{exc}; the file is refused from there (rows 0-{n - 1} were read)" if n
                     else f"{exc}; the file is refused")
    except (ijson.JSONError, ijson.IncompleteJSONError, RecursionError) as exc:
        detail = _ijson_reason(exc)
        where = f"after row {n - 1}; rows 0-{n - 1} were read" if n else "before the first row; the file is refused"
        yield Reject(rel, f"bad json: {detail} ({where})")


def _json_lines(fh: IO[bytes], rel: str, limits: Limits) -> Iterator[tuple[int, Any] | Reject]:
    for i, raw in enumerate(fh, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield Reject(rel, f"bad row: line {i} is not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
                         f"row {i}")
            continue
        if i == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Reject(rel, f"bad row: line {i} is not valid JSON ({exc.msg})", f"row {i}")
            continue
        except RecursionError:
            row = None
            problem: str | None = f"nested deeper than {limits.max_json_depth} levels"
        else:
            problem = _row_problem(row, limits)
        if problem is not None:
            yield Reject(rel, f"bad row: line {i} is {problem}", f"row {i}")
            continue
        yield i, row


def _object_rows(fh: IO[bytes], rel: str, limits: Limits, offset: int) -> Iterator[tuple[int, Any] | Reject]:
    """Rows of an object of objects; a value that is no object refuses the file (checked before any row)."""
    import ijson

    try:
        for _key, value in _top_level_items(ijson.basic_parse(_Utf8Checked(fh, offset), use_float=True),
                                            limits.max_json_depth):
            if not isinstance(value, dict | _TooDeep):
                raise Rejected(rel, "bad json: top level is dict, expected a list of rows")
    except NotUtf8Error as exc:
        raise Rejected(rel, f"{exc}; the file is refused") from None
    except (ijson.JSONError, ijson.IncompleteJSONError, RecursionError) as exc:
        raise Rejected(rel, f"bad json: {_ijson_reason(exc)}") from None
    fh.seek(offset)
    for i, (key, value) in enumerate(_top_level_items(ijson.basic_parse(fh, use_float=True), limits.max_json_depth)):
        if isinstance(value, _TooDeep):
            yield Reject(rel, f"bad row: row {i} is nested deeper than {limits.max_json_depth} levels", f"row {i}")
            continue
        yield i, {**value, "_id": key}
