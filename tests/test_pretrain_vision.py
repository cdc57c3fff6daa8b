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
    with pytest.raises(FileNotFoundError, match="pretrain-vision"):
        build_model("tiny", vision_path=str(tmp_path / "nothing"))
