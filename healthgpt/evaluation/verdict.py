"""A short, plain verdict on a finished run (``healthgpt verdict``): did the model learn the tasks?

One line per task, read from what the pipeline already wrote: the eval report (model and baseline
rows, VQGAN ceiling, the shuffled-image rows), the tokenizer's training report, and each training
stage's ``train_summary.json`` (its validation loss). Each line gives the model's number, the best
baseline's, and says plainly whether the model beats it; the project's targets are checked with
their numbers (met or missed), never adjusted:

* VQGAN ceiling on held-out slices >= 0.85 SSIM;
* CT->MRI and MRI->CT (brain, pelvis): model SSIM above every baseline in the report: the identity
  and the train-mean image (the targets' two), and the blank image (a flat background) where the
  report has it, so that a model whose images collapsed to background cannot pass; the line says how
  many of the model's images are flat (one tone everywhere) and how many VQ codes they use;
* closed questions, VQA-RAD and SLAKE separately: model accuracy >= that benchmark's majority baseline
  + 15 points, on at least 200 closed questions each (the pooled figure is stated beside them);
* image reliance (``healthgpt eval --shuffled-images``, the report's ``image_reliance``: every test
  image swapped for another evaluated sample's of the same task, on the same samples): closed-question
  accuracy (all benchmarks) with true images >= the shuffled-image row + 10 points; the generation
  validation loss of the true target with true images >= 10% below the one with shuffled images;
  SSIM true vs shuffled is stated beside them. An eval without the shuffled pass misses both;
* validation loss (the trainer's ``--val-every``: fixed held-out batches, ``val_by_task`` in
  ``final/train_summary.json``), per stage and task: it ends below where it started; and at the end
  of stage 3 it is at most 50% of the *untrained* model's. The untrained model's loss of a task is
  the validation loss at step 0 of the earliest stage that trained that task: among the runs under
  ``--runs`` whose ``train_summary.json`` names that task (``task``, ``mixed`` for both, or a
  ``val_by_task`` entry), the one with the lowest ``stage`` (ties: folder name); stage 1 when it is
  there. A run without validation loss reads "no validation loss (train with --val-every)" and
  misses its targets.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["Check", "CLOSED_MARGIN", "RELIANCE_CLOSED_MARGIN", "RELIANCE_LOSS_GAP", "UNTRAINED_RATIO",
           "VQ_CEILING_SSIM", "collect_checks", "verdict_command"]

VQ_CEILING_SSIM = 0.85
CLOSED_MARGIN = 15.0  # percentage points over the majority baseline
CLOSED_MIN_N = 200  # closed questions per benchmark for its target
RELIANCE_CLOSED_MARGIN = 10.0  # percentage points of closed accuracy, true over shuffled images
RELIANCE_LOSS_GAP = 0.10  # the true-image generation loss at least this fraction below the shuffled-image one
UNTRAINED_RATIO = 0.5  # stage 3's last validation loss at most this fraction of the untrained model's
NO_VAL = "no validation loss (train with --val-every)"
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
        of = held.get("of", held["n"])
        which = f"all {held['n']}" if of == held["n"] else f"{held['n']} (evenly spaced) of the {of}"
        out.append(Check("vq_held_out", f"VQGAN on {which} held-out {held['split']} targets: SSIM "
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
    for bench in ("VQA-RAD", "SLAKE"):
        m = comp.get(bench) or {}
        if not m.get("n_closed"):
            out.append(Check(f"closed:{bench}", f"closed questions, {bench}: none scored: MISSED", False))
            continue
        base = (maj.get(bench) or {}).get("close") or 0.0
        enough = m["n_closed"] >= CLOSED_MIN_N
        ok = enough and m["close"] >= base + CLOSED_MARGIN
        short = "" if enough else f", fewer than the {CLOSED_MIN_N} needed"
        out.append(Check(f"closed:{bench}", f"closed questions, {bench} (n={m['n_closed']}{short}): model "
                         f"{m['close']:.1f}% | majority {base:.1f}% | {m['close'] - base:+.1f} points (target >= "
                         f"+{CLOSED_MARGIN:.0f}): {_yes(ok)}", ok))
    pooled = [(comp[b], maj.get(b, {})) for b in ("VQA-RAD", "SLAKE") if b in comp and comp[b]["n_closed"]]
    if len(pooled) > 1:
        n = sum(m["n_closed"] for m, _ in pooled)
        model = sum(m["close"] * m["n_closed"] for m, _ in pooled) / n
        base = sum((b.get("close") or 0.0) * m["n_closed"] for m, b in pooled) / n
        out.append(Check("closed", f"closed questions, VQA-RAD + SLAKE pooled (n={n}): model {model:.1f}% | "
                         f"majority {base:.1f}% | {model - base:+.1f} points", None))
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


def _reliance(report: dict[str, Any]) -> list[Check]:
    """Image reliance: true vs shuffled images on the same samples (the report's ``image_reliance``)."""
    rel = report.get("image_reliance") or {}
    has_comp = any((v or {}).get("n_closed") for v in (report.get("comprehension") or {}).values())
    has_gen = bool(report.get("generation"))
    out: list[Check] = []
    if "comprehension" not in rel:  # no shuffled pass in this eval
        why = f"not measured ({rel.get('status', 'no shuffled-image pass')}; eval with --shuffled-images)"
        if has_comp:
            out.append(Check("reliance:closed", f"image reliance, closed questions: {why}: MISSED", False))
        if has_gen:
            out.append(Check("reliance:generation_loss", f"image reliance, generation loss: {why}: MISSED", False))
        return out
    notes = "; ".join(rel.get("notes") or [])
    comp = rel.get("comprehension") or {}
    pooled = [(comp["true"][b], s) for b, s in (comp.get("shuffled") or {}).items() if s.get("n_closed")]
    if pooled:
        n = sum(s["n_closed"] for _, s in pooled)
        true = sum(t["close"] * s["n_closed"] for t, s in pooled) / n
        shuf = sum(s["close"] * s["n_closed"] for _, s in pooled) / n
        ok = true >= shuf + RELIANCE_CLOSED_MARGIN
        out.append(Check("reliance:closed", f"image reliance, closed questions (n={n}, all benchmarks): true images "
                         f"{true:.1f}% | shuffled images {shuf:.1f}% | {true - shuf:+.1f} points (target >= "
                         f"+{RELIANCE_CLOSED_MARGIN:.0f}): {_yes(ok)}", ok))
    elif has_comp:
        out.append(Check("reliance:closed", f"image reliance, closed questions: none scored with shuffled images "
                         f"({notes or 'no closed question took part'}): MISSED", False))
    gen = rel.get("generation_pooled") or {}
    if gen.get("loss_true") is not None and gen.get("loss_shuffled"):
        below = (gen["loss_shuffled"] - gen["loss_true"]) / gen["loss_shuffled"]
        ok = below >= RELIANCE_LOSS_GAP
        out.append(Check("reliance:generation_loss", f"image reliance, generation loss of the true target (held-out, "
                         f"teacher-forced, n={gen['n']}): true images {gen['loss_true']:.4f} | shuffled images "
                         f"{gen['loss_shuffled']:.4f} | {100 * below:.1f}% below (target >= "
                         f"{100 * RELIANCE_LOSS_GAP:.0f}% below): {_yes(ok)}", ok))
    elif has_gen:
        out.append(Check("reliance:generation_loss", "image reliance, generation loss: not scored with shuffled images "
                         f"({notes or 'no loss: samples without target codes'}): MISSED", False))
    if gen.get("ssim_true") is not None and gen.get("ssim_shuffled") is not None:
        out.append(Check("reliance:generation_ssim", f"image reliance, generation SSIM (n={gen['n']}): true images "
                         f"{gen['ssim_true']:.3f} | shuffled images {gen['ssim_shuffled']:.3f} | "
                         f"{gen['ssim_true'] - gen['ssim_shuffled']:+.3f}", None))
    return out


def _stage_of(name: str, summary: dict[str, Any]) -> float:
    stage = summary.get("stage")
    if isinstance(stage, int | float):
        return float(stage)
    digits = "".join(ch for ch in name if ch.isdigit())
    return float(digits) if digits else float("inf")


def _tasks_of(summary: dict[str, Any]) -> list[str]:
    """The tasks a run trained: its ``task`` (``mixed``: both), its training-loss and its validation tasks."""
    task = summary.get("task")
    tasks = {"comprehension", "generation"} if task == "mixed" else {task} if task else set()
    return sorted(tasks | set(summary.get("loss_by_task") or {}) | set(summary.get("val_by_task") or {}))


def _read_runs(runs: Path) -> list[tuple[str, dict[str, Any]]]:
    """(folder name, train_summary) of every run under ``runs`` that trained, earliest stage first (ties: name).
    A run of 0 steps only merges its --init runs (stage 3's two tasks): it trained nothing, so it is neither
    judged nor the untrained reference."""
    found = []
    for path in sorted(runs.glob("*/final/train_summary.json")):
        summary = json.loads(path.read_text("utf-8"))
        if summary.get("steps") != 0:
            found.append((path.parent.parent.name, summary))
    return sorted(found, key=lambda r: (_stage_of(*r), r[0]))


def _untrained(found: list[tuple[str, dict[str, Any]]], task: str) -> tuple[float | None, str, Any]:
    """(the untrained model's validation loss of ``task``, where it was read, that run's validation sources):
    step 0 of the earliest stage that trained the task (see the module docstring)."""
    for name, s in found:
        if task not in _tasks_of(s):
            continue
        step0 = next((float(h["val_loss"][task]) for h in s.get("val_loss") or []
                      if int(h.get("step", -1)) == 0 and task in (h.get("val_loss") or {})), None)
        sources = (s.get("val_sources") or {}).get(task)
        if step0 is not None:
            return step0, f"{name} step 0", sources
        v = (s.get("val_by_task") or {}).get(task)
        if v is not None:  # no step-0 validation (e.g. resumed): its first one, said so
            return float(v["first"]), f"{name} step {v['first_step']}, its first validation, not step 0", sources
        return None, f"{name} (the earliest run that trained {task}) has {NO_VAL}", sources
    return None, f"no run trained {task}", None


def _losses(runs: Path) -> list[Check]:
    """Per stage and task: the validation loss ends below its start; stage 3 ends at most 50% of the untrained
    model's (module docstring)."""
    out = []
    found = _read_runs(runs)
    for name, summary in found:
        for task in _tasks_of(summary):
            v = (summary.get("val_by_task") or {}).get(task)
            if v is None:
                out.append(Check(f"loss:{name}:{task}", f"val loss {name} / {task}: {NO_VAL}: MISSED", False))
                if _stage_of(name, summary) == 3:
                    out.append(Check(f"loss_vs_untrained:{name}:{task}", f"val loss {name} / {task} vs the untrained "
                                     f"model: {NO_VAL}: MISSED", False))
                continue
            ok = v["last"] < v["first"]
            out.append(Check(f"loss:{name}:{task}", f"val loss {name} / {task}: {v['first']:.4f} (step "
                             f"{v['first_step']}) -> {v['last']:.4f} (step {v['last_step']}), "
                             f"{100 * v['last'] / v['first']:.0f}% of its start (target: ends below its start): "
                             f"{_yes(ok)}", ok))
            if _stage_of(name, summary) == 3:
                out.append(_vs_untrained(found, name, summary, task, v))
    return out


def _vs_untrained(found: list[tuple[str, dict[str, Any]]], name: str, summary: dict[str, Any], task: str,
                  v: dict[str, Any]) -> Check:
    base, where, sources = _untrained(found, task)
    head = f"val loss {name} / {task} vs the untrained model"
    if base is None:
        return Check(f"loss_vs_untrained:{name}:{task}", f"{head}: {where}: MISSED", False)
    ratio = v["last"] / base if base else float("inf")
    ok = ratio <= UNTRAINED_RATIO
    mine = (summary.get("val_sources") or {}).get(task)
    differ = f" (validation sets differ: {sources} vs {mine})" if sources and mine and sources != mine else ""
    return Check(f"loss_vs_untrained:{name}:{task}", f"{head}: {v['last']:.4f} (step {v['last_step']}) is "
                 f"{100 * ratio:.0f}% of {base:.4f} ({where}: the untrained model's, the earliest stage that trained "
                 f"{task}){differ} (target <= {100 * UNTRAINED_RATIO:.0f}%): {_yes(ok)}", ok)


def collect_checks(eval_dir: Path, runs: Path | None = None, vq_report: Path | None = None) -> list[Check]:
    report = _read(eval_dir / "report.json")
    if report is None:
        raise FileNotFoundError(f"{eval_dir.name}/report.json not found: run healthgpt eval first")
    checks = _ceiling(report, _read(vq_report) if vq_report else None)
    checks += _generation(report) + _comprehension(report) + _reliance(report)
    if runs is not None:
        checks += _losses(runs)
    return checks


def verdict_command(
    eval_dir: Annotated[Path, typer.Option("--eval", help="healthgpt eval --out folder (report.json).")],
    runs: Annotated[Path | None, typer.Option(help=(
        "Folder of training --out folders (*/final/train_summary.json, trained with --val-every). The untrained "
        "model's validation loss of a task is step 0 of the earliest stage there that trained it."))] = None,
    vq_report: Annotated[Path | None, typer.Option(help="vq_train_report.json of the VQGAN used.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the checks to this JSON file.")] = None,
) -> None:
    """Print one line per task: the model, the best baseline, whether it beats it, and the targets met or missed.

    Targets: VQGAN ceiling; conversions above every baseline; closed questions over the majority; image reliance
    (true images over shuffled ones: closed accuracy +10 points, generation loss 10% below); per stage and task the
    validation loss ends below its start, and stage 3 ends at most 50% of the untrained model's (the validation
    loss at step 0 of the earliest stage under --runs that trained the task).

    Example:

        healthgpt verdict --eval demo/eval --runs demo/runs --vq-report demo/vq/vq_train_report.json
    """
    checks = collect_checks(eval_dir, runs, vq_report)
    targets = [c for c in checks if c.passed is not None]
    missed = [c.name for c in targets if not c.passed]
    typer.echo("== verdict (tiny model on demo data; research use only, not for clinical use)")
    for c in checks:
        typer.echo(f"  {c.line}")
    if runs is not None:
        typer.echo("  (validation loss: the trainer's fixed held-out batches; the untrained model's loss of a task is the "
                   "validation loss at step 0 of the earliest stage under --runs that trained it)")
    typer.echo(f"  targets met: {len(targets) - len(missed)} of {len(targets)}"
               + (f"; missed: {', '.join(missed)}" if missed else ""))
    if json_out is not None:
        json_out.write_text(json.dumps([asdict(c) for c in checks], indent=2) + "\n", "utf-8")
