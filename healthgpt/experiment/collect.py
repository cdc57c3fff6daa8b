"""Assemble results from whatever runs have finished (``healthgpt experiment collect``).

:func:`collect` reads every experiment folder under OUT (:mod:`healthgpt.experiment.results`:
metrics per run, mean ± std per cell, time ratios, claim verdicts) and writes under OUT:
``results.json``, ``results.md`` (one table per experiment, the paper's row under ours,
:mod:`healthgpt.experiment.tables`), ``<experiment>/loss_curves.png`` (:mod:`healthgpt.experiment.plots`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from healthgpt.experiment.results import (
    EXPERIMENT_FILE,
    ExperimentResults,
    collect_experiment,
    read_loss_curve,
    run_metrics,
    step_time,
)

__all__ = ["ExperimentResults", "collect", "collect_experiment", "read_loss_curve", "run_metrics", "step_time"]


def collect(out: str | Path, *, plots: bool = True) -> list[ExperimentResults]:
    """Collect every experiment folder under ``out``; write results.json, results.md and the plots."""
    from healthgpt.experiment.tables import results_markdown
    from vlhealth.shards import write_atomic

    out = Path(out)
    dirs = sorted(p.parent for p in out.glob(f"*/{EXPERIMENT_FILE}"))
    if not dirs:
        from healthgpt.experiment.spec import ExperimentError

        raise ExperimentError(f"{os.fspath(out)}: no experiment folders (*/{EXPERIMENT_FILE}) to collect; give the --out "
                              "folder of `healthgpt experiment run`")
    results = [collect_experiment(d) for d in dirs]
    figures: dict[str, str] = {}
    if plots:
        from healthgpt.experiment.plots import plot_loss_curves

        for res, d in zip(results, dirs, strict=True):
            png = plot_loss_curves(res, d / "loss_curves.png")
            if png is not None:
                figures[res.exp.name] = str(png.relative_to(out))
    doc = {"format": "healthgpt-experiment-results/1", "experiments": [r.to_json() for r in results],
           "figures": figures}
    # keys in table order (cells as the YAML lists them), not sorted
    write_atomic(out / "results.json", (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    write_atomic(out / "results.md", results_markdown(results, figures).encode("utf-8"))
    return results
