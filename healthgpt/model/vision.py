"""Hierarchical visual perception: one CLIP tower, two feature levels, two ``mlp2x_gelu`` adapters.

* comprehension -> **abstract** features: CLIP hidden state ``-2`` (output of the second-to-last
  encoder layer), patch tokens only (CLS dropped), through ``abstract_adapter``;
* generation -> **concrete** features: CLIP hidden state ``1`` (output of the first encoder
  layer), patch tokens only, through ``concrete_adapter``.

Hard routing: only the layers needed for the requested level run (generation stops after the first
encoder layer). The tower is frozen (``requires_grad=False``) and evaluated under ``no_grad``.

``feature_levels`` swaps the level a task reads (``{"comprehension": "concrete"}``: comprehension
on first-layer features), for the paper's Figure 6 ablation (preset override
``comprehension_features`` / ``generation_features``). Each task keeps its own adapter
(``abstract_adapter`` is the comprehension adapter whatever level feeds it).

``mlp2x_gelu`` is ``Linear(d_vision, d_llm) -> GELU -> Linear(d_llm, d_llm)`` as an
``nn.Sequential`` (parameter keys ``0.weight``, ``0.bias``, ``2.weight``, ``2.bias``; the same as the
released ``mm_projector``).

Pre-processing (:meth:`HierarchicalVision.preprocess`): RGB, pad to square with the processor's
mean colour (LLaVA ``expand2square``), then the ``CLIPImageProcessor`` (resize, centre crop,
normalise). Accepts PIL images, uint8 arrays ``[H,W]``/``[H,W,3]``, or paths.

The training loader uses :class:`VisionPreprocessor` (picklable for loader workers), by default
through :class:`FastClipPreprocessor`, which gives the same numbers without the processor's overhead.

Public API: ``HierarchicalVision(tower, processor, llm_hidden, feature_levels=None)``, ``.features(pixel_values, task)``,
``.preprocess(images) -> pixel_values``, ``.num_patches``, ``expand2square``,
``VisionPreprocessor(processor, fast=False)`` / ``.from_model(model)``,
``FastClipPreprocessor.from_processor(processor)``, ``decode_input_image(data, where)``,
``save_tower(tower, out)`` / ``load_tower(folder)`` (a small preset's tower pre-trained by
``healthgpt pretrain-vision``: ``vision_tower.safetensors`` + ``vision_config.json``; the presets load it
with the override ``vision_path``).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

__all__ = [
    "DEFAULT_FEATURE_LEVELS",
    "FEATURE_LAYER",
    "LEVEL_LAYER",
    "FastClipPreprocessor",
    "HierarchicalVision",
    "TOWER_CONFIG",
    "TOWER_FILE",
    "VisionPreprocessor",
    "decode_input_image",
    "expand2square",
    "load_tower",
    "mlp2x_gelu",
    "save_tower",
]

# hidden-state index of each feature level (hidden_states[0] is the embedding output)
LEVEL_LAYER: dict[str, int] = {"abstract": -2, "concrete": 1}
# the paper's routing: comprehension reads abstract features, generation concrete ones
DEFAULT_FEATURE_LEVELS: dict[str, str] = {"comprehension": "abstract", "generation": "concrete"}
FEATURE_LAYER: dict[str, int] = {task: LEVEL_LAYER[level] for task, level in DEFAULT_FEATURE_LEVELS.items()}


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

    def __init__(self, tower: nn.Module, processor: Any, llm_hidden: int,
                 feature_levels: Mapping[str, str] | None = None) -> None:
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
        self.feature_levels = dict(DEFAULT_FEATURE_LEVELS)
        for task, level in (feature_levels or {}).items():
            if task not in DEFAULT_FEATURE_LEVELS or level not in LEVEL_LAYER:
                raise ValueError(f"feature_levels: {task!r}: {level!r}; tasks {sorted(DEFAULT_FEATURE_LEVELS)}, "
                                 f"levels {sorted(LEVEL_LAYER)}")
            self.feature_levels[task] = level
        # number of encoder layers to run for each task
        self._depth = {}
        for task, level in self.feature_levels.items():
            idx = LEVEL_LAYER[level]
            self._depth[task] = idx if idx >= 0 else n_layers + 1 + idx

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


# ------------------------------------------------------------------------------------ loader pre-processing


class VisionPreprocessor:
    """Picklable image pre-processing for loader workers: the model's own
    ``HierarchicalVision.preprocess`` (pad to square + CLIP processor) without the vision tower.

    ``fast=True`` (the default of :meth:`from_model`) uses :class:`FastClipPreprocessor` when the
    processor's settings are ones it reproduces, else the processor itself."""

    def __init__(self, processor: Any, fast: bool = False) -> None:
        self.processor = processor
        self.fast = FastClipPreprocessor.from_processor(processor) if fast else None

    @classmethod
    def from_model(cls, model: Any, fast: bool = True) -> VisionPreprocessor:
        return cls(model.vision.processor, fast=fast)

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        if self.fast is not None:
            return self.fast(images)
        return HierarchicalVision.preprocess(self, list(images))  # type: ignore[arg-type]


class FastClipPreprocessor:
    """LLaVA pad-to-square + CLIP pre-processing without the transformers image-processor machinery.

    The same steps as ``HierarchicalVision.preprocess`` with a CLIP (PIL backend) processor: pad to
    a square on the mean colour, the same PIL resize call (bicubic), centre crop, then rescale and
    normalise through a 256-entry lookup table per channel (computed in float64: the values match
    the processor's to float32 rounding). A square grayscale image is resized once, as one channel,
    and broadcast (PIL resamples every channel independently with the same kernel, so this equals
    resizing its RGB copy). ``tests/test_data.py`` checks the match against the processor.
    """

    def __init__(self, resize: tuple[str, int, int], resample: int, crop: tuple[int, int] | None,
                 scale: float, mean: Sequence[float], std: Sequence[float]) -> None:
        self.resize_rule = resize  # ("shortest_edge", S, 0) or ("exact", H, W)
        self.resample = int(resample)
        self.crop = crop
        self.mean = tuple(float(m) for m in mean)
        self.background = tuple(int(m * 255) for m in self.mean)
        values = np.arange(256, dtype=np.float64)
        self.lut = np.stack([((values * scale) - m) / s for m, s in zip(self.mean, std, strict=True)]).astype(np.float32)

    @classmethod
    def from_processor(cls, proc: Any) -> FastClipPreprocessor | None:
        """The fast equivalent of ``proc``, or None when its settings are not ones reproduced here."""
        def get(name: str, default: Any = None) -> Any:
            return getattr(proc, name, default)

        def dim(size: Any, key: str) -> Any:
            return size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)

        try:
            if not (get("do_resize") and get("do_rescale") and get("do_normalize")) or get("do_pad"):
                return None
            if not get("do_convert_rgb", True):
                return None
            size = get("size")
            if dim(size, "shortest_edge") and not dim(size, "longest_edge"):
                resize = ("shortest_edge", int(dim(size, "shortest_edge")), 0)
            elif dim(size, "height") and dim(size, "width"):
                resize = ("exact", int(dim(size, "height")), int(dim(size, "width")))
            else:
                return None
            crop = None
            if get("do_center_crop"):
                cs = get("crop_size")
                crop = (int(dim(cs, "height")), int(dim(cs, "width")))
            mean, std = list(get("image_mean")), list(get("image_std"))
            if len(mean) != 3 or len(std) != 3:
                return None
            return cls(resize, int(get("resample", 3)), crop, float(get("rescale_factor")), mean, std)
        except (TypeError, ValueError, AttributeError):
            return None

    def _target(self, side: int) -> tuple[int, int]:
        """(height, width) after resizing a ``side`` x ``side`` image."""
        rule, a, b = self.resize_rule
        return (a, a) if rule == "shortest_edge" else (a, b)

    def _one(self, image: Any) -> np.ndarray:
        img = image if isinstance(image, Image.Image) and image.mode in ("L", "RGB") else _to_pil(image)
        w, h = img.size
        if img.mode == "L" and w != h:  # padding uses a colour: no longer one channel
            img = img.convert("RGB")
        if img.mode == "RGB":
            img = expand2square(img, self.background)
        side = max(w, h)
        th, tw = self._target(side)
        if img.size != (tw, th):
            img = img.resize((tw, th), resample=self.resample)
        arr = np.asarray(img)
        if self.crop is not None:
            ch, cw = self.crop
            if ch > th or cw > tw:
                raise ValueError(f"centre crop {self.crop} is larger than the resized image {(th, tw)}")
            top, left = (th - ch) // 2, (tw - cw) // 2
            arr = arr[top:top + ch, left:left + cw]
        if arr.ndim == 2:
            return np.stack([self.lut[c][arr] for c in range(3)])
        return np.stack([self.lut[c][arr[..., c]] for c in range(3)])

    def __call__(self, images: Sequence[Any] | Any) -> torch.Tensor:
        if not isinstance(images, list | tuple):
            images = [images]
        return torch.from_numpy(np.stack([self._one(im) for im in images]))


def decode_input_image(data: bytes, where: str) -> Image.Image:
    """The input image as PIL ``L`` (grayscale kept: pre-processing resizes one channel) or ``RGB``."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode in ("L", "RGB"):
                return img.copy()
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"{where}: cannot decode input image ({err})") from err


# ------------------------------------------------------------------------------------ a pre-trained small tower

TOWER_FILE = "vision_tower.safetensors"
TOWER_CONFIG = "vision_config.json"


def save_tower(tower: nn.Module, out: os.PathLike | str) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tower.state_dict().items()}, str(out / TOWER_FILE))
    (out / TOWER_CONFIG).write_text(json.dumps(tower.config.to_dict(), indent=2, default=str) + "\n", "utf-8")
    return out / TOWER_FILE


def load_tower(folder: os.PathLike | str) -> nn.Module:
    """A ``pretrain-vision`` output folder -> its frozen ``CLIPVisionModel`` (eval mode)."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    folder = Path(folder)
    cfg_path, weights = folder / TOWER_CONFIG, folder / TOWER_FILE
    if not (cfg_path.is_file() and weights.is_file()):
        raise FileNotFoundError(f"vision_path {folder.name or folder}: no {TOWER_CONFIG} + {TOWER_FILE} "
                                "(the output of `healthgpt pretrain-vision`)")
    cfg = CLIPVisionConfig.from_dict(json.loads(cfg_path.read_text("utf-8")))
    cfg._attn_implementation = "sdpa"
    tower = CLIPVisionModel(cfg)
    state = load_file(str(weights))
    missing, unexpected = tower.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"vision_path {folder.name}: {TOWER_FILE} does not fit its config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    tower.requires_grad_(False)
    return tower.eval()
