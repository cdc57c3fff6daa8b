"""Brief text pre-training of a small LLM (``healthgpt pretrain-text``): a base model that knows some text.

Stage 1 assumes a *pre-trained* LLM: it trains only the adapters in front of a frozen language
model, so it can align images only to what that model already reads and writes. The real presets
load a pre-trained LLM; the random ``tiny`` preset has nothing to align to (its loss sits near
ln V whatever the adapter does: the final RMSNorm fixes the hidden norm and the random output rows
are short). This step trains the LLM itself (``word_embeddings``, ``lm_head``, ``llm_base``: every
LLM weight; no adapter, no image) on the text of conversations, with the usual labels (the
assistant turns). An ``<image>`` placeholder is replaced by ``image_text`` (default: nothing), so
image questions become text-only ones.

The output is an ordinary trainable-weights checkpoint (``OUT/final/trainable.safetensors``), so
``healthgpt train --stage 1 ... --init OUT`` starts from it and every later stage carries it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

__all__ = ["TEXT_GROUPS", "pretrain_text", "pretrain_text_command", "step_log", "text_encodings"]

# the LLM's own weights: what a base model's pre-training trains
TEXT_GROUPS = ("word_embeddings", "lm_head", "llm_base")


def pretrain_text(model: Any, encodings: Sequence[Mapping[str, Any]], *, steps: int, lr: float, batch: int,
                  seed: int = 0, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train every LLM weight of ``model`` on ``encodings`` (``encode_conversation`` outputs without images).

    Batches of ``batch`` encodings are drawn with replacement from a generator seeded by ``seed``
    (deterministic); AdamW at a constant ``lr``. The model is left frozen and in eval mode.
    Returns the loss of every step.
    """
    if not encodings:
        raise ValueError("pretrain_text: no text to train on")
    gen = torch.Generator().manual_seed(seed)
    params = model.set_trainable(*TEXT_GROUPS)
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses: list[float] = []
    for step in range(steps):
        idx = torch.randint(len(encodings), (batch,), generator=gen).tolist()
        out = model(**model.collate([encodings[k] for k in idx]), task="comprehension", return_logits=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
        if on_step is not None:
            on_step(step + 1, losses[-1])
    model.requires_grad_(False)
    model.eval()
    return losses


def text_encodings(model: Any, shards: Sequence[os.PathLike | str], *, split: str = "train", limit: int = 20000,
                   image_text: str = "", max_len: int = 512) -> list[dict[str, Any]]:
    """Encoded comprehension conversations of ``split`` from ``shards``, ``<image>`` replaced by ``image_text``."""
    from healthgpt.model.conversation import encode_conversation
    from healthgpt.training.data import held_out
    from vlhealth.schema import IMAGE_TOKEN
    from vlhealth.shards import iter_samples

    out: list[dict[str, Any]] = []
    for folder in shards:
        for sample in iter_samples(folder):
            rec = sample.record
            if rec.task != "comprehension" or rec.split != split:
                continue
            if split == "train" and held_out(rec.group, sample.key):
                continue  # the held-out groups validate every stage: no training reads them
            conv = [{**turn, "value": str(turn["value"]).replace(IMAGE_TOKEN, image_text).strip()}
                    for turn in rec.conversations]
            out.append(encode_conversation(model.tokenizer, conv, template=model.template, max_len=max_len))
            if len(out) >= limit:
                return out
    return out


@contextlib.contextmanager
def step_log(out: Path, name: str, steps: int, console: Any) -> Iterator[Callable[[int, dict[str, float]], None]]:
    """A pre-training's step log: ``log(step, record)`` appends ``{"step", **record}`` to a fresh
    ``OUT/metrics.jsonl`` and moves the progress bar (which shows ``record["loss"]``)."""
    from vlhealth.progress import progress_bar

    metrics = out / "metrics.jsonl"
    metrics.write_text("", "utf-8")
    with progress_bar(name, "loss {task.fields[loss]:.4f}", console=console, enabled=console.is_terminal) as progress:
        bar = progress.add_task(name, total=steps, loss=float("nan"))

        def log(step: int, record: dict[str, float]) -> None:
            progress.update(bar, completed=step, loss=record["loss"])
            with open(metrics, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, **record}) + "\n")

        yield log


def pretrain_text_command(
    shards: Annotated[list[Path], typer.Option("--shards", help="Shard folders whose conversations are the text "
                                                              "(comprehension samples; images are dropped).")],
    out: Annotated[Path, typer.Option(help="Output folder (final/trainable.safetensors, metrics.jsonl).")],
    preset: Annotated[str, typer.Option(help="Model preset (tiny; real presets are pre-trained already).")] = "tiny",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 200,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (constant).")] = 3e-3,
    batch: Annotated[int, typer.Option(help="Conversations per step.")] = 16,
    split: Annotated[str, typer.Option(help="Split whose conversations are used.")] = "train",
    seed: Annotated[int, typer.Option(help="Seed (model and data order).")] = 0,
    model_set: Annotated[list[str] | None, typer.Option(
        "--model-set", help="Model preset override key=value (tiny: hidden=128, layers=4, ...); give healthgpt "
                            "train and eval the same.")] = None,
) -> None:
    """Pre-train the LLM of a small preset briefly on text, so stage 1 has a language model to align to.

    Example:

        healthgpt pretrain-text --shards shards/llava_instruct_text --shards shards/vqa_rad --out runs/text-lm
        healthgpt train --preset tiny --stage 1 --task comprehension --shards shards/vqa_rad --init runs/text-lm \\
            --out runs/stage1-comprehension
    """
    from rich.console import Console

    from healthgpt.model.presets import build_model
    from healthgpt.model.weights import save_trainable
    from healthgpt.training.train import _parse_sets
    from vlhealth.shards import require_shards

    require_shards(shards, "--shards")
    console = Console(stderr=True)
    overrides = _parse_sets(model_set or [], "--model-set")
    if "seed" in overrides:
        raise typer.BadParameter("give the seed with --seed, not --model-set seed=...", param_hint="--model-set")
    model, _ = build_model(preset, seed=seed, **overrides)
    encodings = text_encodings(model, shards, split=split)
    if not encodings:
        raise typer.BadParameter(f"no {split!r} comprehension conversations in "
                                 + ", ".join(str(p) for p in shards), param_hint="--shards")
    out.mkdir(parents=True, exist_ok=True)
    with step_log(out, "pretrain-text", steps, console) as log:
        losses = pretrain_text(model, encodings, steps=steps, lr=lr, batch=batch, seed=seed,
                               on_step=lambda step, loss: log(step, {"loss": loss}))
    final = out / "final"
    final.mkdir(exist_ok=True)
    save_trainable(model, final / "trainable.safetensors", TEXT_GROUPS)
    k = min(10, len(losses))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    summary = {"preset": preset, "model_set": overrides, "steps": steps, "conversations": len(encodings), "lr": lr, "batch": batch,
               "groups": list(TEXT_GROUPS), "loss_first": first, "loss_last": last,
               "shards": [p.name for p in shards]}
    (final / "pretrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n", "utf-8")
    console.print(f"text pre-training: {len(encodings)} conversations, loss {first:.3f} -> {last:.3f} "
                  f"(mean of first/last {k} of {steps} steps, ln V = {math.log(len(model.tokenizer)):.2f}); "
                  f"weights: {out.name}/final/trainable.safetensors")
