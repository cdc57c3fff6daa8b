"""Stage-2 mixing: balanced, reproducible, independent of input order."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers import generation_sample, vqa_sample
from vlhealth.mix import quotas, write_mix
from vlhealth.shards import ShardWriter, iter_records, list_shards, write_index


def make_folder(out: Path, samples) -> Path:
    with ShardWriter(out, prefix=out.name, max_count=7) as writer:
        for s in samples:
            writer.write(s)
        shards = writer.close()
    write_index(out, shards, source=out.name)
    return out


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("stage1")
    comp = make_folder(root / "comp", [vqa_sample(i, split="test" if i % 10 == 0 else "train") for i in range(40)])
    gen = make_folder(root / "gen", [generation_sample(i) for i in range(25)])
    return [comp, gen]


def digests(folder: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in list_shards(folder)]


def test_quotas() -> None:
    assert quotas(10, 0.5, {"comprehension": 100, "generation": 100}, False)[0] == {"comprehension": 5, "generation": 5}
    take, short = quotas(10, 0.5, {"comprehension": 100, "generation": 2}, False)
    assert take == {"comprehension": 2, "generation": 2} and short == {"comprehension": 3, "generation": 3}
    take, _ = quotas(100, 0.25, {"comprehension": 100, "generation": 30}, False)  # balanced at the asked ratio
    assert take == {"comprehension": 10, "generation": 30}
    assert quotas(10, 0.5, {"comprehension": 100, "generation": 2}, True)[0] == {"comprehension": 8, "generation": 2}


def test_mix_is_balanced_train_only_and_reproducible(stage1: list[Path], tmp_path: Path) -> None:
    a = write_mix(stage1, tmp_path / "a", 30, seed=3)
    assert a.samples == 30 and a.by_task == {"comprehension": 15, "generation": 15}
    records = [r for _k, r, _s in iter_records(tmp_path / "a")]
    assert {r["split"] for r in records} == {"train"}
    write_mix(list(reversed(stage1)), tmp_path / "b", 30, seed=3)  # --from order does not matter
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    c = write_mix(stage1, tmp_path / "c", 30, seed=4)
    keys = lambda d: {k for k, _r, _s in iter_records(d)}  # noqa: E731
    assert keys(tmp_path / "c") != keys(tmp_path / "a") and c.by_task == a.by_task
    info = json.loads((tmp_path / "a" / "build.json").read_text())
    assert info["mix"]["seed"] == 3 and info["counts"]["samples"] == 30
    # Members are copied byte for byte.
    src = {k: s for k, _r, s in iter_records(stage1)}
    assert all(src[k] == s for k, _r, s in iter_records(tmp_path / "a"))


def test_mix_shortfall_stays_balanced_unless_fill(stage1: list[Path], tmp_path: Path) -> None:
    short = write_mix(stage1, tmp_path / "s", 100)
    assert short.by_task == {"comprehension": 25, "generation": 25} and short.shortfall == {"comprehension": 25, "generation": 25}
    filled = write_mix(stage1, tmp_path / "f", 60, fill=True)
    assert filled.samples == 60 and filled.by_task == {"comprehension": 35, "generation": 25}


def test_cli_mix(stage1: list[Path], tmp_path: Path) -> None:
    from vlhealth.cli import app

    out = tmp_path / "mix"
    args = ["mix", "--from", str(stage1[0]), "--from", str(stage1[1]), "--n", "20", "--out", str(out), "--seed", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "index.json").read_text())["total_samples"] == 20
