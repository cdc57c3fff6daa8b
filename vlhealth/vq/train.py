"""Train or fine-tune the VQGAN image tokenizer (``vlhealth vq train``).

The model is the same :class:`vlhealth.vq.VQGAN` the builders, the evaluator and inference load,
so what this writes (``OUT/vqgan.safetensors`` + ``OUT/vqgan.json``) is read unchanged by
``vlhealth build --vqgan``, ``healthgpt eval --vq`` and ``healthgpt infer --vq``.

Images are the ``target.png`` members of generation shard folders (the images the LLM will have
to produce): the ``train`` split is trained on, the held-out split (``test``, else ``val``) is
only reconstructed for the report.

Losses, as a taming-style VQGAN is trained:

* reconstruction: L1 between the image and its reconstruction, plus the LPIPS perceptual
  distance when local LPIPS weights are given (``--lpips-weights``; never downloaded);
* the quantiser's own loss. Two quantisers share the checkpoint layout (``quantize.proj`` scores,
  ``quantize.embed`` codebook):

  - ``nearest`` (default from scratch): nearest-codebook-entry quantisation with a
    straight-through gradient, codebook + commitment losses, and unused codes re-seeded from
    encoder outputs. On saving, ``proj`` is set to ``2 e_k . z - |e_k|^2`` so that its argmax
    (how :class:`~vlhealth.vq.VQTokenizer` encodes) *is* the nearest code;
  - ``gumbel`` (default with ``--init``): taming's Gumbel-softmax quantiser, hard samples with a
    straight-through gradient, the temperature annealed from 1 to 1/16, and a small KL term to
    the uniform prior over codes. Fine-tunes a released GumbelVQ without changing what it is;

* an optional PatchGAN discriminator (hinge loss) from ``--disc-start`` on, its generator term
  weighted adaptively by the ratio of the reconstruction and GAN gradient norms at the decoder's
  last layer (as in the VQGAN paper).

Resumable: ``OUT/checkpoint/`` holds the weights (safetensors), the discriminator, both
optimizers' states, the step and the RNG states; ``--resume`` continues from there.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlhealth.vq import VQGAN, VQConfig, VQTokenizer, load_state_dict_file, load_vq, save_vq

__all__ = ["DEMO_VQ_CONFIG", "PatchDiscriminator", "VQTrainConfig", "VQTrainResult", "codebook_usage",
           "load_target_images", "train_vq"]

# A small f8 tokenizer for the demo: 256 px -> 32x32 codes (the schema's 1024 tokens), 256 codes,
# few channels. Trained from scratch on the demo's CT/MR targets in a minute or two on a CPU.
DEMO_VQ_CONFIG = VQConfig(ch=8, ch_mult=(1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(), z_channels=8,
                          embed_dim=8, n_embed=256, norm_groups=4)
CHECKPOINT_DIR = "checkpoint"
WEIGHTS_NAME = "vqgan.safetensors"


@dataclass
class VQTrainConfig:
    shards: Sequence[os.PathLike | str]
    out: os.PathLike | str
    config: VQConfig | None = None  # architecture from scratch (ignored with init: the file's config wins)
    init: os.PathLike | str | None = None  # weights to fine-tune (taming last.ckpt or converted safetensors)
    quantizer: str | None = None  # "nearest" | "gumbel"; None: nearest from scratch, gumbel with init
    steps: int = 300
    batch_size: int = 8
    crop: int | None = None  # random square crops of this size (the model is convolutional): cheaper steps
    lr: float = 2e-3
    disc_start: int | None = None  # step at which the discriminator starts; None: no discriminator
    disc_weight: float = 0.5
    codebook_weight: float = 1.0
    commitment: float = 0.25
    kl_weight: float = 5e-4
    perceptual_weight: float = 1.0
    lpips_weights: Sequence[os.PathLike | str] = ()
    held_out_split: str | None = None  # None: "test" if present, else "val"
    max_images: int = 4000
    held_out_max: int | None = None  # report on at most this many held-out images, evenly spaced (None: all)
    save_every: int = 100
    resume: bool = False
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


@dataclass
class VQTrainResult:
    out: Path
    weights: Path
    steps: int
    losses: list[float]
    report: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- data


def _rgb(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3]
    if img.shape[:2] != (size, size):
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))
    return np.ascontiguousarray(img, dtype=np.uint8)


def load_target_images(shards: Sequence[os.PathLike | str], split: str, size: int, limit: int) -> np.ndarray:
    """uint8 [N,size,size,3]: the ``target.png``/``target.jpg`` of ``split`` generation samples, in shard order."""
    from vlhealth.schema import decode_image
    from vlhealth.shards import iter_tar, list_shards

    out: list[np.ndarray] = []
    for folder in shards:
        tars = list_shards(folder)
        if not tars:
            raise FileNotFoundError(f"vq train: no shards in {Path(folder).name}")
        for tar in tars:
            for key, members in iter_tar(tar):
                if len(out) >= limit:
                    return np.stack(out)
                name = next((m for m in ("target.png", "target.jpg") if m in members), None)
                if name is None or "json" not in members:
                    continue
                try:
                    rec = json.loads(members["json"])
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise ValueError(f"{tar.name}: sample {key!r} has an unreadable json member ({exc})") from exc
                if rec.get("split") == split:
                    out.append(_rgb(decode_image(members[name]), size))
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def _to_tensor(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _draw(images: np.ndarray, batch: int, crop: int | None, gen: torch.Generator) -> np.ndarray:
    idx = torch.randint(len(images), (batch,), generator=gen).numpy()
    out = images[idx]
    if crop is not None and crop < images.shape[1]:
        starts = torch.randint(images.shape[1] - crop + 1, (batch, 2), generator=gen).numpy()
        out = np.stack([im[y:y + crop, x:x + crop] for im, (y, x) in zip(out, starts, strict=True)])
    return out


# ------------------------------------------------------------------------------- quantisers


def _nearest(model: VQGAN, z: torch.Tensor, cfg: VQTrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest-codebook quantisation: (z_q with straight-through gradient, codebook+commitment loss, codes)."""
    b, d, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, d)
    codebook = model.quantize.embed.weight
    dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None]
    codes = dist.argmin(1)
    zq = codebook[codes].reshape(b, h, w, d).permute(0, 3, 1, 2)
    loss = F.mse_loss(zq, z.detach()) + cfg.commitment * F.mse_loss(z, zq.detach())
    return z + (zq - z).detach(), cfg.codebook_weight * loss, codes


def _gumbel(model: VQGAN, z: torch.Tensor, cfg: VQTrainConfig, tau: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gumbel-softmax quantisation (hard, straight-through) + KL to the uniform code prior."""
    logits = model.quantize.proj(z)
    one_hot = F.gumbel_softmax(logits, tau=tau, hard=True, dim=1)
    zq = torch.einsum("bnhw,nd->bdhw", one_hot, model.quantize.embed.weight)
    probs = logits.softmax(1)
    kl = (probs * torch.log(probs * logits.shape[1] + 1e-10)).sum(1).mean()
    return zq, cfg.kl_weight * kl, one_hot.argmax(1).flatten()


def tie_proj_to_codebook(model: VQGAN) -> None:
    """Make ``argmax proj(z)`` the nearest codebook entry: logits ``2 e_k . z - |e_k|^2``."""
    with torch.no_grad():
        codebook = model.quantize.embed.weight
        model.quantize.proj.weight.copy_((2 * codebook)[:, :, None, None])
        model.quantize.proj.bias.copy_(-codebook.pow(2).sum(1))


def _reseed_dead_codes(model: VQGAN, counts: torch.Tensor, z: torch.Tensor, gen: torch.Generator) -> int:
    """Move codes unused since the last call onto random encoder outputs of this batch (keeps usage up)."""
    dead = (counts == 0).nonzero().flatten()
    if not len(dead):
        return 0
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    pick = torch.randint(len(flat), (len(dead),), generator=gen).to(flat.device)
    with torch.no_grad():
        model.quantize.embed.weight[dead] = flat[pick] + 1e-3 * torch.randn_like(flat[pick])
    return len(dead)


# ---------------------------------------------------------------------------- discriminator


class PatchDiscriminator(nn.Module):
    """A PatchGAN: strided 4x4 convs, one real/fake logit per image patch."""

    def __init__(self, channels: int = 3, width: int = 32, layers: int = 3) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        w = width
        for i in range(1, layers + 1):
            nxt = width * min(2**i, 8)
            mods += [nn.Conv2d(w, nxt, 4, 2 if i < layers else 1, 1, bias=False), nn.GroupNorm(8, nxt),
                     nn.LeakyReLU(0.2)]
            w = nxt
        mods.append(nn.Conv2d(w, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last: torch.Tensor, scale: float) -> torch.Tensor:
    """Balance the GAN term against reconstruction by their gradient norms at the decoder's last layer."""
    rec_grad = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach() * scale


# ------------------------------------------------------------------------------ evaluation


def codebook_usage(codes: np.ndarray, n_embed: int) -> dict[str, float]:
    """Perplexity (exp of the code entropy) and the share of the codebook used, over ``codes``."""
    counts = np.bincount(np.asarray(codes).ravel().astype(np.int64), minlength=n_embed).astype(np.float64)
    p = counts / max(counts.sum(), 1.0)
    nz = p[p > 0]
    return {"perplexity": float(np.exp(-(nz * np.log(nz)).sum())) if len(nz) else 0.0,
            "codes_used": int((counts > 0).sum()), "share_used": float((counts > 0).mean())}


def held_out_report(tokenizer: VQTokenizer, images: np.ndarray) -> dict[str, Any]:
    """Reconstruction SSIM/PSNR (8-bit, the evaluator's metrics) and codebook usage on held-out images."""
    from vlhealth.image_metrics import image_metrics

    if not len(images):
        return {"n": 0}
    codes = tokenizer.encode(images)
    recon = tokenizer.decode(codes)
    metrics = [image_metrics(r, t) for r, t in zip(recon, images, strict=True)]
    psnrs = [m["psnr"] for m in metrics if m["psnr"] is not None and math.isfinite(m["psnr"])]
    return {"n": int(len(images)), "ssim": float(np.mean([m["ssim"] for m in metrics])),
            "psnr": float(np.mean(psnrs)) if psnrs else None, "mse": float(np.mean([m["mse"] for m in metrics])),
            **codebook_usage(codes, tokenizer.config.n_embed)}


# --------------------------------------------------------------------------------- training


def _build_model(cfg: VQTrainConfig) -> tuple[VQGAN, str, str]:
    """(model, quantiser kind, description of the start point)."""
    if cfg.init is not None:
        tensors, stored = load_state_dict_file(cfg.init)
        model = VQGAN(stored or cfg.config or VQConfig())
        from vlhealth.vq.convert import _fit_state_dict

        _fit_state_dict(model, tensors, Path(cfg.init).name)
        start = f"fine-tuned from {Path(cfg.init).name}"
    else:
        model = VQGAN(cfg.config or DEMO_VQ_CONFIG)
        start = "from scratch"
    kind = cfg.quantizer or ("gumbel" if cfg.init is not None else "nearest")
    if kind not in ("nearest", "gumbel"):
        raise ValueError(f"vq train: unknown quantizer {kind!r} (nearest, gumbel)")
    if kind == "nearest":
        model.quantize.proj.requires_grad_(False)  # derived from the codebook when saving
    return model, kind, start


def _checkpoint(out: Path, model: VQGAN, kind: str, disc: nn.Module | None, opts: dict[str, Any], step: int,
                losses: list[float], gen: torch.Generator) -> None:
    from safetensors.torch import save_file

    ckpt = out / CHECKPOINT_DIR
    tmp = out / f".{CHECKPOINT_DIR}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    if kind == "nearest":
        tie_proj_to_codebook(model)
    save_vq(model, tmp / WEIGHTS_NAME)
    if disc is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in disc.state_dict().items()},
                  str(tmp / "discriminator.safetensors"))
    torch.save({k: o.state_dict() for k, o in opts.items()}, tmp / "optimizers.pt")
    torch.save({"torch": torch.get_rng_state(), "data": gen.get_state()}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "quantizer": kind, "losses": losses}) + "\n", "utf-8")
    if ckpt.exists():
        import shutil

        shutil.rmtree(ckpt)
    os.replace(tmp, ckpt)


def _restore(out: Path, model: VQGAN, kind: str, disc: nn.Module | None, opts: dict[str, Any],
             gen: torch.Generator) -> tuple[int, list[float]]:
    from safetensors.torch import load_file

    ckpt = out / CHECKPOINT_DIR
    if not (ckpt / "state.json").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {out.name}/{CHECKPOINT_DIR}")
    state = json.loads((ckpt / "state.json").read_text("utf-8"))
    if state["quantizer"] != kind:
        raise ValueError(f"--resume: the checkpoint used the {state['quantizer']} quantizer, this run {kind}")
    tensors, _ = load_state_dict_file(ckpt / WEIGHTS_NAME)
    model.load_state_dict(tensors)
    if disc is not None and (ckpt / "discriminator.safetensors").is_file():
        disc.load_state_dict(load_file(str(ckpt / "discriminator.safetensors")))
    saved = torch.load(ckpt / "optimizers.pt", weights_only=True)
    for k, o in opts.items():
        if k in saved:
            o.load_state_dict(saved[k])
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    gen.set_state(rng["data"])
    return int(state["step"]), list(state["losses"])


def _generator_loss(cfg: VQTrainConfig, model: VQGAN, x: torch.Tensor, step: int, kind: str, lpips: Any,
                    disc: nn.Module | None) -> tuple[torch.Tensor, dict[str, float], torch.Tensor, torch.Tensor]:
    """(total loss, its parts, reconstruction, codes) for one batch."""
    z = model.quant_conv(model.encoder(x))
    if kind == "nearest":
        zq, q_loss, codes = _nearest(model, z, cfg)
    else:
        tau = max(1 / 16, math.exp(-math.log(16) * step / max(cfg.steps, 1)))
        zq, q_loss, codes = _gumbel(model, z, cfg, tau)
    xrec = model.decoder(model.post_quant_conv(zq))
    rec = (x - xrec).abs().mean()
    if lpips is not None:
        rec = rec + cfg.perceptual_weight * lpips(xrec, x).mean()
    total = rec + q_loss
    parts = {"rec": float(rec.detach()), "quant": float(q_loss.detach())}
    if disc is not None and cfg.disc_start is not None and step >= cfg.disc_start:
        g_loss = -disc(xrec).mean()
        weight = _adaptive_weight(rec, g_loss, model.decoder.conv_out.weight, cfg.disc_weight)
        total = total + weight * g_loss
        parts["gan"] = float(g_loss.detach())
        parts["gan_weight"] = float(weight)
    return total, parts, xrec, z if kind == "nearest" else codes


def train_vq(cfg: VQTrainConfig, step_hook: Callable[[int], None] | None = None) -> VQTrainResult:
    """Train (or fine-tune) a VQGAN on the train-split targets of ``cfg.shards``; see the module docs."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model, kind, start = _build_model(cfg)
    size = model.config.resolution
    images = load_target_images(cfg.shards, "train", size, cfg.max_images)
    if not len(images):
        raise ValueError("vq train: no train-split target images in "
                         + ", ".join(Path(s).name for s in cfg.shards) + " (generation shard folders needed)")
    model.to(device).train()
    lpips = None
    if cfg.lpips_weights:
        from vlhealth.image_metrics import load_lpips

        lpips = load_lpips(cfg.lpips_weights, device=device).eval().requires_grad_(False)
    disc = PatchDiscriminator().to(device) if cfg.disc_start is not None else None
    opts: dict[str, Any] = {"vq": torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                                   lr=cfg.lr, betas=(0.5, 0.9))}
    if disc is not None:
        opts["disc"] = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    step, losses = (_restore(out, model, kind, disc, opts, gen) if cfg.resume else (0, []))
    usage = torch.zeros(model.config.n_embed, dtype=torch.long)
    from vlhealth.progress import progress_bar

    t0 = time.perf_counter()
    with progress_bar("vq train", "loss {task.fields[loss]:.4f}", enabled=cfg.progress) as progress:
        bar = progress.add_task("vq train", total=cfg.steps, completed=step, loss=float("nan"))
        while step < cfg.steps:
            lr = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))  # cosine to 10%
            for o in opts.values():
                for g in o.param_groups:
                    g["lr"] = lr
            x = _to_tensor(_draw(images, cfg.batch_size, cfg.crop, gen), device)
            loss, parts, xrec, z_or_codes = _generator_loss(cfg, model, x, step, kind, lpips, disc)
            opts["vq"].zero_grad(set_to_none=True)
            loss.backward()
            opts["vq"].step()
            if disc is not None and cfg.disc_start is not None and step >= cfg.disc_start:
                d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(xrec.detach())).mean()  # hinge
                opts["disc"].zero_grad(set_to_none=True)
                d_loss.backward()
                opts["disc"].step()
            if kind == "nearest":
                with torch.no_grad():
                    flat = z_or_codes.permute(0, 2, 3, 1).reshape(-1, z_or_codes.shape[1])
                    cb = model.quantize.embed.weight
                    codes = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ cb.t() + cb.pow(2).sum(1)[None]).argmin(1)
                usage += torch.bincount(codes.cpu(), minlength=len(usage))
                if (step + 1) % 25 == 0 and step + 1 < 0.8 * cfg.steps:
                    _reseed_dead_codes(model, usage, z_or_codes, gen)
                    usage.zero_()
            step += 1
            losses.append(parts["rec"])
            progress.update(bar, completed=step, loss=parts["rec"])
            if step_hook is not None:
                step_hook(step)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                _checkpoint(out, model, kind, disc, opts, step, losses, gen)
    _checkpoint(out, model, kind, disc, opts, step, losses, gen)
    return _finish(cfg, out, model, kind, start, losses, step, time.perf_counter() - t0, len(images))


def _finish(cfg: VQTrainConfig, out: Path, model: VQGAN, kind: str, start: str, losses: list[float], step: int,
            seconds: float, n_train: int) -> VQTrainResult:
    """Write the final weights + sidecar, reload them as the pipeline will, and report on held-out images."""
    if kind == "nearest":
        tie_proj_to_codebook(model)
    weights = out / WEIGHTS_NAME
    save_vq(model.eval(), weights)
    tokenizer = load_vq(weights, device=cfg.device)  # exactly how build/eval/infer will read it
    split = cfg.held_out_split
    size = model.config.resolution
    held = load_target_images(cfg.shards, split or "test", size, cfg.max_images)
    if split is None and not len(held):
        split, held = "val", load_target_images(cfg.shards, "val", size, cfg.max_images)
    n_held = int(len(held))
    if cfg.held_out_max is not None and n_held > cfg.held_out_max:  # evenly spaced: every patient and anatomy
        held = held[np.linspace(0, n_held - 1, cfg.held_out_max).round().astype(int)]
    k = min(5, len(losses))
    report = {
        "weights": weights.name, "config": model.config.to_dict(), "quantizer": kind, "start": start,
        "steps": step, "batch_size": cfg.batch_size, "crop": cfg.crop, "lr": cfg.lr,
        "discriminator_from_step": cfg.disc_start, "perceptual": bool(cfg.lpips_weights),
        "train_images": n_train,
        "reconstruction_l1": {"first": float(np.mean(losses[:k])) if k else None,
                              "last": float(np.mean(losses[-k:])) if k else None},
        "held_out": {"split": split or "test", "of": n_held, **held_out_report(tokenizer, held)},
        "seconds_this_run": round(seconds, 1),
        "note": "trained weights: codes are meaningful image tokens only as far as the held-out numbers show",
    }
    (out / "vq_train_report.json").write_text(json.dumps(report, indent=2) + "\n", "utf-8")
    _plot_losses(out / "loss.png", losses)
    return VQTrainResult(out=out, weights=weights, steps=step, losses=losses, report=report)


def _plot_losses(path: Path, losses: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(range(1, len(losses) + 1), losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("reconstruction L1 (pixels in [-1, 1])")
    ax.set_title("VQGAN training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def config_as_dict(cfg: VQTrainConfig) -> dict[str, Any]:
    """The training options, JSON-ready, with no absolute paths (for logs)."""
    d = asdict(cfg)
    d["shards"] = [Path(s).name for s in cfg.shards]
    d["out"] = Path(cfg.out).name
    d["init"] = Path(cfg.init).name if cfg.init else None
    d["config"] = cfg.config.to_dict() if cfg.config else None
    d["lpips_weights"] = [Path(p).name for p in cfg.lpips_weights]
    return d
