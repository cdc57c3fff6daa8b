"""One training step of the real ``HealthGPT``, traced on fake tensors: peak memory by kind and FLOPs.

The model is ``arch.build_shape_model`` (the preset's LLM and CLIP from their config files, H-LoRA
through ``HealthGPT.from_parts``), made trainable as ``healthgpt.training.train`` does it (the
stage's groups from ``healthgpt.training.stages``, trainable tensors in fp32, the preset's dtype
for the rest, the stage's dropout, gradient checkpointing through the LLM's
``gradient_checkpointing_enable``). The step is the trainer's: micro-batch forward and backward
(gradient accumulation), ``clip_grad_norm_`` and ``AdamW.step`` with the optimizer state already
there (a steady-state step). Under ``FakeTensorMode`` nothing is allocated and no number is
computed: ``memtrack.StorageTracker`` counts storage bytes, ``FlopCounterMode`` counts FLOPs.

What differs from ``HealthGPT.forward`` (data-dependent code cannot run on fake tensors):

* the image splice: features go in at a known position (``Workload.image_at``) with one
  ``torch.cat`` instead of ``embedding.embed_multimodal``'s search for ``<image>``;
* the split embedding looks up the new rows when the workload has new tokens (generation
  targets) instead of asking ``bool(is_new.any())``;
* the loss takes the label positions as a known slice instead of the ``labels != -100`` mask;
* no padding: every sample has the workload's length, so no attention mask is passed (HF's SDPA
  path then uses ``is_causal`` and, with fewer KV heads, ``enable_gqa``).

Attention FLOPs: on CPU, SDPA runs ``_scaled_dot_product_flash_attention_for_cpu``, which torch's
``FlopCounterMode`` counts as 0 FLOPs (torch 2.13); ``FLOP_FORMULAS`` adds its formula (and its
backward's), counting the full ``s x s`` score matrix as torch does for the CUDA kernels.
bf16: CPU autocast stands in for CUDA autocast (the same lower-precision matmuls and attention).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from healthgpt.training.plan.arch import build_shape_model
from healthgpt.training.plan.memtrack import StorageTracker, storage_key

__all__ = ["KINDS", "StepTrace", "Workload", "trace_step", "workloads"]

KINDS = ("frozen_weights", "trainable_weights", "gradients", "optimizer_states", "activations", "temporaries")

HEADER_TOKENS = 8  # template tokens before the <image> placeholder (system/user role markers)
DEFAULT_TEXT = {  # assumed text lengths (tokens); --prompt-tokens / --answer-tokens override
    "comprehension": (64, 128),  # question + template, answer
    "generation": (64, 1028),  # instruction + template, <start_index> + 1024 codes + <end_index> + end of turn
}


@dataclass(frozen=True)
class Workload:
    """One sample's layout: ``header`` text, the image's ``image_tokens`` positions, the rest of the
    prompt, then ``answer`` labelled positions (new tokens for generation targets)."""

    task: str
    image_tokens: int
    prompt: int
    answer: int

    @property
    def image_at(self) -> int:
        return min(HEADER_TOKENS, self.prompt)

    @property
    def seq_len(self) -> int:  # positions after the splice
        return self.prompt + self.image_tokens + self.answer

    @property
    def n_ids(self) -> int:  # input ids (one <image> placeholder)
        return self.prompt + 1 + self.answer

    @property
    def new_tokens(self) -> bool:
        return self.task == "generation"


def workloads(task: str, image_tokens: int, prompt: int | None = None, answer: int | None = None) -> list[Workload]:
    tasks = ("comprehension", "generation") if task == "mixed" else (task,)
    out = []
    for t in tasks:
        p, a = DEFAULT_TEXT[t]
        out.append(Workload(t, image_tokens, prompt if prompt is not None else p,
                            answer if answer is not None and t == "comprehension" else a))
    return out


@dataclass
class StepTrace:
    peak_bytes: int
    by_kind: dict[str, int]
    flops_fwd_bwd: dict[str, int]  # per task: one micro-batch forward + backward
    trainable_params: int
    frozen_params: int
    trainable_numel_by_group: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _sdpa_cpu_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    b, h, sq, d = query_shape
    sk, dv = key_shape[2], value_shape[3]
    return 2 * b * h * sq * sk * d + 2 * b * h * sq * sk * dv


def _sdpa_cpu_backward_flops(grad_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any,
                             *args: Any, **kwargs: Any) -> int:
    return 2 * _sdpa_cpu_flops(query_shape, key_shape, value_shape)


def _flop_formulas() -> dict[Any, Any]:
    from torch.utils.flop_counter import flop_registry, shape_wrapper

    out = dict(flop_registry)
    out[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = shape_wrapper(_sdpa_cpu_flops)
    out[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward] = shape_wrapper(_sdpa_cpu_backward_flops)
    return out


FLOP_FORMULAS = _flop_formulas()


def _embed(model: Any, ids: torch.Tensor, with_new: bool) -> torch.Tensor:
    """``SplitEmbedding.forward`` with the ``is_new.any()`` answer known in advance."""
    emb = model.embed
    n_old = emb.old.shape[0]
    out = F.embedding(ids.clamp(0, n_old - 1), emb.old)
    if with_new:
        new = F.embedding((ids - n_old).clamp(0, emb.new.shape[0] - 1), emb.new)
        out = torch.where((ids >= n_old).unsqueeze(-1), new.to(out.dtype), out)
    return out.to(model.compute_dtype)


def traced_loss(model: Any, w: Workload, batch: int) -> torch.Tensor:
    """``HealthGPT.forward``'s loss with fixed positions (see the module docstring)."""
    from healthgpt.model.generation import decoder_of

    model.set_task(w.task)
    n_old = model.embed.old.shape[0]
    ids = torch.zeros((batch, w.n_ids), dtype=torch.long)
    if w.new_tokens:
        ids[:, w.n_ids - w.answer:] = n_old + 1
    size = model.vision.image_size
    pixels = torch.zeros((batch, 3, size, size))
    text = _embed(model, ids, w.new_tokens)
    feats = model.vision.features(pixels, w.task).to(text.dtype)
    at = w.image_at
    embeds = torch.cat([text[:, :at], feats, text[:, at + 1:]], 1)
    pos = torch.arange(w.seq_len).unsqueeze(0).expand(batch, -1)
    hidden = decoder_of(model.llm)(inputs_embeds=embeds, attention_mask=None, position_ids=pos,
                                   use_cache=False).last_hidden_state
    first = w.seq_len - w.answer - 1  # position predicting the first label
    sel = hidden[:, first:first + w.answer].reshape(-1, hidden.shape[-1])
    targets = torch.zeros((batch * w.answer,), dtype=torch.long)
    return F.cross_entropy(model.lm_head(sel).float(), targets)


def _prepare(preset: str, stage: int, task: str, precision: str, gradient_checkpointing: bool,
             fake: Any, variant: str, layers: int | None = None) -> tuple[Any, list[torch.nn.Parameter], tuple[str, ...], Any]:
    from healthgpt.model.hlora import set_dropout
    from healthgpt.training.hparams import load_hparams
    from healthgpt.training.stages import stage_groups

    dtype = torch.float32 if precision == "fp32" else None
    model = build_shape_model(preset, fake, variant=variant, dtype=dtype, layers=layers)
    groups = stage_groups(stage, task)
    hp = load_hparams(preset, stage, task=task)
    with fake:
        params = model.set_trainable(*groups)
        for p in params:  # the trainer keeps trainable tensors in fp32 (master weights)
            if p.dtype != torch.float32:
                p.data = p.data.float()
    for t in ("comprehension", "generation"):
        set_dropout(model.llm, hp.dropout_for(t), tasks=[t])
    if gradient_checkpointing:  # as the trainer does (transformers 5 deprecates the name: quiet here)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.vision.tower.eval()
    return model, params, groups, hp


def trace_step(preset: str, stage: int, task: str, micro_batch: int, *, precision: str = "bf16",
               gradient_checkpointing: bool = False, accum: int = 2, foreach: bool | None = True,
               prompt: int | None = None, answer: int | None = None, variant: str = "hlora",
               layers: int | None = None) -> StepTrace:
    """Trace one steady-state optimizer step (see the module docstring).

    One micro-batch per task is traced; with gradient accumulation (``accum`` > 1) or a mixed run the
    gradients of the earlier micro-batches exist already (zeros), so the traced micro-batch is the
    step's worst one. The FLOPs are those of one micro-batch (forward + backward) per task."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from healthgpt.training.stages import optimizer_groups

    fake = FakeTensorMode(allow_non_fake_inputs=False)
    model, params, groups, hp = _prepare(preset, stage, task, precision, gradient_checkpointing, fake, variant, layers)
    loads = workloads(task, model.vision.num_patches, prompt, answer)
    amp = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())
    tracker = StorageTracker(FLOP_FORMULAS)
    with fake:
        optimizer = torch.optim.AdamW(optimizer_groups(model, params, groups, hp), lr=hp.lr, betas=hp.betas,
                                      eps=hp.eps, weight_decay=hp.weight_decay, foreach=foreach)
        for p in params:  # one step first: the optimizer state exists in a steady-state step
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if accum > 1 or len(loads) > 1:  # gradients accumulated by the step's earlier micro-batches
            for p in params:
                p.grad = torch.zeros_like(p)
        states = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        with tracker:
            tracker.adopt(list(model.parameters()) + list(model.buffers()) + states + [p.grad for p in params])
            tracker.reset_peak()
            for w in loads:
                tracker.phase = f"forward:{w.task}"
                with amp:
                    loss = traced_loss(model, w, micro_batch)
                tracker.phase = f"backward:{w.task}"
                loss.backward()
                del loss
            tracker.phase = "optimizer"
            torch.nn.utils.clip_grad_norm_(params, hp.grad_clip if hp.grad_clip > 0 else float("inf"))
            optimizer.step()
        by_kind = _classify(tracker, model, params, states)
        tracker.close()
    flops = {w.task: sum(n for ph, n in tracker.flops_by_phase.items() if ph.endswith(f":{w.task}")) for w in loads}
    trainable_ids = {id(p) for p in params}
    frozen = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in trainable_ids)
    groups_numel = {g: sum(p.numel() for p in ps) for g, ps in model.parameter_groups().items() if g in groups}
    return StepTrace(tracker.peak, by_kind, flops, sum(p.numel() for p in params), frozen, groups_numel)


def _classify(tracker: StorageTracker, model: Any, params: list[torch.nn.Parameter],
              states: list[torch.Tensor]) -> dict[str, int]:
    trainable = {storage_key(p) for p in params}
    frozen = {storage_key(p) for p in model.parameters()} | {storage_key(b) for b in model.buffers()}
    grads = {storage_key(p.grad) for p in params if p.grad is not None}
    state = {storage_key(t) for t in states}
    out = dict.fromkeys(KINDS, 0)
    for key, (nbytes, phase) in tracker.peak_live.items():
        if key in trainable:
            kind = "trainable_weights"
        elif key in frozen:
            kind = "frozen_weights"
        elif key in state:
            kind = "optimizer_states"
        elif key in grads:
            kind = "gradients"
        elif phase.startswith("forward"):
            kind = "activations"
        else:
            kind = "temporaries"
        out[kind] += nbytes
    return out
