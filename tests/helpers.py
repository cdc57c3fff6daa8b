"""Small sample factories shared by tests (not a pytest plugin: import explicitly)."""

from __future__ import annotations

import numpy as np

from vlhealth.schema import Record, Sample


def vqa_sample(i: int, split: str = "train", answer_type: str = "closed", image: np.ndarray | None = None) -> Sample:
    rng = np.random.default_rng(i)
    img = image if image is not None else rng.integers(0, 255, (32, 32), dtype=np.uint8)
    answer = "yes" if answer_type == "closed" else f"answer {i}"
    rec = Record(
        task="comprehension", subtask="vqa", source="toy", split=split,
        conversations=[{"from": "human", "value": f"<image>\nQuestion {i}?"}, {"from": "gpt", "value": answer}],
        group=f"g{i % 5}", license="CC0", answer_type=answer_type, modality="CT", body_part="head",
        provenance={"file": f"images/{i}.png"},
    )
    return Sample(key=f"toy-{i:05d}", record=rec, input_image=img)


def generation_sample(i: int, split: str = "train") -> Sample:
    rng = np.random.default_rng(1000 + i)
    rec = Record(
        task="generation", subtask="ct2mri", source="toy", split=split,
        conversations=[{"from": "human", "value": "<image>\nConvert this CT to MRI."},
                       {"from": "gpt", "value": "<target_image>"}],
        group=f"p{i % 3}", license="CC-BY-NC-4.0", modality="CT", body_part="brain",
    )
    return Sample(
        key=f"toy-gen-{i:05d}", record=rec,
        input_image=rng.integers(0, 255, (256, 256), dtype=np.uint8),
        target=rng.integers(0, 255, (256, 256), dtype=np.uint8),
        target_vq=rng.integers(0, 8192, 1024).astype(np.int16),
    )
