"""Training hyper-parameters: ``healthgpt/training/configs/train_<preset>.yaml``, keyed by stage *and* task.

The paper's Table 7 gives one column per stage and task (transcribed in the YAMLs of configs/); a
merged cell spans both tasks. The YAML mirrors that::

    defaults: {optimizer: adamw, max_len: 2048, ...}        # every stage and task
    stages:
      1:
        comprehension: {adapter_lr: 1.0e-3, global_batch: 256, dropout: 0.0, schedule: warmup}
        generation:    {adapter_lr: 2.0e-5, lr: 2.0e-4, global_batch: 64, dropout: 0.05, schedule: warmup}
      2: {adapter_lr: 2.0e-5, lr: 2.0e-4, global_batch: 32, ...}   # a flat stage: both tasks
      3:
        comprehension: {...}
        generation: {...}
        mixed: {global_batch: 128}                          # optional: what a mixed run shares

Resolution for ``(stage, task)``: ``defaults``, then the stage's flat keys, then the stage's entry
for the task. A ``mixed`` run resolves both tasks: keys on which they agree are taken as they are;
LR and dropout may differ (each task's parameter groups and plugin get their own column's value,
kept in ``HParams.by_task``); any other difference (the global batch, the schedule) must be settled
by the stage's ``mixed:`` entry, else loading fails and names the key. Command-line overrides
apply last, to every task.

Public API::

    HParams(...);  HParams.grad_accum(world_size)
    load_hparams(preset, stage, overrides=None, config=None, task=None) -> HParams
    lr_lambda(schedule, warmup, total) -> step -> factor
    HPARAM_HELP: one line of help per field (the trainer's CLI options are generated from it)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

__all__ = ["CONFIG_DIR", "HPARAM_HELP", "HParams", "load_hparams", "lr_lambda"]

CONFIG_DIR = Path(__file__).parent / "configs"
TASKS = ("comprehension", "generation")
PER_TASK_KEYS = ("adapter_lr", "lr", "dropout")  # may differ between the two tasks of a mixed run

HPARAM_HELP = {
    "adapter_lr": "LR of the visual adapters.",
    "lr": "LR of H-LoRA plugins and embedding/head rows.",
    "global_batch": "Samples per optimizer step, all processes.",
    "micro_batch": "Samples per forward pass per process.",
    "dropout": "H-LoRA dropout.",
    "schedule": "warmup (linear warm-up + cosine), constant or warmup_constant.",
    "warmup_ratio": "Warm-up steps as a share of all steps.",
    "warmup_steps": "Warm-up steps (default: warmup_ratio of the steps).",
    "weight_decay": "AdamW weight decay.",
    "betas": "AdamW betas, e.g. '[0.9, 0.999]'.",
    "eps": "AdamW epsilon.",
    "grad_clip": "Clip the gradient norm (0: off).",
    "max_len": "Max sequence length (images count as their patches).",
    "steps": "Optimizer steps (default: config's steps or epochs).",
    "epochs": "Passes over the task's train samples (if --steps is unset).",
    "optimizer": "Optimizer (adamw).",
    "spike_factor": "Skip a step whose loss exceeds this x the running mean.",
    "spike_window": "Steps in the spike guard's running mean.",
    "spike_min_history": "Accepted steps before the spike guard acts.",
    "max_spikes": "Consecutive skipped steps that stop the run.",
}


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
    # mixed runs over two Table 7 columns: each task's own values (adapter_lr, lr, dropout)
    by_task: dict[str, HParams] = field(default_factory=dict, repr=False, compare=False)

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

    def dropout_for(self, task: str) -> float:
        return self.by_task[task].dropout if task in self.by_task else self.dropout

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "by_task"}
        if self.by_task:
            out["by_task"] = {t: {k: getattr(h, k) for k in PER_TASK_KEYS} for t, h in self.by_task.items()}
        return out


FIELD_NAMES = tuple(f.name for f in fields(HParams) if f.name != "by_task")


def _coerce(name: str, raw: Any) -> Any:
    if name not in FIELD_NAMES:
        raise ValueError(f"unknown hyper-parameter {name!r}; have {sorted(FIELD_NAMES)}")
    return yaml.safe_load(raw) if isinstance(raw, str) else raw


def _read_config(path: Path, stage: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(defaults + the stage's flat keys, the stage's per-task entries) of one YAML."""
    try:
        doc = yaml.safe_load(path.read_text("utf-8"))
        values = dict(doc.get("defaults") or {})
        entry = dict((doc.get("stages") or {})[stage])
    except (yaml.YAMLError, KeyError, TypeError, AttributeError, ValueError) as err:
        raise ValueError(f"{path.name}: needs `defaults:` and `stages: {{{stage}: ...}}` ({err})") from err
    per_task = {t: dict(entry.pop(t) or {}) for t in (*TASKS, "mixed") if t in entry}
    values.update(entry)
    return values, per_task


def _build(values: Mapping[str, Any], where: str) -> HParams:
    unknown = set(values) - set(FIELD_NAMES)
    if unknown:
        raise ValueError(f"{where}: unknown hyper-parameter(s) {sorted(unknown)}")
    try:
        return HParams(**values)
    except TypeError as err:
        raise ValueError(f"{where}: {err}") from err


def load_hparams(preset: str, stage: int, overrides: Mapping[str, Any] | None = None,
                 config: Path | None = None, task: str | None = None) -> HParams:
    """Stage ``stage`` and ``task`` of ``configs/train_<preset>.yaml`` (or ``config``), then ``overrides``.

    ``task=None`` reads a stage as ``mixed``."""
    path = Path(config) if config else CONFIG_DIR / f"train_{preset}.yaml"
    if not path.is_file():
        have = sorted(p.stem.removeprefix("train_") for p in CONFIG_DIR.glob("train_*.yaml"))
        raise FileNotFoundError(f"no training config {path.name} for preset {preset!r} (have {have}); "
                                "pass --config FILE")
    task = task or "mixed"
    common, per_task = _read_config(path, stage)
    extra = {k: _coerce(k, v) for k, v in (overrides or {}).items() if v is not None}
    where = f"{path.name} stage {stage}"
    if task != "mixed":
        return _build({**common, **per_task.get(task, {}), **extra}, f"{where} {task}")
    cols = {t: {**common, **per_task.get(t, {})} for t in TASKS}
    shared = {**cols["comprehension"]}
    for key in set(cols["comprehension"]) | set(cols["generation"]):
        a, b = cols["comprehension"].get(key), cols["generation"].get(key)
        if a != b and key not in PER_TASK_KEYS and key not in per_task.get("mixed", {}):
            raise ValueError(f"{where}: a mixed run needs one {key!r} but the tasks differ ({a!r} vs {b!r}); "
                             f"set stages.{stage}.mixed.{key} in {path.name}")
    shared.update(per_task.get("mixed", {}))
    shared.update(extra)
    hp = _build(shared, f"{where} mixed")
    if any(cols["comprehension"].get(k) != cols["generation"].get(k) for k in PER_TASK_KEYS):
        own = {t: _build({**cols[t], **extra}, f"{where} {t}") for t in TASKS}  # each column, validated once
        hp.by_task = {t: replace(hp, **{k: getattr(own[t], k) for k in PER_TASK_KEYS}) for t in TASKS}
    return hp


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if schedule != "constant" and warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "warmup":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
        return 1.0

    return fn
