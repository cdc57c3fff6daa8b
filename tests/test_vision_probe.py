"""benchmarks/vision_probe.py: the rows it probes and the 'answer state' view (what the trained model answers from)."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from healthgpt.model.conversation import encode_prompt
from healthgpt.model.presets import build_model
from tests.helpers import vqa_sample
from tests.train_data import write_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vp():
    spec = importlib.util.spec_from_file_location("vision_probe", ROOT / "benchmarks" / "vision_probe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["vision_probe"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("vision_probe", None)


def test_answer_state_is_the_state_the_first_answer_token_comes_from(vp, tmp_path, one_thread) -> None:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(12):  # bright or dark images; the answer follows the brightness
        bright = i % 2 == 0
        img = rng.integers(150, 255, (32, 32)) if bright else rng.integers(0, 100, (32, 32))
        s = vqa_sample(i, split="train" if i < 8 else "test", image=img.astype(np.uint8))
        conv = [{"from": "human", "value": "<image>\nIs this image bright?"},
                {"from": "gpt", "value": "yes" if bright else "no"}]
        samples.append(replace(s, record=replace(s.record, conversations=conv)))
    folder = write_shards(tmp_path / "s", samples, "toy", 4)
    data = vp.collect([str(folder)], {"bright": "Is this image bright"})
    rows = data["bright"]
    assert len(rows["train"]) == 8 and len(rows["test"]) == 4
    assert {a for _, a, _ in rows["train"]} == {"yes", "no"}

    torch.manual_seed(0)
    model, _ = build_model("tiny", image_size=32, patch_size=4)
    model.eval()
    views = vp.features(model, rows["test"], answer_state=True)
    assert set(views) == {"tower", "adapter", "pooled", "answer state"}
    assert views["answer state"].shape == (4, model.llm.config.hidden_size)
    # the head on the answer state gives the token greedy decoding starts the answer with
    for i, (_, _, question) in enumerate(rows["test"]):
        pv = model.vision.preprocess([_pil(rows["test"][i][0])])
        ids = torch.tensor(encode_prompt(model.tokenizer, question, template=model.template))
        first = int(model.generate(ids, pixel_values=pv, max_new_tokens=1)[0, 0])
        assert int(model.lm_head(views["answer state"][i : i + 1]).argmax()) == first
    # ... and it depends on the image: two images give two states
    assert not torch.allclose(views["answer state"][0], views["answer state"][1])


def _pil(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")
