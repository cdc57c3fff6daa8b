"""Pre-training of a small preset's vision tower (``healthgpt pretrain-vision``), frozen afterwards as CLIP is.

The paper's tower is CLIP ViT-L/14-336, pre-trained and frozen; both task paths read its hidden
states (abstract = layer -2 for comprehension, concrete = layer 1 for generation). The small presets'
towers are random, and a random tower keeps too little for either path:

* **concrete features lose intensity.** CLIP's pre-layernorm normalises every patch token: on the
  random tiny tower at 128 px / patch 4, flat patches of grey 0 and 40 have layer-1 features with
  cosine 0.999, and grey 160 and 200 0.997. CT->MRI conversion is mostly an intensity mapping, so
  the generation path cannot tell the tissues apart;
* **abstract features barely encode lesions** (a linear probe on the demo: 55-63% against a 51%
  majority, ``benchmarks/vision_probe.py``).

Two objectives, one per feature level, trained together on the images of ``--shards`` (train split):

1. **pixels at the concrete level**: a linear head reads each concrete-level patch token and must
   return that patch's grey levels (mean squared error, on the tower's normalised input). What the
   generation path needs: where each patch is, and how bright.
2. **image-text at the abstract level**: CLIP's contrastive loss (symmetric InfoNCE, learned
   temperature) between the mean abstract-level patch token and the image's text, read by a small
   bag-of-words encoder (hashed word uni- and bigrams): what the comprehension path needs. An image's
   text joins every question and answer (caption, report, instruction) of the samples that show it,
   as a CLIP caption describes an image (one question and answer would leave, say, a lesion's presence
   to a lone "yes" that many images share); a batch holds distinct texts only.

The output folder holds ``vision_tower.safetensors`` (the ``CLIPVisionModel``), ``vision_config.json``
(its ``CLIPVisionConfig``), ``metrics.jsonl`` and ``pretrain_summary.json``; ``--model-set
vision_path=OUT`` loads it as the preset's tower (``healthgpt.model.presets``), for training,
evaluation and serving alike. The heads and the text encoder are dropped: only the tower is kept.

Public API::

    VisionPretrainer(tower, text_dim=64, buckets=4096);  .loss(pixel_values, texts) -> (total, parts)
    pretrain_vision(tower, images, texts, *, steps, lr, batch, seed, kinds=None, hard_negatives=0.0, ...)
        -> list[dict]
    training_images(shards, split="train", limit=4000, kinds=None) -> (images, texts); image_kind(folder, rec)
    (saving and loading the tower: healthgpt.model.vision.save_tower / load_tower)
    pretrain_vision_command (the typer command)
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
import typer
from torch import nn

from healthgpt.model.vision import TOWER_FILE, save_tower

__all__ = ["VisionPretrainer", "contrastable_kinds", "image_kind", "pretrain_vision", "pretrain_vision_command", "training_images"]

_WORD = re.compile(r"[a-z0-9]+")


def _hashed_ngrams(text: str, buckets: int) -> list[int]:
    """Word unigrams and bigrams of ``text`` (lower case), hashed into ``buckets`` (crc32: stable across runs)."""
    words = _WORD.findall(text.lower())
    grams = words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]
    return [zlib.crc32(g.encode("utf-8")) % buckets for g in grams] or [0]


class VisionPretrainer(nn.Module):
    """The tower plus what only pre-training needs: a pixel head, a text encoder, projections, temperature."""

    def __init__(self, tower: nn.Module, text_dim: int = 64, buckets: int = 4096,
                 concrete_layer: int = 1, abstract_layer: int = -2) -> None:
        super().__init__()
        self.tower = tower
        cfg = tower.config
        self.patch = int(cfg.patch_size)
        n_layers = int(cfg.num_hidden_layers)
        self.concrete_depth = concrete_layer
        self.abstract_depth = abstract_layer if abstract_layer >= 0 else n_layers + 1 + abstract_layer
        d = int(cfg.hidden_size)
        self.pixel_head = nn.Linear(d, self.patch * self.patch)
        self.buckets = buckets
        self.text = nn.EmbeddingBag(buckets, text_dim, mode="mean")
        self.image_proj = nn.Linear(d, text_dim, bias=False)
        self.text_proj = nn.Linear(text_dim, text_dim, bias=False)
        self.log_temperature = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(concrete, abstract) patch tokens, CLS dropped, as ``HierarchicalVision`` reads them."""
        vm = getattr(self.tower, "vision_model", self.tower)
        h = vm.pre_layrnorm(vm.embeddings(pixel_values))
        concrete = abstract = None
        for i, layer in enumerate(vm.encoder.layers[: self.abstract_depth], start=1):
            h = layer(h, None)
            h = h[0] if isinstance(h, tuple) else h
            if i == self.concrete_depth:
                concrete = h[:, 1:]
        abstract = h[:, 1:]
        if concrete is None:  # concrete layer 0: the embeddings themselves
            concrete = vm.pre_layrnorm(vm.embeddings(pixel_values))[:, 1:]
        return concrete, abstract

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        ids, offsets = [], []
        for t in texts:
            offsets.append(len(ids))
            ids.extend(_hashed_ngrams(t, self.buckets))
        dev = self.text.weight.device
        return self.text(torch.tensor(ids, device=dev), torch.tensor(offsets, device=dev))

    def loss(self, pixel_values: torch.Tensor, texts: Sequence[str] | None) -> tuple[torch.Tensor, dict[str, float]]:
        concrete, abstract = self.hidden_states(pixel_values)
        grey = pixel_values.mean(1, keepdim=True)  # the tower's normalised input, one channel
        target = F.unfold(grey, self.patch, stride=self.patch).transpose(1, 2)  # [B, patches, p*p]
        pixel = F.mse_loss(self.pixel_head(concrete), target)
        parts = {"pixel": float(pixel.detach())}
        total = pixel
        if texts is not None and len(texts) > 1:
            img = F.normalize(self.image_proj(abstract.mean(1)), dim=-1)
            txt = F.normalize(self.text_proj(self.encode_text(texts)), dim=-1)
            logits = self.log_temperature.clamp(max=float(np.log(100))).exp() * img @ txt.T
            labels = torch.arange(len(texts), device=logits.device)
            contrastive = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            parts["contrastive"] = float(contrastive.detach())
            total = total + contrastive
        parts["loss"] = float(total.detach())
        return total, parts


def _distinct_batch(texts: Sequence[str], size: int, gen: np.random.Generator) -> list[int]:
    """Indices of up to ``size`` samples with distinct texts (a repeated text would be its own negative)."""
    seen: set[str] = set()
    out: list[int] = []
    for i in gen.permutation(len(texts)):
        if texts[i] not in seen:
            seen.add(texts[i])
            out.append(int(i))
            if len(out) == size:
                break
    return out


def _kind_batch(texts: Sequence[str], members: Sequence[int], size: int, gen: np.random.Generator) -> list[int]:
    """Up to ``size`` of ``members`` (indices into ``texts``) with distinct texts."""
    picked = _distinct_batch([texts[i] for i in members], size, gen)
    return [int(members[j]) for j in picked]


def contrastable_kinds(texts: Sequence[str], kinds: Sequence[str]) -> dict[str, list[int]]:
    """``{kind: image indices}`` of the kinds that can fill a hard-negative batch: those with at least two
    distinct texts (sorted by kind)."""
    by_kind: dict[str, list[int]] = {}
    for i, kind in enumerate(kinds):
        by_kind.setdefault(kind, []).append(i)
    return {k: m for k, m in sorted(by_kind.items()) if len({texts[i] for i in m}) > 1}


def pretrain_vision(tower: nn.Module, pixel_values: torch.Tensor, texts: Sequence[str], *, steps: int, lr: float,
                    batch: int, seed: int = 0, kinds: Sequence[str] | None = None, hard_negatives: float = 0.0,
                    on_step: Callable[[int, dict[str, float]], None] | None = None,
                    ) -> list[dict[str, float]]:
    """Train ``tower`` (in place) on pre-processed images and their texts; returns each step's losses.
    The tower is left frozen and in eval mode, as the model uses it.

    With ``kinds`` (one per image, e.g. source/modality/body part) and ``hard_negatives`` > 0, that fraction
    of the steps draws its whole batch from one kind (picked in proportion to its images): its negatives
    then share the scan kind, so the contrast must come from what differs within it (a lesion, its side),
    not from the modality or organ that a random batch already separates."""
    if len(pixel_values) != len(texts) or len(texts) < 2:
        raise ValueError(f"pretrain_vision: need >= 2 images with one text each, got {len(pixel_values)} images "
                         f"and {len(texts)} texts")
    if not 0.0 <= hard_negatives <= 1.0:
        raise ValueError(f"pretrain_vision: hard_negatives must be in [0, 1], got {hard_negatives}")
    if hard_negatives and (kinds is None or len(kinds) != len(texts)):
        raise ValueError("pretrain_vision: hard_negatives needs one kind per image")
    by_kind = contrastable_kinds(texts, kinds) if hard_negatives else {}
    if hard_negatives and not by_kind:
        raise ValueError("pretrain_vision: hard_negatives needs a kind of image with at least two distinct texts; "
                         f"every one of the {len(set(kinds or ()))} kinds has a single text")
    hard = list(by_kind)
    weights = np.array([len(by_kind[k]) for k in hard], dtype=float)
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    hard_gen = np.random.default_rng([seed, 1])  # a stream of its own: hard_negatives=0 keeps the plain batches
    trainer = VisionPretrainer(tower)
    tower.requires_grad_(True)
    tower.train()
    opt = torch.optim.AdamW(trainer.parameters(), lr=lr, weight_decay=0.0)
    history: list[dict[str, float]] = []
    for step in range(steps):
        is_hard = bool(hard) and hard_gen.random() < hard_negatives
        if is_hard:
            kind = hard[int(hard_gen.choice(len(hard), p=weights / weights.sum()))]
            idx = _kind_batch(texts, by_kind[kind], batch, hard_gen)
        else:
            idx = _distinct_batch(texts, batch, gen)
        total, parts = trainer.loss(pixel_values[idx], [texts[i] for i in idx])
        if hard_negatives:  # what the batch was: the summary counts the hard steps and their sizes
            parts = {**parts, "hard_batch": float(is_hard), "batch_size": float(len(idx))}
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        history.append(parts)
        if on_step is not None:
            on_step(step + 1, parts)
    tower.requires_grad_(False)
    tower.eval()
    return history


def _sample_text(rec: Any) -> str:
    """Question and answer (or instruction and caption/report) of a sample, image placeholder removed."""
    from vlhealth.schema import IMAGE_TOKEN

    return " ".join(str(t.get("value", "")).replace(IMAGE_TOKEN, " ") for t in rec.conversations
                    if "<target_image>" not in str(t.get("value", ""))).strip()


def image_kind(folder: os.PathLike | str, rec: Any) -> str:
    """What a hard-negative batch has in common: the shard folder, modality and body part of an image."""
    return "/".join((Path(folder).name, str(rec.modality or "?").lower(), str(rec.body_part or "?").lower()))


def training_images(shards: Sequence[os.PathLike | str], split: str = "train", limit: int = 4000,
                    kinds: list[str] | None = None) -> tuple[list[Any], list[str]]:
    """Input images of ``split`` from ``shards`` and one text per image: every distinct text of the samples
    that show it (its questions and answers, or its instruction), joined in shard order, as a CLIP caption
    describes an image. One QA pair per image would leave a lesion's presence to a lone "yes"/"no" that
    many other images share; the joined text names the organ, modality, lesion count and side together. A ``kinds`` list is filled
    with each image's :func:`image_kind` (that of its first sample)."""
    from healthgpt.model.vision import decode_input_image
    from healthgpt.training.data import held_out
    from vlhealth.shards import iter_samples

    images: list[Any] = []
    parts: list[list[str]] = []
    index: dict[tuple[int, int], int] = {}
    for folder in shards:
        for sample in iter_samples(folder):
            rec = sample.record
            if rec.split != split or sample.input_image is None:
                continue
            if split == "train" and held_out(rec.group, sample.key):
                continue  # the held-out groups validate every stage: no training reads them
            data = sample.input_image
            raw = data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()
            digest = (zlib.crc32(raw), len(raw))
            text = _sample_text(rec)
            i = index.get(digest)
            if i is None:
                if len(images) >= limit:
                    continue
                index[digest] = i = len(images)
                images.append(decode_input_image(data, f"{Path(folder).name}:{sample.key}")
                              if isinstance(data, bytes) else data)
                parts.append([])
                if kinds is not None:
                    kinds.append(image_kind(folder, rec))
            if text and text not in parts[i]:
                parts[i].append(text)
    return images, [" ".join(p) for p in parts]


def pretrain_vision_command(
    shards: Annotated[list[Path], typer.Option("--shards", help="Shard folders whose input images (and texts) "
                                                              "the tower learns from (train split).")],
    out: Annotated[Path, typer.Option(help="Output folder (vision_tower.safetensors, vision_config.json).")],
    preset: Annotated[str, typer.Option(help="Preset whose tower is trained (tiny, smollm2-135m).")] = "tiny",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 300,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (constant).")] = 3e-3,
    batch: Annotated[int, typer.Option(help="Images per step (distinct texts).")] = 32,
    hard_negatives: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Fraction of steps whose batch comes from one kind of image (shard folder, modality, body part): "
             "negatives of the same scan kind make the contrast read what differs within it, such as a "
             "lesion. 0: every batch is drawn from all images.")] = 0.0,
    limit: Annotated[int, typer.Option(help="At most this many images are read.")] = 4000,
    seed: Annotated[int, typer.Option(help="Seed (initial tower and batch order).")] = 0,
    model_set: Annotated[list[str] | None, typer.Option(
        "--model-set", help="Model preset override key=value (image_size=64, patch_size=4, ...); give healthgpt "
                            "train and eval the same plus vision_path=OUT.")] = None,
) -> None:
    """Pre-train a small preset's vision tower (pixels at the concrete level, image-text contrast at the
    abstract level); it is then frozen, as CLIP is in the paper.

    Example:

        healthgpt pretrain-vision --shards shards/synthrad --shards shards/vqa_rad --out runs/vision \\
            --model-set image_size=64 --model-set patch_size=4
        healthgpt train --preset tiny --stage 1 --task generation --shards shards/synthrad --out runs/s1g \\
            --model-set image_size=64 --model-set patch_size=4 --model-set vision_path=runs/vision
    """
    from rich.console import Console

    from healthgpt.model.presets import build_model
    from healthgpt.training.pretrain_text import step_log
    from healthgpt.training.train import _parse_sets

    console = Console(stderr=True)
    overrides = _parse_sets(model_set or [], "--model-set")
    for key in ("seed", "vision_path"):
        if key in overrides:
            raise typer.BadParameter(f"--model-set {key}= is not taken here (the seed is --seed; the tower is "
                                     "made, not loaded)", param_hint="--model-set")
    if preset not in ("tiny", "smollm2-135m"):
        raise typer.BadParameter(f"{preset!r} has a pre-trained CLIP tower already; pretrain-vision is for the "
                                 "small presets (tiny, smollm2-135m)", param_hint="--preset")
    model, _ = build_model(preset, seed=seed, **overrides)
    kinds: list[str] = []
    images, texts = training_images(shards, limit=limit, kinds=kinds)
    if len(images) < 2:
        raise typer.BadParameter("fewer than 2 train images in " + ", ".join(p.name for p in shards),
                                 param_hint="--shards")
    if hard_negatives and not contrastable_kinds(texts, kinds):
        raise typer.BadParameter("no kind of image (shard folder, modality, body part) in "
                                 + ", ".join(p.name for p in shards) + " has two distinct texts to contrast",
                                 param_hint="--hard-negatives")
    pixel_values = model.vision.preprocess(images)
    out.mkdir(parents=True, exist_ok=True)
    with step_log(out, "pretrain-vision", steps, console) as log:
        history = pretrain_vision(model.vision.tower, pixel_values, texts, steps=steps, lr=lr, batch=batch,
                                  seed=seed, kinds=kinds, hard_negatives=hard_negatives, on_step=log)
    save_tower(model.vision.tower, out)
    k = min(10, len(history))
    mean = {key: (sum(h[key] for h in history[:k]) / k, sum(h[key] for h in history[-k:]) / k)
            for key in history[0] if key not in ("hard_batch", "batch_size")}
    hard_steps = [h["batch_size"] for h in history if h.get("hard_batch")]
    summary = {"preset": preset, "model_set": overrides, "steps": steps, "images": len(images), "lr": lr,
               "batch": batch, "hard_negatives": hard_negatives,
               "hard_negative_steps": len(hard_steps),
               "hard_batch_mean_size": sum(hard_steps) / len(hard_steps) if hard_steps else None,
               "image_kinds": dict(sorted(Counter(kinds).items())), "seed": seed,
               "shards": [p.name for p in shards],
               "objectives": {"pixel": "concrete-level patch tokens -> their grey levels (MSE)",
                              "contrastive": "mean abstract-level token <-> text (symmetric InfoNCE)"},
               "first": {k_: v[0] for k_, v in mean.items()}, "last": {k_: v[1] for k_, v in mean.items()}}
    (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n", "utf-8")
    console.print(f"vision pre-training: {len(images)} images, " + ", ".join(
        f"{key} {a:.3f} -> {b:.3f}" for key, (a, b) in mean.items()) + f" (mean of first/last {k} of {steps} steps); "
        f"tower: {out.name}/{TOWER_FILE}; use it with --model-set vision_path={out.name}")
