"""Hierarchical visual perception: one CLIP tower, two feature levels, two ``mlp2x_gelu`` adapters.

* comprehension -> **abstract** features: CLIP hidden state ``-2`` (output of the second-to-last
  encoder layer), patch tokens only (CLS dropped), through ``abstract_adapter``;
* generation -> **concrete** features: CLIP hidden state ``1`` (output of the first encoder
  layer), patch tokens only, through ``concrete_adapter``.

Hard routing: only the layers needed for the requested level run (generation stops after the first
encoder layer). The tower is frozen (``requires_grad=False``) and evaluated under ``no_grad``.

``mlp2x_gelu`` is ``Linear(d_vision, d_llm) -> GELU -> Linear(d_llm, d_llm)`` as an
``nn.Sequential`` (parameter keys ``0.weight``, ``0.bias``, ``2.weight``, ``2.bias``; the same as the
released ``mm_projector``).

Pre-processing (:meth:`HierarchicalVision.preprocess`): RGB, pad to square with the processor's
mean colour (LLaVA ``expand2square``), then the ``CLIPImageProcessor`` (resize, centre crop,
normalise). Accepts PIL images, uint8 arrays ``[H,W]``/``[H,W,3]``, or paths.

Public API: ``HierarchicalVision(tower, processor, llm_hidden)``, ``.features(pixel_values, task)``,
``.preprocess(images) -> pixel_values``, ``.num_patches``, ``expand2square``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

__all__ = ["FEATURE_LAYER", "HierarchicalVision", "expand2square", "mlp2x_gelu"]

# hidden-state index used per task (hidden_states[0] is the embedding output)
FEATURE_LAYER: dict[str, int] = {"comprehension": -2, "generation": 1}


def mlp2x_gelu(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


def expand2square(img: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Pad a PIL image to a square, centring it on ``background`` (LLaVA's pad-to-square)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def _to_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, str | os.PathLike):
        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as err:
            raise ValueError(f"{os.fspath(image)}: cannot read image ({err})") from err
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8, got {arr.dtype}")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3)):
        return Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr).convert("RGB")
    raise ValueError(f"image array must be [H,W] or [H,W,3], got shape {arr.shape}")


class HierarchicalVision(nn.Module):
    """Frozen CLIP vision tower + ``abstract_adapter`` (comprehension) + ``concrete_adapter``."""

    def __init__(self, tower: nn.Module, processor: Any, llm_hidden: int) -> None:
        super().__init__()
        self.tower = tower
        self.processor = processor
        self.tower.requires_grad_(False)
        d_vis = tower.config.hidden_size
        self.abstract_adapter = mlp2x_gelu(d_vis, llm_hidden)
        self.concrete_adapter = mlp2x_gelu(d_vis, llm_hidden)
        n_layers = tower.config.num_hidden_layers
        if n_layers < 2:
            raise ValueError("the CLIP tower needs at least 2 layers for hierarchical features")
        # number of encoder layers to run for each task
        self._depth = {
            task: (idx if idx >= 0 else n_layers + 1 + idx) for task, idx in FEATURE_LAYER.items()
        }

    @property
    def num_patches(self) -> int:
        cfg = self.tower.config
        return (cfg.image_size // cfg.patch_size) ** 2

    @property
    def image_size(self) -> int:
        return int(self.tower.config.image_size)

    def adapter(self, task: str) -> nn.Sequential:
        if task == "comprehension":
            return self.abstract_adapter
        if task == "generation":
            return self.concrete_adapter
        raise KeyError(f"unknown task {task!r} (comprehension, generation)")

    @torch.no_grad()
    def patch_features(self, pixel_values: torch.Tensor, task: str) -> torch.Tensor:
        """CLIP patch tokens (CLS dropped) at the task's hidden-state level: ``[N, P, d_vision]``."""
        depth = self._depth[task] if task in self._depth else None
        if depth is None:
            raise KeyError(f"unknown task {task!r} (comprehension, generation)")
        # transformers 5 flattens CLIPVisionModel; 4.x nests it under .vision_model
        vm = getattr(self.tower, "vision_model", self.tower)
        dtype = vm.embeddings.patch_embedding.weight.dtype
        h = vm.pre_layrnorm(vm.embeddings(pixel_values.to(dtype)))
        for layer in vm.encoder.layers[:depth]:
            h = layer(h, None)
            if isinstance(h, tuple):  # older transformers return a tuple
                h = h[0]
        return h[:, 1:]

    def features(self, pixel_values: torch.Tensor, task: str) -> torch.Tensor:
        """Adapter output in the LLM width: ``[N, num_patches, d_llm]``."""
        adapter = self.adapter(task)
        feats = self.patch_features(pixel_values, task)
        return adapter(feats.to(adapter[0].weight.dtype))

    def preprocess(self, images: Sequence[Any] | Any) -> torch.Tensor:
        """Pad-to-square + CLIP pre-processing; returns ``pixel_values [N, 3, S, S]`` (float32)."""
        if not isinstance(images, list | tuple):
            images = [images]
        mean = self.processor.image_mean
        background = tuple(int(x * 255) for x in mean)
        pils = [expand2square(_to_pil(im), background) for im in images]
        out = self.processor(images=pils, return_tensors="pt")
        return out["pixel_values"]
