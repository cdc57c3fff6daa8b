"""Model and trainer options the paper's ablations need: the visual feature level per task (Figure 6),
one plugin shared by both tasks (Figure 2), ``--groups`` (Table 5's mixed training) and ``--model-set``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from healthgpt.cli import app
from healthgpt.model.presets import build_model
from healthgpt.model.weights import CheckpointError, load_trainable, save_trainable
from tests.train_data import make_all


def _pixels(model) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 3, model.vision.image_size, model.vision.image_size)


def test_feature_level_per_task_can_be_swapped() -> None:
    default, _ = build_model("tiny", seed=0)
    swapped, _ = build_model("tiny", seed=0, comprehension_features="concrete", generation_features="abstract")
    assert default.vision.feature_levels == {"comprehension": "abstract", "generation": "concrete"}
    x = _pixels(default)
    with torch.no_grad():
        abstract = default.vision.patch_features(x, "comprehension")
        concrete = default.vision.patch_features(x, "generation")
        assert not torch.allclose(abstract, concrete)
        # the same tower weights (same seed): swapping the levels swaps the features each task reads
        assert torch.equal(swapped.vision.patch_features(x, "comprehension"), concrete)
        assert torch.equal(swapped.vision.patch_features(x, "generation"), abstract)
        # each task keeps its own adapter: comprehension still goes through abstract_adapter
        assert torch.equal(swapped.vision.features(x, "comprehension"), swapped.vision.abstract_adapter(concrete))
    with pytest.raises(ValueError, match="feature_levels"):
        build_model("tiny", comprehension_features="middle")


def test_checkpoint_of_other_feature_levels_is_refused(tmp_path: Path) -> None:
    swapped, _ = build_model("tiny", seed=0, comprehension_features="concrete")
    path = tmp_path / "w.safetensors"
    save_trainable(swapped, path, ["abstract_adapter"])
    default, _ = build_model("tiny", seed=0)
    with pytest.raises(CheckpointError, match="feature levels"):
        load_trainable(default, path)
    again, _ = build_model("tiny", seed=0, comprehension_features="concrete")
    assert load_trainable(again, path)


def test_shared_plugin_serves_both_tasks() -> None:
    shared, _ = build_model("tiny", seed=0, variant="lora", shared_plugin=True)
    separate, _ = build_model("tiny", seed=0, variant="lora")
    groups = shared.parameter_groups()
    assert groups["comprehension_plugin"] and not groups["generation_plugin"]
    assert shared.adapters["generation"].share == "comprehension"
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    for model in (shared, separate):
        with torch.no_grad():
            for p in model.parameter_groups()["comprehension_plugin"] + model.parameter_groups()["generation_plugin"]:
                p.normal_(0, 0.5)
    with torch.no_grad():
        a = shared(ids, task="comprehension").logits
        b = shared(ids, task="generation").logits
        c = separate(ids, task="comprehension").logits
        d = separate(ids, task="generation").logits
    assert torch.equal(a, b)  # one adapter for both tasks
    assert not torch.allclose(c, d)  # two plugins: the tasks differ
    # the plain configuration is saved as before (checkpoints without `share` still compare equal)
    assert "share" not in separate.adapters["generation"].to_dict()


def test_train_cli_takes_model_overrides_and_groups(tmp_path: Path) -> None:
    shards = make_all(tmp_path / "shards")
    out = tmp_path / "run"
    groups = "abstract_adapter,comprehension_plugin,generation_plugin,new_token_rows"
    res = CliRunner().invoke(app, [
        "train", "--preset", "tiny", "--stage", "3", "--task", "mixed", "--shards", str(shards["comp"]),
        "--shards", str(shards["gen"]), "--out", str(out), "--steps", "2", "--global-batch", "2", "--micro-batch", "2",
        "--model-set", "variant=moelora", "--model-set", "experts=2", "--groups", groups, "--no-progress",
    ])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "final" / "train_summary.json").read_text("utf-8"))
    assert summary["groups"] == groups.split(",")
    assert summary["model_overrides"] == {"variant": "moelora", "experts": 2}
    assert set(summary["trainable"]) == set(groups.split(","))
    # the weights carry the MoELoRA configuration: a default model refuses them, the same overrides load them
    with pytest.raises(CheckpointError, match="adapter configuration"):
        load_trainable(build_model("tiny")[0], out / "final" / "trainable.safetensors")
    assert load_trainable(build_model("tiny", variant="moelora", experts=2)[0], out / "final" / "trainable.safetensors")
    bad = CliRunner().invoke(app, [
        "train", "--preset", "tiny", "--stage", "3", "--task", "mixed", "--shards", str(shards["comp"]),
        "--out", str(tmp_path / "bad"), "--steps", "1", "--model-set", "colour=blue", "--no-progress",
    ])
    assert bad.exit_code == 2 and "colour" in bad.output
