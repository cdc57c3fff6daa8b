"""H-LoRA: heterogeneous low-rank adaptation with one plugin per task and hard task routing.

A :class:`HLoRALinear` wraps a frozen ``nn.Linear`` (kept as ``base_layer``, the same name peft
uses) and holds one plugin per task in ``plugins[task]``. The active task is chosen per batch
(:func:`set_active_task`, or ``HealthGPT.set_task``); only the active plugin computes, the other
one is not touched (no FLOPs, no gradient).

Plugin variants (``AdapterConfig.variant``), selectable for ablations and benchmarks:

``hlora`` (HealthGPT, the default)
    k experts merged into one ``lora_A`` (d_in -> r), one ``lora_B`` (r -> d_out, zero init) and a
    router ``lora_route`` (d_in -> k, softmax per token). Expert i owns rank slice
    ``[i*r/k, (i+1)*r/k)``::

        y = W x + B( repeat_interleave(softmax(route(x)), r/k) * dropout(A(x)) * scaling )
        scaling = alpha / r * k

    which equals ``sum_i gate_i * B_i A_i x * scaling`` (tested). The gate is applied with a
    view ``[..., k, r/k]`` instead of materialising ``repeat_interleave``, so the cost over plain
    LoRA is one d_in x k matmul and a softmax.
``lora``
    plain LoRA of the same total rank: ``y = W x + B(dropout(A(x))) * alpha / r``.
``moelora``
    k separate experts ``experts[i].lora_A`` (d_in -> r/k) / ``lora_B`` (r/k -> d_out) looped in
    Python plus the router, as the MoELoRA reference does; mathematically the same as ``hlora``
    (same scaling), only slower. It is initialised from the same random draws as an ``hlora``
    plugin (expert i = rank slice i of the merged A/B), so from the same seed the two variants start
    from the same weights and, without dropout (whose masks are drawn per expert here), train alike
    up to floating-point rounding: the ``expert-structure`` experiment checks that.

Dropout follows the released code in position (applied to ``A(x)``, after the input projection).

Shared plugin (``AdapterConfig.share``, preset override ``shared_plugin=true``): a task whose config
says ``share="comprehension"`` has no plugin of its own and runs the comprehension plugin, i.e. one
adapter for both tasks, the unified baseline behind the paper's task-conflict figure (Figure 2).

Parameter names inside a wrapped linear (``...q_proj.`` prefix omitted)::

    base_layer.weight / base_layer.bias                      frozen base weights
    plugins.<task>.lora_A.weight / lora_B.weight / lora_route.weight      (hlora)
    plugins.<task>.lora_A.weight / lora_B.weight                           (lora)
    plugins.<task>.experts.<i>.lora_A.weight / .lora_B.weight, plugins.<task>.lora_route.weight
                                                                           (moelora)

Public API: ``AdapterConfig``, ``HLoRALinear``, ``inject_hlora(module, configs, exclude=...)``,
``set_active_task(module, task)``, ``hlora_layers(module)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TASKS",
    "AdapterConfig",
    "HLoRALinear",
    "HLoRAPlugin",
    "LoRAPlugin",
    "MoELoRAPlugin",
    "hlora_layers",
    "inject_hlora",
    "set_active_task",
]

TASKS: tuple[str, str] = ("comprehension", "generation")
Variant = Literal["hlora", "lora", "moelora"]


@dataclass(frozen=True)
class AdapterConfig:
    """One task plugin's hyper-parameters: total rank ``r``, ``alpha``, ``experts`` (k), dropout, and
    ``share`` (another task whose plugin this task runs instead of an own one)."""

    r: int
    alpha: float
    experts: int = 4
    dropout: float = 0.0
    variant: Variant = "hlora"
    share: str | None = None

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"H-LoRA rank must be positive, got r={self.r}")
        if self.variant not in ("hlora", "lora", "moelora"):
            raise ValueError(f"unknown adapter variant {self.variant!r} (hlora, lora, moelora)")
        if self.variant != "lora" and (self.experts <= 0 or self.r % self.experts):
            raise ValueError(f"rank r={self.r} must be a positive multiple of experts k={self.experts}")

    @property
    def scaling(self) -> float:
        if self.variant == "lora":
            return self.alpha / self.r
        return self.alpha / self.r * self.experts

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["share"] is None:  # checkpoints written before `share` existed compare equal
            del out["share"]
        return out


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


class LoRAPlugin(nn.Module):
    """Plain LoRA: ``B(dropout(A x)) * alpha / r``."""

    def __init__(self, d_in: int, d_out: int, cfg: AdapterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.scaling = cfg.scaling
        self.lora_A = nn.Linear(d_in, cfg.r, bias=False)
        self.lora_B = nn.Linear(cfg.r, d_out, bias=False)
        self.dropout = _dropout(cfg.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.dropout(F.linear(x, self.lora_A.weight))
        return F.linear(a * self.scaling, self.lora_B.weight)


class HLoRAPlugin(nn.Module):
    """k experts merged into one A/B pair plus a per-token softmax router (see module docstring)."""

    def __init__(self, d_in: int, d_out: int, cfg: AdapterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.experts = cfg.experts
        self.rank_per_expert = cfg.r // cfg.experts
        self.scaling = cfg.scaling
        self.lora_A = nn.Linear(d_in, cfg.r, bias=False)
        self.lora_B = nn.Linear(cfg.r, d_out, bias=False)
        self.lora_route = nn.Linear(d_in, cfg.experts, bias=False)
        self.dropout = _dropout(cfg.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        nn.init.kaiming_uniform_(self.lora_route.weight, a=math.sqrt(5))

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Router weights, softmax over the k experts, per token: ``[..., k]``."""
        return torch.softmax(F.linear(x, self.lora_route.weight), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.dropout(F.linear(x, self.lora_A.weight))
        gate = self.gates(x).to(a.dtype) * self.scaling
        # [..., k, r/k] * [..., k, 1] == a * repeat_interleave(gate, r/k), without materialising it
        a = (a.unflatten(-1, (self.experts, self.rank_per_expert)) * gate.unsqueeze(-1)).flatten(-2)
        return F.linear(a, self.lora_B.weight)


class _Expert(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int) -> None:
        super().__init__()
        # no random draws here: MoELoRAPlugin fills the weights from an H-LoRA plugin's draws
        self.lora_A = nn.utils.skip_init(nn.Linear, d_in, rank, bias=False)
        self.lora_B = nn.utils.skip_init(nn.Linear, rank, d_out, bias=False)


class MoELoRAPlugin(nn.Module):
    """MoELoRA baseline: k separate experts evaluated one after another in a Python loop.

    Initialised from an :class:`HLoRAPlugin`'s random draws (the same calls in the same order), split
    into rank slices: from the same RNG state both variants hold the same function."""

    def __init__(self, d_in: int, d_out: int, cfg: AdapterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.scaling = cfg.scaling
        rank = cfg.r // cfg.experts
        merged = HLoRAPlugin(d_in, d_out, cfg)  # the H-LoRA plugin's draws, in its order
        self.experts = nn.ModuleList(_Expert(d_in, d_out, rank) for _ in range(cfg.experts))
        self.lora_route = merged.lora_route
        self.dropout = _dropout(cfg.dropout)
        self._load_merged(merged.lora_A.weight, merged.lora_B.weight)

    @torch.no_grad()
    def _load_merged(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Expert i <- rank slice i of a merged ``A`` [r, d_in] and ``B`` [d_out, r]."""
        rank = self.cfg.r // self.cfg.experts
        for i, expert in enumerate(self.experts):
            expert.lora_A.weight.copy_(a[i * rank:(i + 1) * rank])
            expert.lora_B.weight.copy_(b[:, i * rank:(i + 1) * rank])

    def reset_parameters(self) -> None:
        """Draw as :meth:`HLoRAPlugin.reset_parameters` does (merged A, then the router), then split."""
        first = self.experts[0].lora_A.weight
        a = torch.empty(self.cfg.r, first.shape[1], dtype=first.dtype, device=first.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self._load_merged(a, torch.zeros(self.experts[0].lora_B.weight.shape[0], self.cfg.r, dtype=first.dtype,
                                         device=first.device))
        nn.init.kaiming_uniform_(self.lora_route.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.softmax(F.linear(x, self.lora_route.weight), dim=-1)
        out: torch.Tensor | None = None
        for i, expert in enumerate(self.experts):
            h = expert.lora_B(self.dropout(expert.lora_A(x))) * (gate[..., i : i + 1] * self.scaling)
            out = h if out is None else out + h
        assert out is not None
        return out


_PLUGINS: dict[str, type[nn.Module]] = {"hlora": HLoRAPlugin, "lora": LoRAPlugin, "moelora": MoELoRAPlugin}


class HLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus one adapter plugin per task; only the active plugin runs.

    ``active_task`` is ``None`` (adapters off: exactly the base layer) or a key of ``plugins``.
    """

    def __init__(self, base_layer: nn.Linear, configs: Mapping[str, AdapterConfig]) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        base_layer.weight.requires_grad_(False)
        if base_layer.bias is not None:
            base_layer.bias.requires_grad_(False)
        factory = {"device": base_layer.weight.device}
        self.plugins = nn.ModuleDict(
            {
                task: _PLUGINS[cfg.variant](self.in_features, self.out_features, cfg).to(**factory)
                for task, cfg in configs.items() if cfg.share is None
            }
        )
        # task -> the plugin it runs (its own, or the one it shares)
        self.routes = {task: cfg.share or task for task, cfg in configs.items()}
        for task, target in self.routes.items():
            if target not in self.plugins:
                raise ValueError(f"task {task!r} shares the plugin of {target!r}, which has no plugin of its own")
        self.active_task: str | None = next(iter(configs), None)

    @property
    def weight(self) -> torch.Tensor:  # some HF code reads `.weight` of a projection for its dtype
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def set_task(self, task: str | None) -> None:
        if task is not None and task not in self.routes:
            raise KeyError(f"no H-LoRA plugin for task {task!r}; have {sorted(self.routes)}")
        self.active_task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.active_task is None:
            return out
        plugin = self.plugins[self.routes[self.active_task]]
        return out + plugin(x.to(plugin_dtype(plugin))).to(out.dtype)

    def extra_repr(self) -> str:
        tasks = ", ".join(f"{t}:{p.cfg.variant} r={p.cfg.r}" for t, p in self.plugins.items())
        return f"in={self.in_features}, out={self.out_features}, {tasks}, active={self.active_task}"


def plugin_dtype(plugin: nn.Module) -> torch.dtype:
    return next(plugin.parameters()).dtype


def inject_hlora(
    module: nn.Module,
    configs: Mapping[str, AdapterConfig],
    *,
    exclude: Sequence[str] = ("lm_head",),
) -> list[str]:
    """Wrap every ``nn.Linear`` in ``module`` (except names whose last part is in ``exclude``).

    Returns the qualified names of the wrapped linears. Already wrapped linears are skipped.
    """
    targets: list[tuple[str, nn.Linear]] = []
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear) and name.rsplit(".", 1)[-1] not in exclude:
            parent_name = name.rsplit(".", 1)[0] if "." in name else ""
            if isinstance(module.get_submodule(parent_name), HLoRALinear | _Expert) or ".plugins." in name:
                continue
            targets.append((name, child))
    for name, child in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, HLoRALinear(child, configs))
    return [name for name, _ in targets]


def hlora_layers(module: nn.Module) -> Iterator[tuple[str, HLoRALinear]]:
    for name, child in module.named_modules():
        if isinstance(child, HLoRALinear):
            yield name, child


def set_active_task(module: nn.Module, task: str | None) -> None:
    """Hard routing: every H-LoRA layer in ``module`` uses ``task``'s plugin (None = adapters off)."""
    for _, layer in hlora_layers(module):
        layer.set_task(task)


def set_dropout(module: nn.Module, p: float, tasks: Sequence[str] | None = None) -> None:
    """Set the dropout on the ``A`` path of every plugin in ``module`` (all tasks, or only ``tasks``):
    the paper's Table 7 varies it per stage and task, so the trainer sets it when a stage starts."""
    for _, layer in hlora_layers(module):
        for task, plugin in layer.plugins.items():
            if (tasks is None or task in tasks) and hasattr(plugin, "dropout"):
                plugin.dropout = _dropout(p)
