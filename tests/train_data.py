"""Small shard folders for the data/trainer tests (imported explicitly, not a pytest plugin)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tests.helpers import generation_sample, vqa_sample
from vlhealth.schema import Record, Sample
from vlhealth.shards import ShardWriter, write_index


def learnable_generation_sample(i: int, split: str = "train", pattern: int = 0) -> Sample:
    """A generation sample whose VQ codes follow a simple pattern (learnable, unlike random codes)."""
    rng = np.random.default_rng(2000 + i)
    rec = Record(
        task="generation", subtask="ct2mri", source="toy", split=split,
        conversations=[{"from": "human", "value": "<image>\nConvert this CT to MRI."},
                       {"from": "gpt", "value": "<target_image>"}],
        group=f"p{i % 3}", license="CC0",
    )
    codes = (np.arange(1024) // 128 + 11 * pattern + 3 * (i % 2)).astype(np.int16)
    return Sample(key=f"toy-lgen-{pattern}-{i:05d}", record=rec,
                  input_image=rng.integers(0, 255, (48, 48), dtype=np.uint8), target_vq=codes)


def brightness_sample(i: int, split: str = "train") -> Sample:
    """Closed VQA whose answer depends on the image: bright -> yes, dark -> no."""
    rng = np.random.default_rng(3000 + i)
    bright = i % 2 == 0
    base = 200 if bright else 40
    img = np.clip(base + rng.integers(-20, 20, (32, 32)), 0, 255).astype(np.uint8)
    rec = Record(
        task="comprehension", subtask="vqa", source="bright", split=split,
        conversations=[{"from": "human", "value": "<image>\nIs the image bright?"},
                       {"from": "gpt", "value": "yes" if bright else "no"}],
        group=f"g{i}", license="CC0", answer_type="closed",
    )
    return Sample(key=f"bright-{i:05d}", record=rec, input_image=img)


def darkness_sample(i: int, split: str = "train") -> Sample:
    """The brightness images with a new instruction: "Is the image dark?" (answers inverted)."""
    s = brightness_sample(i, split)
    bright = s.record.conversations[1]["value"] == "yes"
    s.record.conversations = [{"from": "human", "value": "<image>\nIs the image dark?"},
                              {"from": "gpt", "value": "no" if bright else "yes"}]
    return Sample(key=f"dark-{i:05d}", record=s.record, input_image=s.input_image)


def write_shards(out: Path, samples: list[Sample], prefix: str, per_shard: int) -> Path:
    with ShardWriter(out, prefix=prefix, max_count=per_shard) as w:
        for s in samples:
            w.write(s)
    write_index(out, w.shards)
    return out


def make_all(root: Path) -> dict[str, Path]:
    """comp (closed 'yes' VQA + 4 val samples), bright, gen (learnable codes), gen_png (helpers'
    generation samples with target.png), in shards of a few samples each."""
    return {
        "comp": write_shards(root / "comp", [vqa_sample(i) for i in range(24)]
                             + [vqa_sample(100 + i, split="val") for i in range(4)], "comp", 7),
        "bright": write_shards(root / "bright", [brightness_sample(i) for i in range(24)], "bright", 6),
        "gen": write_shards(root / "gen", [learnable_generation_sample(i) for i in range(12)], "gen", 3),
        "gen_png": write_shards(root / "gen_png", [generation_sample(i) for i in range(6)], "genpng", 2),
    }


def brightness_description(bright: bool, image_tokens: int) -> str:
    """The text a tiny LM is pre-trained to read where stage 1 later puts the image: one
    character per image position ('b' bright, 'd' dark)."""
    return ("b" if bright else "d") * image_tokens


def pretrain_tiny_lm(model: Any, steps: int = 60, lr: float = 1e-2, batch: int = 8, seed: int = 0) -> dict[str, Any]:
    """Make the random ``tiny`` LLM a (very small) *pre-trained* language model, as stage 1 assumes.

    Why: stage 1 comprehension trains only the abstract adapter in front of a frozen LLM. On the
    random tiny LLM the loss sits at ~ln(V) = 9.04 and no adapter can move it far: the final
    RMSNorm fixes the hidden norm at sqrt(d) and the random ``lm_head`` rows have norm ~0.16, so a
    token's logit can be raised by at most ~1.3 nats (best reachable loss ~7.7, 85% of the start).
    A real LLM has learned logits; here the LLM (all its weights; no adapter, no image) is trained
    on the text form of the brightness task, where a 16-character description stands where the
    image will be (``brightness_description``). Stage 1 then has to *align*: map bright/dark CLIP
    features to embeddings that the LLM reads like those characters — it cannot guess the
    yes/no answer from the text alone (the image-blind floor is ~ln 2 per answer).

    Deterministic for a given ``seed``; returns the pre-trained LLM state (``model.llm`` keys).
    """
    from healthgpt.model.conversation import encode_conversation
    from healthgpt.training.pretrain_text import pretrain_text

    image_tokens = model.vision.num_patches
    encs = []
    for i in range(24):
        conv = brightness_sample(i).record.conversations
        yes = conv[1]["value"] == "yes"
        human = conv[0]["value"].replace("<image>", brightness_description(yes, image_tokens))
        encs.append(encode_conversation(model.tokenizer, [{"from": "human", "value": human}, conv[1]],
                                        template=model.template))
    pretrain_text(model, encs, steps=steps, lr=lr, batch=batch, seed=seed)
    return {k: v.detach().clone() for k, v in model.llm.state_dict().items()}
