"""`healthgpt pretrain-text`: the tiny LLM learns text, and stage 1 starts from the result with --init."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from typer.testing import CliRunner

from healthgpt.cli import app
from healthgpt.model.presets import build_model
from healthgpt.model.weights import load_trainable, read_metadata, resolve_trainable
from tests.helpers import vqa_sample
from tests.train_data import write_shards


def test_pretrain_text_learns_and_feeds_stage_1(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "qa", [vqa_sample(i, answer_type="open") for i in range(12)]
                          + [vqa_sample(100 + i, split="test") for i in range(3)], "qa", 5)
    out = tmp_path / "text-lm"
    res = CliRunner().invoke(app, ["pretrain-text", "--shards", str(shards), "--out", str(out), "--steps", "25",
                                   "--batch", "4", "--lr", "1e-2"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "final" / "pretrain_summary.json").read_text())
    assert summary["conversations"] == 12  # the train split only
    assert summary["loss_last"] < 0.7 * summary["loss_first"], summary
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 25
    weights = out / "final" / "trainable.safetensors"
    with safe_open(str(weights), framework="pt") as fh:
        assert any(k.startswith("llm.") for k in fh.keys())  # noqa: SIM118
    model, _ = build_model("tiny")
    before = model.lm_head.weight.detach().clone()
    path = resolve_trainable(out)  # what train --init reads from a --out folder
    assert set(read_metadata(path)["groups"]) == {"word_embeddings", "lm_head", "llm_base"}
    load_trainable(model, path)
    assert not model.lm_head.weight.detach().equal(before)
