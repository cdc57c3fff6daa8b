"""Held-out validation loss: it never changes training, it never reads what training reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from healthgpt.training.data import HOLDOUT_EVERY, held_out
from healthgpt.training.train import TrainConfig, train
from tests.helpers import vqa_sample
from tests.train_data import brightness_sample, learnable_generation_sample, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("val_shards")
    return {
        # a source with a val split, and one without (it lends 1 in 20 of its train groups)
        "comp": write_shards(root / "comp", [vqa_sample(i) for i in range(24)]
                             + [vqa_sample(100 + i, split="val") for i in range(6)], "comp", 7),
        "bright": write_shards(root / "bright", [brightness_sample(i) for i in range(60)], "bright", 12),
        "gen": write_shards(root / "gen", [learnable_generation_sample(i) for i in range(12)]
                            + [learnable_generation_sample(50 + i, split="val") for i in range(4)], "gen", 4),
    }


def _cfg(out: Path, shards: list[Path], steps: int, **kw) -> TrainConfig:
    ov = {"steps": steps, "micro_batch": 2, "global_batch": 2, "lr": 1e-2, "adapter_lr": 1e-2, "dropout": 0.1}
    return TrainConfig(preset="tiny", stage=3, task="mixed", shards=[str(s) for s in shards], out=out,
                       overrides=ov, progress=False, **kw)


def test_validation_leaves_the_training_losses_bit_identical(tmp_path, shards, one_thread) -> None:
    # dropout on, so any RNG the validation pass consumed would change every later training step
    data = [shards["comp"], shards["gen"]]
    plain = train(_cfg(tmp_path / "plain", data, 8))
    validated = train(_cfg(tmp_path / "validated", data, 8, val_every=3, val_batches=2))
    assert validated.losses == plain.losses  # exact, not approximate
    recs = [json.loads(x) for x in (tmp_path / "validated" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 3, 6, 8]
    assert set(val[0]["val_loss"]) == {"comprehension", "generation"}
    summary = json.loads((tmp_path / "validated" / "final" / "train_summary.json").read_text())
    assert summary["val_by_task"]["generation"]["first_step"] == 0
    assert summary["val_by_task"]["generation"]["last_step"] == 8
    assert summary["val_sources"]["comprehension"] == ["comp (val)"]
    # the validation loss moved: it is measured on the model as it trains, not cached
    assert val[0]["val_loss"]["generation"] != val[-1]["val_loss"]["generation"]


def test_a_source_without_val_lends_train_groups_that_training_never_reads(tmp_path, shards, one_thread) -> None:
    lent = {s.key for s in (brightness_sample(i) for i in range(60))
            if held_out(s.record.group, s.key)}
    assert 0 < len(lent) < 60 // HOLDOUT_EVERY * 3  # about 1 in 20 (the hash is fixed, so is the count)
    res = train(_cfg(tmp_path / "run", [shards["bright"]], 20, val_every=10, val_batches=1,
                     debug_log_keys=True), )
    trained = set((tmp_path / "run" / "keys-rank0.txt").read_text().split())
    assert len(trained) > 10 and not trained & lent
    summary = json.loads((tmp_path / "run" / "final" / "train_summary.json").read_text())
    assert summary["val_sources"]["comprehension"] == [f"bright (1 in {HOLDOUT_EVERY} train groups)"]
    assert res.step == 20


def test_held_out_is_decided_by_group_not_sample() -> None:
    # every sample of one group falls on the same side
    for group in ("patient-1", "patient-2", "img-77", "x"):
        sides = {held_out(group, f"k{i}") for i in range(10)}
        assert len(sides) == 1
    share = sum(held_out(f"g{i}") for i in range(4000)) / 4000
    assert abs(share - 1 / HOLDOUT_EVERY) < 0.015
