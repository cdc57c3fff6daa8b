"""Did a run learn? Its scores against the baselines in its own ``eval/report.json``.

:func:`baseline_margins` gives, per score metric of :func:`healthgpt.experiment.scores.report_metrics`,
``margin:<metric>`` = the model's value minus the best baseline's, each baseline scored on the same
items and aggregated the same way as the model (> 0: the run beat every baseline; for ``mse``, lower
is better and the sign follows):

* comprehension: **majority** (train-split answer to the same question) and **random choice**
  (single-choice questions). ``comp/<benchmark>/<close|all|open|choice>`` compares the two numbers;
  ``comp_avg`` compares the model's mean over the Table-1 columns a baseline has with the
  baseline's mean over the same columns (random choice has only the single-choice columns);
* generation: **identity** (the input image), **train mean** and **blank** (flat background),
  per group, then through the same family and ``gen_avg`` aggregation as the model, over the
  groups the baseline has. Identity is left out for reconstruction, where the input *is* the target
  (it would score a perfect reconstruction and no model could beat it).

:func:`loss_margins`: a training loss's baseline is its own start, ``margin:loss/<task>/last`` =
first - last (> 0: the loss fell); the same for ``mean``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from healthgpt.experiment.scores import report_metrics
from healthgpt.experiment.stats import MARGIN

__all__ = ["COMP_BASELINES", "GEN_BASELINES", "baseline_margins", "loss_margins"]

COMP_BASELINES = ("majority", "random_choice")
GEN_BASELINES = ("identity", "train_mean", "blank")
_COMP_KEYS = ("close", "all", "open", "choice")


def _comp_margins(report: Mapping[str, Any], baseline: str) -> dict[str, float]:
    from healthgpt.evaluation.report import benchmark_order

    comp = report.get("comprehension") or {}
    base = ((report.get("comprehension_baselines") or {}).get(baseline)) or {}
    out: dict[str, float] = {}
    model_cols, base_cols = [], []
    for bench in benchmark_order(comp) if comp else []:
        s, b = comp[bench], base.get(bench) or {}
        for key in _COMP_KEYS:
            if s.get(key) is not None and b.get(key) is not None:
                out[f"comp/{bench}/{key}"] = float(s[key]) - float(b[key])
        shown = (["close", "all"] if s.get("n_closed") or s.get("n_open") else []) + (
            ["choice"] if s.get("n_choice") else [])
        for key in shown:  # Table 1's columns (report.table1_columns), where the baseline has a value
            if s.get(key) is not None and b.get(key) is not None:
                model_cols.append(float(s[key]))
                base_cols.append(float(b[key]))
    if model_cols:
        out["comp_avg"] = sum(model_cols) / len(model_cols) - sum(base_cols) / len(base_cols)
    return out


def _gen_margins(report: Mapping[str, Any], baseline: str) -> dict[str, float]:
    gen = report.get("generation") or {}
    model_part, base_part = {}, {}
    for group, g in gen.items():
        b = (g.get("baselines") or {}).get(baseline)
        if not b or (baseline == "identity" and g.get("subtask") == "recon"):
            continue
        model_part[group] = g
        base_part[group] = {**g, **{k: b.get(k) for k in ("n", "ssim", "psnr", "mse")}}
    if not model_part:
        return {}
    mm = report_metrics({"generation": model_part})
    bm = report_metrics({"generation": base_part})
    out: dict[str, float] = {}
    for key, value in mm.items():
        other = bm.get(key)
        if value is None or other is None:
            continue
        out[key] = (other - value) if key.endswith("/mse") else (value - other)
    return out


def baseline_margins(report: Mapping[str, Any]) -> dict[str, float]:
    """``margin:<metric>`` for every score metric with at least one baseline (see the module docstring)."""
    per_baseline = [_comp_margins(report, b) for b in COMP_BASELINES]
    per_baseline += [_gen_margins(report, b) for b in GEN_BASELINES]
    keys = sorted({k for d in per_baseline for k in d})
    return {MARGIN + k: min(d[k] for d in per_baseline if k in d) for k in keys}


def loss_margins(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``margin:loss/<task>/last`` and ``.../mean``: the loss's start minus that value (> 0: it fell)."""
    out = {}
    for key, first in metrics.items():
        if key.startswith("loss/") and key.endswith("/first") and first is not None:
            stem = key[: -len("first")]
            for kind in ("last", "mean"):
                if metrics.get(stem + kind) is not None:
                    out[MARGIN + stem + kind] = float(first) - float(metrics[stem + kind])
    return out
