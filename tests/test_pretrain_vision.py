"""`healthgpt pretrain-vision`: the tower learns, and the presets load it as their tower."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from healthgpt.cli import app
from healthgpt.model.presets import build_model
from healthgpt.model.vision import TOWER_FILE, load_tower
from tests.helpers import vqa_sample
from tests.train_data import brightness_sample, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory):
    # images of flat 4x4-pixel blocks at random grey levels (a patch of the 32 px / patch-4 tower is one
    # level), beside the brightness images; each with its own question text
    root = tmp_path_factory.mktemp("pv")
    rng = np.random.default_rng(0)
    blocks = [np.kron(rng.integers(0, 256, (8, 8)), np.ones((4, 4))).astype(np.uint8) for _ in range(24)]
    samples = [vqa_sample(i, image=img) for i, img in enumerate(blocks)] + [brightness_sample(i) for i in range(8)]
    return write_shards(root / "mixed", samples, "mixed", 8)


def test_pretrain_vision_learns_and_its_tower_loads_as_the_presets(tmp_path, shards, one_thread) -> None:
    out = tmp_path / "vision"
    res = CliRunner().invoke(app, ["pretrain-vision", "--shards", str(shards), "--out", str(out), "--steps", "150",
                                   "--batch", "8", "--model-set", "image_size=32", "--model-set", "patch_size=4"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "pretrain_summary.json").read_text())
    assert summary["last"]["pixel"] < 0.5 * summary["first"]["pixel"]
    assert summary["last"]["contrastive"] < summary["first"]["contrastive"]
    assert (out / TOWER_FILE).is_file()

    model, _ = build_model("tiny", vision_path=str(out))
    assert model.vision.image_size == 32 and model.vision.num_patches == 64
    saved = load_tower(out).state_dict()
    for key, value in model.vision.tower.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert not any(p.requires_grad for p in model.vision.tower.parameters())  # frozen, as CLIP is



def test_vision_path_refuses_a_different_size(tmp_path, shards, one_thread) -> None:
    out = tmp_path / "vision"
    res = CliRunner().invoke(app, ["pretrain-vision", "--shards", str(shards), "--out", str(out), "--steps", "2",
                                   "--batch", "4", "--model-set", "image_size=32", "--model-set", "patch_size=4"])
    assert res.exit_code == 0, res.output
    with pytest.raises(ValueError, match="image_size=64 but the tower in vision_path has image_size=32"):
        build_model("tiny", vision_path=str(out), image_size=64)
    with pytest.raises(ValueError, match="vision_hidden=64 but the tower in vision_path has vision_hidden=32"):
        build_model("tiny", vision_path=str(out), vision_hidden=64)
    wide, _ = build_model("tiny", vision_hidden=48, vision_layers=2)  # the random tower's width and depth
    assert (wide.vision.tower.config.hidden_size, wide.vision.tower.config.num_hidden_layers) == (48, 2)
    assert wide.vision.abstract_adapter[0].in_features == 48
    with pytest.raises(FileNotFoundError, match="pretrain-vision"):
        build_model("tiny", vision_path=str(tmp_path / "nothing"))


def test_each_image_is_paired_with_all_of_its_texts(tmp_path) -> None:
    """One entry per distinct image, its text every distinct question and answer that shows it, in shard order
    (a CLIP caption), so "yes" to a lesion question is never an image's whole description."""
    from dataclasses import replace

    from PIL import Image

    from healthgpt.training.data import held_out
    from healthgpt.training.pretrain_vision import training_images

    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, (32, 32), dtype=np.uint8) for _ in range(3)]
    samples, want = [], {}
    for i in range(12):  # image i % 3, question i % 6: every image has a repeated and a distinct question
        s = replace(vqa_sample(i % 6, image=images[i % 3]), key=f"toy-{i:05d}")
        samples.append(s)
        if not held_out(s.record.group, s.key):
            parts = want.setdefault(i % 3, [])
            if f"Question {i % 6}? yes" not in parts:
                parts.append(f"Question {i % 6}? yes")
    root = write_shards(tmp_path / "s", samples, "s", 4)
    got_images, texts = training_images([root])
    assert len(got_images) == len(texts) == len(want)
    for img, text in zip(got_images, texts, strict=True):
        grey = np.asarray(img.convert("L") if isinstance(img, Image.Image) else img)
        grey = grey[..., 0] if grey.ndim == 3 else grey
        idx = next(k for k, im in enumerate(images) if np.array_equal(grey, im))
        assert text == " ".join(want[idx])
    assert any(len(p) > 1 for p in want.values())
    assert len(training_images([root], limit=1)[0]) == 1


def test_hard_negative_batches_come_from_one_kind_and_leave_plain_batches_alone(monkeypatch, one_thread) -> None:
    """--hard-negatives F: about F of the batches hold one kind of image only (their negatives share the scan
    kind); F = 0 draws exactly the batches of a run without kinds."""
    import healthgpt.training.pretrain_vision as pv

    batches: list[list[int]] = []

    def spy(self, pixel_values, texts):  # record which images each step saw, then a loss that trains nothing
        batches.append(list(texts))
        return (self.pixel_head.weight.sum() * 0.0), {"loss": 0.0}

    monkeypatch.setattr(pv.VisionPretrainer, "loss", spy)
    model, _ = build_model("tiny", image_size=32, patch_size=4)
    n = 24
    pixels = torch.zeros(n, 3, 32, 32)
    texts = [f"image {i}" for i in range(n)]
    kinds = [("ct" if i % 3 else "mri") + "/brain" for i in range(n)]

    def run(**kw):
        batches.clear()
        pv.pretrain_vision(model.vision.tower, pixels, texts, steps=40, lr=1e-3, batch=4, seed=5, **kw)
        return [list(b) for b in batches]

    plain = run()
    assert run(kinds=kinds, hard_negatives=0.0) == plain
    # ... which are the batches the sampler draws from the seed alone (as before hard negatives existed)
    rng = np.random.default_rng(5)
    assert plain == [[texts[i] for i in pv._distinct_batch(texts, 4, rng)] for _ in range(40)]
    kind_of = dict(zip(texts, kinds, strict=True))
    mixed = sum(len({kind_of[t] for t in b}) > 1 for b in plain)
    assert mixed > 30  # random batches mix the kinds
    hard = run(kinds=kinds, hard_negatives=1.0)
    assert all(len({kind_of[t] for t in b}) == 1 and len(set(b)) == len(b) for b in hard)
    assert {kind_of[b[0]] for b in hard} == {"ct/brain", "mri/brain"}
    half = run(kinds=kinds, hard_negatives=0.5)
    single = sum(len({kind_of[t] for t in b}) == 1 for b in half)
    assert 10 <= single <= 32
    with pytest.raises(ValueError, match="one kind per image"):
        pv.pretrain_vision(model.vision.tower, pixels, texts, steps=1, lr=1e-3, batch=4, hard_negatives=0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        pv.pretrain_vision(model.vision.tower, pixels, texts, steps=1, lr=1e-3, batch=4, kinds=kinds,
                           hard_negatives=1.5)
    one_text = ["same"] * n  # every kind has one text only: nothing to contrast within a kind
    with pytest.raises(ValueError, match="two distinct texts"):
        pv.pretrain_vision(model.vision.tower, pixels, one_text, steps=1, lr=1e-3, batch=4, kinds=kinds,
                           hard_negatives=0.5)
    history = pv.pretrain_vision(model.vision.tower, pixels, texts, steps=20, lr=1e-3, batch=4, seed=5,
                                 kinds=kinds, hard_negatives=0.5)
    assert {h["batch_size"] for h in history} == {4.0} and 0 < sum(h["hard_batch"] for h in history) < 20
