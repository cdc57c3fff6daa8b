"""The tokenizer API: 256x256 images <-> 32x32 = 1024 codes (``VQTokenizer``, ``load_vq``).

Two deliberate differences from the released inference scripts:

* encoding is the argmax of the quantiser logits ``proj(z)``; the taming ``GumbelQuantize`` runs
  ``gumbel_softmax`` even in eval mode, which adds random Gumbel noise, so its indices are not
  reproducible. Taking the noise-free argmax makes shards byte-identical across runs.
* decoded pixels are rounded to the nearest 8-bit level (the released ``custom_to_pil`` truncates).

``load_vq("tiny")`` gives a small model with seeded random weights (same f8 geometry and codebook
size, fast on CPU: its quantiser is a product codebook, see :meth:`GumbelQuantizer.use_product`)
for tests and the demo; its indices are not meaningful image tokens and
:meth:`VQTokenizer.describe` says so.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlhealth.vq.convert import _as_config, _fit_state_dict, _sha256_file, load_state_dict_file
from vlhealth.vq.network import (
    GUMBEL_F8_CONFIG,
    TINY_CONFIG,
    TINY_PRODUCT,
    VQGAN,
    VQConfig,
    _init_seeded,
    _seeded_uniform,
)

TINY_SEED = 20250213


TINY_NOTE = "tiny random VQGAN: indices are not meaningful image tokens"


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class VQTokenizer:
    """numpy in, numpy out: ``encode`` uint8 images -> int16 codes, ``decode`` codes -> uint8 RGB."""

    def __init__(
        self,
        model: VQGAN,
        *,
        name: str,
        sha256: str,
        random_weights: bool,
        device: str = "cpu",
        batch_size: int = 32,
        ignored_keys: list[str] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.config = model.config
        self.name = name
        self.sha256 = sha256
        self.random_weights = random_weights
        self.batch_size = batch_size
        self.ignored_keys = list(ignored_keys or [])
        self.path_given: str | None = None  # the weights file as the user typed it (load_vq sets it)
        # rows of quantiser logits scored at once: cache-sized on CPU, large on accelerators
        self._chunk_rows = 32 if self.device.type == "cpu" else 16384
        if self.device.type == "cpu":
            # measured on the tiny model (benchmarks/vq_throughput.py --layouts)
            self.model.use_memory_formats(torch.channels_last, torch.channels_last)

    @property
    def image_size(self) -> int:
        return self.config.resolution

    @property
    def tokens_per_image(self) -> int:
        return self.config.grid**2

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        arr = np.asarray(images)
        size = self.image_size
        if arr.dtype != np.uint8:
            raise ValueError(f"VQ encode expects uint8 images, got dtype {arr.dtype}")
        if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3 and arr.shape[:2] == (size, size)):
            arr = arr[None]  # a single image
        if arr.ndim == 3:
            arr = arr[..., None]
        if arr.ndim != 4 or arr.shape[1:3] != (size, size) or arr.shape[3] not in (1, 3):
            raise ValueError(
                f"VQ encode expects images shaped [N,{size},{size}] or [N,{size},{size},3] "
                f"(or one such image), got {tuple(np.shape(images))}"
            )
        return arr

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N,R,R] (grey) or [N,R,R,3] -> int16 [N, grid*grid] codes (row-major)."""
        arr = self._check_images(images)
        out = np.empty((arr.shape[0], self.tokens_per_image), dtype=np.int16)
        with torch.inference_mode():
            for part in _batches(arr.shape[0], self.batch_size):
                x = torch.tensor(arr[part]).to(self.device)  # a copy: inputs may be read-only views
                x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
                if x.shape[1] == 1:
                    x = x.expand(-1, 3, -1, -1)
                codes = self.model.encode_codes(x, self._chunk_rows)
                out[part] = codes.to("cpu", torch.int16).numpy()
        return out

    def decode(self, indices: np.ndarray) -> np.ndarray:
        """int codes [N, grid*grid] (or [N,grid,grid], or one row) -> uint8 RGB [N,R,R,3]."""
        arr = np.asarray(indices)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"VQ decode expects integer indices, got dtype {arr.dtype}")
        tokens, grid = self.tokens_per_image, self.config.grid
        if arr.ndim == 1:
            arr = arr[None]  # one image's codes
        elif arr.ndim == 3 and arr.shape[1:] == (grid, grid):
            arr = arr.reshape(arr.shape[0], tokens)
        if arr.ndim != 2 or arr.shape[1] != tokens:
            raise ValueError(f"VQ decode expects indices shaped [N,{tokens}], got {tuple(np.shape(indices))}")
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= self.config.n_embed:
                raise ValueError(f"VQ indices must lie in [0, {self.config.n_embed - 1}], got values in [{lo}, {hi}]")
        size = self.image_size
        out = np.empty((arr.shape[0], size, size, 3), dtype=np.uint8)
        with torch.inference_mode():
            for part in _batches(arr.shape[0], self.batch_size):
                codes = torch.from_numpy(arr[part].astype(np.int64)).to(self.device)
                x = self.model.decode_codes(codes)
                # [-1,1] -> [0,255], rounded to the nearest level
                x = x.clamp_(-1.0, 1.0).add_(1.0).mul_(127.5).round_()
                out[part] = x.permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()
        return out

    def describe(self) -> dict[str, Any]:
        """Provenance for build.json: never an absolute path."""
        info: dict[str, Any] = {
            "name": self.name,
            "config": self.config.to_dict(),
            "sha256": self.sha256,
            "random_weights": self.random_weights,
        }
        if self.random_weights:
            info["note"] = TINY_NOTE
        if self.ignored_keys:
            info["ignored_checkpoint_keys"] = len(self.ignored_keys)
        return info


def _seeded_product_proj(model: VQGAN, seed: int, n_first: int, d_first: int) -> None:
    """Make ``quantize.proj`` a product codebook of seeded unit directions (no bias), and use it.

    Unit rows keep every direction reachable as an argmax, so codes follow the content.
    """
    proj = model.quantize.proj
    n, d = proj.out_channels, proj.in_channels
    n_second = n // n_first
    first = _seeded_uniform(seed, "quantize.proj.first", (n_first, d_first), 1.0)
    second = _seeded_uniform(seed, "quantize.proj.second", (n_second, d - d_first), 1.0)
    first = first / first.norm(dim=1, keepdim=True)
    second = second / second.norm(dim=1, keepdim=True)
    rows = torch.cat([first[:, None, :].expand(n_first, n_second, d_first),
                      second[None].expand(n_first, n_second, d - d_first)], dim=2)
    with torch.no_grad():
        proj.weight.copy_(rows.reshape(n, d, 1, 1))
        if proj.bias is not None:
            proj.bias.zero_()
    model.quantize.use_product(n_first, d_first)


def _tiny_tokenizer(device: str, batch_size: int, seed: int = TINY_SEED) -> VQTokenizer:
    model = VQGAN(TINY_CONFIG)
    _init_seeded(model, seed)
    _seeded_product_proj(model, seed, *TINY_PRODUCT)
    ident = json.dumps({"seed": seed, "config": TINY_CONFIG.to_dict(), "product": list(TINY_PRODUCT)},
                       sort_keys=True)
    return VQTokenizer(
        model,
        name="tiny",
        sha256=hashlib.sha256(ident.encode()).hexdigest(),
        random_weights=True,
        device=device,
        batch_size=batch_size,
    )


def load_vq(
    spec: str | os.PathLike[str] = "tiny",
    device: str = "cpu",
    batch_size: int = 32,
    *,
    config: VQConfig | Mapping[str, Any] | None = None,
) -> VQTokenizer:
    """``"tiny"`` (seeded random weights) or a path to taming ``last.ckpt`` / converted safetensors.

    The architecture of a file comes from ``config`` if given, else from the file (safetensors
    metadata) or a config beside it (``<stem>.json``, ``config.json``, taming's ``model.yaml``),
    else the released Gumbel f8 config.
    """
    if isinstance(spec, str) and spec == "tiny":
        if config is not None:
            raise ValueError("load_vq('tiny') has a fixed config; pass a weights file to use another")
        return _tiny_tokenizer(device, batch_size)
    path = Path(spec)
    tensors, stored = load_state_dict_file(path)
    cfg = _as_config(config) or stored or GUMBEL_F8_CONFIG
    model = VQGAN(cfg)
    ignored = _fit_state_dict(model, tensors, path.name)
    tok = VQTokenizer(
        model,
        name=path.name,
        sha256=_sha256_file(path),
        random_weights=False,
        device=device,
        batch_size=batch_size,
        ignored_keys=ignored,
    )
    tok.path_given = os.fspath(spec)  # as typed: build.json keeps it (relative) so that runs can find the file
    return tok
