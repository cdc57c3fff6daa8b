"""A smaller VQ grid (16x16 codes), the image placed last in generation prompts, and noisy new rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import vlhealth.builders.synthrad as synthrad

from healthgpt.model.conversation import IMAGE_TOKEN_ID, encode_conversation, image_target_ids, vocab_ids
from healthgpt.model.generation import parse_image_tokens
from healthgpt.model.presets import build_model
from tests.test_builders_generation import write_patient
from vlhealth.build import run_build
from vlhealth.schema import IMAGE_TOKEN, SchemaError, check_vq, image_turn
from vlhealth.shards import iter_samples


class GridVQ:
    """A stand-in VQ with a 16x16 grid (the real tokenizer's grid follows its config; tested in test_vq)."""

    def encode(self, images):
        return (images[:, ::16, ::16, 0].reshape(len(images), -1).astype(np.int16) * 7) % 256

    def describe(self):
        return {"name": "grid16", "random_weights": True}


def test_schema_takes_square_grids_up_to_32x32_only() -> None:
    assert check_vq(np.zeros(256, np.int16)).shape == (256,)
    assert check_vq(np.zeros(1024, np.int16)).shape == (1024,)
    for bad in (np.zeros(300, np.int16), np.zeros(4096, np.int16), np.zeros((16, 16), np.int16)):
        with pytest.raises(SchemaError, match="square grid"):
            check_vq(bad)


def test_image_turn_places_the_image() -> None:
    assert image_turn("Convert.", "first") == f"{IMAGE_TOKEN}\nConvert."
    assert image_turn("Convert.", "last") == f"Convert.\n{IMAGE_TOKEN}"
    with pytest.raises(ValueError, match="image position"):
        image_turn("Convert.", "middle")


def test_synthrad_image_last_keeps_the_output_a_fixed_distance_after_the_image(tmp_path) -> None:
    root = tmp_path / "src"
    for i, pid in enumerate(("1BA001", "1BA002", "1BB003")):
        write_patient(root, "brain", pid, seed=i)
    out = tmp_path / "shards"
    summary = run_build(synthrad, root, out, vq=GridVQ(), options=synthrad.Options(image_position="last", recon="none"))
    assert summary.rejects == 0
    samples = list(iter_samples(out))
    model, tok = build_model("tiny", image_tokens=256)
    gaps = set()
    for s in samples:
        assert s.record.conversations[0]["value"].endswith(f"\n{IMAGE_TOKEN}")
        assert s.target_vq.shape == (256,)
        enc = encode_conversation(tok, s.record.conversations, template=model.template, vq_indices=s.target_vq,
                                  image_tokens=model.vision.num_patches)
        ids = enc["input_ids"].tolist()
        gaps.add(ids.index(vocab_ids(tok).start_index) - ids.index(IMAGE_TOKEN_ID))
        assert ids.count(vocab_ids(tok).end_index) == 1
        assert sum(vocab_ids(tok).is_index(t) for t in ids) == 256
    # whatever the instruction template, <start_index> is the same number of tokens after the image
    assert len(gaps) == 1
    assert len({s.record.conversations[0]["value"] for s in samples}) > 1
    with pytest.raises(ValueError, match="--image-position"):
        run_build(synthrad, root, tmp_path / "bad", vq=GridVQ(), options=synthrad.Options(image_position="middle"))


def test_a_16x16_model_decodes_256_codes() -> None:
    torch.manual_seed(0)
    model, tok = build_model("tiny", image_tokens=256)
    vocab = vocab_ids(tok)
    assert len(image_target_ids(vocab, np.arange(256) % 8)) == 258
    prompt = torch.tensor([[vocab.start_index]])
    codes, reports = model.generate_image_tokens(prompt, constrained=True, n_codes=16)
    assert codes.shape == (1, 256) and reports[0].ok and codes.max() < 16
    codes, rep = parse_image_tokens([vocab.idx_0 + 3] * 300 + [vocab.end_index], vocab, 16, n_tokens=256)
    assert codes.shape == (256,) and rep.truncated == 44
    with pytest.raises(ValueError, match="square grid"):
        build_model("tiny", image_tokens=300)


def test_new_rows_start_at_the_mean_unless_noise_is_asked_for() -> None:
    plain, _ = build_model("tiny")
    assert torch.equal(plain.embed.new, plain.embed.new[:1].expand_as(plain.embed.new))
    noisy, _ = build_model("tiny", new_rows_noise=1.0)
    new, old = noisy.embed.new, noisy.embed.old
    assert not torch.equal(new[0], new[1])
    # centred on the old rows' mean, spread like the old rows
    assert torch.allclose(new.mean(0), old.mean(0), atol=3 * float(old.std()) / new.shape[0] ** 0.5)
    assert abs(float(new.std(0).mean()) / float(old.std(0).mean()) - 1) < 0.1
    assert not torch.equal(noisy.lm_head.new[0], noisy.lm_head.new[1])
