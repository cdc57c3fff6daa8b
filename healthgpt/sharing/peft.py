"""One task plugin of a ``HealthGPT`` in the PEFT adapter layout, written and read back.

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

Public API::

    export_peft_adapter(model, task, out_dir) -> Path
    import_peft_adapter(model, task, in_dir) -> list[str]
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from healthgpt.model.core import HealthGPT
from healthgpt.model.hlora import HLoRAPlugin, LoRAPlugin, MoELoRAPlugin, hlora_layers
from healthgpt.model.weights import CheckpointError, _assign, _set_plugin_tensor

__all__ = ["export_peft_adapter", "import_peft_adapter"]

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
            "which peft's LoRA cannot compute: load with healthgpt.sharing.peft.import_peft_adapter")
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
