"""`healthgpt experiment run` end to end on CPU: grid -> real `healthgpt train` + `healthgpt eval`
processes -> tables, verdicts, loss curves -> a rerun that trains nothing -> an interrupted run that
continues with the trainer's --resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from healthgpt.cli import app
from tests.helpers import generation_sample, vqa_sample
from tests.train_data import write_shards

pytestmark = pytest.mark.slow


def _experiment(shards: Path) -> dict:
    return {
        "name": "toy-variants",
        "title": "Toy: LoRA vs H-LoRA",
        "seeds": [0, 1, 2],
        "axes": {"variant": [{"label": "LoRA", "model": {"variant": "lora"}},
                             {"label": "H-LoRA", "model": {"variant": "hlora", "experts": 2}}]},
        "baseline": "LoRA",
        "columns": [{"name": "toy all", "metric": "comp/toy/all"}, {"name": "comp. avg", "metric": "comp_avg"},
                    {"name": "training time", "metric": "time_ratio", "format": "ratio"}],
        "paper": {"LoRA": {"training time": 1.0}, "H-LoRA": {"training time": 1.0}},
        "claims": [{"id": "time", "kind": "near", "a": "H-LoRA", "metric": "time_ratio", "target": 1.0,
                    "tolerance": 0.5, "text": "H-LoRA is about as fast as LoRA"}],
        "forms": {"small": {
            "vars": {"shards": str(shards)},
            "env": {"OMP_NUM_THREADS": "1"},
            "pipelines": {"default": [{
                "name": "train", "stage": 3, "task": "mixed", "shards": ["{shards}/comp", "{shards}/gen:0.5"],
                "args": {"steps": 3, "global-batch": 2, "micro-batch": 2, "save-every": 1, "device": "cpu"}}]},
            "eval": {"shards": ["{shards}/comp"],
                     "args": {"limit": 4, "batch-size": 4, "max-new-tokens": 4, "device": "cpu"}},
        }},
    }


def test_experiment_runs_collects_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    shards = Path("shards")
    write_shards(shards / "comp", [vqa_sample(i) for i in range(8)] + [vqa_sample(50 + i, split="test")
                                                                       for i in range(4)], "comp", 6)
    write_shards(shards / "gen", [generation_sample(i) for i in range(4)], "gen", 4)
    spec = Path("toy.yaml")
    spec.write_text(yaml.safe_dump(_experiment(shards), sort_keys=False), "utf-8")
    cli = CliRunner()

    res = cli.invoke(app, ["experiment", "run", str(spec), "--out", "out", "--no-progress"])
    assert res.exit_code == 0, res.output
    root = Path("out")
    runs = sorted((root / "toy-variants" / "runs").iterdir())
    assert [r.name for r in runs] == sorted(f"{v}__s{s}" for v in ("lora", "h-lora") for s in range(3))
    for run in runs:
        assert (run / "train" / "final" / "train_summary.json").is_file()
        assert (run / "eval" / "report.json").is_file()
        commands = (run / "command.sh").read_text("utf-8")
        assert "healthgpt train --preset tiny --stage 3 --task mixed" in commands and "healthgpt eval" in commands
        assert str(tmp_path) not in commands  # relative paths only
    summary = json.loads((runs[0] / "train" / "final" / "train_summary.json").read_text("utf-8"))
    assert summary["model_overrides"] == {"variant": "hlora", "experts": 2} and summary["steps"] == 3
    results = json.loads((root / "results.json").read_text("utf-8"))
    exp = results["experiments"][0]
    assert exp["counts"]["finished"] == 6 and exp["time_pairs"]["same_session"] == 6
    ratio = exp["cells"]["H-LoRA"]["metrics"]["time_ratio"]
    assert ratio["n"] == 3 and ratio["mean"] > 0
    assert exp["cells"]["LoRA"]["metrics"]["time_ratio"]["values"] == [1.0, 1.0, 1.0]
    assert exp["claims"][0]["verdict"] in ("reproduced", "not reproduced", "not significant")
    md = (root / "results.md").read_text("utf-8")
    assert "| LoRA | ours (n=3) |" in md and "| paper |" in md and "loss_curves.png" in md
    assert (root / "toy-variants" / "loss_curves.png").stat().st_size > 5000
    attempts = {r.name: json.loads((r / "run.json").read_text("utf-8")) for r in runs}

    # the same command again trains and evaluates nothing
    res = cli.invoke(app, ["experiment", "run", str(spec), "--out", "out", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert res.output.count("already finished") == 6
    for r in runs:
        again = json.loads((r / "run.json").read_text("utf-8"))
        assert again["steps"] == attempts[r.name]["steps"] and again["eval"] == attempts[r.name]["eval"]

    # an interrupted run (checkpoint, no final weights, no report) continues with --resume
    victim = runs[0]
    shutil.rmtree(victim / "train" / "final")
    (victim / "eval" / "report.json").unlink()
    res = cli.invoke(app, ["experiment", "run", str(spec), "--out", "out", "--no-progress"])
    assert res.exit_code == 0, res.output
    record = json.loads((victim / "run.json").read_text("utf-8"))
    assert [a["resumed"] for a in record["steps"]["train"]["attempts"]] == [False, True]
    assert len(record["eval"]["attempts"]) == 2 and (victim / "eval" / "report.json").is_file()
    assert "resumed from step-00000003" in (victim / "logs" / "train.log").read_text("utf-8")
    # the resumed run's timing spans two sessions: its time ratio is left out, and said so
    exp = json.loads((root / "results.json").read_text("utf-8"))["experiments"][0]
    assert exp["time_pairs"] == {"same_session": 5, "different_sessions": 1}
