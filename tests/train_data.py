"""Small shard folders for the data/trainer tests (imported explicitly, not a pytest plugin)."""

from __future__ import annotations

from pathlib import Path

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
