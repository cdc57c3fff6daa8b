"""Judging a finished run's loss per task: did it fall, and did any task end above its start?

A mixed run alternates tasks, so one overall first/last pair compares different tasks; the trainer
therefore keeps a per-task summary (``loss_by_task`` in ``train_summary.json``: the mean of each
task's first and last few step losses). :func:`divergence_warnings` turns that summary into plain
warnings for the tasks whose loss *rose*, which the trainer prints and stores, so a run like a
generation loss going 5.4 -> 11.9 is never silent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["DEFAULT_TARGET_RATIO", "divergence_warnings", "loss_ratios"]

# the project's bar for "this stage learned": each task's loss ends at most 70% of where it started
DEFAULT_TARGET_RATIO = 0.7


def loss_ratios(by_task: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``last / first`` per task (NaN-free: tasks with a non-positive or non-finite start are left out)."""
    out: dict[str, float] = {}
    for task, v in by_task.items():
        first, last = float(v.get("first", math.nan)), float(v.get("last", math.nan))
        if math.isfinite(first) and math.isfinite(last) and first > 0:
            out[task] = last / first
    return out


def divergence_warnings(by_task: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One sentence per task whose loss ended above where it started (empty list: none rose).

    ``by_task`` is the trainer's ``loss_by_task`` summary: ``{task: {"first", "last", "n", "steps"}}``.
    A task whose end is not finite (NaN/inf) counts as diverged too.
    """
    warnings: list[str] = []
    for task in sorted(by_task):
        v = by_task[task]
        first, last = float(v.get("first", math.nan)), float(v.get("last", math.nan))
        n, steps = v.get("n", "?"), v.get("steps", "?")
        if not math.isfinite(last) or (math.isfinite(first) and last > first):
            warnings.append(
                f"{task}: loss rose from {first:.4f} to {last:.4f} (mean of the first/last {n} of its {steps} "
                f"steps): this task diverged; check the learning rate and warm-up for this stage, the spike "
                f"guard's skipped steps in metrics.jsonl, and whether its targets are learnable at all"
            )
    return warnings
