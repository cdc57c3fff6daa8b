"""Paths relative to a source root: the one rule builders, the build runner and volume IO share.

Outputs name input files relative to the source root, never by the building machine's absolute
path. A root's sub-folders are often symlinks to other disks (``images/ -> /mnt/big/images``), so
the path is first taken as it was named (lexically, after collapsing ``..``) and only then through
the resolved targets.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["root_relative"]


def root_relative(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str | None:
    """``path`` relative to ``root`` in POSIX form, or None when it lies outside the root."""
    p, r = Path(path), Path(root)
    named = Path(os.path.normpath(p.absolute()))
    base = Path(os.path.normpath(r.absolute()))
    try:
        return named.relative_to(base).as_posix()
    except ValueError:
        pass
    try:
        return p.resolve().relative_to(r.resolve()).as_posix()
    except ValueError:
        return None
