"""Results of whatever runs have finished: metrics per run, statistics per experiment.

Per run (``run_metrics``), from its own files:

* ``eval/report.json``: ``comp/<benchmark>/<close|all|open|choice>`` (%), ``comp_avg`` (Table 1's
  average of the shown close/all/op columns), ``gen/<subtask>/<ssim|psnr|mse>`` and
  ``gen/<subtask>/<body part>/...`` (SSIM x100 as in the paper; a subtask's value is the
  sample-weighted mean over its body parts; reconstruction is ``recon`` and, by target
  modality, ``recon_ct`` / ``recon_mr``); the paper's columns ``gen/mtrans/*`` (CT->MRI and
  MRI->CT together), ``gen/recon/*``, ``gen/sr/*``; ``gen_avg`` (mean SSIM x100 over those
  columns present, as Table 4's RECOM/MTRANS/SR average to Table 10's gen. avg); a column or claim
  may name ``mean(metric, metric, ...)``;
* the timing step's ``metrics.jsonl``: ``step_time_s``, the wall time per optimizer step (per task
  the median, weighted by the task's share of the steps; the first step, which pays one-off set-up,
  left out);
* the last train step's ``metrics.jsonl``: ``loss/<task>/first|last|mean`` (mean = the area under
  that task's loss curve per step: lower converges faster), ``steps``;
* ``margin:<metric>``: how far the run's score lies above the best of its own baselines (from the
  same ``report.json``), or its loss below its start (:mod:`healthgpt.experiment.learned`); the
  claims' learning gate (:mod:`healthgpt.experiment.stats`).

Per experiment: the runs of each cell give ``mean ± std`` per metric (``stats.mean_std``).
``time_ratio`` is formed per seed, ``step_time_s(cell) / step_time_s(baseline)``, only when both
timing steps were trained start to finish in the same session (one ``experiment run``
invocation, so side by side on one machine); pairs from different sessions are left out and
counted. Claims get their verdicts (``stats.evaluate_claim``). Missing and failed runs are listed;
cells with fewer than 3 finished seeds give their claims "no data".

:mod:`healthgpt.experiment.collect` writes them out (tables, plots).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from healthgpt.experiment.learned import baseline_margins, loss_margins
from healthgpt.experiment.scores import report_metrics
from healthgpt.experiment.spec import Experiment, RunSpec, expand, parse_experiment
from healthgpt.experiment.stats import MARGIN, Summary, evaluate_claim, mean_std

__all__ = ["EXPERIMENT_FILE", "ExperimentResults", "collect_experiment", "read_loss_curve", "run_metrics", "step_time"]

EXPERIMENT_FILE = "experiment.json"
RUN_FILE = "run.json"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    if not path.is_file():
        return out
    for line in path.read_text("utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
    return out


def read_loss_curve(step_dir: str | Path) -> list[tuple[int, str, float]]:
    """``(step, dominant task, loss)`` of every applied optimizer step of a train step folder."""
    out = []
    for rec in _read_jsonl(Path(step_dir) / "metrics.jsonl"):
        loss = rec.get("loss")
        if rec.get("skipped") or loss is None or not math.isfinite(loss):
            continue
        tasks = rec.get("tasks") or {}
        task = max(tasks, key=tasks.get) if tasks else "unknown"
        out.append((int(rec["step"]), task, float(loss)))
    return out


def step_time(step_dir: str | Path, skip_first: int = 1) -> float | None:
    """Wall time per optimizer step (seconds): the median step time of each task, weighted by the task's
    share of the steps (a mixed run's comprehension and generation steps differ tenfold in cost, so one
    median over both would jump between them); the first ``skip_first`` steps (one-off set-up) left out."""
    recs = sorted(_read_jsonl(Path(step_dir) / "metrics.jsonl"), key=lambda r: r.get("step", 0))
    recs = [r for r in recs if "step_time_s" in r]
    kept = [r for r in recs if r.get("step", 0) > skip_first] or recs
    by_task: dict[str, list[float]] = defaultdict(list)
    for r in kept:
        tasks = r.get("tasks") or {}
        by_task[max(tasks, key=tasks.get) if tasks else "unknown"].append(float(r["step_time_s"]))
    total = sum(len(v) for v in by_task.values())
    if not total:
        return None
    return sum(len(v) / total * statistics.median(v) for v in by_task.values())


def _timing_session(record: Mapping[str, Any], step: str) -> str | None:
    """The session that trained ``step`` start to finish in one go (None: resumed, failed or unknown)."""
    attempts = (record.get("steps") or {}).get(step, {}).get("attempts") or []
    done = [a for a in attempts if a.get("returncode") == 0]
    if len(attempts) != 1 or len(done) != 1 or done[0].get("resumed"):
        return None
    return str(done[0]["session"])


def run_metrics(run: RunSpec, record: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metrics of one run folder (empty when nothing is there)."""
    from healthgpt.experiment.runner import step_finished

    out: dict[str, Any] = {}
    report_path = Path(run.eval_out) / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text("utf-8"))
        out.update(report_metrics(report))
        out.update(baseline_margins(report))
    timing = next(s for s in run.steps if s.name == run.timing_step)
    if step_finished(timing.out):
        out["step_time_s"] = step_time(timing.out)
    last = run.steps[-1]
    curve = read_loss_curve(last.out)
    if curve and step_finished(last.out):
        out["steps"] = float(len(curve))
        by_task: dict[str, list[float]] = defaultdict(list)
        for _, task, loss in curve:
            by_task[task].append(loss)
        for task, losses in by_task.items():
            k = min(3, len(losses))
            out[f"loss/{task}/first"] = sum(losses[:k]) / k
            out[f"loss/{task}/last"] = sum(losses[-k:]) / k
            out[f"loss/{task}/mean"] = sum(losses) / len(losses)
        out.update(loss_margins(out))
    return out


class ExperimentResults:
    """Everything collected for one experiment folder."""

    def __init__(self, exp: Experiment, form: str, runs: list[RunSpec], records: dict[str, dict[str, Any] | None],
                 metrics: dict[str, dict[str, Any]]) -> None:
        self.exp = exp
        self.form = form
        self.runs = runs
        self.records = records
        self.metrics = metrics
        self.time_pairs = {"same_session": 0, "different_sessions": 0}
        self._time_ratios()
        self._derived()
        self.stats = self._stats()
        self.claims = [evaluate_claim(c, self.stats) for c in exp.claims]

    def finished(self, run: RunSpec) -> bool:
        rec = self.records.get(run.run_id)
        return bool(rec) and rec.get("status") == "finished" and (Path(run.eval_out) / "report.json").is_file()

    def _time_ratios(self) -> None:
        base = self.exp.baseline
        if base is None:
            return
        by_seed = {r.seed: r for r in self.runs if r.cell == base}
        for run in self.runs:
            ref = by_seed.get(run.seed)
            t, t0 = self.metrics[run.run_id].get("step_time_s"), self.metrics.get(ref.run_id if ref else "", {}).get(
                "step_time_s")
            if ref is None or t is None or t0 is None:
                continue
            s1 = _timing_session(self.records.get(run.run_id) or {}, run.timing_step)
            s0 = _timing_session(self.records.get(ref.run_id) or {}, ref.timing_step)
            if s1 is not None and s1 == s0:
                self.metrics[run.run_id]["time_ratio"] = t / t0
                self.time_pairs["same_session"] += 1
            else:
                self.time_pairs["different_sessions"] += 1

    def _derived(self) -> None:
        """``mean(a, b, ...)`` metrics named by columns or claims, per run (None unless all parts exist)."""
        names = {c.metric for c in self.exp.columns} | {str(c.get("metric")) for c in self.exp.claims}
        for name in sorted(n for n in names if n.startswith("mean(") and n.endswith(")")):
            parts = [p.strip() for p in name[5:-1].split(",") if p.strip()]
            for m in self.metrics.values():
                for prefix in ("", MARGIN):  # the margin of a mean: the mean of its parts' margins
                    vals = [m.get(prefix + p) for p in parts]
                    if vals and all(v is not None for v in vals):
                        m[prefix + name] = sum(vals) / len(vals)

    def _stats(self) -> dict[str, dict[str, Summary]]:
        out: dict[str, dict[str, Summary]] = {}
        for cell in self.exp.cells:
            runs = [r for r in self.runs if r.cell == cell.key and self.finished(r)]
            names = sorted({m for r in runs for m in self.metrics[r.run_id]})
            out[cell.key] = {m: mean_std([self.metrics[r.run_id].get(m) for r in runs], [r.seed for r in runs])
                             for m in names}
        return out

    def counts(self) -> dict[str, int]:
        statuses = [(self.records.get(r.run_id) or {}).get("status", "missing") for r in self.runs]
        return {"runs": len(self.runs), "finished": sum(self.finished(r) for r in self.runs),
                "failed": statuses.count("failed"), "missing": statuses.count("missing"),
                "unfinished": sum(s in ("pending", "running") for s in statuses)}

    def to_json(self) -> dict[str, Any]:
        cells = {}
        for cell in self.exp.cells:
            seeds = sorted(r.seed for r in self.runs if r.cell == cell.key and self.finished(r))
            cells[cell.key] = {"labels": cell.labels, "seeds_finished": seeds,
                               "metrics": {m: s.to_json() for m, s in self.stats[cell.key].items()}}
        table = {"columns": [c.__dict__ for c in self.exp.columns],
                 "rows": {cell.key: {c.name: self.stats[cell.key].get(c.metric, Summary(None, None, 0)).to_json()
                                     for c in self.exp.columns} for cell in self.exp.cells},
                 "paper": self.exp.paper}
        return {"name": self.exp.name, "title": self.exp.title, "form": self.form, "counts": self.counts(),
                "baseline": self.exp.baseline, "time_pairs": self.time_pairs, "cells": cells, "table": table,
                "claims": [c.to_json() for c in self.claims],
                "failed": [r.run_id for r in self.runs if (self.records.get(r.run_id) or {}).get("status") == "failed"],
                "missing": [r.run_id for r in self.runs if not self.finished(r)]}


def collect_experiment(exp_dir: str | Path) -> ExperimentResults:
    """Results of one experiment folder (written by ``experiment run``), partial or complete."""
    exp_dir = Path(exp_dir)
    path = exp_dir / EXPERIMENT_FILE
    try:
        doc = json.loads(path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        from healthgpt.experiment.spec import ExperimentError

        raise ExperimentError(f"{exp_dir.name}/{EXPERIMENT_FILE}: cannot read ({err})") from err
    exp = parse_experiment(doc["spec"], doc.get("source", "experiment.json"))
    runs = expand(exp, doc["form"], exp_dir, doc.get("vars") or {}, pretrained=bool(doc.get("pretrained", True)))
    records: dict[str, dict[str, Any] | None] = {}
    metrics: dict[str, dict[str, Any]] = {}
    for run in runs:
        rp = Path(run.dir) / RUN_FILE
        try:
            records[run.run_id] = json.loads(rp.read_text("utf-8")) if rp.is_file() else None
        except json.JSONDecodeError:
            records[run.run_id] = None
        metrics[run.run_id] = run_metrics(run, records[run.run_id]) if records[run.run_id] else {}
    return ExperimentResults(exp, doc["form"], runs, records, metrics)
