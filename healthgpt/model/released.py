"""The released HealthGPT weights mapped onto our parameter names.

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

Public API::

    load_released(model, path_or_state_dict, task) -> ReleasedLoadReport
    load_released_m3(model, folder) -> list[ReleasedLoadReport]
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from healthgpt.model.core import HealthGPT
from healthgpt.model.hlora import HLoRALinear, hlora_layers
from healthgpt.model.weights import CheckpointError, _assign, _set_plugin_tensor

__all__ = ["ReleasedLoadReport", "ReleasedWeightsError", "load_released", "load_released_m3"]

class ReleasedWeightsError(CheckpointError):
    """A released HealthGPT file whose keys or shapes do not map onto the model."""




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
