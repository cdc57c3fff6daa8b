"""Measure a real training step on the CPU, to check ``plan``'s prediction against it.

The step is the one ``trace.trace_step`` traces, run for real through ``HealthGPT.forward`` (with
the ``<image>`` splice of ``healthgpt.model.embedding``, the label mask, the real optimizer): the
preset's model, the stage's groups trainable in fp32, one steady-state AdamW step (state already
there, earlier micro-batches' gradients already there), one micro-batch per task of the same
``trace.Workload`` layout.

Peak memory is measured with torch's own CPU allocator events, independently of the storage
tracker the prediction uses: ``torch.profiler.profile(profile_memory=True)`` records every CPU
allocation and free (kineto ``[memory]`` events, ``nbytes`` signed); their running sum, in time
order, from the bytes already live when the step starts (parameters, buffers, optimizer states,
gradients: summed over distinct storages), gives the step's peak.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any

import torch

from healthgpt.training.plan.trace import Workload, workloads

__all__ = ["MeasuredStep", "live_bytes", "measure_cpu_step", "real_batch"]


@dataclass
class MeasuredStep:
    peak_bytes: int
    baseline_bytes: int
    seconds: float
    trainable_params: int


def live_bytes(tensors: list[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr() or id(st)] = int(st.nbytes())
    return sum(seen.values())


def real_batch(model: Any, w: Workload, batch: int) -> dict[str, Any]:
    """A batch of the workload's layout: ``<image>`` at ``w.image_at``, labels on the last positions."""
    from healthgpt.model.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID

    ids = torch.full((batch, w.n_ids), 5, dtype=torch.long)
    ids[:, w.image_at] = IMAGE_TOKEN_ID
    if w.new_tokens:
        ids[:, w.n_ids - w.answer:] = model.vocab.idx_0 + 1
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, w.n_ids - w.answer:] = ids[:, w.n_ids - w.answer:]
    size = model.vision.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.zeros((batch, 3, size, size))}


def _prepare(model: Any, preset: str, stage: int, task: str) -> tuple[list[torch.nn.Parameter], Any]:
    from healthgpt.model.hlora import set_dropout
    from healthgpt.training.hparams import load_hparams
    from healthgpt.training.stages import optimizer_groups, stage_groups

    hp = load_hparams(preset, stage, task=task)
    groups = stage_groups(stage, task)
    params = model.set_trainable(*groups)
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()
    for t in ("comprehension", "generation"):
        set_dropout(model.llm, hp.dropout_for(t), tasks=[t])
    model.train()
    model.vision.tower.eval()
    optimizer = torch.optim.AdamW(optimizer_groups(model, params, groups, hp), lr=hp.lr, betas=hp.betas,
                                  eps=hp.eps, weight_decay=hp.weight_decay)
    return params, (optimizer, hp)


def measure_cpu_step(preset: str, stage: int, task: str, micro_batch: int, *, accum: int = 2,
                     model: Any = None, prompt: int | None = None, answer: int | None = None) -> MeasuredStep:
    """Peak CPU bytes of one real fp32 training step (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    if model is None:
        from healthgpt.model.presets import build_model

        model, _ = build_model(preset)
    params, (optimizer, hp) = _prepare(model, preset, stage, task)
    loads = workloads(task, model.vision.num_patches, prompt, answer)
    batches = {w.task: real_batch(model, w, micro_batch) for w in loads}
    for p in params:  # a first step creates the optimizer state
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if accum > 1 or len(loads) > 1:
        for p in params:
            p.grad = torch.zeros_like(p)
    states = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    gc.collect()
    baseline = live_bytes(list(model.parameters()) + list(model.buffers()) + states + [p.grad for p in params])
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for w in loads:
            out = model(**batches[w.task], task=w.task, return_logits=False)
            out.loss.backward()
            del out
        torch.nn.utils.clip_grad_norm_(params, hp.grad_clip if hp.grad_clip > 0 else float("inf"))
        optimizer.step()
    seconds = time.perf_counter() - t0
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return MeasuredStep(baseline + peak, baseline, seconds, sum(p.numel() for p in params))
