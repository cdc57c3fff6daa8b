"""Evaluation reports: ``report.json``, ``report.md`` (laid out like the paper's tables) and grids.

``write_report(out_dir, predictions, config_record, ...)`` turns the merged per-sample predictions
of :mod:`healthgpt.evaluation.evaluate` into

* ``report.json`` — everything, machine-readable: comprehension per benchmark (``close``,
  ``open``, ``all``, ``choice``, counts, choice accuracy per modality), generation per subtask and
  body part (SSIM 0-1, PSNR dB, MSE in 8-bit grey levels, LPIPS or ``null``, SynthRAD HU metrics,
  the VQGAN ceiling, repaired token sequences, the true target's teacher-forced ``loss``, the
  ``shuffled_images`` row), ``image_reliance`` (true vs shuffled images on the same samples,
  :mod:`healthgpt.evaluation.reliance`), the metric definitions and the model/VQGAN provenance. Deterministic: the same predictions give the same bytes (no timestamps here; timing
  goes to ``run.json``).
* ``report.md`` — the research-use notice, the paper's Table 1 (VQA-RAD/SLAKE/PathVQA close and all, MMMU-Med and
  OmniMedVQA op), Table 9 (single-choice accuracy per modality), Table 4 (modality conversion:
  SSIM/PSNR/MSE per direction and anatomy), Table 5 (super-resolution: SSIM/PSNR/MSE/LPIPS), the
  SynthRAD2023 HU metrics, the image-reliance tables, and notes. SSIM is shown x100, as in the paper.
  Every table has the row ``model, shuffled images`` (each input image swapped for another test
  sample's of the same task) beside the baselines, in the same units.
* ``grids/<subtask>/<key>.png`` — input | prediction | target, 256 px each, for a deterministic
  sample of generation cases (evenly spaced over the keys of each subtask).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from healthgpt import RESEARCH_USE
from healthgpt.evaluation.answer_metrics import ALL_DEFINITION, VQAItem, summarize_vqa
from healthgpt.evaluation.baselines import BASELINE_NOTES, comprehension_baselines
from healthgpt.evaluation.reliance import RELIANCE_DEFINITION, SHUFFLED_NAME, reliance_summary, token_weighted
from healthgpt.evaluation.samples import benchmark_name

__all__ = ["FLAT_STD", "REPORT_FORMAT", "benchmark_name", "benchmark_order", "prediction_diversity", "generation_summary", "table1_average",
           "table1_columns", "write_report"]

REPORT_FORMAT = "healthgpt-eval-report/1"
# baseline rows shown under each generation task (baselines.py), and their display names
GENERATION_BASELINES = ("identity", "train_mean", "blank")
_PREDICTOR_NAMES = {"identity": "identity (input)", "train_mean": "train mean image", "blank": "blank (flat background)",
                    "vq_ceiling": "VQGAN ceiling", "shuffled_images": SHUFFLED_NAME,
                    "majority": "majority (train)", "random_choice": "random choice"}

_TABLE1_ORDER = ["VQA-RAD", "SLAKE", "PathVQA", "MMMU-Med", "OMVQA"]
_SUBTASKS = {"ct2mri": "CT2MRI", "mri2ct": "MRI2CT", "sr4x": "SR 4x", "recon": "Reconstruction",
             "report2cxr": "Report2CXR"}

# a predicted image counts as flat (collapsed to one tone, e.g. all background) below this grey-level std
FLAT_STD = 5.0


DEFINITIONS = {
    "close": "accuracy over closed questions; a yes/no reference is matched by the first whole-word "
             "'yes'/'no' of the normalised prediction (neither -> wrong); another closed reference must "
             "occur as whole words in the prediction",
    "open": "mean token recall over open questions: share of the reference's normalised words (with "
            "multiplicity) found in the prediction",
    "all": ALL_DEFINITION,
    "choice": "accuracy over single-choice questions: the option picked by the prediction (its letter or "
              "its text) must be the reference option ('op' in the paper's Table 1)",
    "normalisation": "lower case, punctuation removed (decimal points kept), number words -> digits, "
                     "articles dropped, contractions spelled with their apostrophe",
    "ssim": "SSIM of prediction and 8-bit target (7x7 uniform window, K1=0.01, K2=0.03, data range 255; "
            "grey if either is grey); shown x100 in report.md",
    "psnr": "10 log10(255^2/MSE) per image in dB, averaged over images with MSE > 0 (identical images are "
            "counted in n_identical)",
    "mse": "mean squared difference in 8-bit grey levels (0-255 scale) per image, averaged",
    "lpips": "LPIPS (AlexNet, v0.1 linear heads), lower is better",
    "synthrad": "SynthRAD2023 challenge metrics on HU for CT targets: MAE in the body mask; PSNR with both "
                "clipped to [-1024, 3000] HU, data range 4024, in the mask; SSIM on clipped HU with the "
                "outside of the mask set to -1024, averaged over window centres in the mask. The prediction's "
                "8-bit grey levels are mapped to HU through the target's window",
    "flat": f"model images with an 8-bit grey-level std below {FLAT_STD:g} (one tone everywhere: the model "
            "fell back to a background code), out of n",
    "vq_ceiling": "the same 8-bit metrics for the VQGAN's own reconstruction of the target "
                  "(decode(target codes) vs target): the best a perfect token predictor could score",
    "loss": "held-out teacher-forced loss of the true target: cross-entropy of its VQ codes (and end tokens) given "
            "prompt + input image, the model's forward with labels exactly as training computes it, mean over the "
            "label tokens of the row's samples",
    "shuffled_images": RELIANCE_DEFINITION,
}


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _group_name(rec: dict[str, Any]) -> str:
    """``subtask[/body_part]``; reconstruction is split by target modality (``recon_ct``)."""
    task = str(rec["subtask"])
    if task == "recon" and rec.get("target_modality"):
        task = f"recon_{str(rec['target_modality']).lower()}"
    body = rec.get("body_part")
    return f"{task}/{body}" if body else task


def _summary_of(metrics: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"n": len(metrics), "ssim": _mean([m["ssim"] for m in metrics]),
            "psnr": _mean([m["psnr"] for m in metrics]), "mse": _mean([m["mse"] for m in metrics])}


def prediction_diversity(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How much the model's images vary: the median number of distinct VQ codes per image, and how many
    images are *flat* (8-bit grey-level std below ``FLAT_STD``: one tone everywhere, such as a model
    whose every token fell back to a background code; only the SSIM of a dark surround makes those
    look decent). Records without ``codes`` / ``pred_std`` are left out of each count."""
    grids = [np.asarray(r["codes"]) for r in records if r.get("codes")]
    stds = [float(r["pred_std"]) for r in records if r.get("pred_std") is not None]
    return {"distinct_codes_median": float(np.median([len(np.unique(g)) for g in grids])) if grids else None,
            "n_flat": sum(1 for s in stds if s < FLAT_STD) if stds else None}


def _hu_summary(hu: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    if not hu:
        return None
    return {"n": len(hu), "mae_hu": _mean([h["mae_hu"] for h in hu]), "psnr_hu": _mean([h["psnr_hu"] for h in hu]),
            "ssim_hu": _mean([h["ssim_hu"] for h in hu])}


def _shuffled_summary(rs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The ``model, shuffled images`` row of one generation group (None when none was scored)."""
    if not rs:
        return None
    stds = [float(r["pred_std"]) for r in rs if r.get("pred_std") is not None]
    return {**_summary_of([r["metrics"] for r in rs]), "loss": token_weighted(rs),
            "n_loss": sum(1 for r in rs if r.get("loss") is not None),
            "n_flat": sum(1 for s in stds if s < FLAT_STD) if stds else None,
            "hu": _hu_summary([r["hu_metrics"] for r in rs if r.get("hu_metrics")])}


def generation_summary(records: Sequence[dict[str, Any]],
                       shuffled: Sequence[dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Per ``subtask/body_part``: n, mean SSIM/PSNR/MSE/LPIPS, the true target's loss, HU metrics, ceiling,
    repairs, and the ``shuffled_images`` row when ``shuffled`` (the shuffled-image pass) is given."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[_group_name(r)].append(r)
    shuffled_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in shuffled or []:
        shuffled_of[_group_name(r)].append(r)
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(groups):
        rs = groups[name]
        metrics = [r["metrics"] for r in rs]
        hu = [r["hu_metrics"] for r in rs if r.get("hu_metrics")]
        ceil = [r["vq_ceiling"] for r in rs if r.get("vq_ceiling")]
        lp = [m.get("lpips") for m in metrics if m.get("lpips") is not None]
        entry: dict[str, Any] = {
            "subtask": rs[0]["subtask"],
            "target_modality": rs[0].get("target_modality"),
            "body_part": rs[0].get("body_part"),
            "n": len(rs),
            "ssim": _mean([m["ssim"] for m in metrics]),
            "psnr": _mean([m["psnr"] for m in metrics]),
            "mse": _mean([m["mse"] for m in metrics]),
            "n_identical": sum(1 for m in metrics if m["psnr"] is None),
            "lpips": _mean(lp) if lp else None,
            "loss": token_weighted(rs),
            "n_loss": sum(1 for r in rs if r.get("loss") is not None),
            "n_repaired_tokens": sum(1 for r in rs if not r.get("tokens_ok", True)),
            **prediction_diversity(rs),
            "hu": None,
            "vq_ceiling": None,
        }
        entry["hu"] = _hu_summary(hu)
        if shuffled is not None:
            entry["shuffled_images"] = _shuffled_summary(shuffled_of.get(name, []))
        if ceil:
            entry["vq_ceiling"] = _summary_of(ceil)
        entry["baselines"] = {b: _summary_of(v) for b in GENERATION_BASELINES
                              if (v := [r["baselines"][b] for r in rs if (r.get("baselines") or {}).get(b)])}
        entry["baselines_hu"] = {b: _hu_summary(v) for b in GENERATION_BASELINES
                                 if (v := [r["baselines_hu"][b] for r in rs if (r.get("baselines_hu") or {}).get(b)])}
        out[name] = entry
    return out


def _comprehension(records: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    items = []
    unscorable = 0
    for r in records:
        item = VQAItem(key=r["key"], benchmark=benchmark_name(r["source"]), answer_type=r["answer_type"],
                       prediction=r["prediction"], reference=r["reference"], options=r.get("options"),
                       modality=r.get("modality"), subtask=r.get("subtask", "vqa"))
        try:
            item.score  # noqa: B018 - validate the reference against its options once
        except ValueError:
            unscorable += 1
            continue
        items.append(item)
    return summarize_vqa(items), unscorable


def benchmark_order(comp: dict[str, Any]) -> list[str]:
    """The paper's Table 1 order, then any other benchmark alphabetically."""
    return [b for b in _TABLE1_ORDER if b in comp] + sorted(b for b in comp if b not in _TABLE1_ORDER)


def table1_columns(comp: dict[str, Any]) -> list[tuple[str, float | None]]:
    """Table 1 columns of a report's ``comprehension`` part: ``<benchmark> close`` and ``all`` (when it has
    closed or open questions) and ``<benchmark> op`` (single-choice), in the paper's order (%)."""
    out: list[tuple[str, float | None]] = []
    for b in benchmark_order(comp):
        s = comp[b]
        if s["n_closed"] or s["n_open"]:
            out += [(f"{b} close", s["close"]), (f"{b} all", s["all"])]
        if s["n_choice"]:
            out.append((f"{b} op", s["choice"]))
    return out


def table1_average(comp: dict[str, Any]) -> float | None:
    """Table 1's "Avg.": the mean of the shown columns."""
    return _mean([v for _, v in table1_columns(comp)])


# -------------------------------------------------------------------------------- markdown


def _f(x: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "–" if x is None else f"{x * scale:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _table1_row(label: str, summary: dict[str, Any], comp: dict[str, Any], order: Sequence[str]) -> list[str]:
    """One Table 1 row; ``comp`` (the model's summary) decides the columns, ``summary`` fills them."""
    row, shown = [label], []
    for b in order:
        s = summary.get(b, {})
        keys = (["close", "all"] if comp[b]["n_closed"] or comp[b]["n_open"] else []) + (
            ["choice"] if comp[b]["n_choice"] else [])
        for key in keys:
            row.append(_f(s.get(key)))
            shown += [s[key]] if s.get(key) is not None else []
    return row + [_f(_mean(shown))]


def _markdown(report: dict[str, Any]) -> str:
    model = report["model"]
    lines = ["# HealthGPT evaluation report", "", f"**{RESEARCH_USE}**", ""]
    ckpt = model.get("checkpoint") or {}
    lines.append(f"Model: preset `{model['preset']}`, checkpoint `{ckpt.get('name', 'none (initial weights)')}`"
                 + (f", released weights `{model['released']['name']}`" if model.get("released") else "") + ".")
    vq = model.get("vq") or {}
    vq_note = f" ({vq['note']})" if isinstance(vq, dict) and vq.get("note") else ""
    lines.append(f"VQGAN: `{vq.get('name', vq) if isinstance(vq, dict) else vq}`{vq_note}.")
    c = report["counts"]
    lines.append(f"Samples: {c['comprehension']} comprehension, {c['generation']} generation "
                 f"(split `{model.get('split')}`; shards: {', '.join(report['shards'])}).")
    lines.append("")

    lines += _comprehension_section(report, model)
    lines += _generation_section(report)
    lines += _reliance_section(report)

    lines += ["## Notes", "", f"- LPIPS: {report['lpips']}."]
    lines += [f"- `{k}`: {v.rstrip('.')}." for k, v in DEFINITIONS.items()]
    lines += [f"- baseline `{_PREDICTOR_NAMES[k]}`: {v}." for k, v in BASELINE_NOTES.items()]
    if isinstance(vq, dict) and vq.get("random_weights"):
        lines.append("- The VQGAN has random weights: image metrics measure the pipeline, not image quality.")
    lines.append("")
    return "\n".join(lines)




def _comprehension_section(report: dict[str, Any], model: dict[str, Any]) -> list[str]:
    """Table 1 (model and baselines), per-benchmark counts, Table 9 by modality."""
    comp = report["comprehension"]
    if not comp:
        return []
    lines: list[str] = []
    lines += ["## Comprehension", "", "Table 1 layout (%; `close` = closed-question accuracy, `all` = "
              "all questions, `op` = single-choice accuracy):", ""]
    order = benchmark_order(comp)
    header = ["Model"] + [name for name, _ in table1_columns(comp)]
    rows = [_table1_row(model["preset"], comp, comp, order)]
    for name, summary in (report.get("comprehension_baselines") or {}).items():
        rows.append(_table1_row(_PREDICTOR_NAMES.get(name, name), summary, comp, order))
    shuffled = ((report.get("image_reliance") or {}).get("comprehension") or {}).get("shuffled")
    if shuffled is not None:
        rows.append(_table1_row(SHUFFLED_NAME, shuffled, comp, order))
    lines += _table(header + ["Avg."], rows) + [""]
    lines += ["Per benchmark:", ""]
    named = [(b, b, comp[b]) for b in order] + [(b, f"{b}, {SHUFFLED_NAME}", shuffled[b])
                                                  for b in order if shuffled and b in shuffled]
    named += [(b, f"{b}, {_PREDICTOR_NAMES.get(name, name)}", summary[b])  # the baselines, benchmark by benchmark
              for name, summary in (report.get("comprehension_baselines") or {}).items() for b in order if b in summary]
    rows = [[label, str(s.get("n_closed", "–")), str(s.get("n_open", "–")), str(s.get("n_choice", "–")),
             _f(s.get("close")), _f(s.get("open")), _f(s.get("all")), _f(s.get("choice"))] for _, label, s in named]
    lines += _table(["Benchmark", "n closed", "n open", "n choice", "close", "open (recall)", "all", "choice"],
                    rows) + [""]
    choice_benches = [b for b in order if comp[b]["by_modality"]]
    if choice_benches:
        mods = sorted({m for b in choice_benches for m in comp[b]["by_modality"]})
        lines += ["Single-choice accuracy by modality (Table 9 layout, %):", ""]
        rows = [[label] + [_f(s["by_modality"].get(m, {}).get("choice")) for m in mods] + [_f(s["choice"])]
                for b, label, s in named if b in choice_benches and s.get("by_modality")]
        lines += _table(["Benchmark"] + mods + ["Overall"], rows) + [""]
    lines += [f"Definition of `all`: {ALL_DEFINITION}", ""]
    if report.get("unscorable"):
        lines += [f"{report['unscorable']} choice question(s) whose reference is none of their options "
                  "were left out.", ""]
    return lines


def _generation_section(report: dict[str, Any]) -> list[str]:
    """Tables 4/5 with the baselines beside the model, SynthRAD HU metrics, example grids."""
    gen = report["generation"]
    if not gen:
        return []
    lines: list[str] = []
    lines += ["## Generation", ""]
    conv = {k: v for k, v in gen.items() if v["subtask"] in ("ct2mri", "mri2ct")}
    sr = {k: v for k, v in gen.items() if v["subtask"] == "sr4x"}
    other = {k: v for k, v in gen.items() if k not in conv and k not in sr}

    def name(v: dict[str, Any]) -> str:
        sub = _SUBTASKS.get(v["subtask"], v["subtask"])
        if v["subtask"] == "recon" and v.get("target_modality"):
            sub = f"{sub} {v['target_modality']}"
        return f"{sub}-{str(v['body_part']).capitalize()}" if v.get("body_part") else sub

    def rows_of(group: dict[str, dict[str, Any]]) -> list[list[str]]:
        rows = []
        for v in group.values():
            rows.append([name(v), "model", str(v["n"]), _f(v["ssim"], 100), _f(v["psnr"]), _f(v["mse"]),
                         _f(v["lpips"], 1, 4), _f(v.get("loss"), 1, 3), str(v["n_repaired_tokens"]),
                         "–" if v.get("n_flat") is None else str(v["n_flat"])])
            if v.get("shuffled_images"):
                m = v["shuffled_images"]
                rows.append([name(v), SHUFFLED_NAME, str(m["n"]), _f(m["ssim"], 100), _f(m["psnr"]), _f(m["mse"]),
                             "–", _f(m.get("loss"), 1, 3), "–", "–" if m.get("n_flat") is None else str(m["n_flat"])])
            others = {**(v.get("baselines") or {}), **({"vq_ceiling": v["vq_ceiling"]} if v.get("vq_ceiling")
                                                       else {})}
            rows += [[name(v), _PREDICTOR_NAMES[b], str(m["n"]), _f(m["ssim"], 100), _f(m["psnr"]),
                      _f(m["mse"]), "–", "–", "–", "–"] for b, m in others.items()]
        return rows

    header = ["Task", "Predictor", "n", "SSIM", "PSNR (dB)", "MSE", "LPIPS", "loss", "repaired", "flat"]
    for title, group in (("Modality conversion (Table 4 layout)", conv),
                         ("Super-resolution (Table 5 layout)", sr), ("Other generation tasks", other)):
        if group:
            lines += [f"### {title}", ""] + _table(header, rows_of(group)) + [""]
    hu = [(name(v), label, h) for v in gen.values()
          for label, h in (("model", v.get("hu")), (SHUFFLED_NAME, (v.get("shuffled_images") or {}).get("hu")),
                           *((_PREDICTOR_NAMES[b], bh) for b, bh in (v.get("baselines_hu") or {}).items())) if h]
    if hu:
        lines += ["### SynthRAD2023 challenge metrics (HU, body mask)", ""]
        lines += _table(["Task", "Predictor", "n", "MAE (HU)", "PSNR (dB)", "SSIM"],
                        [[task, label, str(h["n"]), _f(h["mae_hu"], 1, 1), _f(h["psnr_hu"]), _f(h["ssim_hu"], 1, 4)]
                         for task, label, h in hu]) + [""]
    if report.get("grids"):
        lines += ["### Examples (input | prediction | target)", ""]
        lines += [f"![{Path(g).stem}]({g})" for g in report["grids"]] + [""]
    return lines


def _below(true: float | None, shuffled: float | None) -> str:
    """How far the true-image loss lies below the shuffled-image one, in percent of the latter."""
    if true is None or shuffled is None or shuffled == 0:
        return "–"
    return f"{100 * (shuffled - true) / shuffled:.1f}%"


def _reliance_section(report: dict[str, Any]) -> list[str]:
    """True images vs shuffled images on the same samples (``image_reliance``)."""
    rel = report.get("image_reliance") or {}
    lines = ["## Image reliance (does the model look?)", ""]
    if "comprehension" not in rel:
        return lines + [f"Shuffled-image pass: {rel.get('status', 'not computed')}.", ""]
    lines += [f"Each input image swapped for another evaluated sample's of the same task (seed {rel.get('seed')}; "
              f"{rel.get('n_same_kind', 0)} of {rel.get('n_scored', 0)} swapped images are of the same subtask/body part "
              "or source); true-image numbers on the same samples.", ""]
    lines += [f"- {note}." for note in rel.get("notes") or []] + ([""] if rel.get("notes") else [])
    comp = rel.get("comprehension")
    if comp:
        rows = []
        for b in benchmark_order(comp["shuffled"]):
            t, s = comp["true"].get(b, {}), comp["shuffled"][b]
            rows.append([b, str(s["n_closed"]), f"{_f(t.get('close'))} / {_f(s['close'])}", str(s["n_open"]),
                         f"{_f(t.get('open'))} / {_f(s['open'])}", str(s["n_choice"]),
                         f"{_f(t.get('choice'))} / {_f(s['choice'])}"])
        lines += ["Comprehension (%, true / shuffled images):", ""]
        lines += _table(["Benchmark", "n closed", "close", "n open", "open (recall)", "n choice", "choice"], rows)
        lines += [""]
    gen = rel.get("generation") or {}
    if gen:
        rows = [[g, str(v["n"]), _f(v["ssim_true"], 100), _f(v["ssim_shuffled"], 100), _f(v["loss_true"], 1, 3),
                 _f(v["loss_shuffled"], 1, 3), _below(v["loss_true"], v["loss_shuffled"])]
                for g, v in list(gen.items()) + [("all", rel["generation_pooled"])]]
        lines += ["Generation (SSIM x100; loss: the true target's teacher-forced loss):", ""]
        lines += _table(["Task", "n", "SSIM true", "SSIM shuffled", "loss true", "loss shuffled",
                         "true below shuffled"], rows) + [""]
    return lines


# -------------------------------------------------------------------------------- grids


def _rgb256(img: np.ndarray) -> np.ndarray:
    from PIL import Image

    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8:  # 16-bit inputs: stretch to 8 bits for display only
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr.astype(np.float64) - lo) / max(hi - lo, 1e-9) * 255).round().astype(np.uint8)
    pil = Image.fromarray(arr).convert("RGB")
    if pil.size != (256, 256):
        pil = pil.resize((256, 256), Image.Resampling.BICUBIC)
    return np.asarray(pil)


def _write_grids(out: Path, records: Sequence[dict[str, Any]], shards: Sequence[os.PathLike | str], vq: Any,
                 per_task: int) -> list[str]:
    if per_task <= 0 or vq is None:
        return []
    from PIL import Image

    from vlhealth.schema import Sample
    from vlhealth.shards import iter_tar, list_shards

    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_task[r["subtask"]].append(r)
    chosen: dict[str, dict[str, Any]] = {}
    for rs in by_task.values():
        rs = sorted(rs, key=lambda r: r["key"])
        idx = np.unique(np.linspace(0, len(rs) - 1, num=min(per_task, len(rs))).round().astype(int))
        chosen.update({rs[i]["key"]: rs[i] for i in idx})
    written: list[str] = []
    for tar in list_shards(list(shards)):
        for key, members in iter_tar(tar):
            if key not in chosen:
                continue
            rec = chosen.pop(key)
            sample = Sample.from_members(key, members)
            pred = vq.decode(np.asarray(rec["codes"], dtype=np.int64)[None])[0]
            target = sample.target if sample.target is not None else vq.decode(sample.target_vq[None].astype(np.int64))[0]
            if sample.input_image is not None:
                from vlhealth.schema import decode_image

                inp = sample.input_image if isinstance(sample.input_image, np.ndarray) else decode_image(sample.input_image)
            else:  # text-only input (report -> CXR)
                inp = np.full((256, 256), 255, dtype=np.uint8)
            gap = np.full((256, 4, 3), 255, dtype=np.uint8)
            grid = np.concatenate([_rgb256(inp), gap, _rgb256(pred), gap, _rgb256(target)], axis=1)
            rel = Path("grids") / rec["subtask"] / f"{key}.png"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(grid).save(out / rel)
            written.append(rel.as_posix())
            if not chosen:
                return sorted(written)
    return sorted(written)


# -------------------------------------------------------------------------------- entry point


def write_report(
    out_dir: os.PathLike | str,
    predictions: Sequence[dict[str, Any]],
    config_record: dict[str, Any],
    *,
    shards: Sequence[os.PathLike | str] = (),
    vq: Any = None,
    grids_per_task: int = 4,
    lpips_status: str = "not computed",
    train_ref: Any = None,
    shuffled: Sequence[dict[str, Any]] | None = None,
    reliance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write report.json, report.md and the grids; returns the report dict. ``shuffled``: the predictions of
    the shuffled-image pass (None: not run), ``reliance``: its seed, notes and status."""
    from vlhealth.shards import write_atomic

    out = Path(out_dir)
    comp_recs = [r for r in predictions if r["task"] == "comprehension"]
    gen_recs = [r for r in predictions if r["task"] == "generation"]
    comprehension, unscorable = _comprehension(comp_recs)
    grids = _write_grids(out, gen_recs, shards, vq, grids_per_task) if gen_recs else []
    report = {
        "format": REPORT_FORMAT,
        "model": {k: config_record.get(k) for k in ("preset", "checkpoint", "released", "template", "vq", "split",
                                                     "max_new_tokens", "max_image_tokens", "constrained_images")},
        "shards": config_record.get("shards", []),
        "counts": {"comprehension": len(comp_recs), "generation": len(gen_recs)},
        "comprehension": comprehension,
        "comprehension_baselines": comprehension_baselines(comp_recs, train_ref) if comp_recs else {},
        "baselines": {"definitions": BASELINE_NOTES, **(train_ref.describe() if train_ref is not None else {})},
        "unscorable": unscorable,
        "generation": generation_summary(gen_recs, None if shuffled is None else
                                         [r for r in shuffled if r["task"] == "generation"]),
        "image_reliance": reliance_summary(predictions, shuffled, reliance or {"status": "not computed"},
                                           _group_name),
        "lpips": lpips_status,
        "definitions": DEFINITIONS,
        "grids": grids,
        "predictions": "predictions.jsonl",
        "predictions_shuffled": "predictions_shuffled.jsonl" if shuffled is not None else None,
    }
    write_atomic(out / "report.json",
                 (json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode())
    write_atomic(out / "report.md", _markdown(report).encode("utf-8"))
    return report
