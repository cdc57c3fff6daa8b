"""A short, plain verdict on a finished run (``healthgpt verdict``): did the model learn the tasks?

One line per task, read from what the pipeline already wrote: the eval report (model and baseline
rows, VQGAN ceiling), the tokenizer's training report, and each training stage's
``train_summary.json`` (per-task loss first/last). Each line gives the model's number, the best
baseline's, and says plainly whether the model beats it; the project's targets are checked with
their numbers (met or missed), never adjusted:

* VQGAN ceiling on held-out slices >= 0.85 SSIM;
* CT->MRI and MRI->CT (brain, pelvis): model SSIM above every baseline in the report: the identity
  and the train-mean image (the targets' two), and the blank image (a flat background) where the
  report has it, so that a model whose images collapsed to background cannot pass; the line says how
  many of the model's images are flat (one tone everywhere) and how many VQ codes they use;
* closed questions of VQA-RAD + SLAKE: model accuracy >= majority baseline + 15 points;
* every training stage's loss, per task, ends at <= 70% of its start.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["Check", "CLOSED_MARGIN", "LOSS_RATIO", "VQ_CEILING_SSIM", "collect_checks", "verdict_command"]

VQ_CEILING_SSIM = 0.85
CLOSED_MARGIN = 15.0  # percentage points over the majority baseline
LOSS_RATIO = 0.7
CONVERSIONS = ("ct2mri/brain", "ct2mri/pelvis", "mri2ct/brain", "mri2ct/pelvis")
_NAMES = {"identity": "identity", "train_mean": "train mean", "blank": "blank", "majority": "majority", "random_choice": "random choice"}


@dataclass
class Check:
    """One verdict line: ``passed`` is None for lines that are information, not a target."""

    name: str
    line: str
    passed: bool | None


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text("utf-8")) if path.is_file() else None


def _yes(flag: bool) -> str:
    return "MET" if flag else "MISSED"


def _ceiling(report: dict[str, Any], vq_report: dict[str, Any] | None) -> list[Check]:
    gen = report.get("generation") or {}
    rows = [v["vq_ceiling"] for v in gen.values() if v.get("vq_ceiling") and v["vq_ceiling"].get("ssim") is not None]
    out = []
    if rows:
        n = sum(r["n"] for r in rows)
        ssim = sum(r["ssim"] * r["n"] for r in rows) / n
        out.append(Check("vq_ceiling", f"VQGAN ceiling: SSIM {ssim:.3f} on {n} evaluated held-out slices "
                         f"(target >= {VQ_CEILING_SSIM}): {_yes(ssim >= VQ_CEILING_SSIM)}", ssim >= VQ_CEILING_SSIM))
    held = (vq_report or {}).get("held_out") or {}
    if held.get("n"):
        out.append(Check("vq_held_out", f"VQGAN on all {held['n']} held-out {held['split']} targets: SSIM "
                         f"{held['ssim']:.3f}, PSNR {held['psnr']:.2f} dB, {held['codes_used']} codes used, perplexity "
                         f"{held['perplexity']:.1f}", None))
    return out


def _generation(report: dict[str, Any]) -> list[Check]:
    out = []
    for group, v in sorted((report.get("generation") or {}).items()):
        base = {k: m["ssim"] for k, m in (v.get("baselines") or {}).items() if m.get("ssim") is not None}
        if v.get("ssim") is None or not base:
            continue
        best = max(base, key=base.get)
        beats = all(v["ssim"] > s for s in base.values())
        others = ", ".join(f"{_NAMES.get(k, k)} {s:.3f}" for k, s in sorted(base.items()))
        target = group in CONVERSIONS
        flat = v.get("n_flat")
        images = (f" | {flat} of {v['n']} model images flat (one tone), median {v['distinct_codes_median']:.0f} "
                  f"distinct codes" if flat is not None else "")
        out.append(Check(f"gen:{group}", f"{group} (n={v['n']}): model SSIM {v['ssim']:.3f} | best baseline "
                         f"{_NAMES.get(best, best)} {base[best]:.3f} ({others}) | model beats "
                         f"{'all baselines' if beats else 'NOT all baselines'}{images}"
                         + (f": {_yes(beats)}" if target else ""), beats if target else None))
    return out


def _comprehension(report: dict[str, Any]) -> list[Check]:
    comp = report.get("comprehension") or {}
    maj = (report.get("comprehension_baselines") or {}).get("majority") or {}
    rand = (report.get("comprehension_baselines") or {}).get("random_choice") or {}
    out = []
    pooled = [(comp[b], maj.get(b, {})) for b in ("VQA-RAD", "SLAKE") if b in comp and comp[b]["n_closed"]]
    if pooled:
        n = sum(m["n_closed"] for m, _ in pooled)
        model = sum(m["close"] * m["n_closed"] for m, _ in pooled) / n
        base = sum((b.get("close") or 0.0) * m["n_closed"] for m, b in pooled) / n
        ok = model >= base + CLOSED_MARGIN
        out.append(Check("closed", f"closed questions, VQA-RAD + SLAKE (n={n}): model {model:.1f}% | majority "
                         f"{base:.1f}% | {model - base:+.1f} points (target >= +{CLOSED_MARGIN:.0f}): {_yes(ok)}", ok))
    for bench, s in sorted(comp.items()):
        if s.get("n_choice") and s.get("choice") is not None:
            base = {k: v[bench]["choice"] for k, v in (("majority", maj), ("random_choice", rand))
                    if bench in v and v[bench].get("choice") is not None}
            best = max(base, key=base.get) if base else None
            line = f"{bench} single choice (n={s['n_choice']}): model {s['choice']:.1f}%"
            if best:
                line += (f" | best baseline {_NAMES[best]} {base[best]:.1f}% | model "
                         f"{'beats' if s['choice'] > base[best] else 'does NOT beat'} it")
            out.append(Check(f"choice:{bench}", line, None))
    return out


def _losses(runs: Path) -> list[Check]:
    out = []
    for summary_path in sorted(runs.glob("*/final/train_summary.json")):
        summary = json.loads(summary_path.read_text("utf-8"))
        stage = summary_path.parent.parent.name
        for task, v in sorted((summary.get("loss_by_task") or {}).items()):
            ratio = v["last"] / v["first"] if v["first"] else float("inf")
            ok = ratio <= LOSS_RATIO
            out.append(Check(f"loss:{stage}:{task}", f"loss {stage} / {task}: {v['first']:.3f} -> {v['last']:.3f} "
                             f"({100 * ratio:.0f}% of start, target <= {100 * LOSS_RATIO:.0f}%): {_yes(ok)}", ok))
    return out


def collect_checks(eval_dir: Path, runs: Path | None = None, vq_report: Path | None = None) -> list[Check]:
    report = _read(eval_dir / "report.json")
    if report is None:
        raise FileNotFoundError(f"{eval_dir.name}/report.json not found: run healthgpt eval first")
    checks = _ceiling(report, _read(vq_report) if vq_report else None)
    checks += _generation(report) + _comprehension(report)
    if runs is not None:
        checks += _losses(runs)
    return checks


def verdict_command(
    eval_dir: Annotated[Path, typer.Option("--eval", help="healthgpt eval --out folder (report.json).")],
    runs: Annotated[Path | None, typer.Option(help="Folder of training --out folders (*/final/train_summary.json).")] = None,
    vq_report: Annotated[Path | None, typer.Option(help="vq_train_report.json of the VQGAN used.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the checks to this JSON file.")] = None,
) -> None:
    """Print one line per task: the model, the best baseline, whether it beats it, and the targets met or missed.

    Example:

        healthgpt verdict --eval demo/eval --runs demo/runs --vq-report demo/vq/vq_train_report.json
    """
    checks = collect_checks(eval_dir, runs, vq_report)
    targets = [c for c in checks if c.passed is not None]
    missed = [c.name for c in targets if not c.passed]
    typer.echo("== verdict (tiny model on demo data; research use only, not for clinical use)")
    for c in checks:
        typer.echo(f"  {c.line}")
    typer.echo(f"  targets met: {len(targets) - len(missed)} of {len(targets)}"
               + (f"; missed: {', '.join(missed)}" if missed else ""))
    if json_out is not None:
        json_out.write_text(json.dumps([asdict(c) for c in checks], indent=2) + "\n", "utf-8")
