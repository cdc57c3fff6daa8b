"""Preset shapes: the architecture files and a weightless ``HealthGPT`` built from them.

``healthgpt/model/architectures/*.json`` transcribe the published ``config.json`` of each base model
(Phi-3-mini-4k-instruct, Phi-4, Qwen2.5-32B-Instruct, CLIP ViT-L/14-336) plus the small models of
the ``tiny`` and ``smollm2-135m`` presets, and the tokenizer length the split embedding starts from.
``build_shape_model`` builds the model the way ``healthgpt.model.presets`` does (LLM from config,
CLIP vision from config, ``HealthGPT.from_parts`` with the preset's H-LoRA sizes) inside a
``FakeTensorMode`` or on the meta device: no weights are read or allocated. A stand-in tokenizer of
the right length takes the tokenizer's place (``from_parts`` only extends it and reads ids).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import torch

from healthgpt.model.conversation import NEW_TOKENS
from healthgpt.model.hlora import AdapterConfig

__all__ = ["PRESET_SHAPES", "PresetShape", "ShapeTokenizer", "architecture", "build_shape_model", "llm_config"]


@dataclass(frozen=True)
class PresetShape:
    llm: str  # architecture file stem
    vision: str
    comp: tuple[int, float]  # H-LoRA total rank, alpha (comprehension)
    gen: tuple[int, float] | None
    dtype: torch.dtype  # the preset's weight dtype (real presets: bf16)
    experts: int = 4


# the same H-LoRA sizes as healthgpt.model.presets (_build_tiny, _build_smollm2, _REAL)
PRESET_SHAPES: dict[str, PresetShape] = {
    "tiny": PresetShape("tiny-llama", "tiny-clip", (8, 16), (16, 32), torch.float32),
    "smollm2-135m": PresetShape("smollm2-135m-instruct", "smollm2-clip", (16, 32), (32, 64), torch.float32),
    "m3": PresetShape("phi-3-mini-4k-instruct", "clip-vit-large-patch14-336", (64, 128), (256, 512), torch.bfloat16),
    "l14": PresetShape("phi-4", "clip-vit-large-patch14-336", (32, 64), (128, 256), torch.bfloat16),
    "xl32": PresetShape("qwen2.5-32b-instruct", "clip-vit-large-patch14-336", (64, 128), None, torch.bfloat16),
}


@cache
def architecture(stem: str) -> dict[str, Any]:
    """One architecture file (``healthgpt/model/architectures/<stem>.json``)."""
    text = resources.files("healthgpt.model.architectures").joinpath(f"{stem}.json").read_text("utf-8")
    return json.loads(text)


def llm_config(stem: str, layers: int | None = None) -> Any:
    from transformers import AutoConfig

    fields = dict(architecture(stem)["config"])
    if layers is not None:  # a scaled-down model of the same shape (benchmarks/gpu_check.py)
        fields["num_hidden_layers"] = int(layers)
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    cfg._attn_implementation = "sdpa"
    return cfg


def vision_config(stem: str) -> Any:
    from transformers import CLIPVisionConfig

    fields = dict(architecture(stem)["config"])
    fields.pop("model_type")
    cfg = CLIPVisionConfig(**fields)
    cfg._attn_implementation = "sdpa"
    return cfg


class ShapeTokenizer:
    """A tokenizer of ``n`` tokens that ``extend_tokenizer`` can extend: sizes and ids only, no text."""

    unk_token_id = None
    eos_token_id = 0
    pad_token_id = 0
    bos_token_id = None

    def __init__(self, n: int) -> None:
        self._vocab = {f"<tok_{i}>": i for i in range(n)}

    def __len__(self) -> int:
        return len(self._vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def add_tokens(self, tokens: list[str], special_tokens: bool = False) -> int:
        added = 0
        for tok in tokens:
            if tok not in self._vocab:
                self._vocab[tok] = len(self._vocab)
                added += 1
        return added

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int | None]:
        return [self._vocab.get(t) for t in tokens]


def build_shape_model(preset: str, fake_mode: Any = None, variant: str = "hlora",
                      dtype: torch.dtype | None = None, *, device: str = "meta", layers: int | None = None) -> Any:
    """The preset's ``HealthGPT`` with no weights: built on the meta device, then (with ``fake_mode``)
    every parameter and buffer becomes a fake CPU tensor of the same shape, dtype and sharing.
    ``device="cuda"`` (or ``"cpu"``) builds it with random weights there instead; ``layers`` keeps only
    that many decoder layers."""
    with torch.device(device):
        model = _build_meta(preset, variant, dtype, layers)
    if fake_mode is not None:
        _to_fake(model, fake_mode)
    return model


def _to_fake(model: torch.nn.Module, fake_mode: Any) -> None:
    """Replace meta parameters and buffers by fake CPU tensors, keeping shared ones shared (tied heads)."""
    done: dict[int, torch.Tensor] = {}
    with fake_mode:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) not in done:
                    done[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="cpu"),
                                                     requires_grad=p.requires_grad)
                module._parameters[name] = done[id(p)]
            for name, b in list(module._buffers.items()):
                if b is not None:
                    if id(b) not in done:
                        done[id(b)] = torch.zeros(b.shape, dtype=b.dtype, device="cpu")
                    module._buffers[name] = done[id(b)]


def _build_meta(preset: str, variant: str, dtype: torch.dtype | None, layers: int | None = None) -> Any:
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    from healthgpt.model.core import HealthGPT

    shape = PRESET_SHAPES[preset]
    k = shape.experts
    adapters = {"comprehension": AdapterConfig(shape.comp[0], shape.comp[1], k, 0.0, variant)}
    if shape.gen is not None:
        adapters["generation"] = AdapterConfig(shape.gen[0], shape.gen[1], k, 0.0, variant)
    llm = AutoModelForCausalLM.from_config(llm_config(shape.llm, layers))
    tower = CLIPVisionModel(vision_config(shape.vision)).eval()
    tokenizer = ShapeTokenizer(int(architecture(shape.llm)["tokenizer_size"]))
    model = HealthGPT.from_parts(llm, tokenizer, tower, None, adapters=adapters, template="chatml", preset=preset)
    return model.to(dtype or shape.dtype)


def new_token_count() -> int:
    return len(NEW_TOKENS)
