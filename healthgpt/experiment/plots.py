"""Loss curves of an experiment: one figure, one panel per task, one line per cell (mean over the
seeds, the band ± one std), on the optimizer steps of the whole pipeline (stages one after another,
their boundaries dotted)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from healthgpt.experiment.results import read_loss_curve

if TYPE_CHECKING:
    from healthgpt.experiment.results import ExperimentResults

__all__ = ["cell_curves", "plot_loss_curves", "stage_boundaries"]


def _run_segments(steps: list[str]) -> list[tuple[str, list[tuple[int, str, float]]]]:
    """Per train step folder: its loss curve with steps made cumulative over the pipeline."""
    out = []
    offset = 0
    for step_dir in steps:
        curve = read_loss_curve(step_dir)
        out.append((step_dir, [(offset + s, t, loss) for s, t, loss in curve]))
        offset += max((s for s, _, _ in curve), default=0)
    return out


def stage_boundaries(res: ExperimentResults, cell: str) -> list[int]:
    """Cumulative optimizer steps where a cell's pipeline moves to its next train step (first finished seed)."""
    for run in (r for r in res.runs if r.cell == cell and res.finished(r)):
        segments = _run_segments([s.out for s in run.steps])
        return [max((s for s, _, _ in curve), default=0) for _, curve in segments[:-1]]
    return []


def cell_curves(res: ExperimentResults, cell: str) -> dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Task -> segments of ``(steps, mean loss, std loss)`` over the cell's finished seeds."""
    runs = [r for r in res.runs if r.cell == cell and res.finished(r)]
    per_task: dict[tuple[str, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    for run in runs:
        for seg_i, (_, curve) in enumerate(_run_segments([s.out for s in run.steps])):
            for task in sorted({t for _, t, _ in curve}):
                pts = [(s, loss) for s, t, loss in curve if t == task]
                x = np.array([p[0] for p in pts], dtype=float)
                y = np.array([p[1] for p in pts], dtype=float)
                per_task.setdefault((task, seg_i), []).append((x, y))
    out: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    for (task, _), series in sorted(per_task.items()):
        lo = min(x[0] for x, _ in series)
        hi = max(x[-1] for x, _ in series)
        grid = np.arange(lo, hi + 1, dtype=float)
        stack = np.full((len(series), grid.size), np.nan)
        for i, (x, y) in enumerate(series):
            inside = (grid >= x[0]) & (grid <= x[-1])
            stack[i, inside] = np.interp(grid[inside], x, y)
        with np.errstate(invalid="ignore"):
            mean = np.nanmean(stack, axis=0)
            std = np.nanstd(stack, axis=0, ddof=1) if len(series) > 1 else np.zeros_like(mean)
        out.setdefault(task, []).append((grid, mean, np.nan_to_num(std)))
    return out


def plot_loss_curves(res: ExperimentResults, path: str | Path) -> Path | None:
    """Write the experiment's loss-curve PNG; None when no run has finished yet."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {cell.key: cell_curves(res, cell.key) for cell in res.exp.cells}
    tasks = sorted({t for c in curves.values() for t in c})
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.0 * len(tasks), 4.2), squeeze=False)
    colours = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    for ax, task in zip(axes[0], tasks, strict=True):
        for i, (cell, by_task) in enumerate(curves.items()):
            colour = colours(i % colours.N)
            for edge in stage_boundaries(res, cell):
                ax.axvline(edge + 0.5, color=colour, ls=":", lw=0.9, alpha=0.6)
            for j, (x, mean, std) in enumerate(by_task.get(task, [])):
                ax.plot(x, mean, color=colour, lw=1.6, label=cell if j == 0 else None)
                ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.15, lw=0)
        ax.set_title(f"{task} loss")
        ax.set_xlabel("optimizer step (whole pipeline)")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ax.legend(fontsize=8)
    fig.suptitle(f"{res.exp.title} ({res.form} form; mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
