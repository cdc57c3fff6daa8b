"""The three-stage H-LoRA trainer (``healthgpt train``): one stage per run, read top to bottom.

``train`` sets up the process group and calls ``fit``: build the model and load ``--init``, freeze
all but the stage's groups (:mod:`healthgpt.training.stages`), wrap it for DDP/FSDP, build the optimizer,
the loader and the LR schedule (:mod:`healthgpt.training.hparams`), resume from the latest checkpoint
(:mod:`healthgpt.training.checkpoints`), then loop: one optimizer step (``_optimizer_step``), log it,
checkpoint every ``--save-every`` steps or on SIGTERM. The final weights and
``final/train_summary.json`` close the run.

Stage 1 comprehension assumes a pre-trained LLM. On the random ``tiny`` LLM its loss stays near
ln(V) ~ 9.0: the final RMSNorm fixes the hidden norm and the random head rows are short, so no
adapter output can raise a token's logit by more than ~1.3 nats (best reachable ~85% of the
start). ``tests/test_train.py`` therefore pre-trains the tiny LLM on text first.

Loss of an optimizer step: the mean over every label token of its micro-batches on all ranks, so
accumulation gives the gradient of one batch of ``global_batch`` samples (not a mean of
per-micro-batch means). The loss-spike guard skips a step whose loss is not finite or above
``spike_factor x`` the running mean of the last ``spike_window`` accepted losses of the same task,
logs it to ``metrics.jsonl``, and stops the run after ``max_spikes`` consecutive skipped steps.
A task whose loss ends above where it started is named in a warning (console and
``train_summary.json``, :mod:`healthgpt.training.loss_trend`).

Hardware: CUDA (bf16 autocast, gradient checkpointing) when available, else CPU (fp32). Multi-GPU
and multi-node through ``torchrun`` (DDP; ``--fsdp`` for presets that do not fit one device); gloo
on CPU. Data: local shard folders are read by random access with an exact data position; shard
URLs stream through ``webdataset`` (:mod:`healthgpt.training.data`), where ``--resume`` restores weights,
optimizer and step but restarts the stream.

``--init`` takes earlier runs, weights files or ``healthgpt export`` folders, local or by Hub id
(``hf://ORG/NAME[@REVISION]``, :mod:`healthgpt.sharing.hub`); their lineage is carried into this run's.

Outputs under ``--out``: ``metrics.jsonl`` (one line per optimizer step), ``checkpoints/step-N/``,
``final/trainable.safetensors`` + ``final/train_summary.json``; with ``--report-to``
(:mod:`healthgpt.training.trackers`) ``csv/``, ``tensorboard/``, W&B and MLflow runs get the same scalars.

Public API::

    TrainConfig(...);  train(cfg, model=None, batch_hook=None) -> TrainResult
    loss_by_task(losses, tasks) -> {task: {first, last, n, steps}}
    train_command (the typer command; its hyper-parameter options are generated from HParams)
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import random
import signal
import threading
import time
import typing
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from torch import nn

from healthgpt.model.conversation import IGNORE_INDEX
from healthgpt.model.hlora import set_dropout
from healthgpt.model.vision import VisionPreprocessor
from healthgpt.model.weights import TRAINABLE_FILE, load_trainable, resolve_trainable, save_trainable
from healthgpt.sharing.export import export_lineage, is_export_folder, load_export, read_export_info
from healthgpt.sharing.hub import display_name, resolve_model
from healthgpt.sharing.run_spec import make_run_spec, parse_sets
from healthgpt.training.checkpoints import (
    CHECKPOINTS_DIR,
    CheckpointWriteError,
    latest_checkpoint,
    load_run_weights,
    read_checkpoint,
    rng_state,
    run_lineage,
    save_rng,
    set_rng_state,
    write_checkpoint,
)
from healthgpt.training.data import DataConfig, LoaderState, make_loader, parse_shard_spec, source_sample_counts
from healthgpt.training.dist import Dist
from healthgpt.training.hparams import HPARAM_HELP, HParams, load_hparams, lr_lambda
from healthgpt.training.loss_trend import divergence_warnings
from healthgpt.training.stages import STAGE_GROUPS, optimizer_groups, stage_groups
from healthgpt.training.trackers import Trackers, check_available, open_trackers, parse_report_to, step_scalars
from healthgpt.training.validation import ValidationSet
from vlhealth.cli_errors import print_error

__all__ = [
    "STAGE_GROUPS",
    "LossGuard",
    "TrainConfig",
    "TrainResult",
    "TooManyBadSamples",
    "TrainingDiverged",
    "latest_checkpoint",
    "loss_by_task",
    "train",
    "train_command",
    "val_by_task",
]

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many consecutive loss spikes."""


class TooManyBadSamples(ValueError):
    """More samples failed to decode than ``--max-bad-samples`` allows."""


@dataclass
class TrainConfig:
    preset: str
    stage: int
    task: str
    shards: Sequence[str]
    out: Path
    init: Sequence[str | Path] = ()  # previous stage(s): --out folders, .safetensors, export folders, hf:// ids
    resume: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    config: Path | None = None
    seed: int = 0
    split: str = "train"
    pack: bool = False
    stream: bool = False  # webdataset streaming mode even for local shard folders (URLs always stream)
    verify: bool = True  # compare each local tar's sha256 with its index.json before reading it
    num_workers: int | None = None
    save_every: int = 100
    keep: int = 3
    log_every: int = 1
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    gradient_checkpointing: bool | None = None  # None: on for CUDA
    fsdp: bool = False
    tensorboard: bool = False  # the same as "tensorboard" in report_to
    report_to: tuple[str, ...] = ()  # trackers (healthgpt.training.trackers.TRACKERS): csv, tensorboard, wandb, mlflow
    run_name: str | None = None  # the trackers' run name (default: the --out folder's name)
    progress: bool = True
    preset_overrides: dict[str, Any] = field(default_factory=dict)  # build_model(...) overrides (--model-set)
    groups: tuple[str, ...] = ()  # parameter groups to train instead of the stage's (--groups; ablations)
    image_codes: int | None = None  # VQGAN codebook size < 8192: the loss's softmax skips the dead code rows
    val_every: int = 0  # held-out validation loss every N steps (and at step 0 and the end); 0: off
    val_batches: int = 4  # validation micro-batches per task
    debug_nan_at: tuple[int, ...] = ()  # optimizer steps whose first micro-batch gets NaN pixels
    debug_exit_after: int | None = None  # hard exit (no checkpoint) after this step: simulates a kill
    debug_log_keys: bool = False  # write the sample keys each rank trained on to OUT/keys-rank<R>.txt
    max_bad_samples: int = 10  # samples that fail to decode are skipped (and named) up to this many; then stop


@dataclass
class TrainResult:
    status: str  # finished | preempted
    step: int
    total_steps: int
    losses: list[float]
    skipped: list[int]
    trainable: dict[str, int]
    out: Path
    final_weights: Path | None


# ------------------------------------------------------------------------------------ the loop


class LossGuard:
    """Skips non-finite steps and spikes far above the running mean; stops on repeated spikes.

    The running mean is kept per task: in a mixed run a generation batch (a loss over 1024 image
    tokens) would otherwise be judged against the far lower comprehension losses and skipped as a
    "spike", so generation would barely train (seen in the demo's stage 3).
    """

    def __init__(self, hp: HParams, history: Sequence[float] | Mapping[str, Sequence[float]] = (),
                 consecutive: int = 0) -> None:
        self.factor = hp.spike_factor
        self.min_history = hp.spike_min_history
        self.max_spikes = hp.max_spikes
        self.window = hp.spike_window
        # checkpoints written before the per-task history hold one list: it becomes the "" task's
        items = history.items() if isinstance(history, Mapping) else [("", history)]
        self.histories: dict[str, deque[float]] = {k: deque(v, maxlen=self.window) for k, v in items}
        self.consecutive = consecutive

    def check(self, loss: float, grad_norm: float, task: str = "") -> str | None:
        """None when the step may be applied, else the reason to skip it."""
        reason = None
        history = self.histories.setdefault(task, deque(maxlen=self.window))
        if not math.isfinite(loss):
            reason = f"non-finite loss {loss}"
        elif not math.isfinite(grad_norm):
            reason = f"non-finite gradient norm {grad_norm}"
        elif len(history) >= self.min_history:
            mean = sum(history) / len(history)
            if loss > self.factor * mean:
                reason = f"loss {loss:.4g} > {self.factor:g} x running mean {mean:.4g}{f' of {task}' if task else ''}"
        if reason is None:
            history.append(loss)
            self.consecutive = 0
        else:
            self.consecutive += 1
        return reason

    def exhausted(self) -> bool:
        return self.consecutive >= self.max_spikes

    def state(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.histories.items()}, "consecutive": self.consecutive}


def trainable_summary(model: Any) -> dict[str, int]:
    """Trainable parameter count per group (groups with none are left out)."""
    out = {}
    for name, params in model.parameter_groups().items():
        n = int(sum(p.numel() for p in params if p.requires_grad))
        if n:
            out[name] = n
    return out


@dataclass
class _Run:
    """Everything a running stage holds, so the loop below reads as a loop."""

    cfg: TrainConfig
    dd: Dist
    hp: HParams
    model: Any
    wrapped: nn.Module
    params: list[nn.Parameter]
    groups: tuple[str, ...]
    saved_groups: list[str]
    trained_before: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    amp: Any
    accum: int
    total_steps: int
    loader_state: LoaderState
    batches: Iterator[dict[str, Any]] = iter(())
    guard: LossGuard | None = None
    streaming: bool = False  # webdataset mode: --resume restarts the data stream
    lineage: list[dict[str, Any]] = field(default_factory=list)  # the --init runs' stages and data, oldest first
    step: int = 0
    losses: list[float] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    step_tasks: list[str] = field(default_factory=list)  # dominant task per step of this run
    validation: Any = None  # ValidationSet: fixed held-out batches per task (--val-every)
    val_history: list[dict[str, Any]] = field(default_factory=list)  # {"step", "val_loss": {task: loss}}
    spec: dict[str, Any] = field(default_factory=dict)  # run_spec: VQGAN, --model-set values, seed (run_spec.py)


def train(cfg: TrainConfig, model: Any = None,
          batch_hook: Callable[[int, dict[str, Any]], dict[str, Any]] | None = None) -> TrainResult:
    """Run one stage. ``model`` defaults to ``build_model(cfg.preset, seed=cfg.seed)``;
    ``batch_hook(step, batch) -> batch`` may alter micro-batches (tests inject NaNs with it)."""
    device_kind = cfg.device
    if device_kind == "auto":
        device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    if device_kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA device is available")
    dd = Dist(backend="nccl" if device_kind == "cuda" else "gloo")
    try:
        return fit(setup(cfg, dd, device_kind, model), batch_hook)
    finally:
        dd.close()


def setup(cfg: TrainConfig, dd: Dist, device_kind: str, model: Any) -> _Run:
    """Model, optimizer, schedule, loader and resumed state of one stage."""
    from rich.console import Console

    console = Console(stderr=True, quiet=not dd.main)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    device = torch.device(f"cuda:{dd.local_rank}" if device_kind == "cuda" else "cpu")
    if device_kind == "cuda":
        torch.cuda.set_device(device)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device_kind == "cuda" else "fp32")
    use_gc = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else device_kind == "cuda"
    hp = load_hparams(cfg.preset, cfg.stage, cfg.overrides, cfg.config, task=cfg.task)
    check_available(_tracker_names(cfg))  # a missing tracker package is an error before any work
    spec = make_run_spec([s.path for s in map(parse_shard_spec, cfg.shards) if s.url is None], cfg.init,
                         cfg.preset_overrides, cfg.seed, cfg.out)
    groups = tuple(cfg.groups) or stage_groups(cfg.stage, cfg.task)
    num_workers = cfg.num_workers if cfg.num_workers is not None else (4 if device_kind == "cuda" else 0)

    model, params, trained_before = _prepare_model(cfg, hp, groups, model, console)
    model.to(device)
    if use_gc and hasattr(model.llm, "gradient_checkpointing_enable"):
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.vision.tower.eval()
    optimizer = torch.optim.AdamW(optimizer_groups(model, params, groups, hp), lr=hp.lr, betas=hp.betas,
                                  eps=hp.eps, weight_decay=hp.weight_decay)
    data_cfg = DataConfig(cfg.shards, cfg.task, hp.micro_batch, max_len=hp.max_len, pack=cfg.pack,
                          split=cfg.split, seed=cfg.seed, num_workers=num_workers, template=model.template,
                          image_tokens=model.vision.num_patches, streaming=cfg.stream, verify=cfg.verify)
    total_steps = _total_steps(cfg, hp, data_cfg)
    warmup = hp.warmup_steps if hp.warmup_steps is not None else int(round(hp.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(hp.schedule, warmup, total_steps))
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device_kind == "cuda" and precision == "bf16"
           else contextlib.nullcontext())
    run = _Run(cfg, dd, hp, model, _wrap(model, cfg, dd, device, device_kind), params, groups, [], trained_before,
               optimizer, scheduler, device, amp, hp.grad_accum(dd.world), total_steps, LoaderState(num_workers),
               guard=LossGuard(hp), streaming=data_cfg.streaming, spec=spec)
    resume_rng = _resume(run, console) if cfg.resume else None
    if not cfg.resume:
        run.lineage = _init_lineage(cfg.init)
    if not cfg.resume and dd.main:
        (Path(cfg.out) / "metrics.jsonl").write_text("", "utf-8")
    run.saved_groups = sorted(set(run.trained_before) | set(groups))
    loader, run.loader_state = make_loader(data_cfg, model.tokenizer, VisionPreprocessor.from_model(model),
                                           rank=dd.rank, world_size=dd.world, state=run.loader_state)
    run.batches = iter(loader)  # draws a base seed from the torch RNG
    if cfg.val_every > 0 and cfg.split != "train":
        raise ValueError(f"--val-every validates on held-out data: training on --split {cfg.split} would "
                         "train on it; train on the train split")
    if cfg.val_every > 0:
        run.validation = ValidationSet.build(data_cfg, model.tokenizer, VisionPreprocessor.from_model(model),
                                             cfg.val_batches)
        if run.validation is None:
            console.print("[yellow]--val-every: no validation samples (no val split, no train groups to lend) "
                          "for this task; validation is off[/yellow]")
        else:
            console.print("validation: " + "; ".join(
                f"{t} {run.validation.n_samples(t)} samples from {', '.join(run.validation.sources[t])}"
                for t in run.validation.tasks))
    if resume_rng is not None:  # so the RNG is restored only now, as it was after this point originally
        set_rng_state(resume_rng)
    summary = trainable_summary(model)
    console.print(f"stage {cfg.stage} {cfg.task} | preset {cfg.preset} | groups {', '.join(groups)} | "
                  f"{sum(summary.values()):,} trainable | steps {total_steps} | global batch {hp.global_batch} "
                  f"= {hp.micro_batch} x {dd.world} x {run.accum} | {device_kind} {precision}"
                  f"{' +grad-ckpt' if use_gc else ''}")
    return run


def fit(run: _Run, batch_hook: Callable[[int, dict[str, Any]], dict[str, Any]] | None = None) -> TrainResult:
    """The training loop: optimizer steps until the stage's step count, checkpoints, SIGTERM."""
    from rich.console import Console

    cfg, dd = run.cfg, run.dd
    console = Console(stderr=True, quiet=not dd.main)
    out = Path(cfg.out)
    trackers = (open_trackers(_tracker_names(cfg), out, cfg.run_name or out.name, run_config(run), run.step)
                if dd.main else Trackers())
    stop = {"signal": False}
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        old_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=True))
    keys_fh = open(out / f"keys-rank{dd.rank}.txt", "a", encoding="utf-8") if cfg.debug_log_keys else None  # noqa: SIM115
    status = "finished"
    try:
        status = _loop(run, batch_hook, keys_fh, trackers, stop, console)
    except BaseException:
        trackers.close("failed")
        raise
    finally:
        if keys_fh is not None:
            keys_fh.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    trackers.close(status)
    return _finish(run, status, console)


def _loop(run: _Run, batch_hook: Callable[[int, dict[str, Any]], dict[str, Any]] | None, keys_fh: Any,
          trackers: Trackers, stop: dict[str, bool], console: Any) -> str:
    """Optimizer steps until the stage's step count or SIGTERM; returns finished or preempted."""
    cfg, dd, out = run.cfg, run.dd, Path(run.cfg.out)
    status = "finished"
    with _progress_bar(console, cfg.progress and dd.main) as progress:
        bar = progress.add_task("train", total=run.total_steps, completed=run.step, loss=float("nan"), tps=0.0)
        if run.step == 0:
            _validate(run, trackers, console)
        while run.step < run.total_steps:
            t0 = time.perf_counter()
            record = _optimizer_step(run, batch_hook, keys_fh)
            if record["skipped"]:
                console.print(f"[yellow]step {run.step}: skipped ({record['skip_reason']})[/yellow]")
            record["step_time_s"] = time.perf_counter() - t0
            record["tokens_per_s"] = record["tokens"] / record["step_time_s"]
            if dd.main:
                _log_step(out, record, trackers, len(run.skipped))
                progress.update(bar, completed=run.step, loss=record["loss"], tps=record["tokens_per_s"])
                if not progress.live.is_started and cfg.log_every and run.step % cfg.log_every == 0:
                    console.print(f"step {run.step}/{run.total_steps} loss {record['loss']:.4f} "
                                  f"tok/s {record['tokens_per_s']:,.0f}")
            bad = run.loader_state.bad_samples()
            if dd.any(len(bad) > cfg.max_bad_samples):
                raise TooManyBadSamples(_bad_samples_message(bad, cfg.max_bad_samples, run.step))
            if run.guard.exhausted():
                raise TrainingDiverged(
                    f"stage {cfg.stage}: {run.guard.consecutive} consecutive steps skipped as loss spikes (last: "
                    f"{record.get('skip_reason')}); stopping. Resume from the last checkpoint with a lower "
                    f"--lr/--adapter-lr, or inspect the data around step {run.step} (metrics.jsonl lists the "
                    "skipped steps)")
            if cfg.val_every and (run.step % cfg.val_every == 0 or run.step == run.total_steps):
                _validate(run, trackers, console)
            if cfg.debug_exit_after is not None and run.step >= cfg.debug_exit_after:
                if cfg.save_every and run.step % cfg.save_every == 0:
                    _checkpoint(run)
                os._exit(137)  # simulate a hard kill: no cleanup
            terminate = dd.any(stop["signal"])
            if (cfg.save_every and run.step % cfg.save_every == 0) or terminate:
                _checkpoint(run)
            if terminate:
                status = "preempted"
                console.print(f"SIGTERM: checkpoint written at step {run.step}; exiting")
                break
    return status


def _optimizer_step(run: _Run, batch_hook: Callable[[int, dict[str, Any]], dict[str, Any]] | None,
                    keys_fh: Any) -> dict[str, Any]:
    """Accumulate ``accum`` micro-batches, clip, check the spike guard, step; returns the step's log record."""
    cfg, dd, hp = run.cfg, run.dd, run.hp
    run.optimizer.zero_grad(set_to_none=True)
    micro: list[dict[str, Any]] = []
    tasks: dict[str, int] = {}
    for a in range(run.accum):
        batch = next(run.batches)
        run.loader_state.update(batch)
        if a == 0 and (run.step + 1) in cfg.debug_nan_at and batch["pixel_values"] is not None:
            batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
        if batch_hook is not None:
            batch = batch_hook(run.step + 1, batch)
        if keys_fh is not None:
            keys_fh.write("".join(k + "\n" for k in batch["keys"]))
        tasks[batch["task"]] = tasks.get(batch["task"], 0) + 1
        micro.append(batch)
    # the step's loss is the mean over every label token of all its micro-batches on all ranks (what
    # one big batch would give); label positions after the causal shift (image splicing adds none)
    n_label = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro]
    total_label = max(1.0, dd.sum(float(sum(n_label))))
    loss_sum = 0.0
    for a, batch in enumerate(micro):
        sync = contextlib.nullcontext()
        if dd.enabled and a < run.accum - 1 and hasattr(run.wrapped, "no_sync"):
            sync = run.wrapped.no_sync()
        with sync:
            with run.amp:
                res = run.wrapped(
                    input_ids=batch["input_ids"].to(run.device),
                    attention_mask=batch["attention_mask"].to(run.device),
                    labels=batch["labels"].to(run.device),
                    pixel_values=None if batch["pixel_values"] is None else batch["pixel_values"].to(run.device),
                    task=batch["task"], return_logits=False, n_codes=cfg.image_codes,
                )
            (res.loss * (n_label[a] * dd.world / total_label)).backward()  # DDP averages over ranks: x world
        loss_sum += float(res.loss.detach()) * n_label[a]
    step_loss = dd.sum(loss_sum) / total_label
    max_norm = hp.grad_clip if hp.grad_clip > 0 else math.inf
    if cfg.fsdp and hasattr(run.wrapped, "clip_grad_norm_"):
        # FSDP shards gradients: its own clip computes the global norm across ranks, so every rank
        # clips alike and the spike guard reaches the same decision everywhere
        grad_norm = float(run.wrapped.clip_grad_norm_(max_norm))
    else:  # under DDP the gradients are already averaged: every rank sees the same norm
        grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, max_norm))
    reason = run.guard.check(step_loss, grad_norm, max(tasks, key=tasks.get))
    if reason is None:
        run.optimizer.step()
    else:
        run.skipped.append(run.step + 1)
        run.optimizer.zero_grad(set_to_none=True)
    lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(run.optimizer.param_groups)}
    run.scheduler.step()
    run.step += 1
    run.losses.append(step_loss)
    run.step_tasks.append(max(tasks, key=tasks.get))
    tokens = dd.sum(sum(int(b["n_tokens"]) for b in micro))
    record = {"step": run.step, "loss": step_loss, "grad_norm": grad_norm, "lr": _lr(lrs, "lora"),
              "adapter_lr": _lr(lrs, "adapter"), "tokens": tokens, "tasks": tasks, "skipped": reason is not None}
    if reason is not None:
        record["skip_reason"] = reason
    record["lrs"] = lrs
    return record


def _validate(run: _Run, trackers: Trackers, console: Any) -> None:
    """Score the fixed validation batches (every rank scores the same ones; the main rank logs)."""
    if run.validation is None:
        return
    losses = run.validation.loss(run.model, run.device, run.amp, run.cfg.image_codes, forward=run.wrapped)
    record = {"step": run.step, "val_loss": losses}
    run.val_history.append(record)
    if not run.dd.main:
        return
    with open(Path(run.cfg.out) / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    trackers.log({f"val/loss_{task}": loss for task, loss in losses.items()}, run.step)
    console.print(f"step {run.step}: validation loss " + ", ".join(f"{t} {v:.4f}" for t, v in losses.items()))


def _shareable(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Model overrides as a summary may show them: a path (``vision_path``, ``llm_path``, ...) by its folder
    name only, never the building machine's absolute path."""
    out = json.loads(json.dumps(dict(overrides), default=str))
    return {k: (Path(str(v)).name if k.endswith("_path") and v is not None else v) for k, v in out.items()}


def val_by_task(history: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per task: the validation loss at the stage's first and last validation (same batches both times)."""
    out: dict[str, dict[str, float]] = {}
    for task in sorted({t for h in history for t in h["val_loss"]}):
        points = [(int(h["step"]), float(h["val_loss"][task])) for h in history if task in h["val_loss"]]
        if points:
            out[task] = {"first": points[0][1], "last": points[-1][1], "first_step": points[0][0],
                         "last_step": points[-1][0], "n": len(points)}
    return out


def _lr(lrs: Mapping[str, float], kind: str) -> float | None:
    """The LR of one kind of optimizer group (the first one when a mixed run splits it per task)."""
    return next((v for k, v in lrs.items() if k == kind or k.startswith(f"{kind}:")), None)


def _log_step(out: Path, record: dict[str, Any], trackers: Trackers, skipped_so_far: int) -> None:
    lrs = record.pop("lrs")
    row = {k: record[k] for k in ("step", "loss", "grad_norm", "lr", "adapter_lr", "tokens", "tokens_per_s",
                                  "step_time_s", "tasks", "skipped")}
    if "skip_reason" in record:
        row["skip_reason"] = record["skip_reason"]
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
    trackers.log(step_scalars(record, lrs, skipped_so_far), record["step"])


def _tracker_names(cfg: TrainConfig) -> tuple[str, ...]:
    names = parse_report_to(cfg.report_to)
    return names + ("tensorboard",) if cfg.tensorboard and "tensorboard" not in names else names


def run_config(run: _Run) -> dict[str, Any]:
    """What the trackers record about a run: resolved hyper-parameters, stage, data names and lineage
    (names only, never the machine's paths)."""
    cfg = run.cfg
    return {
        "run": Path(cfg.out).name, "preset": cfg.preset, "stage": cfg.stage, "task": cfg.task, "seed": cfg.seed,
        "split": cfg.split, "pack": cfg.pack, "world_size": run.dd.world, "total_steps": run.total_steps,
        "grad_accum": run.accum, "shards": [Path(str(s)).name for s in cfg.shards], "groups": list(run.groups),
        "trainable": trainable_summary(run.model), "model_overrides": _shareable(cfg.preset_overrides),
        "image_codes": cfg.image_codes, "val_every": cfg.val_every,
        "hparams": json.loads(json.dumps(run.hp.to_dict(), default=str)), "lineage": run.lineage,
    }


# ------------------------------------------------------------------------------------ set-up helpers


def _prepare_model(cfg: TrainConfig, hp: HParams, groups: Sequence[str], model: Any,
                   console: Any) -> tuple[Any, list[nn.Parameter], list[str]]:
    """Build (or take) the model, load ``--init``, unfreeze the stage's groups, set the plugins' dropout."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if model is None:
        from healthgpt.model.presets import build_model

        model, _ = build_model(cfg.preset, seed=cfg.seed, **cfg.preset_overrides)
    trained_before: list[str] = []
    if not cfg.resume:
        for init in cfg.init:  # e.g. stage 2 starts from both stage-1 runs (comprehension + generation)
            loaded = _load_init(model, init)
            trained_before = sorted(set(trained_before) | set(loaded))
            console.print(f"init: loaded {', '.join(loaded) or 'weights'} from {display_name(init)}")
        _own_groups_win(model, cfg.init, console)
    params = model.set_trainable(*groups)
    if not params:
        raise ValueError(f"stage {cfg.stage} {cfg.task}: the model has no parameters in {groups}")
    for p in params:  # train in fp32 whatever the preset's dtype (master weights)
        if p.dtype != torch.float32:
            p.data = p.data.float()
    for task in ("comprehension", "generation"):
        set_dropout(model.llm, hp.dropout_for(task), tasks=[task])
    return model, params, trained_before


def _load_init(model: Any, init: str | os.PathLike[str]) -> list[str]:
    """Load one ``--init``: a training run, checkpoint or weights file, or a ``healthgpt export`` folder, each
    local or by Hub id (``hf://ORG/NAME[@REVISION]``); returns the parameter groups it trained."""
    source = resolve_model(init)
    if is_export_folder(source):
        info = read_export_info(source)
        load_export(model, source)  # checks the manifest's sha256 first
        return list(info.get("groups") or [])
    return load_run_weights(model, source)


def _trained_groups(init: str | os.PathLike[str]) -> list[str]:
    """The parameter groups a training run trained itself (its ``train_summary.json``), not those it carried
    from earlier stages; empty for an export, a checkpoint or a bare weights file (unknown)."""
    source = resolve_model(init)
    if is_export_folder(source):
        return []
    summary = resolve_trainable(source).parent / "train_summary.json"
    if not summary.is_file():
        return []
    return [str(g) for g in json.loads(summary.read_text("utf-8")).get("groups") or []]


def _own_groups_win(model: Any, inits: Sequence[str | os.PathLike[str]], console: Any) -> None:
    """Several ``--init``: each group comes from the run that trained it. A run's weights file also carries
    the groups of the stages before it, so two runs from one parent (stage 3's comprehension and generation
    runs, trained side by side) each hold a stale copy of the other's groups, and no loading order is right;
    the groups each run trained itself are loaded again, last. Two runs that trained the same group are an
    error: which one to keep is the user's choice."""
    if len(inits) < 2:
        return
    owner: dict[str, str | os.PathLike[str]] = {}
    for init in inits:
        for group in _trained_groups(init):
            if group in owner:
                raise ValueError(f"--init {display_name(owner[group])} and --init {display_name(init)} both trained "
                                 f"{group}: merge runs that trained different groups, or give one of them")
            owner[group] = init
    for init in inits:
        own = [g for g, o in owner.items() if o is init]
        if own:
            load_trainable(model, resolve_trainable(resolve_model(init)), groups=own)
            console.print(f"init: {', '.join(own)} from {display_name(init)}, which trained them")


def _init_lineage(inits: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """The earlier stages behind ``--init``, oldest first: a run's recorded lineage (``run_lineage``), or the
    stages an export folder lists (``export_lineage``)."""
    out: list[dict[str, Any]] = []
    for init in inits:
        source = resolve_model(init)
        entries = export_lineage(source) if is_export_folder(source) else run_lineage([source])
        out += [e for e in entries if e not in out]
    return out


def _wrap(model: Any, cfg: TrainConfig, dd: Dist, device: torch.device, device_kind: str) -> nn.Module:
    if not dd.enabled:
        return model
    if cfg.fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP(model, use_orig_params=True, device_id=device if device_kind == "cuda" else None,
                    sync_module_states=True)
    # trainable tensors may sit out a batch in every stage: the new input rows when a batch has no
    # new-token ids (stage 2 comprehension batches), the idle task's plugin and adapter in mixed runs,
    # a visual adapter on a text-only batch; without unused-parameter detection DDP then fails at the
    # next step ("did not receive gradient")
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device_kind == "cuda" else None,
                                               find_unused_parameters=True)


def _total_steps(cfg: TrainConfig, hp: HParams, data_cfg: DataConfig) -> int:
    if hp.steps is not None:
        return hp.steps
    if any(s.remote for s in data_cfg.specs):
        raise ValueError("streaming from URLs: the number of samples is not known in advance; give --steps")
    counts = source_sample_counts(data_cfg.specs, cfg.split)
    wanted = ("comprehension", "generation") if cfg.task == "mixed" else (cfg.task,)
    n = sum(v for (_, t), v in counts.items() if t in wanted)
    return max(1, math.ceil((hp.epochs or 1.0) * n / hp.global_batch))


def _resume(run: _Run, console: Any) -> dict[str, Any]:
    """Load the latest checkpoint of ``--out`` into ``run``; returns this rank's RNG state to restore."""
    cfg, dd, out = run.cfg, run.dd, Path(run.cfg.out)
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {out.name}/{CHECKPOINTS_DIR}")
    st = read_checkpoint(ckpt)
    for key in ("preset", "stage", "task"):
        if st[key] != getattr(cfg, key):
            raise ValueError(f"--resume: the checkpoint is {key}={st[key]!r}, this run {key}={getattr(cfg, key)!r}")
    if st["world_size"] != dd.world:
        raise ValueError(f"--resume: the checkpoint was written by {st['world_size']} process(es), this run has "
                         f"{dd.world}; the data position cannot be continued exactly")
    load_run_weights(run.model, ckpt / TRAINABLE_FILE)  # holds this stage's and the earlier stages' groups
    run.trained_before = list(st.get("trained_before", []))
    run.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    run.scheduler.load_state_dict(st["scheduler"])
    run.step = int(st["step"])
    run.guard = LossGuard(run.hp, st["guard"]["history"], st["guard"]["consecutive"])
    run.loader_state = LoaderState.from_dict(st["data"][dd.rank], run.loader_state.num_workers)
    run.losses, run.skipped = list(st["losses"]), list(st["skipped"])
    run.lineage = list(st.get("lineage", []))
    run.val_history = list(st.get("val_history", []))
    metrics = out / "metrics.jsonl"
    if dd.main and metrics.is_file():  # drop what the interrupted run logged after the checkpoint
        kept = [ln for ln in metrics.read_text("utf-8").splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= run.step]
        metrics.write_text("".join(k + "\n" for k in kept), "utf-8")
    console.print(f"resumed from {ckpt.name} (step {run.step}/{run.total_steps})")
    if run.streaming:
        console.print("streaming mode: the data stream restarts with a new shuffle (the exact data position "
                      "is kept only for local shard folders read without --stream)")
    return torch.load(ckpt / f"rng-rank{dd.rank}.pt", weights_only=True)


def _checkpoint(run: _Run) -> None:
    """Every rank's data position and RNG state go into the checkpoint rank 0 writes."""
    cfg, dd = run.cfg, run.dd
    data_states = dd.gather(run.loader_state.to_dict())
    rng = rng_state()
    if dd.main:
        state = {
            "preset": cfg.preset, "stage": cfg.stage, "task": cfg.task, "step": run.step, "world_size": dd.world,
            "scheduler": run.scheduler.state_dict(), "guard": run.guard.state(), "data": data_states,
            "losses": run.losses, "skipped": run.skipped, "trained_before": run.trained_before,
            "hparams": run.hp.to_dict(), "seed": cfg.seed, "shards": [str(Path(s).name) for s in cfg.shards],
            "lineage": run.lineage, "val_history": run.val_history, "run_spec": run.spec,
        }
        write_checkpoint(Path(cfg.out), run.step, run.model, run.saved_groups, run.optimizer, state, cfg.keep, rng=rng)
    dd.barrier()  # every other rank writes its own RNG state into the (now final) folder
    if not dd.main:
        save_rng(Path(cfg.out) / CHECKPOINTS_DIR / f"step-{run.step:08d}", dd.rank, rng)
    dd.barrier()


def _finish(run: _Run, status: str, console: Any) -> TrainResult:
    cfg, dd, losses = run.cfg, run.dd, run.losses
    summary = trainable_summary(run.model)
    by_task = loss_by_task(losses[len(losses) - len(run.step_tasks):], run.step_tasks)
    rising = divergence_warnings(by_task)
    final = None
    bad = [b for rank in dd.gather(run.loader_state.bad_samples()) for b in rank]
    if bad and dd.main:
        console.print(f"[yellow]{len(bad)} sample(s) could not be decoded and were skipped (train_summary.json "
                      f"lists them): {', '.join(b['sample'] for b in bad[:5])}{' ...' if len(bad) > 5 else ''}[/yellow]")
    if status == "finished":
        if dd.main:
            final_dir = Path(cfg.out) / "final"
            final_dir.mkdir(parents=True, exist_ok=True)
            final = final_dir / TRAINABLE_FILE
            save_trainable(run.model, final, run.saved_groups)
            (final_dir / "train_summary.json").write_text(json.dumps({
                "preset": cfg.preset, "stage": cfg.stage, "task": cfg.task, "steps": run.step,
                "shards": [str(Path(s).name) for s in cfg.shards],  # names only (no local paths)
                "lineage": run.lineage,  # the earlier stages this run's weights grew from, with their data
                "model_overrides": _shareable(cfg.preset_overrides),
                "run_spec": run.spec,  # the VQGAN and --model-set values infer/eval/serve/export rebuild it with
                "image_codes": cfg.image_codes,
                "groups": list(run.groups), "saved_groups": run.saved_groups, "trainable": summary,
                "hparams": json.loads(json.dumps(run.hp.to_dict(), default=str)),
                "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                "skipped_steps": run.skipped, "loss_by_task": by_task, "warnings": rising,
                "val_loss": run.val_history, "val_by_task": val_by_task(run.val_history),
                "val_sources": run.validation.sources if run.validation is not None else None,
                "bad_samples": bad, "bad_sample_count": len(bad),  # undecodable samples that were skipped
            }, indent=2) + "\n", "utf-8")
        dd.barrier()
    if dd.main:
        _print_summary(console, summary, losses, run.skipped, status)
        for task, v in by_task.items():
            console.print(f"  {task}: loss {v['first']:.4f} -> {v['last']:.4f} (mean of first/last {v['n']} "
                          f"of {v['steps']} steps)")
        for task, v in val_by_task(run.val_history).items():
            console.print(f"  {task}: validation loss {v['first']:.4f} (step {v['first_step']}) -> {v['last']:.4f} "
                          f"(step {v['last_step']}), {v['last'] / v['first']:.0%} of its start")
        for warning in rising:
            console.print(f"[bold yellow]warning: {warning}[/bold yellow]", highlight=False)
    return TrainResult(status, run.step, run.total_steps, losses, run.skipped, summary, Path(cfg.out), final)


def _bad_samples_message(bad: Sequence[Mapping[str, str]], limit: int, step: int) -> str:
    listed = "".join(f"\n  {b['sample']}: {b['reason']}" for b in bad[:20])
    more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
    return (f"{len(bad)} training samples could not be decoded (more than --max-bad-samples {limit}); stopped at step "
            f"{step}. Rebuild or drop these shards, or raise --max-bad-samples, then continue with --resume:"
            f"{listed}{more}")


def _progress_bar(console: Any, enabled: bool) -> Any:
    from vlhealth.progress import progress_bar

    return progress_bar("train", "loss {task.fields[loss]:.4f}", "{task.fields[tps]:,.0f} tok/s",
                        console=console, enabled=enabled and console.is_terminal)


def loss_by_task(losses: Sequence[float], tasks: Sequence[str], n: int | None = None) -> dict[str, dict[str, float]]:
    """Per task: mean of its first and last ``n`` finite step losses (mixed runs alternate tasks,
    so one overall first/last pair would compare different tasks). The default window is 5% of the
    task's steps, at least 3 and at most 25: small comprehension batches differ several-fold in loss
    with their answers, so three steps alone made "start" and "end" a draw (a 200-step stage-2 run
    measured its start as 0.58 where its next seven steps averaged 1.7), while a wide window moves
    "start" into the fast early fall of the loss. Same batches before and after would be cleaner."""
    out: dict[str, dict[str, float]] = {}
    for task in sorted(set(tasks)):
        vals = [x for x, t in zip(losses, tasks, strict=True) if t == task and math.isfinite(x)]
        if vals:
            window = n if n is not None else max(3, min(25, len(vals) // 20))
            k = min(window, len(vals))
            out[task] = {"first": sum(vals[:k]) / k, "last": sum(vals[-k:]) / k, "n": k, "steps": len(vals)}
    return out


def _print_summary(console: Any, summary: Mapping[str, int], losses: Sequence[float], skipped: Sequence[int],
                   status: str) -> None:
    from rich.table import Table

    table = Table(title=f"trainable parameters ({status})")
    table.add_column("group")
    table.add_column("parameters", justify="right")
    for name, n in summary.items():
        table.add_row(name, f"{n:,}")
    table.add_row("[bold]total", f"[bold]{sum(summary.values()):,}")
    console.print(table)
    finite = [x for x in losses if math.isfinite(x)]
    if finite:
        console.print(f"loss: first {finite[0]:.4f} -> last {finite[-1]:.4f} over {len(losses)} steps"
                      f"{f'; skipped steps {list(skipped)}' if skipped else ''}")


# ------------------------------------------------------------------------------------ CLI


def _parse_sets(items: Sequence[str], option: str = "--set") -> dict[str, Any]:
    """``key=value`` items (values read as YAML: ``4`` is a number, ``true`` a flag)."""
    return parse_sets(items, option)


def _hparam_options() -> list[inspect.Parameter]:
    """One ``--flag`` per ``HParams`` field (default None: the YAML's value), help from ``HPARAM_HELP``."""
    hints = typing.get_type_hints(HParams)
    params = []
    for f in dataclasses.fields(HParams):
        if f.name == "by_task":
            continue
        kind = next((t for t in (int, float, str) if t in typing.get_args(hints[f.name]) or hints[f.name] is t), str)
        option = typer.Option("--" + f.name.replace("_", "-"), help=HPARAM_HELP.get(f.name, ""),
                              rich_help_panel="Hyper-parameters (default: the training YAML)")
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[kind | None, option]))
    return params


_HPARAM_OPTIONS = _hparam_options()


def train_command(
    shards: Annotated[list[str], typer.Option("--shards", help="Shard folder, optionally DIR:WEIGHT (mixing weight), or a shard URL pattern (streamed; URL:WEIGHT). Repeat for several.")],
    stage: Annotated[int, typer.Option(help="1 alignment, 2 plugin adaptation, 3 instruction tuning.", min=1, max=3)],
    task: Annotated[str, typer.Option(help="comprehension, generation or mixed.")],
    out: Annotated[Path, typer.Option(help="Output folder (metrics.jsonl, checkpoints/, final/).")],
    preset: Annotated[str, typer.Option(help="Model preset: tiny, smollm2-135m, m3, l14, xl32.")] = "tiny",
    init: Annotated[list[str] | None, typer.Option(help="Previous stage's --out folder (or a trainable .safetensors), or a `healthgpt export` folder, local or by Hub id hf://ORG/NAME[@REVISION]; its lineage is carried over. Repeat to merge runs.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint in --out.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Any hyper-parameter as key=value (same as its own option).")] = None,
    model_set: Annotated[list[str] | None, typer.Option("--model-set", help="Model preset override key=value (variant=lora|moelora|hlora, experts=8, comp_r=32, comprehension_features=concrete, shared_plugin=true, ...); give healthgpt eval the same.")] = None,
    groups: Annotated[str | None, typer.Option(help="Train these parameter groups (comma-separated) instead of the stage's, e.g. a one-stage mixed baseline.")] = None,
    image_codes: Annotated[int | None, typer.Option(min=1, max=8192, help="Codebook size of the VQGAN the generation shards were tokenized with (its config's n_embed), when smaller than 8192: the loss's softmax then runs over those codes only, as `eval --constrained-images` decodes, and the dead code rows are never computed (~3x faster generation steps on the tiny preset with a 256-code VQGAN). A target code beyond it is an error.")] = None,
    config: Annotated[Path | None, typer.Option(help="Training YAML (default healthgpt/training/configs/train_<preset>.yaml).")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    split: Annotated[str, typer.Option(help="Split to train on.")] = "train",
    pack: Annotated[bool, typer.Option(help="Pack several samples per row up to --max-len.")] = False,
    stream: Annotated[bool, typer.Option(help="Read local shard folders in webdataset streaming mode too (URLs such as https://host/x-{000000..000099}.tar or 'pipe:curl -s ...' always stream). --resume then restarts the stream: the exact data position is kept only for local shards read in the default mode.")] = False,
    verify: Annotated[bool, typer.Option(help="Compare each local tar's sha256 with its folder's index.json before training (--no-verify skips it).")] = True,
    num_workers: Annotated[int | None, typer.Option(help="Loader worker processes (default 0 on CPU, 4 on CUDA).")] = None,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: only at the end/SIGTERM).")] = 100,
    keep: Annotated[int, typer.Option(help="Checkpoints to keep.")] = 3,
    max_bad_samples: Annotated[int, typer.Option(help="Training samples that fail to decode are skipped, counted and named in train_summary.json, up to this many; one more stops the run with their list.")] = 10,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 on CUDA), bf16 or fp32.")] = "auto",
    gradient_checkpointing: Annotated[bool | None, typer.Option(help="Default: on with CUDA.")] = None,
    fsdp: Annotated[bool, typer.Option(help="Shard with FSDP instead of DDP (torchrun).")] = False,
    tensorboard: Annotated[bool, typer.Option(help="Also log to OUT/tensorboard (the same as --report-to tensorboard).")] = False,
    report_to: Annotated[list[str] | None, typer.Option(help="Experiment trackers, comma-separated or repeated: csv (OUT/csv/metrics.csv), tensorboard (OUT/tensorboard/), wandb (Weights & Biases: WANDB_PROJECT, WANDB_MODE=offline), mlflow (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME). They get the metrics.jsonl scalars, the resolved hyper-parameters and the run's lineage; only the main rank logs. wandb and mlflow are optional extras: pip install -e '.[wandb,mlflow]'.")] = None,
    run_name: Annotated[str | None, typer.Option(help="Run name in the trackers (default: the --out folder's name).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    val_every: Annotated[int, typer.Option(help="Validation loss per task on fixed held-out batches (the val split, or 1 in 20 train groups of a source without one, never trained on) at step 0, every N steps and at the end; written to metrics.jsonl, train_summary.json and TensorBoard. 0: off.")] = 0,
    val_batches: Annotated[int, typer.Option(help="Validation micro-batches per task.")] = 4,
    debug_nan_at: Annotated[list[int] | None, typer.Option(hidden=True)] = None,
    debug_exit_after: Annotated[int | None, typer.Option(hidden=True)] = None,
    debug_log_keys: Annotated[bool, typer.Option(hidden=True)] = False,
    **hparams: Any,
) -> None:
    """Train one stage of HealthGPT on WebDataset shards (stage 1 alignment, 2 plugin adaptation,
    3 instruction tuning); each stage starts from the previous one with --init. Hyper-parameters
    come from healthgpt/training/configs/train_<preset>.yaml (per stage and task, as the paper's Table 7),
    each overridable by its own option; multi-GPU with `torchrun --nproc-per-node N -m healthgpt.cli
    train ...`. On SIGTERM a checkpoint is written; continue with --resume.

    Example:

        healthgpt train --preset tiny --stage 1 --task generation --shards demo/shards/synthrad --out runs/s1g

        healthgpt train --preset tiny --stage 2 --task mixed --shards demo/shards/vqa_rad --shards demo/shards/synthrad:0.5 --init runs/s1g --out runs/s2

        healthgpt train --preset tiny --stage 1 --task generation --shards demo/shards/synthrad --out runs/s1g --report-to tensorboard,wandb
    """
    from healthgpt.sharing.run_spec import check_checkpoint
    from vlhealth.shards import require_shards

    require_shards([s.path for s in map(parse_shard_spec, shards) if s.url is None], "--shards")
    for run in init or ():
        check_checkpoint(run, "--init")
    overrides = {k: v for k, v in hparams.items() if v is not None}
    overrides.update(_parse_sets(set_ or []))
    if task not in ("comprehension", "generation", "mixed"):
        raise typer.BadParameter(f"--task must be comprehension, generation or mixed, not {task!r}")
    try:
        trackers = parse_report_to(report_to)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    cfg = TrainConfig(
        preset=preset, stage=stage, task=task, shards=shards, out=out, init=tuple(init or ()), resume=resume,
        overrides=overrides, config=config, seed=seed, split=split, pack=pack, stream=stream, verify=verify,
        num_workers=num_workers, save_every=save_every, keep=keep, device=device, precision=precision,
        gradient_checkpointing=gradient_checkpointing, fsdp=fsdp, tensorboard=tensorboard, progress=progress,
        report_to=trackers, run_name=run_name,
        debug_nan_at=tuple(debug_nan_at or ()), debug_exit_after=debug_exit_after, debug_log_keys=debug_log_keys,
        preset_overrides=_parse_sets(model_set or [], "--model-set"),
        groups=tuple(g.strip() for g in (groups or "").split(",") if g.strip()), image_codes=image_codes,
        val_every=val_every, val_batches=val_batches, max_bad_samples=max_bad_samples,
    )
    logging.basicConfig(level=logging.WARNING)
    try:
        result = train(cfg)
    except TrainingDiverged as err:
        print_error(err)
        raise typer.Exit(3) from None
    except (ValueError, FileNotFoundError, KeyError, TypeError, CheckpointWriteError) as err:
        print_error(err)
        raise typer.Exit(2) from None
    if result.status == "preempted":
        typer.echo(f"stopped by SIGTERM at step {result.step}/{result.total_steps}; continue with --resume", err=True)


def _with_hparam_options(command: Callable[..., None]) -> None:
    """Give ``command`` (whose ``**hparams`` collects them) one typer option per HParams field."""
    hints = typing.get_type_hints(command, include_extras=True)
    fixed = [p.replace(annotation=hints[name]) for name, p in inspect.signature(command).parameters.items()
             if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params = fixed + _HPARAM_OPTIONS
    command.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}


_with_hparam_options(train_command)


TORCHRUN_PROG = "python -m healthgpt.training"


def torchrun_app() -> typer.Typer:
    """``python -m healthgpt.training ...`` (e.g. under torchrun): ``healthgpt train`` as an app of its own,
    with the same one-line errors (exit 2) and ``--debug`` as the ``healthgpt`` command line."""
    from vlhealth.cli_errors import ErrorCommand

    app = typer.Typer(add_completion=False, help="HealthGPT three-stage trainer.", pretty_exceptions_show_locals=False)
    app.command("train", cls=ErrorCommand)(train_command)
    return app


def main() -> None:  # pragma: no cover - `python -m healthgpt.training ...` (e.g. under torchrun)
    torchrun_app()(prog_name=TORCHRUN_PROG)


if __name__ == "__main__":  # pragma: no cover
    main()
