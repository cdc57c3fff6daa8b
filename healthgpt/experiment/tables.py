"""``results.md``: one table per experiment in the paper's layout, the paper's row under ours, then
the claims with their verdicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from healthgpt.experiment.stats import NO_DATA, NO_EVIDENCE, NOT_REPRODUCED, REPRODUCED, WITHIN_NOISE, Summary

if TYPE_CHECKING:
    from healthgpt.experiment.results import ExperimentResults

__all__ = ["experiment_markdown", "format_value", "results_markdown"]

RULE = ("Cells are mean ± std over seeds (sample std). Every verdict needs ≥ 3 finished seeds per cell "
        "(else **no data**) and runs that learned: when the claim's metric has baselines (majority / random "
        "choice for comprehension; identity / train mean / blank for generation, from each run's own "
        "report.json; a loss's own start), every run of the claim's cells must beat them, else **no evidence: "
        "the runs did not learn**. Then a stated test at α = 0.05: differences by Welch's t-test (two-sided), "
        "\"as fast as\" by two one-sided tests (TOST) within the claim's tolerance, bounds by a one-sample "
        "t-test; p < α in the paper's direction is **reproduced**, against it **not reproduced**, p ≥ α "
        "**not significant**. Equality checks (`equal`) compare runs of the same seed with a stated "
        "tolerance.")
_MARK = {REPRODUCED: "✅ reproduced", NOT_REPRODUCED: "❌ not reproduced", WITHIN_NOISE: "〰 not significant",
         NO_DATA: "… no data (fewer than 3 seeds)", NO_EVIDENCE: "∅ no evidence: the runs did not learn"}


def format_value(value: Any, fmt: str = "number") -> str:
    """A paper number (or text) as printed in the table."""
    if value is None:
        return "–"
    if isinstance(value, int | float):
        return f"{value:.2f}×" if fmt == "ratio" else f"{value:.2f}"
    return str(value)


def _ours(s: Summary | None, fmt: str) -> str:
    if s is None or s.mean is None:
        return "–"
    return s.format(2, "×" if fmt == "ratio" else "")


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def experiment_markdown(res: ExperimentResults, figure: str | None = None) -> str:
    exp = res.exp
    c = res.counts()
    lines = [f"## {exp.title}", "", f"`{exp.name}` ({res.form} form, from `{exp.source}`)."]
    if exp.description:
        lines += ["", exp.description]
    note = (exp.forms.get(res.form) or {}).get("note")
    if note:
        lines += ["", str(note).strip()]
    status = f"Runs: {c['finished']}/{c['runs']} finished ({len(exp.seeds)} seeds per cell)"
    extra = [f"{c[k]} {k}" for k in ("failed", "unfinished", "missing") if c[k]]
    lines += ["", status + (f"; {', '.join(extra)}: partial results." if extra else ".")]
    header = [" / ".join(next(iter(exp.cells)).labels) if exp.cells else "cell", ""]
    header += [col.name + {"higher": " ↑", "lower": " ↓"}.get(col.better or "", "") for col in exp.columns]
    lines += ["", _row(header), _row(["---"] * len(header))]
    for cell in exp.cells:
        stats = res.stats.get(cell.key, {})
        n = len([r for r in res.runs if r.cell == cell.key and res.finished(r)])
        lines.append(_row([cell.key, f"ours (n={n})"] + [_ours(stats.get(col.metric), col.format)
                                                          for col in exp.columns]))
        if cell.key in exp.paper:
            paper = exp.paper[cell.key]
            lines.append(_row(["", "paper"] + [format_value(paper.get(col.name), col.format)
                                                for col in exp.columns]))
    if exp.paper_note:
        lines += ["", exp.paper_note]
    if exp.baseline and any(col.metric == "time_ratio" for col in exp.columns):
        tp = res.time_pairs
        lines += ["", f"Training time: wall time per optimizer step (per task the median, weighted by the task mix; "
                      f"the first step left out) relative to `{exp.baseline}` of the same seed, both trained start "
                      f"to finish in the same session ({tp['same_session']} pairs"
                      + (f"; {tp['different_sessions']} pairs from different sessions or resumed runs left out"
                         if tp["different_sessions"] else "") + ")."]
    if res.claims:
        lines += ["", "| claim (paper) | paper | ours | test (α = 0.05) | learned | verdict |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for cl in res.claims:
            lines.append(_row([cl.text, cl.paper or "–", cl.ours, cl.test, cl.learned,
                               _MARK.get(cl.verdict, cl.verdict)]))
    if figure:
        lines += ["", f"![{exp.name} loss curves]({figure})"]
    failed = [r for r in res.runs if (res.records.get(r.run_id) or {}).get("status") == "failed"]
    if failed:
        lines += ["", "Failed runs (see their `logs/`): " + ", ".join(f"`{r.run_id}`" for r in failed)]
    return "\n".join(lines) + "\n"


def results_markdown(results: Sequence[ExperimentResults], figures: Mapping[str, str] | None = None) -> str:
    figures = figures or {}
    lines = ["# Reproducing the paper's ablations", "",
             "Written by `healthgpt experiment collect`; every run's commands, `train_summary.json` and "
             "`report.json` are in its folder under `<experiment>/runs/`.", "", RULE, ""]
    verdicts = [(r.exp.name, cl) for r in results for cl in r.claims]
    if verdicts:
        lines += ["| experiment | claim | verdict |", "| --- | --- | --- |"]
        lines += [_row([name, cl.text, _MARK.get(cl.verdict, cl.verdict)]) for name, cl in verdicts]
        lines.append("")
    for res in results:
        lines.append(experiment_markdown(res, figures.get(res.exp.name)))
    return "\n".join(lines)
