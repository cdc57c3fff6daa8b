"""The one progress-bar layout of the project's long-running commands (builds, training)."""

from __future__ import annotations

from typing import Any


def progress_bar(label: str, *fields: str, console: Any = None, enabled: bool = True) -> Any:
    """A rich ``Progress``: label, bar, done/total, extra ``fields`` (rich format strings that may read
    ``task.fields``), elapsed time and ETA. Disabled bars cost nothing (e.g. non-zero ranks)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), *(TextColumn(f) for f in fields),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, disable=not enabled,
    )
