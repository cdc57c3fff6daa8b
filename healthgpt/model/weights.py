"""Our trainable-weights file: the trainable parts of a ``HealthGPT`` as one safetensors file.

Our format (``save_trainable`` / ``load_trainable``): one ``.safetensors`` file whose keys are the
model's own parameter names (``HealthGPT.named_parameters()``, e.g.
``llm.model.layers.0.self_attn.q_proj.plugins.comprehension.lora_A.weight``,
``vision.abstract_adapter.0.weight``, ``llm.model.embed_tokens.new``), plus metadata
``healthgpt`` (JSON: format version, preset, template, adapter configs, vocabulary sizes, groups).
Tied tensors are stored once, under their first name.

Public API::

    save_trainable(model, path, groups=None) -> list[str]        (atomic)
    load_trainable(model, path, strict=True) -> list[str]
    resolve_trainable(path) -> Path;  read_metadata(path) -> dict
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from healthgpt.model.core import HealthGPT
from healthgpt.model.hlora import MoELoRAPlugin

__all__ = ["FORMAT_VERSION", "TRAINABLE_FILE", "CheckpointError", "load_trainable", "read_metadata", "resolve_trainable", "save_trainable"]

FORMAT_VERSION = 1
DEFAULT_GROUPS = ("abstract_adapter", "concrete_adapter", "comprehension_plugin", "generation_plugin",
                  "new_token_rows")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model (unknown keys, wrong shapes, bad format)."""


def _name(path: str | os.PathLike[str]) -> str:
    return Path(path).name  # never print absolute paths


def _param_names(model: HealthGPT) -> dict[int, str]:
    """id(param) -> first qualified name (tied parameters keep their first name)."""
    out: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), name)
    return out


def save_trainable(model: HealthGPT, path: str | os.PathLike[str],
                   groups: Sequence[str] | None = None) -> list[str]:
    """Save the named parameter groups (default: adapters, both plugins, the new token rows, plus
    ``word_embeddings``/``lm_head`` when they are trainable) as safetensors; returns the keys."""
    all_groups = model.parameter_groups()
    if groups is None:
        groups = list(DEFAULT_GROUPS)
        for g in ("word_embeddings", "lm_head"):
            if any(p.requires_grad for p in all_groups[g]):
                groups.append(g)
    unknown = [g for g in groups if g not in all_groups]
    if unknown:
        raise KeyError(f"unknown parameter group(s) {unknown}; have {sorted(all_groups)}")
    names = _param_names(model)
    tensors: dict[str, torch.Tensor] = {}
    for g in groups:
        for p in all_groups[g]:
            tensors[names[id(p)]] = p.detach().to("cpu").contiguous()
    meta = {
        "format_version": FORMAT_VERSION,
        "preset": model.preset,
        "template": model.template,
        "adapters": {t: c.to_dict() for t, c in model.adapters.items()},
        "feature_levels": dict(model.vision.feature_levels),
        "vocab_first_new": model.vocab.first_new,
        "vocab_total": model.vocab.total,
        "groups": list(groups),
    }
    # written atomically (temporary name, fsync, rename): a killed run never leaves a half-written file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"healthgpt": json.dumps(meta)})
    _fsync(tmp)
    os.replace(tmp, path)
    return sorted(tensors)


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


TRAINABLE_FILE = "trainable.safetensors"


def resolve_trainable(path: str | os.PathLike[str]) -> Path:
    """The trainable-weights file meant by ``path``: a ``.safetensors`` file, a folder holding
    ``trainable.safetensors`` (a checkpoint ``step-N``), or a training ``--out`` folder (its
    ``final/`` weights, else its latest ``checkpoints/step-N``). One rule for train --init, infer
    and eval."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for candidate in (p / TRAINABLE_FILE, p / "final" / TRAINABLE_FILE):
            if candidate.is_file():
                return candidate
        steps = sorted((d for d in (p / "checkpoints").glob("step-*") if (d / TRAINABLE_FILE).is_file()),
                       key=lambda d: int(d.name.split("-")[-1]) if d.name.split("-")[-1].isdigit() else -1)
        if steps:
            return steps[-1] / TRAINABLE_FILE
        raise CheckpointError(f"{p.name}/: no {TRAINABLE_FILE} in this folder, in final/ or in checkpoints/step-*/ "
                              "(expected a training --out folder, a checkpoint folder or a .safetensors file)")
    raise CheckpointError(f"{p.name}: checkpoint not found")


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("healthgpt", "{}"))


def _assign(target: torch.Tensor, value: torch.Tensor, key: str, source: str) -> None:
    if tuple(target.shape) != tuple(value.shape):
        raise CheckpointError(f"{source}: {key} has shape {tuple(value.shape)}, the model expects "
                              f"{tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(value.to(dtype=target.dtype, device=target.device))


def load_trainable(model: HealthGPT, path: str | os.PathLike[str], strict: bool = True,
                   groups: Sequence[str] | None = None) -> list[str]:
    """Load a ``save_trainable`` file; unknown keys (and, with ``strict``, a different adapter
    configuration) raise ``CheckpointError``. ``groups``: load only the tensors of these parameter
    groups (``parameter_groups()`` names; a group the file lacks is an error). Returns the loaded keys."""
    source = _name(path)
    try:
        tensors = load_file(str(path))
        meta = read_metadata(path)
    except Exception as err:  # safetensors raises several types for bad files
        raise CheckpointError(f"{source}: not a readable safetensors checkpoint ({err})") from err
    if groups is not None:
        names = _param_names(model)
        all_groups = model.parameter_groups()
        unknown = [g for g in groups if g not in all_groups]
        if unknown:
            raise KeyError(f"unknown parameter group(s) {unknown}; have {sorted(all_groups)}")
        wanted = {names[id(p)] for g in groups for p in all_groups[g]}
        missing = [g for g in groups if not any(names[id(p)] in tensors for p in all_groups[g])]
        if missing:
            raise CheckpointError(f"{source}: holds no tensors of parameter group(s) {missing}")
        tensors = {k: v for k, v in tensors.items() if k in wanted}
    # the configurations matter only for what the file holds: a text pre-training (LLM weights only) loads
    # into a model with any plugins or feature levels
    has_plugins = any(".plugins." in k for k in tensors)
    has_adapters = any(k.startswith(("vision.abstract_adapter.", "vision.concrete_adapter.")) for k in tensors)
    if strict and has_plugins and meta.get("adapters"):
        ours = {t: c.to_dict() for t, c in model.adapters.items()}
        if meta["adapters"] != ours:
            raise CheckpointError(f"{source}: adapter configuration {meta['adapters']} differs from the "
                                  f"model's {ours}")
    levels = dict(model.vision.feature_levels)
    if strict and has_adapters and meta.get("feature_levels") and meta["feature_levels"] != levels:
        raise CheckpointError(f"{source}: trained with visual feature levels {meta['feature_levels']}, the model "
                              f"reads {levels} (pass the same comprehension_features/generation_features)")
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(k for k in tensors if k not in params)
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} key(s) not in the model, e.g. {unknown[:3]}")
    for k, v in tensors.items():
        _assign(params[k], v, k, source)
    return sorted(tensors)


def _set_plugin_tensor(plugin: torch.nn.Module, part: str, value: torch.Tensor, key: str, source: str) -> None:
    if isinstance(plugin, MoELoRAPlugin) and part in ("lora_A", "lora_B"):
        k = len(plugin.experts)
        chunks = value.chunk(k, dim=0 if part == "lora_A" else 1)
        if len(chunks) != k:
            raise CheckpointError(f"{source}: {key} cannot be split into {k} experts")
        for e, c in zip(plugin.experts, chunks, strict=True):
            _assign(getattr(e, part).weight, c, key, source)
        return
    sub = getattr(plugin, part, None)
    if sub is None:
        raise CheckpointError(f"{source}: {key}: the model's {type(plugin).__name__} has no {part}")
    _assign(sub.weight, value, key, source)
