"""Bounded-memory bookkeeping of a build: the discovered items on disk, and hashed key sets.

A comprehension source has up to ~1.3M rows (PubMedVision). Holding one :class:`~vlhealth.build.Item`
per row in memory, sorted, costs gigabytes; the build runner instead spills every discovered item
into an :class:`ItemStore` (a temporary SQLite file next to the shards) and reads the items back in
id order, one at a time. Only ids and groups are indexed; the items themselves are pickled blobs.

SQLite compares TEXT with ``memcmp`` on UTF-8, which orders strings exactly as Python's ``sorted``
does (UTF-8 preserves code point order), so the streamed order equals the in-memory sort, and ties
(the same id discovered twice) keep the discovery order through the ``seq`` column.

:class:`HashedKeySet` remembers which sample keys / upstream ids were taken with 8 bytes per key
(an open-addressing table of 64-bit BLAKE2b digests in a NumPy array) instead of a Python ``set``
of strings (~100 bytes per key). Two different keys share a digest with probability about
``n^2 / 2^65`` (5e-8 for 1.3M keys).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


def key_digest(key: str) -> int:
    """A non-zero 64-bit digest of ``key`` (0 marks an empty slot of :class:`HashedKeySet`)."""
    value = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return value or 1


class HashedKeySet:
    """A set of strings stored as 64-bit digests: ``add``, ``in``, ``len``, ``update``."""

    def __init__(self, keys: Iterable[str] = (), capacity: int = 1024) -> None:
        size = 1 << max(10, int(capacity * 2 - 1).bit_length())
        self._table = np.zeros(size, dtype=np.uint64)
        self._mask = size - 1
        self._count = 0
        self.update(keys)

    def __len__(self) -> int:
        return self._count

    def _slot(self, digest: int) -> int:
        table, mask = self._table, self._mask
        i = digest & mask
        while True:
            here = int(table[i])
            if here == 0 or here == digest:
                return i
            i = (i + 1) & mask

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        digest = key_digest(key)
        return int(self._table[self._slot(digest)]) == digest

    def add(self, key: str) -> bool:
        """Add ``key``; True when it was new."""
        digest = key_digest(key)
        i = self._slot(digest)
        if int(self._table[i]) == digest:
            return False
        self._table[i] = digest
        self._count += 1
        if self._count * 2 > len(self._table):
            self._grow()
        return True

    def update(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.add(key)

    def _grow(self) -> None:
        old = self._table[self._table != 0]
        self._table = np.zeros(len(self._table) * 2, dtype=np.uint64)
        self._mask = len(self._table) - 1
        for digest in old.tolist():
            self._table[self._slot(int(digest))] = digest


class ItemStore:
    """Discovered items of one build in a temporary SQLite file ``folder/name`` (removed by :meth:`close`;
    one name per partition, so partitions built side by side into one folder keep apart).

    ``add(item)`` while discovering; then :meth:`drop_duplicates` (refusing the later copies of an id),
    optionally :meth:`set_partition`, and :meth:`iter_items` / :meth:`ids` / :meth:`count` in id order.
    """

    def __init__(self, folder: os.PathLike | str, name: str = ".items.sqlite") -> None:
        self.path = Path(folder) / name
        self.path.unlink(missing_ok=True)  # left by a killed build: rebuilt from the source every time
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("PRAGMA temp_store=FILE")
        self._db.execute("PRAGMA cache_size=-2048")  # 2 MiB of page cache, whatever the item count
        self._db.execute("CREATE TABLE items (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, grp TEXT NOT NULL, "
                         "file TEXT NOT NULL, part INTEGER NOT NULL DEFAULT 0, blob BLOB NOT NULL)")
        self._db.execute("CREATE TABLE rejects (seq INTEGER PRIMARY KEY, line TEXT NOT NULL)")
        self._db.execute("BEGIN")
        self._seq = 0
        self._rejects = 0
        self._indexed = False

    def __enter__(self) -> ItemStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._db.close()
        finally:
            self.path.unlink(missing_ok=True)

    def add(self, item: Any) -> None:
        file = item.files[0] if item.files else item.id
        self._db.execute("INSERT INTO items (seq, id, grp, file, blob) VALUES (?, ?, ?, ?, ?)",
                         (self._seq, item.id, item.group, file, pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)))
        self._seq += 1

    def add_reject(self, line: str) -> None:
        """Keep one ``rejects.jsonl`` line (discovery rejects can be many: multi-image rows, ...)."""
        self._db.execute("INSERT INTO rejects (seq, line) VALUES (?, ?)", (self._rejects, line))
        self._rejects += 1

    def reject_lines(self) -> Iterator[str]:
        """The kept lines, in the order they were added."""
        for (line,) in self._db.execute("SELECT line FROM rejects ORDER BY seq"):
            yield line

    def _index(self) -> None:
        if not self._indexed:
            self._db.execute("COMMIT")
            self._db.execute("CREATE INDEX items_by_id ON items (id, seq)")
            self._indexed = True

    def drop_duplicates(self) -> Iterator[tuple[str, str, str]]:
        """Remove every item whose id an earlier discovered item has; yields ``(id, file, kept_file)``
        for each, in id order (the caller turns them into rejects)."""
        self._index()
        dropped: list[int] = []
        previous: tuple[str, str] | None = None
        for seq, ident, file in self._db.execute("SELECT seq, id, file FROM items ORDER BY id, seq"):
            if previous is not None and previous[0] == ident:
                dropped.append(seq)
                yield ident, file, previous[1]
            else:
                previous = (ident, file)
        for start in range(0, len(dropped), 500):
            chunk = dropped[start:start + 500]
            self._db.execute(f"DELETE FROM items WHERE seq IN ({','.join('?' * len(chunk))})", chunk)

    def groups(self) -> Iterator[str]:
        """The distinct groups, sorted."""
        self._index()
        self._db.execute("CREATE INDEX IF NOT EXISTS items_by_group ON items (grp)")
        for (group,) in self._db.execute("SELECT DISTINCT grp FROM items ORDER BY grp"):
            yield group

    def set_partition(self, n: int) -> None:
        """Give each item the partition of its group: round-robin over the sorted groups (as
        :func:`vlhealth.build.partition_groups`)."""
        self._index()
        self._db.execute("BEGIN")
        self._db.execute("CREATE TEMP TABLE parts (grp TEXT PRIMARY KEY, part INTEGER NOT NULL)")
        self._db.execute("INSERT INTO parts SELECT grp, (ROW_NUMBER() OVER (ORDER BY grp) - 1) % ? "
                         "FROM (SELECT DISTINCT grp FROM items)", (n,))
        self._db.execute("UPDATE items SET part = (SELECT part FROM parts WHERE parts.grp = items.grp)")
        self._db.execute("DROP TABLE parts")
        self._db.execute("COMMIT")

    def _where(self, part: int | None) -> tuple[str, tuple[Any, ...]]:
        return ("", ()) if part is None else (" WHERE part = ?", (part,))

    def count(self, part: int | None = None) -> int:
        self._index()
        where, args = self._where(part)
        return int(self._db.execute(f"SELECT COUNT(*) FROM items{where}", args).fetchone()[0])

    def ids(self, part: int | None = None) -> Iterator[str]:
        self._index()
        where, args = self._where(part)
        for (ident,) in self._db.execute(f"SELECT id FROM items{where} ORDER BY id, seq", args):
            yield ident

    def id_at(self, position: int, part: int | None = None) -> str | None:
        self._index()
        where, args = self._where(part)
        row = self._db.execute(f"SELECT id FROM items{where} ORDER BY id, seq LIMIT 1 OFFSET ?",
                               (*args, position)).fetchone()
        return None if row is None else str(row[0])

    def iter_items(self, part: int | None = None, start: int = 0) -> Iterator[Any]:
        """The items in id order (from position ``start``), unpickled one at a time."""
        self._index()
        where, args = self._where(part)
        cursor = self._db.execute(f"SELECT blob FROM items{where} ORDER BY id, seq LIMIT -1 OFFSET ?",
                                  (*args, start))
        for (blob,) in cursor:
            yield pickle.loads(blob)

    def load_all(self, part: int | None = None) -> list[Any]:
        """Every item in memory (for the builders that need the whole list, e.g. ``preset_splits``)."""
        return list(self.iter_items(part))
