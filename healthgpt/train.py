"""The three-stage H-LoRA trainer (``healthgpt train``).

Stages (paper §4.4; DESIGN.md) and what each trains (``STAGE_GROUPS``; everything else frozen):

======= ================ ==========================================================================
stage   task             trainable parameter groups (``HealthGPT.parameter_groups()`` names)
======= ================ ==========================================================================
1       comprehension    abstract_adapter
1       generation       concrete_adapter, generation_plugin, new_token_rows
1       mixed            the union of the two above
2       any (mixed)      word_embeddings, lm_head, new_token_rows  (= all embedding / head rows)
3       comprehension    comprehension_plugin, abstract_adapter
3       generation       generation_plugin, concrete_adapter
3       mixed            both plugins and both adapters
======= ================ ==========================================================================

Each stage starts from the previous stage's output (``--init``): the trained weights are saved
cumulatively (a stage's ``trainable.safetensors`` holds every group trained in it *or* in the
stages before), so stage 3 needs only stage 2's file.

Stage 1 comprehension assumes a pre-trained LLM. On the random ``tiny`` LLM (``make demo``) its loss
stays near ln(V) ~ 9.0: the final RMSNorm fixes the hidden norm and the random head rows are short,
so no adapter output can raise a token's logit by more than ~1.3 nats (best reachable ~85% of the
start). ``tests/test_train.py`` therefore pre-trains the tiny LLM on text first
(``tests.train_data.pretrain_tiny_lm``) and asserts <= 70% for every stage on that base.

Hyper-parameters come from ``healthgpt/configs/train_<preset>.yaml`` (Table 7 for the paper's
presets), any key overridable on the command line. AdamW with two parameter groups: the visual
adapters at ``adapter_lr``, everything else (H-LoRA plugins, embedding/head rows) at ``lr``.
``global_batch = micro_batch x world_size x grad_accum``; the loss of an optimizer step is the mean
over every label token of its micro-batches on all ranks, so accumulation gives the gradient of one
batch of ``global_batch`` samples (not a mean of per-micro-batch means).

Hardware: CUDA (bf16 autocast, gradient checkpointing) when available, else CPU (fp32). Multi-GPU
and multi-node through ``torchrun`` (DDP; ``--fsdp`` for presets that do not fit one device);
gloo on CPU.

Data: local shard folders are read by random access with an exact data position; shard URLs
(``https://.../x-{000000..000099}.tar``, ``pipe:curl -s ...``, ``hf://...``; ``--stream`` forces
it for local folders too) go through the ``webdataset`` streaming mode of ``healthgpt.data``, where
``--resume`` restores the weights, optimizer and step but restarts the data stream.

Fault tolerance: a checkpoint every ``--save-every`` steps (trainable weights as safetensors,
optimizer, scheduler, RNG states and every rank's data position) written to a temporary folder
and renamed; the last ``--keep`` are kept; ``--resume`` continues at the same step and data
position (on CPU the loss sequence is reproduced exactly). SIGTERM writes a checkpoint and exits
cleanly. The loss-spike guard skips an optimizer step whose loss is not finite or above
``spike_factor x`` the running mean of the last ``spike_window`` accepted losses, logs it to
``metrics.jsonl``, and stops the run after ``max_spikes`` consecutive skipped steps.

Outputs under ``--out``: ``metrics.jsonl`` (one line per optimizer step), ``checkpoints/step-N/``,
``final/trainable.safetensors`` + ``final/train_summary.json``, optional ``tensorboard/``.

Public API::

    STAGE_GROUPS, ADAPTER_GROUPS, stage_groups(stage, task) -> tuple[str, ...]
    load_hparams(preset, stage, overrides=None) -> HParams
    TrainConfig(...);  train(cfg, model=None, batch_hook=None) -> TrainResult
    save_trainable(model, path, groups);  load_trainable(model, path) -> list[str]   (healthgpt.checkpoints format)
    latest_checkpoint(out_dir) -> Path | None
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.distributed as dist
import typer
import yaml
from torch import nn

from healthgpt.conversation import IGNORE_INDEX
from healthgpt.data import DataConfig, LoaderState, VisionPreprocessor, make_loader, source_sample_counts

__all__ = [
    "ADAPTER_GROUPS",
    "STAGE_GROUPS",
    "HParams",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "latest_checkpoint",
    "load_hparams",
    "load_trainable",
    "save_trainable",
    "stage_groups",
    "train",
    "train_command",
]

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
TRAINABLE_NAME = "trainable.safetensors"
CHECKPOINTS = "checkpoints"

_COMP = ("abstract_adapter",)
_GEN = ("concrete_adapter", "generation_plugin", "new_token_rows")
STAGE_GROUPS: dict[int, dict[str, tuple[str, ...]]] = {
    1: {"comprehension": _COMP, "generation": _GEN, "mixed": _COMP + _GEN},
    2: {t: ("word_embeddings", "lm_head", "new_token_rows") for t in ("comprehension", "generation", "mixed")},
    3: {
        "comprehension": ("comprehension_plugin", "abstract_adapter"),
        "generation": ("generation_plugin", "concrete_adapter"),
        "mixed": ("comprehension_plugin", "generation_plugin", "abstract_adapter", "concrete_adapter"),
    },
}
ADAPTER_GROUPS = ("abstract_adapter", "concrete_adapter")  # trained at adapter_lr; the rest at lr


def stage_groups(stage: int, task: str) -> tuple[str, ...]:
    try:
        return STAGE_GROUPS[stage][task]
    except KeyError:
        raise ValueError(f"unknown stage/task {stage}/{task!r}: stage 1, 2 or 3; task comprehension, "
                         "generation or mixed") from None


class TrainingDiverged(RuntimeError):
    """Too many consecutive loss spikes."""


# ------------------------------------------------------------------------------------ hyper-parameters


@dataclass
class HParams:
    adapter_lr: float
    lr: float
    global_batch: int
    micro_batch: int = 4
    dropout: float = 0.0
    schedule: str = "warmup"  # warmup (linear warm-up + cosine) | constant | warmup_constant
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    max_len: int = 2048
    steps: int | None = None
    epochs: float | None = None
    optimizer: str = "adamw"
    spike_factor: float = 3.0
    spike_window: int = 20
    spike_min_history: int = 5
    max_spikes: int = 5

    def __post_init__(self) -> None:
        if self.schedule not in ("warmup", "constant", "warmup_constant"):
            raise ValueError(f"schedule must be warmup, constant or warmup_constant, got {self.schedule!r}")
        if self.optimizer.lower() != "adamw":
            raise ValueError(f"only the AdamW optimizer is supported, got {self.optimizer!r}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        for name in ("adapter_lr", "lr", "dropout", "warmup_ratio", "weight_decay", "eps", "grad_clip",
                     "spike_factor"):
            setattr(self, name, float(getattr(self, name)))
        for name in ("global_batch", "micro_batch", "max_len", "spike_window", "spike_min_history", "max_spikes"):
            setattr(self, name, int(getattr(self, name)))
        if self.global_batch < 1 or self.micro_batch < 1:
            raise ValueError("global_batch and micro_batch must be >= 1")

    def grad_accum(self, world_size: int) -> int:
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise ValueError(f"global_batch {self.global_batch} is not a multiple of micro_batch "
                             f"{self.micro_batch} x {world_size} process(es)")
        return self.global_batch // per_step


def _coerce(name: str, raw: Any) -> Any:
    types = {f.name: f.type for f in fields(HParams)}
    if name not in types:
        raise ValueError(f"unknown hyper-parameter {name!r}; have {sorted(types)}")
    if isinstance(raw, str):
        raw = yaml.safe_load(raw)
    return raw


def load_hparams(preset: str, stage: int, overrides: Mapping[str, Any] | None = None,
                 config: Path | None = None) -> HParams:
    """Stage ``stage`` of ``configs/train_<preset>.yaml`` (or ``config``), then ``overrides``."""
    path = config or CONFIG_DIR / f"train_{preset}.yaml"
    if not path.is_file():
        have = sorted(p.stem.removeprefix("train_") for p in CONFIG_DIR.glob("train_*.yaml"))
        raise FileNotFoundError(f"no training config {path.name} for preset {preset!r} (have {have}); "
                                "pass --config FILE")
    try:
        doc = yaml.safe_load(path.read_text("utf-8"))
        values = dict(doc.get("defaults") or {})
        values.update((doc.get("stages") or {})[stage])
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path.name}: needs `defaults:` and `stages: {{{stage}: ...}}` ({err})") from err
    for k, v in (overrides or {}).items():
        if v is not None:
            values[k] = _coerce(k, v)
    unknown = set(values) - {f.name for f in fields(HParams)}
    if unknown:
        raise ValueError(f"{path.name}: unknown hyper-parameter(s) {sorted(unknown)}")
    try:
        return HParams(**values)
    except TypeError as err:
        raise ValueError(f"{path.name} stage {stage}: {err}") from err


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if schedule != "constant" and warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "warmup":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
        return 1.0

    return fn


# ------------------------------------------------------------------------------------ weights IO


def save_trainable(model: Any, path: Path, groups: Sequence[str]) -> None:
    """``healthgpt.checkpoints.save_trainable`` for ``groups``, written atomically (temporary name,
    fsync, rename), so a killed run never leaves a half-written weights file."""
    from healthgpt.checkpoints import save_trainable as _save

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    _save(model, tmp, list(groups))
    _fsync(tmp)
    os.replace(tmp, path)


def _resolve_weights(path: Path) -> Path:
    """A ``.safetensors`` file, a checkpoint folder, or a training ``--out`` folder (its final weights)."""
    from healthgpt.checkpoints import CheckpointError, resolve_trainable

    try:
        return resolve_trainable(path)
    except CheckpointError as exc:
        raise FileNotFoundError(f"--init {exc}") from exc


def load_trainable(model: Any, path: Path) -> list[str]:
    """Load a trainable-weights file (``healthgpt.checkpoints`` format; every key must fit the model)
    into ``model``; returns the parameter groups it holds."""
    from healthgpt.checkpoints import load_trainable as _load
    from healthgpt.checkpoints import read_metadata

    path = _resolve_weights(Path(path))
    _load(model, path)
    return list(read_metadata(path).get("groups", []))


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def latest_checkpoint(out_dir: Path) -> Path | None:
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    done = sorted((p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()),
                  key=lambda p: int(p.name.split("-")[1]))
    return done[-1] if done else None


# ------------------------------------------------------------------------------------ config / result


@dataclass
class TrainConfig:
    preset: str
    stage: int
    task: str
    shards: Sequence[str]
    out: Path
    init: Sequence[Path] = ()  # previous stage(s): --out folders or trainable .safetensors files
    resume: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    config: Path | None = None
    seed: int = 0
    split: str = "train"
    pack: bool = False
    stream: bool = False  # webdataset streaming mode even for local shard folders (URLs always stream)
    num_workers: int | None = None
    save_every: int = 100
    keep: int = 3
    log_every: int = 1
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    gradient_checkpointing: bool | None = None  # None: on for CUDA
    fsdp: bool = False
    tensorboard: bool = False
    progress: bool = True
    preset_overrides: dict[str, Any] = field(default_factory=dict)
    debug_nan_at: tuple[int, ...] = ()  # optimizer steps whose first micro-batch gets NaN pixels
    debug_exit_after: int | None = None  # hard exit (no checkpoint) after this step: simulates a kill
    debug_log_keys: bool = False  # write the sample keys each rank trained on to OUT/keys-rank<R>.txt


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


# ------------------------------------------------------------------------------------ helpers


class LossGuard:
    """Skips non-finite steps and spikes far above the running mean; stops on repeated spikes."""

    def __init__(self, hp: HParams, history: Sequence[float] = (), consecutive: int = 0) -> None:
        self.factor = hp.spike_factor
        self.min_history = hp.spike_min_history
        self.max_spikes = hp.max_spikes
        self.history: deque[float] = deque(history, maxlen=hp.spike_window)
        self.consecutive = consecutive

    def check(self, loss: float, grad_norm: float) -> str | None:
        """None when the step may be applied, else the reason to skip it."""
        reason = None
        if not math.isfinite(loss):
            reason = f"non-finite loss {loss}"
        elif not math.isfinite(grad_norm):
            reason = f"non-finite gradient norm {grad_norm}"
        elif len(self.history) >= self.min_history:
            mean = sum(self.history) / len(self.history)
            if loss > self.factor * mean:
                reason = f"loss {loss:.4g} > {self.factor:g} x running mean {mean:.4g}"
        if reason is None:
            self.history.append(loss)
            self.consecutive = 0
        else:
            self.consecutive += 1
        return reason

    def exhausted(self) -> bool:
        return self.consecutive >= self.max_spikes

    def state(self) -> dict[str, Any]:
        return {"history": list(self.history), "consecutive": self.consecutive}


class _Dist:
    def __init__(self, device_kind: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.own_group = False
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
            self.own_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def sum(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        return self.sum(1.0 if flag else 0.0) > 0

    def gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.own_group and dist.is_initialized():
            dist.destroy_process_group()


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, list | tuple) else x


def _set_dropout(model: Any, p: float) -> None:
    """Set the H-LoRA plugins' dropout (Table 7 varies it per stage)."""
    from healthgpt.hlora import hlora_layers

    for _, layer in hlora_layers(model.llm):
        for plugin in layer.plugins.values():
            if hasattr(plugin, "dropout"):
                plugin.dropout = nn.Dropout(p) if p > 0 else nn.Identity()


def _count(params: Sequence[nn.Parameter]) -> int:
    return int(sum(p.numel() for p in params))


def trainable_summary(model: Any) -> dict[str, int]:
    """Trainable parameter count per group (groups with none are left out)."""
    out = {}
    for name, params in model.parameter_groups().items():
        n = _count([p for p in params if p.requires_grad])
        if n:
            out[name] = n
    return out


# ------------------------------------------------------------------------------------ the trainer


def train(cfg: TrainConfig, model: Any = None,
          batch_hook: Callable[[int, dict[str, Any]], dict[str, Any]] | None = None) -> TrainResult:
    """Run one stage. ``model`` defaults to ``build_model(cfg.preset, seed=cfg.seed)``;
    ``batch_hook(step, batch) -> batch`` may alter micro-batches (tests inject NaNs with it)."""
    device_kind = cfg.device
    if device_kind == "auto":
        device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    if device_kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA device is available")
    dd = _Dist(device_kind)
    try:
        return _train(cfg, dd, device_kind, model, batch_hook)
    finally:
        dd.close()


def _train(cfg: TrainConfig, dd: _Dist, device_kind: str, model: Any,
           batch_hook: Callable[[int, dict[str, Any]], dict[str, Any]] | None) -> TrainResult:
    from rich.console import Console

    console = Console(stderr=True, quiet=not dd.main)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(f"cuda:{dd.local_rank}" if device_kind == "cuda" else "cpu")
    if device_kind == "cuda":
        torch.cuda.set_device(device)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device_kind == "cuda" else "fp32")
    use_gc = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else device_kind == "cuda"
    hp = load_hparams(cfg.preset, cfg.stage, cfg.overrides, cfg.config)
    groups = stage_groups(cfg.stage, cfg.task)
    accum = hp.grad_accum(dd.world)
    num_workers = cfg.num_workers if cfg.num_workers is not None else (4 if device_kind == "cuda" else 0)

    # -- model
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if model is None:
        from healthgpt.presets import build_model

        model, _ = build_model(cfg.preset, seed=cfg.seed, **cfg.preset_overrides)
    trained_before: list[str] = []
    if not cfg.resume:
        for init in cfg.init:  # e.g. stage 2 starts from both stage-1 runs (comprehension + generation)
            loaded = load_trainable(model, Path(init))
            trained_before = sorted(set(trained_before) | set(loaded))
            console.print(f"init: loaded {', '.join(loaded) or 'weights'} from {Path(init).name}")
    params = model.set_trainable(*groups)
    if not params:
        raise ValueError(f"stage {cfg.stage} {cfg.task}: the model has no parameters in {groups}")
    all_groups = model.parameter_groups()
    adapter_ids = {id(p) for g in ADAPTER_GROUPS if g in groups for p in all_groups[g]}
    for p in params:  # train in fp32 whatever the preset's dtype (master weights)
        if p.dtype != torch.float32:
            p.data = p.data.float()
    _set_dropout(model, hp.dropout)
    model.to(device)
    if use_gc and hasattr(model.llm, "gradient_checkpointing_enable"):
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.vision.tower.eval()

    wrapped: nn.Module = model
    if dd.enabled:
        if cfg.fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            wrapped = FSDP(model, use_orig_params=True, device_id=device if device_kind == "cuda" else None,
                           sync_module_states=True)
        else:
            # trainable tensors may sit out a batch in every stage: the new input rows when a batch has
            # no new-token ids (stage 2 comprehension batches), the idle task's plugin and adapter in
            # mixed runs, a visual adapter on a text-only batch; without unused-parameter detection DDP
            # then fails at the next step ("did not receive gradient")
            wrapped = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device_kind == "cuda" else None,
                find_unused_parameters=True,
            )

    adapter_params = [p for p in params if id(p) in adapter_ids]
    other_params = [p for p in params if id(p) not in adapter_ids]
    opt_groups = []
    if adapter_params:
        opt_groups.append({"params": adapter_params, "lr": hp.adapter_lr, "name": "adapter"})
    if other_params:
        opt_groups.append({"params": other_params, "lr": hp.lr, "name": "lora"})
    optimizer = torch.optim.AdamW(opt_groups, lr=hp.lr, betas=hp.betas, eps=hp.eps,
                                  weight_decay=hp.weight_decay)

    # -- data
    data_cfg = DataConfig(cfg.shards, cfg.task, hp.micro_batch, max_len=hp.max_len, pack=cfg.pack,
                          split=cfg.split, seed=cfg.seed, num_workers=num_workers, template=model.template,
                          image_tokens=model.vision.num_patches, streaming=cfg.stream)
    total_steps = hp.steps
    if total_steps is None:
        if any(s.remote for s in data_cfg.specs):
            raise ValueError("streaming from URLs: the number of samples is not known in advance; give --steps")
        counts = source_sample_counts(data_cfg.specs, cfg.split)
        wanted = ("comprehension", "generation") if cfg.task == "mixed" else (cfg.task,)
        n = sum(v for (_, t), v in counts.items() if t in wanted)
        total_steps = max(1, math.ceil((hp.epochs or 1.0) * n / hp.global_batch))
    warmup = hp.warmup_steps if hp.warmup_steps is not None else int(round(hp.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(hp.schedule, warmup, total_steps))

    # -- resume
    step = 0
    resume_rng = None
    guard = LossGuard(hp)
    loader_state = LoaderState(num_workers)
    losses: list[float] = []
    skipped: list[int] = []
    metrics_path = out / "metrics.jsonl"
    if cfg.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {out.name}/{CHECKPOINTS}")
        st = json.loads((ckpt / "trainer_state.json").read_text("utf-8"))
        for key in ("preset", "stage", "task"):
            if st[key] != getattr(cfg, key):
                raise ValueError(f"--resume: the checkpoint is {key}={st[key]!r}, this run {key}={getattr(cfg, key)!r}")
        if st["world_size"] != dd.world:
            raise ValueError(f"--resume: the checkpoint was written by {st['world_size']} process(es), "
                             f"this run has {dd.world}; the data position cannot be continued exactly")
        load_trainable(model, ckpt / TRAINABLE_NAME)  # holds this stage's and the earlier stages' groups
        trained_before = list(st.get("trained_before", []))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(st["scheduler"])
        step = int(st["step"])
        guard = LossGuard(hp, st["guard"]["history"], st["guard"]["consecutive"])
        loader_state = LoaderState.from_dict(st["data"][dd.rank], num_workers)
        resume_rng = torch.load(ckpt / f"rng-rank{dd.rank}.pt", weights_only=True)
        losses, skipped = list(st["losses"]), list(st["skipped"])
        if dd.main and metrics_path.is_file():  # drop what the interrupted run logged after the checkpoint
            kept = [ln for ln in metrics_path.read_text("utf-8").splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= step]
            metrics_path.write_text("".join(k + "\n" for k in kept), "utf-8")
        console.print(f"resumed from {ckpt.name} (step {step}/{total_steps})")
        if data_cfg.streaming:
            console.print("streaming mode: the data stream restarts with a new shuffle (the exact data position "
                          "is kept only for local shard folders read without --stream)")
    elif dd.main:
        metrics_path.write_text("", "utf-8")
    saved_groups = sorted(set(trained_before) | set(groups))

    loader, loader_state = make_loader(data_cfg, model.tokenizer, VisionPreprocessor.from_model(model),
                                       rank=dd.rank, world_size=dd.world, state=loader_state)
    batches: Iterator[dict[str, Any]] = iter(loader)  # draws a base seed from the torch RNG
    if resume_rng is not None:  # so the RNG is restored only now, as it was after this point originally
        _set_rng_state(resume_rng)

    writer = None
    if cfg.tensorboard and dd.main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise RuntimeError("--tensorboard needs the tensorboard package (pip install tensorboard)") from err
        writer = SummaryWriter(str(out / "tensorboard"))

    stop = {"signal": False}

    def on_term(signum: int, frame: Any) -> None:
        stop["signal"] = True

    old_handler = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None

    def checkpoint() -> Path | None:
        data_states = dd.gather(loader_state.to_dict())
        rng_state = _rng_state()
        path = None
        if dd.main:
            path = _write_checkpoint(out, step, cfg, hp, model, saved_groups, trained_before, optimizer, scheduler,
                                     guard, data_states, losses, skipped, dd.world, cfg.keep)
        # every rank writes its own RNG state into the (now final) folder
        dd.barrier()
        ckpt = out / CHECKPOINTS / f"step-{step:08d}"
        torch.save(rng_state, ckpt / f"rng-rank{dd.rank}.pt")
        dd.barrier()
        return path

    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device_kind == "cuda" and precision == "bf16"
           else contextlib.nullcontext())
    summary = trainable_summary(model)
    if dd.main:
        console.print(f"stage {cfg.stage} {cfg.task} | preset {cfg.preset} | groups {', '.join(groups)} | "
                      f"{sum(summary.values()):,} trainable | steps {total_steps} | global batch {hp.global_batch} "
                      f"= {hp.micro_batch} x {dd.world} x {accum} | {device_kind} {precision}"
                      f"{' +grad-ckpt' if use_gc else ''}")

    step_tasks: list[str] = []  # dominant task per step of this run (per-task loss summary)
    keys_fh = open(out / f"keys-rank{dd.rank}.txt", "a", encoding="utf-8") if cfg.debug_log_keys else None  # noqa: SIM115
    progress = _progress(console, cfg.progress and dd.main)
    status = "finished"
    with progress:
        bar = progress.add_task("train", total=total_steps, completed=step, loss=float("nan"), tps=0.0)
        while step < total_steps:
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            tokens = 0
            tasks: dict[str, int] = {}
            micro: list[dict[str, Any]] = []
            for a in range(accum):
                batch = next(batches)
                loader_state.update(batch)
                if a == 0 and (step + 1) in cfg.debug_nan_at and batch["pixel_values"] is not None:
                    batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
                if batch_hook is not None:
                    batch = batch_hook(step + 1, batch)
                if keys_fh is not None:
                    keys_fh.write("".join(k + "\n" for k in batch["keys"]))
                tokens += int(batch["n_tokens"])
                tasks[batch["task"]] = tasks.get(batch["task"], 0) + 1
                micro.append(batch)
            # the step's loss is the mean over every label token of all its micro-batches on all ranks
            # (what one big batch would give); a mean of per-micro-batch means would weight the tokens
            # of short answers more. Label positions after the causal shift (image splicing adds none).
            n_label = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro]
            total_label = max(1.0, dd.sum(float(sum(n_label))))
            loss_sum = 0.0
            for a, batch in enumerate(micro):
                sync = contextlib.nullcontext()
                if dd.enabled and a < accum - 1 and hasattr(wrapped, "no_sync"):
                    sync = wrapped.no_sync()
                with sync:
                    with amp:
                        res = wrapped(
                            input_ids=batch["input_ids"].to(device),
                            attention_mask=batch["attention_mask"].to(device),
                            labels=batch["labels"].to(device),
                            pixel_values=None if batch["pixel_values"] is None else batch["pixel_values"].to(device),
                            task=batch["task"],
                            return_logits=False,
                        )
                    # DDP averages gradients over ranks, hence x world
                    (res.loss * (n_label[a] * dd.world / total_label)).backward()
                loss_sum += float(res.loss.detach()) * n_label[a]
            step_loss = dd.sum(loss_sum) / total_label
            # under DDP the gradients are already averaged, so every rank sees the same norm and decision
            max_norm = hp.grad_clip if hp.grad_clip > 0 else math.inf
            if cfg.fsdp and hasattr(wrapped, "clip_grad_norm_"):
                # FSDP shards gradients: its own clip computes the global norm across ranks, so every
                # rank clips alike and the spike guard reaches the same decision everywhere.
                grad_norm = float(wrapped.clip_grad_norm_(max_norm))
            else:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            reason = guard.check(step_loss, grad_norm)
            if reason is None:
                optimizer.step()
            else:
                skipped.append(step + 1)
                optimizer.zero_grad(set_to_none=True)
                console.print(f"[yellow]step {step + 1}: skipped ({reason})[/yellow]")
            lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
            scheduler.step()
            step += 1
            losses.append(step_loss)
            step_tasks.append(max(tasks, key=tasks.get))
            dt = time.perf_counter() - t0
            tokens_all = dd.sum(tokens)
            if dd.main:
                rec = {"step": step, "loss": step_loss, "grad_norm": grad_norm, "lr": lrs.get("lora"),
                       "adapter_lr": lrs.get("adapter"), "tokens": tokens_all, "tokens_per_s": tokens_all / dt,
                       "step_time_s": dt, "tasks": tasks, "skipped": reason is not None}
                if reason is not None:
                    rec["skip_reason"] = reason
                with open(metrics_path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(rec) + "\n")
                if writer is not None:
                    writer.add_scalar("train/loss", step_loss if math.isfinite(step_loss) else 0.0, step)
                    writer.add_scalar("train/tokens_per_s", tokens_all / dt, step)
                    for name, lr in lrs.items():
                        writer.add_scalar(f"train/lr_{name}", lr, step)
                progress.update(bar, completed=step, loss=step_loss, tps=tokens_all / dt)
                if not progress.live.is_started and cfg.log_every and step % cfg.log_every == 0:
                    console.print(f"step {step}/{total_steps} loss {step_loss:.4f} tok/s {tokens_all / dt:,.0f}")
            if guard.exhausted():
                raise TrainingDiverged(
                    f"stage {cfg.stage}: {guard.consecutive} consecutive steps skipped as loss spikes (last: {reason}); "
                    f"stopping. Resume from the last checkpoint with a lower --lr/--adapter-lr, or inspect the "
                    f"data around step {step} (metrics.jsonl lists the skipped steps)")
            if cfg.debug_exit_after is not None and step >= cfg.debug_exit_after:
                if cfg.save_every and step % cfg.save_every == 0:
                    checkpoint()
                os._exit(137)  # simulate a hard kill: no cleanup
            terminate = dd.any(stop["signal"])
            if (cfg.save_every and step % cfg.save_every == 0) or terminate:
                checkpoint()
            if terminate:
                status = "preempted"
                console.print(f"SIGTERM: checkpoint written at step {step}; exiting")
                break
    if keys_fh is not None:
        keys_fh.close()
    if old_handler is not None:
        signal.signal(signal.SIGTERM, old_handler)
    if writer is not None:
        writer.close()

    final = None
    if status == "finished":
        if dd.main:
            final_dir = out / "final"
            final_dir.mkdir(parents=True, exist_ok=True)
            final = final_dir / TRAINABLE_NAME
            save_trainable(model, final, saved_groups)
            (final_dir / "train_summary.json").write_text(json.dumps({
                "preset": cfg.preset, "stage": cfg.stage, "task": cfg.task, "steps": step,
                "groups": list(groups), "saved_groups": saved_groups, "trainable": summary,
                "hparams": _jsonable(asdict(hp)), "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None, "skipped_steps": skipped,
                "loss_by_task": loss_by_task(losses[len(losses) - len(step_tasks):], step_tasks),
            }, indent=2) + "\n", "utf-8")
        dd.barrier()
    if dd.main:
        _print_summary(console, summary, losses, skipped, status)
        for task, v in loss_by_task(losses[len(losses) - len(step_tasks):], step_tasks).items():
            console.print(f"  {task}: loss {v['first']:.4f} -> {v['last']:.4f} (mean of first/last {v['n']} "
                          f"of {v['steps']} steps)")
    return TrainResult(status, step, total_steps, losses, skipped, summary, out, final)


def loss_by_task(losses: Sequence[float], tasks: Sequence[str], n: int = 3) -> dict[str, dict[str, float]]:
    """Per task: mean of its first and last ``n`` finite step losses (mixed runs alternate tasks,
    so one overall first/last pair would compare different tasks)."""
    out: dict[str, dict[str, float]] = {}
    for task in sorted(set(tasks)):
        vals = [x for x, t in zip(losses, tasks, strict=True) if t == task and math.isfinite(x)]
        if vals:
            k = min(n, len(vals))
            out[task] = {"first": sum(vals[:k]) / k, "last": sum(vals[-k:]) / k, "n": k, "steps": len(vals)}
    return out


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _write_checkpoint(out: Path, step: int, cfg: TrainConfig, hp: HParams, model: Any, saved_groups: list[str],
                      trained_before: list[str], optimizer: torch.optim.Optimizer, scheduler: Any, guard: LossGuard,
                      data_states: list[Any], losses: list[float], skipped: list[int], world: int,
                      keep: int) -> Path:
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_trainable(model, tmp / TRAINABLE_NAME, saved_groups)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    state = {
        "preset": cfg.preset, "stage": cfg.stage, "task": cfg.task, "step": step, "world_size": world,
        "scheduler": scheduler.state_dict(), "guard": guard.state(), "data": data_states,
        "losses": losses, "skipped": skipped, "trained_before": trained_before, "hparams": _jsonable(asdict(hp)),
        "seed": cfg.seed, "shards": [str(Path(s).name) for s in cfg.shards],
    }
    # trainer_state.json is written last: its presence marks a complete checkpoint
    with open(tmp / "trainer_state.json", "w", encoding="utf-8") as fh:
        fh.write(json.dumps(_jsonable(state), indent=1))
        fh.flush()
        os.fsync(fh.fileno())
    for f in tmp.iterdir():
        _fsync(f)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    done = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    for old in done[: max(0, len(done) - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _progress(console: Any, enabled: bool) -> Any:
    from vlhealth.progress import progress_bar

    return progress_bar("train", "loss {task.fields[loss]:.4f}", "{task.fields[tps]:,.0f} tok/s",
                        console=console, enabled=enabled and console.is_terminal)


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


def _parse_sets(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def train_command(
    shards: Annotated[list[str], typer.Option("--shards", help="Shard folder, optionally DIR:WEIGHT (mixing weight), or a shard URL pattern (streamed; URL:WEIGHT). Repeat for several.")],
    stage: Annotated[int, typer.Option(help="1 alignment, 2 plugin adaptation, 3 instruction tuning.", min=1, max=3)],
    task: Annotated[str, typer.Option(help="comprehension, generation or mixed.")],
    out: Annotated[Path, typer.Option(help="Output folder (metrics.jsonl, checkpoints/, final/).")],
    preset: Annotated[str, typer.Option(help="Model preset: tiny, smollm2-135m, m3, l14, xl32.")] = "tiny",
    init: Annotated[list[Path] | None, typer.Option(help="Previous stage's --out folder (or a trainable .safetensors); repeat to merge runs.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint in --out.")] = False,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: config's steps or epochs).")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the task's train samples (if --steps is unset).")] = None,
    lr: Annotated[float | None, typer.Option(help="LR of H-LoRA plugins and embedding/head rows.")] = None,
    adapter_lr: Annotated[float | None, typer.Option(help="LR of the visual adapters.")] = None,
    global_batch: Annotated[int | None, typer.Option(help="Samples per optimizer step, all processes.")] = None,
    micro_batch: Annotated[int | None, typer.Option(help="Samples per forward pass per process.")] = None,
    max_len: Annotated[int | None, typer.Option(help="Max sequence length (images count as their patches).")] = None,
    schedule: Annotated[str | None, typer.Option(help="warmup, constant or warmup_constant.")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Warm-up steps (default: warmup_ratio of the steps).")] = None,
    dropout: Annotated[float | None, typer.Option(help="H-LoRA dropout.")] = None,
    weight_decay: Annotated[float | None, typer.Option()] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Any other hyper-parameter: key=value.")] = None,
    config: Annotated[Path | None, typer.Option(help="Training YAML (default healthgpt/configs/train_<preset>.yaml).")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    split: Annotated[str, typer.Option(help="Split to train on.")] = "train",
    pack: Annotated[bool, typer.Option(help="Pack several samples per row up to --max-len.")] = False,
    stream: Annotated[bool, typer.Option(help="Read local shard folders in webdataset streaming mode too (URLs such as https://host/x-{000000..000099}.tar or 'pipe:curl -s ...' always stream). --resume then restarts the stream: the exact data position is kept only for local shards read in the default mode.")] = False,
    num_workers: Annotated[int | None, typer.Option(help="Loader worker processes (default 0 on CPU, 4 on CUDA).")] = None,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: only at the end/SIGTERM).")] = 100,
    keep: Annotated[int, typer.Option(help="Checkpoints to keep.")] = 3,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 on CUDA), bf16 or fp32.")] = "auto",
    gradient_checkpointing: Annotated[bool | None, typer.Option(help="Default: on with CUDA.")] = None,
    fsdp: Annotated[bool, typer.Option(help="Shard with FSDP instead of DDP (torchrun).")] = False,
    tensorboard: Annotated[bool, typer.Option(help="Also log to OUT/tensorboard.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    debug_nan_at: Annotated[list[int] | None, typer.Option(hidden=True)] = None,
    debug_exit_after: Annotated[int | None, typer.Option(hidden=True)] = None,
    debug_log_keys: Annotated[bool, typer.Option(hidden=True)] = False,
) -> None:
    """Train one stage of HealthGPT on WebDataset shards (stage 1 alignment, 2 plugin adaptation,
    3 instruction tuning); each stage starts from the previous one with --init. Hyper-parameters
    come from healthgpt/configs/train_<preset>.yaml; multi-GPU with `torchrun --nproc-per-node N -m
    healthgpt.cli train ...`. On SIGTERM a checkpoint is written; continue with --resume.

    Example:

        healthgpt train --preset tiny --stage 1 --task generation --shards demo/shards/synthrad --out runs/s1g

        healthgpt train --preset tiny --stage 2 --task mixed --shards demo/shards/vqa_rad --shards demo/shards/synthrad:0.5 --init runs/s1g --out runs/s2
    """
    overrides = {"steps": steps, "epochs": epochs, "lr": lr, "adapter_lr": adapter_lr, "global_batch": global_batch,
                 "micro_batch": micro_batch, "max_len": max_len, "schedule": schedule, "warmup_steps": warmup_steps,
                 "dropout": dropout, "weight_decay": weight_decay}
    overrides.update(_parse_sets(set_ or []))
    if task not in ("comprehension", "generation", "mixed"):
        raise typer.BadParameter(f"--task must be comprehension, generation or mixed, not {task!r}")
    cfg = TrainConfig(
        preset=preset, stage=stage, task=task, shards=shards, out=out, init=tuple(init or ()), resume=resume,
        overrides={k: v for k, v in overrides.items() if v is not None}, config=config, seed=seed, split=split,
        pack=pack, stream=stream, num_workers=num_workers, save_every=save_every, keep=keep, device=device, precision=precision,
        gradient_checkpointing=gradient_checkpointing, fsdp=fsdp, tensorboard=tensorboard, progress=progress,
        debug_nan_at=tuple(debug_nan_at or ()), debug_exit_after=debug_exit_after, debug_log_keys=debug_log_keys,
    )
    logging.basicConfig(level=logging.WARNING)
    try:
        result = train(cfg)
    except TrainingDiverged as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(3) from None
    except (ValueError, FileNotFoundError, KeyError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if result.status == "preempted":
        typer.echo(f"stopped by SIGTERM at step {result.step}/{result.total_steps}; continue with --resume", err=True)


app = typer.Typer(add_completion=False, help="HealthGPT three-stage trainer.")
app.command("train")(train_command)


def main() -> None:  # pragma: no cover - `python -m healthgpt.train train ...`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
