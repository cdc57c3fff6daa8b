"""``make_plan``: memory, FLOPs, time and fit of one training stage, from the trace and the formulas.

Per-GPU memory is the traced step's peak (``trace.trace_step``), plus what data parallelism adds:
DDP (``--gpus`` > 1) keeps its gradient buckets (one more fp32 copy of the trainable gradients);
``--fsdp`` as the trainer wraps it (the whole model as one FSDP unit, FULL_SHARD) shards the
optimizer states 1/N but gathers every parameter for the whole step (full copy + its 1/N shard).
A GPU "fits" when the peak is at most ``0.95 x (memory - 1 GiB)`` (CUDA context and workspaces,
then a 5% allocator-fragmentation margin).

Time: seconds per step = model FLOPs per GPU per step / (peak dense TFLOP/s x MFU). MFU is model
FLOPs utilisation, so the recomputation of gradient checkpointing is inside it (the anchors were
measured with checkpointing on). The default MFU comes from ``MFU_ANCHORS``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from healthgpt.training.plan.formulas import closed_form_flops, closed_form_memory, describe, total_params
from healthgpt.training.plan.trace import StepTrace, trace_step, workloads

__all__ = ["DEFAULT_MFU", "FIT_SIZES", "GPUS", "MFU_ANCHORS", "PAPER_SAMPLES", "PlanConfig", "make_plan"]

GIB = 2 ** 30
# name -> (memory GiB, dense bf16 TFLOP/s, dense fp32 TFLOP/s without TF32), vendor datasheets
GPUS: dict[str, tuple[float, float, float]] = {
    "a10-24gb": (24.0, 125.0, 31.2),
    "a100-40gb": (40.0, 312.0, 19.5),
    "a100-80gb": (80.0, 312.0, 19.5),
    "h100-80gb": (80.0, 989.0, 67.0),
    "h200-141gb": (140.4, 989.0, 67.0),
}
FIT_SIZES = {"24GB": 24.0, "40GB": 40.0, "80GB": 80.0, "141GB": 140.4}
MFU_ANCHORS = [
    ("LLaVA-1.5-7B visual instruction tuning, 665k samples in ~10 h on 8xA100-80GB (LLaVA repository README, "
     "training section): ~2.3e19 model FLOPs (6 x 6.7e9 per token, ~5.6e8 tokens) / (8 x 312 TFLOP/s x 36,000 s)",
     0.25),
    ("torchtitan docs/performance.md: Llama 3 8B, FSDP2 on 64 A100-80GB, 57-58% MFU; Llama 3.1 405B, "
     "FSDP2+TP on 128 H100, 23-29% MFU (dense pre-training, torch.compile-free baselines)", 0.29),
]
DEFAULT_MFU = 0.25  # the LLaVA anchor: the closest workload (an HF-transformers VLM fine-tune)
# samples per stage and task (paper §4 / Table 8; stage-1 comprehension adds PubMedVision-PT, whose
# size the paper does not give: 647,031 is the PubMedVision alignment set's release count; stage 2's
# Mixed-47k is sampled from all stage-1 data, split here in stage 1's proportions)
_S1 = {"comprehension": 558_128 + 647_031, "generation": 558_128}
PAPER_SAMPLES: dict[int, dict[str, int]] = {
    1: _S1,
    2: {t: round(47_000 * n / sum(_S1.values())) for t, n in _S1.items()},
    3: {"comprehension": 765_802, "generation": 783_045},
}


@dataclass
class PlanConfig:
    preset: str = "m3"
    stage: int = 3
    task: str = "mixed"
    global_batch: int | None = None
    micro_batch: int | None = None
    gpus: int = 8
    gpu: str = "a100-80gb"
    precision: str = "bf16"
    gradient_checkpointing: bool = True
    fsdp: bool = False
    mfu: float | None = None
    shards: Sequence[str] = ()
    prompt_tokens: int | None = None
    answer_tokens: int | None = None
    search_micro_batch: bool = True
    notes: list[str] = field(default_factory=list)


def _accum(cfg: PlanConfig, global_batch: int, micro: int) -> int:
    return max(1, math.ceil(global_batch / (micro * cfg.gpus)))


def _per_gpu(cfg: PlanConfig, kinds: dict[str, int]) -> dict[str, int]:
    out = dict(kinds)
    if cfg.gpus > 1 and cfg.fsdp:
        n = cfg.gpus
        out["frozen_weights"] += kinds["frozen_weights"] // n
        out["trainable_weights"] += kinds["trainable_weights"] // n
        out["optimizer_states"] = kinds["optimizer_states"] // n
    elif cfg.gpus > 1:
        out["gradients"] += kinds["trainable_weights"]  # DDP gradient buckets
    return out


def _usable(gib: float) -> float:
    return 0.95 * (gib - 1.0) * GIB


def _trace(cfg: PlanConfig, micro: int, gc: bool, accum: int) -> StepTrace:
    return trace_step(cfg.preset, cfg.stage, cfg.task, micro, precision=cfg.precision, gradient_checkpointing=gc,
                      accum=accum, foreach=True, prompt=cfg.prompt_tokens, answer=cfg.answer_tokens)


def _closed(cfg: PlanConfig, micro: int, gc: bool, groups: tuple[str, ...], dropout: bool) -> dict[str, int]:
    loads = workloads(cfg.task, _patches(cfg), cfg.prompt_tokens, cfg.answer_tokens)
    return closed_form_memory(cfg.preset, groups, loads, micro, precision=cfg.precision,
                              gradient_checkpointing=gc, dropout=dropout)


def _patches(cfg: PlanConfig) -> int:
    from healthgpt.training.plan.formulas import dims

    return dims(cfg.preset).patches


def _max_micro(cfg: PlanConfig, gc: bool, groups: tuple[str, ...], dropout: bool) -> int:
    """Largest micro-batch that fits the chosen GPU: searched with the closed form, then the trace
    confirms it (stepping down while the traced peak does not fit). 0: not even one sample fits."""
    cap = _usable(GPUS[cfg.gpu][0])
    best = 0
    for mb in range(1, 257):
        if sum(_per_gpu(cfg, _closed(cfg, mb, gc, groups, dropout)).values()) > cap:
            break
        best = mb
    mb = max(best, 1)
    while mb >= 1:
        if sum(_per_gpu(cfg, _trace(cfg, mb, gc, 2).by_kind).values()) <= cap:
            return mb
        mb -= 1
    return 0


def _samples(cfg: PlanConfig) -> tuple[dict[str, int], str]:
    if cfg.shards:
        from healthgpt.training.data import source_sample_counts

        counts = source_sample_counts(list(cfg.shards), "train")
        out = {"comprehension": 0, "generation": 0}
        for (_, task), n in counts.items():
            out[task] = out.get(task, 0) + n
        return out, "shards: " + ", ".join(str(s) for s in cfg.shards)
    return dict(PAPER_SAMPLES[cfg.stage]), "paper §4 / Table 8 dataset sizes (stage 1 adds PubMedVision-PT: release count)"


def make_plan(cfg: PlanConfig) -> dict[str, Any]:
    """Everything ``healthgpt plan`` prints, as one JSON-able dict (schema: README "Planning a run")."""
    from healthgpt.training.hparams import load_hparams
    from healthgpt.training.stages import stage_groups

    if cfg.gpu not in GPUS:
        raise ValueError(f"unknown --gpu {cfg.gpu!r}; choose one of {', '.join(GPUS)}")
    hp = load_hparams(cfg.preset, cfg.stage, task=cfg.task)
    global_batch = cfg.global_batch or hp.global_batch
    micro = cfg.micro_batch or hp.micro_batch
    if cfg.micro_batch is None and micro * cfg.gpus > global_batch:  # the config's micro-batch overshoots
        micro = max(1, global_batch // cfg.gpus)
    gc = cfg.gradient_checkpointing
    groups = stage_groups(cfg.stage, cfg.task)
    dropout = any(hp.dropout_for(t) > 0 for t in ("comprehension", "generation"))
    accum = _accum(cfg, global_batch, micro)
    loads = workloads(cfg.task, _patches(cfg), cfg.prompt_tokens, cfg.answer_tokens)
    main = _trace(cfg, micro, gc, accum)
    other = _trace(cfg, micro, not gc, accum)
    model_trace, hw_trace = (other, main) if gc else (main, other)
    closed = _closed(cfg, micro, gc, groups, dropout)
    per_gpu = _per_gpu(cfg, main.by_kind)
    peak = sum(per_gpu.values())
    samples, samples_source = _samples(cfg)
    tasks = [w.task for w in loads]
    n_task = {t: samples.get(t, 0) for t in tasks}
    total_samples = sum(n_task.values()) if cfg.stage != 2 or cfg.shards else sum(samples.values())
    weights = {t: (n_task[t] / sum(n_task.values()) if sum(n_task.values()) else 1 / len(tasks)) for t in tasks}
    flops = _flops_table(cfg, loads, groups, micro, model_trace, hw_trace, gc)
    step_model = accum * sum(weights[t] * flops[t]["model_traced"] for t in tasks)
    step_hw = accum * sum(weights[t] * flops[t]["hardware_traced"] for t in tasks)
    mfu = cfg.mfu if cfg.mfu is not None else DEFAULT_MFU
    peak_flops = GPUS[cfg.gpu][1 if cfg.precision == "bf16" else 2] * 1e12
    seconds = step_model / (peak_flops * mfu)
    steps = max(1, math.ceil((hp.epochs or 1.0) * total_samples / global_batch))
    notes = list(cfg.notes) + _notes(cfg, global_batch, micro, accum)
    search = cfg.search_micro_batch
    return {
        "schema": "healthgpt.plan/1",
        "config": {**{k: v for k, v in asdict(cfg).items() if k not in ("notes", "search_micro_batch")},
                   "shards": [str(s) for s in cfg.shards], "global_batch": global_batch, "micro_batch": micro,
                   "grad_accum": accum, "groups": list(groups), "mfu": mfu},
        "model": {**describe(cfg.preset), "total_params": total_params(cfg.preset),
                  "trainable_params": main.trainable_params, "frozen_params": main.frozen_params,
                  "trainable_by_group": main.trainable_numel_by_group},
        "workload": [{"task": w.task, "seq_len": w.seq_len, "image_tokens": w.image_tokens, "prompt_tokens": w.prompt,
                      "labelled_tokens": w.answer} for w in loads],
        "memory": {"per_gpu": {**per_gpu, "peak": peak}, "traced_step": {**main.by_kind, "peak": main.peak_bytes},
                   "closed_form_step": {**closed, "peak": sum(closed.values())},
                   "closed_over_traced": sum(closed.values()) / main.peak_bytes},
        "flops": {"per_micro_batch": flops, "per_step_per_gpu_model": step_model,
                  "per_step_per_gpu_hardware": step_hw, "per_step_all_gpus_model": step_model * cfg.gpus},
        "time": {"mfu": mfu, "mfu_anchors": [{"source": s, "mfu": v} for s, v in MFU_ANCHORS],
                 "peak_tflops_per_gpu": peak_flops / 1e12, "seconds_per_step": seconds,
                 "hfu": step_hw / (seconds * peak_flops), "samples": total_samples, "samples_by_task": n_task,
                 "samples_source": samples_source, "epochs": hp.epochs or 1.0, "steps": steps,
                 "hours": steps * seconds / 3600},
        "fits": {name: peak <= _usable(gib) for name, gib in FIT_SIZES.items()},
        "usable_bytes": {name: int(_usable(gib)) for name, gib in FIT_SIZES.items()},
        "max_micro_batch": {"gpu": cfg.gpu,
                            "with_checkpointing": _max_micro(cfg, True, groups, dropout) if search else None,
                            "without_checkpointing": (_max_micro(cfg, False, groups, dropout)
                                                      if search else None)},
        "notes": notes,
    }


def _flops_table(cfg: PlanConfig, loads: list[Any], groups: tuple[str, ...], micro: int, model_trace: StepTrace,
                 hw_trace: StepTrace, gc: bool) -> dict[str, dict[str, int]]:
    out = {}
    for w in loads:
        cf = closed_form_flops(cfg.preset, groups, w, micro, gradient_checkpointing=gc)
        out[w.task] = {"model_traced": model_trace.flops_fwd_bwd[w.task],
                       "hardware_traced": hw_trace.flops_fwd_bwd[w.task] if gc else model_trace.flops_fwd_bwd[w.task],
                       "model_closed_form": cf["model"], "hardware_closed_form": cf["hardware"]}
    return out


def _notes(cfg: PlanConfig, global_batch: int, micro: int, accum: int) -> list[str]:
    notes = ["traced on fake tensors: no padding (every sample has the assumed length), no attention mask "
             "(SDPA is_causal, GQA without repeating K/V); CPU autocast stands in for CUDA autocast"]
    if micro * cfg.gpus * accum != global_batch:
        notes.append(f"global batch {global_batch} is not micro-batch {micro} x {cfg.gpus} GPUs x accumulation: "
                     f"the trainer would use {accum} accumulation steps")
    if cfg.task == "mixed":
        notes.append("mixed: every micro-batch is one task; memory is the worse task's micro-batch with both tasks' "
                     "gradients present, FLOPs per step are weighted by the tasks' sample counts")
    if cfg.fsdp:
        notes.append("--fsdp as the trainer wraps it: one FSDP unit over the whole model, so every parameter is "
                     "gathered for the step; FSDP v1 also needs one dtype per unit (the trainer's fp32 trainable + "
                     "bf16 frozen mix may be refused; benchmarks/gpu_check.py checks it)")
    if cfg.precision == "fp32":
        notes.append("fp32: peak TFLOP/s is the GPU's fp32 rate without TF32 (the trainer does not enable it)")
    return notes
