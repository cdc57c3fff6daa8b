"""The VQGAN network: configuration and modules, in plain PyTorch.

The taming-transformers ``GumbelVQ`` "OpenImages f8, 8192 codes" (ch 128, ch_mult (1,1,2,4), two
residual blocks per level, attention at resolution 32, z_channels = embed_dim = 256). Parameter
names follow the taming checkpoint layout exactly (``encoder.*``, ``decoder.*``, ``quant_conv.*``,
``quantize.proj.*``, ``quantize.embed.weight``, ``post_quant_conv.*``), so the released Lightning
``last.ckpt`` loads without renaming (:mod:`vlhealth.vq.convert`). ``TINY_CONFIG`` is the small
seeded model of the tests and the demo (``_init_seeded``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CODEBOOK_SIZE = 8192


GRID = 32


TOKENS_PER_IMAGE = GRID * GRID


IMAGE_SIZE = 256


@dataclass(frozen=True)
class VQConfig:
    """Architecture of a taming VQGAN (the ``ddconfig`` plus the quantiser sizes).

    ``norm_groups`` is not a taming option (taming always uses 32 GroupNorm groups); it exists so
    the tiny model can have fewer than 32 channels. Parameter names and shapes do not depend on it.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (32,)
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = IMAGE_SIZE
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = CODEBOOK_SIZE
    norm_groups: int = 32
    dropout: float = 0.0
    double_z: bool = False

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.double_z:
            problems.append("double_z must be false for a VQGAN")
        if self.embed_dim != self.z_channels:
            # GumbelVQ feeds quant_conv's output (embed_dim) to quantize.proj, which taming builds
            # with z_channels inputs: the two must agree for the layout to run at all.
            problems.append(f"embed_dim ({self.embed_dim}) must equal z_channels ({self.z_channels})")
        if self.resolution // 2 ** (len(self.ch_mult) - 1) * 2 ** (len(self.ch_mult) - 1) != self.resolution:
            problems.append(f"resolution {self.resolution} is not divisible by the downsampling factor")
        widths = {self.ch * m for m in self.ch_mult} | {self.z_channels}
        bad = sorted(w for w in widths if w % self.norm_groups)
        if bad:
            problems.append(f"channel widths {bad} are not divisible by norm_groups={self.norm_groups}")
        if problems:
            raise ValueError("invalid VQ config: " + "; ".join(problems))

    @property
    def grid(self) -> int:
        return self.resolution // 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ch_mult"] = list(self.ch_mult)
        out["attn_resolutions"] = list(self.attn_resolutions)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VQConfig:
        """Accept our own dict, or a taming model config (``model.params`` with a ``ddconfig``)."""
        if "model" in data and isinstance(data["model"], Mapping):
            data = data["model"].get("params", data["model"])
        if "ddconfig" in data:
            flat = dict(data["ddconfig"])
            for key in ("embed_dim", "n_embed"):
                if key in data:
                    flat[key] = data[key]
            data = flat
        known = {f.name for f in cls.__dataclass_fields__.values()}
        kwargs: dict[str, Any] = {k: v for k, v in data.items() if k in known}
        for key in ("ch_mult", "attn_resolutions"):
            if key in kwargs:
                kwargs[key] = tuple(int(v) for v in kwargs[key])
        return cls(**kwargs)


GUMBEL_F8_CONFIG = VQConfig()


# Same geometry (256 -> 32x32, 8192 codes), as cheap as the layout allows on one CPU core: two
# channels, no residual blocks in the encoder levels (only the stride-2 convs; the middle block
# and its attention are part of the layout), and a product codebook (TINY_PRODUCT) so codes are
# scored against 128 + 64 rows instead of 8192. About 3 ms per image on one core, against ~14 ms
# for the earlier ch=2, ch_mult (1,2,4,8), one-block config (benchmarks/build_throughput.py).
TINY_CONFIG = VQConfig(
    ch=2,
    ch_mult=(1, 1, 1, 1),
    num_res_blocks=0,
    attn_resolutions=(),
    z_channels=8,
    embed_dim=8,
    norm_groups=2,
)


# code k = i * 64 + j: i from the first 4 latent channels (128 unit directions), j from the last 4
TINY_PRODUCT = (128, 4)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # taming names the 1x1 projection of the skip path "nin_shortcut" (only when widths differ)
        self.nin_shortcut: nn.Module | None = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))  # dropout is 0 in every released config
        skip = self.nin_shortcut(x) if self.nin_shortcut is not None else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out, scale 1/sqrt(C)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # [B,C,H,W] -> [B,1,HW,C]
            # contiguous, so that CPU SDPA takes its flash kernel instead of the slow math path
            return t.flatten(2).transpose(1, 2).contiguous().unsqueeze(1)

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, hgt, wid)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # taming pads only right and bottom before the stride-2 conv. Built by hand: F.pad of a
        # channels-last tensor zero-fills and copies slowly on CPU (the values are the same).
        b, c, h, w = x.shape
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        padded = torch.empty((b, c, h + 1, w + 1), dtype=x.dtype, device=x.device, memory_format=layout)
        padded[:, :, :h, :w] = x
        padded[:, :, h, :] = 0
        padded[:, :, :h, w] = 0
        return self.conv(padded)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (AttnBlocks, maybe empty), resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


class _Middle(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        g = cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        in_mult = (1, *cfg.ch_mult)
        res = cfg.resolution
        self.down = nn.ModuleList()
        width = cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            stage = _Level()
            width = cfg.ch * in_mult[level]
            out = cfg.ch * mult
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(width, out, g))
                width = out
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(width, g))
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(width)
                res //= 2
            self.down.append(stage)
        self.mid = _Middle(width, g)
        self.norm_out = _group_norm(width, g)
        self.conv_out = nn.Conv2d(width, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = stage.run_blocks(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        g = cfg.norm_groups
        levels = len(cfg.ch_mult)
        width = cfg.ch * cfg.ch_mult[-1]
        res = cfg.grid
        self.conv_in = nn.Conv2d(cfg.z_channels, width, 3, padding=1)
        self.mid = _Middle(width, g)
        stages: list[_Level] = []
        for level in reversed(range(levels)):
            stage = _Level()
            out = cfg.ch * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(width, out, g))
                width = out
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(width, g))
            if level != 0:
                stage.upsample = Upsample(width)
                res *= 2
            stages.append(stage)
        # taming indexes decoder levels by resolution level (up.0 is the full-resolution one)
        self.up = nn.ModuleList(reversed(stages))
        self.norm_out = _group_norm(width, g)
        self.conv_out = nn.Conv2d(width, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            h = stage.run_blocks(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class GumbelQuantizer(nn.Module):
    """Inference half of taming's ``GumbelQuantize``: logits ``proj`` and codebook ``embed``."""

    def __init__(self, dim: int, n_embed: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, n_embed, 1)
        self.embed = nn.Embedding(n_embed, dim)
        self.product: tuple[int, int] | None = None  # see use_product

    def use_product(self, n_first: int, d_first: int) -> None:
        """Score ``proj`` as the product codebook it is, instead of all ``n_embed`` rows.

        Requires (checked here) that code ``k = i * n_second + j`` has the proj row
        ``[u_i, v_j]`` (``u_i`` its first ``d_first`` weights, shared by all ``j``; ``v_j`` the
        rest, shared by all ``i``) and one bias for all codes. Then ``argmax_k proj(z)_k`` is
        ``(argmax_i u_i . z[:d_first]) * n_second + argmax_j v_j . z[d_first:]``: two scorings of
        ``n_first`` and ``n_second`` rows instead of ``n_first * n_second``. The tiny model is
        built this way; real checkpoints never are. Ties resolve to the first index either way;
        the two sums round differently from the full one only on exact-arithmetic near-ties.
        """
        n, d = self.proj.out_channels, self.proj.in_channels
        if n_first < 1 or n % n_first or not 0 < d_first < d:
            raise ValueError(f"product codebook {n_first} x {n // max(n_first, 1)} does not fit {n} codes of dim {d}")
        w = self.proj.weight.detach().reshape(n_first, n // n_first, d)
        bias = self.proj.bias
        if not (torch.equal(w[:, :1, :d_first].expand_as(w[..., :d_first]), w[..., :d_first])
                and torch.equal(w[:1, :, d_first:].expand_as(w[..., d_first:]), w[..., d_first:])
                and (bias is None or bool((bias == bias[0]).all()))):
            raise ValueError("quantize.proj is not a product codebook of that shape")
        self.product = (n_first, d_first)

    def codes(self, z: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        """Noise-free argmax of ``proj(z)`` over the codebook: [B,D,H,W] -> int64 [B,H*W].

        The full logits tensor is B*H*W*n_embed floats (1 GiB for 32 images), so rows are scored
        in chunks that stay cache-resident; the result equals ``proj(z).argmax(1)``.
        """
        b, d, hgt, wid = z.shape
        rows = z.permute(0, 2, 3, 1).reshape(-1, d)
        if self.product is not None:
            n_first, d_first = self.product
            n_second = self.proj.out_channels // n_first
            w = self.proj.weight.reshape(n_first, n_second, d)
            first = _first_argmax(rows[:, :d_first] @ w[:, 0, :d_first].t())
            second = _first_argmax(rows[:, d_first:] @ w[0, :, d_first:].t())
            return (first * n_second + second).reshape(b, hgt * wid)
        weight = self.proj.weight.reshape(self.proj.out_channels, d).t()
        bias = self.proj.bias
        out = torch.empty(rows.shape[0], dtype=torch.long, device=z.device)
        for start in range(0, rows.shape[0], chunk_rows):
            part = rows[start : start + chunk_rows]
            logits = torch.addmm(bias, part, weight) if bias is not None else part @ weight
            out[start : start + chunk_rows] = _first_argmax(logits)
        return out.reshape(b, hgt * wid)


def _first_argmax(scores: torch.Tensor, block: int = 128) -> torch.Tensor:
    """``scores.argmax(1)`` (first index of the maximum) for a 2-D float tensor, computed blockwise.

    On CPU ``argmax`` is a scalar loop while ``amax`` is vectorised: taking the per-block maxima,
    the first block holding the row maximum, and the argmax inside that block gives the same index
    (blocks are scanned in order, so ties resolve to the first occurrence) about ten times faster.
    """
    rows, n = scores.shape
    if scores.device.type != "cpu" or n % block or n <= block:
        return scores.argmax(dim=1)
    blocks = scores.reshape(rows, n // block, block)
    best_block = blocks.amax(dim=2).argmax(dim=1)
    inside = blocks[torch.arange(rows, device=scores.device), best_block].argmax(dim=1)
    return best_block * block + inside


class VQGAN(nn.Module):
    """taming ``GumbelVQ`` without its training parts; ``state_dict()`` keys match the checkpoint."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.quantize = GumbelQuantizer(cfg.embed_dim, cfg.n_embed)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self._encode_format = torch.contiguous_format
        self._decode_format = torch.contiguous_format

    def use_memory_formats(self, encode: torch.memory_format, decode: torch.memory_format) -> VQGAN:
        """Pick activation layouts (oneDNN convs are faster channels-last, GroupNorm is not)."""
        self._encode_format, self._decode_format = encode, decode
        for module in (self.encoder, self.quant_conv):
            module.to(memory_format=encode)
        for module in (self.post_quant_conv, self.decoder):
            module.to(memory_format=decode)
        return self

    def encode_codes(self, x: torch.Tensor, chunk_rows: int = 512) -> torch.Tensor:
        """x: float [B,3,R,R] in [-1,1] -> int64 [B, grid*grid] (row-major)."""
        x = x.contiguous(memory_format=self._encode_format)
        return self.quantize.codes(self.quant_conv(self.encoder(x)), chunk_rows)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: int64 [B, grid*grid] -> float [B,3,R,R], roughly in [-1,1]."""
        grid = self.config.grid
        z = self.quantize.embed(codes).reshape(codes.shape[0], grid, grid, -1).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z.contiguous(memory_format=self._decode_format)))


def _seeded_uniform(seed: int, name: str, shape: tuple[int, ...], bound: float) -> torch.Tensor:
    """Uniform(-bound, bound) drawn from PCG64 keyed by (seed, parameter name).

    ``Generator.random`` maps raw 64-bit draws to doubles by a fixed rule, so the same seed gives
    the same weights on every machine and numpy version; keying by name keeps each tensor stable
    when others change.
    """
    key = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    draws = np.random.Generator(np.random.PCG64(key)).random(int(np.prod(shape)))
    return torch.from_numpy(((draws * 2.0 - 1.0) * bound).astype(np.float32).reshape(shape))


def _init_seeded(model: VQGAN, seed: int) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".weight") and ("norm" in name.rsplit(".", 2)[-2]):
                param.fill_(1.0)  # GroupNorm scale
            elif "norm" in name.rsplit(".", 2)[-2] and name.endswith(".bias"):
                param.zero_()
            elif name == "quantize.embed.weight":
                param.copy_(_seeded_uniform(seed, name, tuple(param.shape), 1.0))
            elif name.startswith("quantize.proj"):
                # unit-scale code directions and no bias: the argmax then follows the direction of z,
                # so different images pick different codes instead of one bias-dominated index
                bound = 1.0 if name.endswith("weight") else 0.0
                param.copy_(_seeded_uniform(seed, name, tuple(param.shape), bound))
            elif name.endswith(".weight"):
                fan_in = int(np.prod(param.shape[1:]))
                param.copy_(_seeded_uniform(seed, name, tuple(param.shape), math.sqrt(3.0 / fan_in)))
            else:
                param.copy_(_seeded_uniform(seed, name, tuple(param.shape), 0.05))
