"""Checkpoints: our trainable parts as safetensors, PEFT-layout plugin export, released weights.

Our format (``save_trainable`` / ``load_trainable``): one ``.safetensors`` file whose keys are the
model's own parameter names (``HealthGPT.named_parameters()``, e.g.
``llm.model.layers.0.self_attn.q_proj.plugins.comprehension.lora_A.weight``,
``vision.abstract_adapter.0.weight``, ``llm.model.embed_tokens.new``), plus metadata
``healthgpt`` (JSON: format version, preset, template, adapter configs, vocabulary sizes, groups).
Tied tensors are stored once, under their first name.

PEFT layout (``export_peft_adapter`` / ``import_peft_adapter``), one folder per task plugin::

    adapter_config.json         peft LoraConfig fields (peft_type LORA, r, lora_alpha,
                                target_modules, task_type CAUSAL_LM, ...)
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight / .lora_B.weight
                                (+ .lora_route.weight for H-LoRA)
    healthgpt_plugin.json       task, variant, experts k, scaling, and the note that peft itself
                                cannot run an H-LoRA plugin (router, scaling alpha/r*k)
    visual_adapter.safetensors  the task's mlp2x_gelu adapter (0.weight, 0.bias, 2.weight, 2.bias)

A plain-LoRA plugin (``variant="lora"``) exported this way loads in peft unchanged
(``PeftModel.from_pretrained``); MoELoRA plugins are written in the merged H-LoRA form (the k
expert A/B matrices stacked along the rank axis; the same function).

Released HealthGPT files (``load_released``): ``com_hlora_weights.bin``, ``gen_hlora_weights.bin``,
``fusion_layer_weights.bin`` are ``torch.save`` state dicts of the released LLaVA-Phi3 model wrapped
by their peft fork, opened here with ``torch.load(weights_only=True)``. Key mapping (the
``base_model.model.`` prefix is optional)::

    model.layers.N.<path>.lora_A.weight      -> llm.model.layers.N.<path>.plugins.<task>.lora_A.weight
    model.layers.N.<path>.lora_B.weight      -> ... .lora_B.weight
    model.layers.N.<path>.lora_route.weight  -> ... .lora_route.weight
    model.mm_projector.{0,2}.{weight,bias}   -> vision.<abstract|concrete>_adapter.{0,2}.*  (by task)
    model.embed_tokens.weight [V+8195, d]    -> llm embedding old rows [:V] + new rows [V:]
    lm_head.weight [V+8195, d]               -> lm_head old rows + new rows
    model.vision_tower.vision_tower.<k>      -> vision.tower.<k> (CLIP, if a file carries it)

``task`` is ``comprehension`` for ``com_hlora_weights*.bin`` and ``generation`` for the gen and
fusion files (the released generation script loads those two together). Every key must map onto a
tensor of the same shape, otherwise ``ReleasedWeightsError`` names the file and the keys.

Training checkpoints (``write_checkpoint`` / ``read_checkpoint``): ``OUT/checkpoints/step-NNNNNNNN/``
holds ``trainable.safetensors`` (this stage's and the earlier stages' groups), ``optimizer.pt``,
``rng-rank<R>.pt`` (every rank's RNG states) and ``trainer_state.json`` (step, scheduler, spike
guard, every rank's data position, losses), written last: its presence marks a complete
checkpoint. A checkpoint is written to a temporary folder, fsynced and renamed; the last ``keep``
are kept.

Public API::

    save_trainable(model, path, groups=None) -> list[str]        (atomic)
    load_trainable(model, path, strict=True) -> list[str]
    load_run_weights(model, path) -> list[str]   (a run folder, checkpoint or file; returns its groups)
    latest_checkpoint(out_dir) -> Path | None
    write_checkpoint(out, step, model, groups, optimizer, state, keep) -> Path;  read_checkpoint(path) -> dict
    rng_state() -> dict;  set_rng_state(state)
    export_peft_adapter(model, task, out_dir) -> Path
    import_peft_adapter(model, task, in_dir) -> list[str]
    load_released(model, path_or_state_dict, task) -> ReleasedLoadReport
    load_released_m3(model, folder) -> list[ReleasedLoadReport]
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from healthgpt.model.core import HealthGPT
from healthgpt.model.hlora import HLoRALinear, HLoRAPlugin, LoRAPlugin, MoELoRAPlugin, hlora_layers
from vlhealth.shards import fsync_dir

__all__ = [
    "CHECKPOINTS_DIR",
    "FORMAT_VERSION",
    "TRAINABLE_FILE",
    "latest_checkpoint",
    "load_run_weights",
    "run_lineage",
    "read_checkpoint",
    "rng_state",
    "set_rng_state",
    "write_checkpoint",
    "CheckpointError",
    "ReleasedLoadReport",
    "ReleasedWeightsError",
    "export_peft_adapter",
    "import_peft_adapter",
    "load_released",
    "load_released_m3",
    "load_trainable",
    "save_trainable",
]

FORMAT_VERSION = 1
DEFAULT_GROUPS = ("abstract_adapter", "concrete_adapter", "comprehension_plugin", "generation_plugin",
                  "new_token_rows")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model (unknown keys, wrong shapes, bad format)."""


class ReleasedWeightsError(CheckpointError):
    """A released HealthGPT file whose keys or shapes do not map onto the model."""


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


def load_trainable(model: HealthGPT, path: str | os.PathLike[str], strict: bool = True) -> list[str]:
    """Load a ``save_trainable`` file; unknown keys (and, with ``strict``, a different adapter
    configuration) raise ``CheckpointError``. Returns the loaded keys."""
    source = _name(path)
    try:
        tensors = load_file(str(path))
        meta = read_metadata(path)
    except Exception as err:  # safetensors raises several types for bad files
        raise CheckpointError(f"{source}: not a readable safetensors checkpoint ({err})") from err
    if strict and meta.get("adapters"):
        ours = {t: c.to_dict() for t, c in model.adapters.items()}
        if meta["adapters"] != ours:
            raise CheckpointError(f"{source}: adapter configuration {meta['adapters']} differs from the "
                                  f"model's {ours}")
    levels = dict(model.vision.feature_levels)
    if strict and meta.get("feature_levels") and meta["feature_levels"] != levels:
        raise CheckpointError(f"{source}: trained with visual feature levels {meta['feature_levels']}, the model "
                              f"reads {levels} (pass the same comprehension_features/generation_features)")
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(k for k in tensors if k not in params)
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} key(s) not in the model, e.g. {unknown[:3]}")
    for k, v in tensors.items():
        _assign(params[k], v, k, source)
    return sorted(tensors)


# -------------------------------------------------------------------------------- PEFT layout


def _merged_plugin_tensors(plugin: torch.nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(plugin, HLoRAPlugin):
        return {"lora_A": plugin.lora_A.weight, "lora_B": plugin.lora_B.weight,
                "lora_route": plugin.lora_route.weight}
    if isinstance(plugin, LoRAPlugin):
        return {"lora_A": plugin.lora_A.weight, "lora_B": plugin.lora_B.weight}
    if isinstance(plugin, MoELoRAPlugin):
        return {"lora_A": torch.cat([e.lora_A.weight for e in plugin.experts], 0),
                "lora_B": torch.cat([e.lora_B.weight for e in plugin.experts], 1),
                "lora_route": plugin.lora_route.weight}
    raise TypeError(f"unknown plugin type {type(plugin).__name__}")


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


def export_peft_adapter(model: HealthGPT, task: str, out_dir: str | os.PathLike[str]) -> Path:
    """Write one task plugin in the PEFT adapter layout (see module docstring)."""
    if task not in model.adapters:
        raise KeyError(f"no plugin for task {task!r}")
    cfg = model.adapters[task]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for name, layer in hlora_layers(model.llm):
        targets.add(name.rsplit(".", 1)[-1])
        for part, t in _merged_plugin_tensors(layer.plugins[task]).items():
            tensors[f"base_model.model.{name}.{part}.weight"] = t.detach().cpu().contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    peft_cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model.preset,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(peft_cfg, indent=2) + "\n")
    note = ("plain LoRA: loadable by peft as is" if cfg.variant == "lora" else
            "H-LoRA: lora_A/lora_B hold the k experts stacked along the rank axis and lora_route the "
            "router; the output is B(repeat_interleave(softmax(route(x)), r/k) * A(x)) * alpha/r*k, "
            "which peft's LoRA cannot compute: load with healthgpt.training.checkpoints.import_peft_adapter")
    (out / "healthgpt_plugin.json").write_text(json.dumps({
        "task": task, "variant": "hlora" if cfg.variant == "moelora" else cfg.variant,
        "experts": cfg.experts, "scaling": cfg.scaling, "adapter": cfg.to_dict(),
        "visual_adapter": "abstract_adapter" if task == "comprehension" else "concrete_adapter",
        "note": note,
    }, indent=2) + "\n")
    adapter = model.vision.adapter(task)
    save_file({k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()},
              str(out / "visual_adapter.safetensors"))
    return out


def import_peft_adapter(model: HealthGPT, task: str, in_dir: str | os.PathLike[str]) -> list[str]:
    """Load a folder written by ``export_peft_adapter`` into ``task``'s plugin (and adapter)."""
    folder = Path(in_dir)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{folder.name}: no adapter_model.safetensors")
    tensors = load_file(str(weights))
    layers = dict(hlora_layers(model.llm))
    seen: set[str] = set()
    pat = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B|lora_route)(?:\.[^.]+)?\.weight$")
    for key, value in tensors.items():
        m = pat.match(key)
        if not m or m.group(1) not in layers:
            raise CheckpointError(f"{folder.name}/adapter_model.safetensors: key {key} matches no H-LoRA layer")
        _set_plugin_tensor(layers[m.group(1)].plugins[task], m.group(2), value, key, weights.name)
        seen.add(m.group(1))
    missing = sorted(set(layers) - seen)
    if missing:
        raise CheckpointError(f"{folder.name}: no weights for {len(missing)} layer(s), e.g. {missing[:3]}")
    loaded = sorted(tensors)
    vis = folder / "visual_adapter.safetensors"
    if vis.is_file():
        adapter = model.vision.adapter(task)
        state = load_file(str(vis))
        params = dict(adapter.named_parameters())
        for k, v in state.items():
            if k not in params:
                raise CheckpointError(f"{folder.name}/{vis.name}: unexpected key {k}")
            _assign(params[k], v, k, vis.name)
        loaded += [f"visual_adapter.{k}" for k in sorted(state)]
    return loaded


# -------------------------------------------------------------------------------- released


@dataclass
class ReleasedLoadReport:
    source: str
    task: str
    used: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)  # our parameter names that were written

    def __str__(self) -> str:
        return f"{self.source}: {len(self.used)} keys -> {len(self.targets)} tensors ({self.task})"


_LORA_KEY = re.compile(r"^(.+)\.(lora_A|lora_B|lora_route)\.weight$")
_PROJ_KEY = re.compile(r"^model\.mm_projector\.(0|2)\.(weight|bias)$")
_TOWER_KEY = re.compile(r"^model\.vision_tower\.vision_tower\.(.+)$")


def _read_state(path_or_state: str | os.PathLike[str] | Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], str]:
    if isinstance(path_or_state, Mapping):
        return dict(path_or_state), "<state dict>"
    path = Path(path_or_state)
    source = path.name
    if not path.is_file():
        raise ReleasedWeightsError(f"{source}: file not found")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ReleasedWeightsError(f"{source}: cannot be read as a weights-only torch file ({err})") from err
    if not isinstance(state, Mapping):
        raise ReleasedWeightsError(f"{source}: expected a state dict, got {type(state).__name__}")
    return dict(state), source


def load_released(
    model: HealthGPT,
    path_or_state: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    task: str,
) -> ReleasedLoadReport:
    """Map a released HealthGPT weights file onto ``model`` (see the module docstring)."""
    state, source = _read_state(path_or_state)
    if task not in model.adapters:
        raise ReleasedWeightsError(f"{source}: the model has no {task!r} plugin")
    layers = dict(hlora_layers(model.llm))
    adapter = model.vision.adapter(task)
    adapter_name = "abstract_adapter" if task == "comprehension" else "concrete_adapter"
    tower_params = dict(model.vision.tower.named_parameters())
    report = ReleasedLoadReport(source=source, task=task)
    unmapped: list[str] = []
    n_old = model.vocab.first_new
    for raw_key, value in state.items():
        if not isinstance(value, torch.Tensor):
            unmapped.append(raw_key)
            continue
        key = raw_key.removeprefix("base_model.model.")
        m = _LORA_KEY.match(key)
        if m:
            layer: HLoRALinear | None = layers.get(m.group(1))
            if layer is None:
                unmapped.append(raw_key)
                continue
            _set_plugin_tensor(layer.plugins[task], m.group(2), value, raw_key, source)
            report.targets.append(f"llm.{m.group(1)}.plugins.{task}.{m.group(2)}.weight")
        elif m := _PROJ_KEY.match(key):
            param = getattr(adapter[int(m.group(1))], m.group(2))
            _assign(param, value, raw_key, source)
            report.targets.append(f"vision.{adapter_name}.{m.group(1)}.{m.group(2)}")
        elif key in ("model.embed_tokens.weight", "lm_head.weight"):
            split = model.embed if key.startswith("model.") else model.lm_head
            expected = (model.vocab.total, split.old.shape[1])
            if tuple(value.shape) != expected:
                raise ReleasedWeightsError(f"{source}: {raw_key} has shape {tuple(value.shape)}, expected "
                                           f"{expected} ({n_old} text rows + {model.vocab.num_new} new rows)")
            _assign(split.old, value[:n_old], raw_key, source)
            _assign(split.new, value[n_old:], raw_key, source)
            which = "embed_tokens" if key.startswith("model.") else "lm_head"
            report.targets += [f"{which}.old", f"{which}.new"]
        elif m := _TOWER_KEY.match(key):
            sub = m.group(1)
            name = sub if sub in tower_params else sub.removeprefix("vision_model.")
            if name not in tower_params:
                unmapped.append(raw_key)
                continue
            _assign(tower_params[name], value, raw_key, source)
            report.targets.append(f"vision.tower.{name}")
        else:
            unmapped.append(raw_key)
            continue
        report.used.append(raw_key)
    if unmapped:
        raise ReleasedWeightsError(f"{source}: {len(unmapped)} key(s) map onto nothing in the model, "
                                   f"e.g. {sorted(unmapped)[:5]}")
    return report


def load_released_m3(model: HealthGPT, folder: str | os.PathLike[str]) -> list[ReleasedLoadReport]:
    """Load ``com_hlora_weights.bin`` (comprehension) and ``gen_hlora_weights.bin`` +
    ``fusion_layer_weights.bin`` (generation) from a HealthGPT-M3 download, whichever exist
    (also ``com_hlora_weights_phi4.bin`` of HealthGPT-L14)."""
    folder = Path(folder)
    plan = [("com_hlora_weights.bin", "comprehension"), ("com_hlora_weights_phi4.bin", "comprehension"),
            ("gen_hlora_weights.bin", "generation"), ("fusion_layer_weights.bin", "generation")]
    reports = [load_released(model, folder / f, t) for f, t in plan if (folder / f).is_file()]
    if not reports:
        raise ReleasedWeightsError(
            f"{folder.name}: none of com_hlora_weights.bin, gen_hlora_weights.bin, fusion_layer_weights.bin "
            "found; download them from the Hugging Face repo lintw/HealthGPT-M3")
    return reports


# -------------------------------------------------------------------------------- training checkpoints

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"


def load_run_weights(model: HealthGPT, path: str | os.PathLike[str]) -> list[str]:
    """Load the weights of a run (``--out`` folder), a checkpoint folder or a ``.safetensors`` file
    into ``model`` (every key must fit); returns the parameter groups the file holds."""
    weights = resolve_trainable(path)
    load_trainable(model, weights)
    return list(read_metadata(weights).get("groups", []))


def run_lineage(inits: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """The earlier training runs behind ``--init`` weights, oldest first: per run its folder name, stage,
    task and shard folder names, read from each run's ``final/train_summary.json`` (which carries its own
    lineage in turn). A run without a summary (a bare weights file, a checkpoint) is listed with
    ``shards: None``: its data is unknown, and exports and publishing treat it so."""
    out: list[dict[str, Any]] = []
    for init in inits:
        weights = resolve_trainable(init)
        summary_path = weights.parent / "train_summary.json"
        summary = json.loads(summary_path.read_text("utf-8")) if summary_path.is_file() else None
        if summary is None:
            entries = [{"run": Path(init).name, "stage": None, "task": None, "shards": None}]
        else:
            own_root = weights.parent.parent if weights.parent.name == "final" else weights.parent
            entries = list(summary.get("lineage", [])) + [
                {"run": own_root.name, "stage": summary.get("stage"), "task": summary.get("task"),
                 "shards": summary.get("shards")}]
        out += [e for e in entries if e not in out]
    return out


def latest_checkpoint(out_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete ``checkpoints/step-N`` of a training ``--out`` folder, or None."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    done = sorted((p for p in root.glob("step-*") if (p / STATE_FILE).is_file()),
                  key=lambda p: int(p.name.split("-")[1]))
    return done[-1] if done else None


def write_checkpoint(out: Path, step: int, model: HealthGPT, groups: Sequence[str], optimizer: torch.optim.Optimizer,
                     state: Mapping[str, Any], keep: int) -> Path:
    """Write ``out/checkpoints/step-N`` atomically (weights of ``groups``, optimizer, ``state`` as
    trainer_state.json last) and drop all but the newest ``keep``. The ranks' RNG files are added
    to the final folder afterwards (:func:`rng_state`)."""
    root = Path(out) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_trainable(model, tmp / TRAINABLE_FILE, list(groups))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    with open(tmp / STATE_FILE, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(json.loads(json.dumps(state, default=str)), indent=1))
        fh.flush()
        os.fsync(fh.fileno())
    for f in tmp.iterdir():
        _fsync(f)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    done = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    for old in done[: max(0, len(done) - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint folder."""
    return json.loads((Path(path) / STATE_FILE).read_text("utf-8"))


def rng_state() -> dict[str, Any]:
    """Every RNG the trainer draws from (torch, Python, NumPy, CUDA), as tensors torch.save can hold."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, list | tuple) else x
