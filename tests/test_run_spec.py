"""Runs remember their tokenizer and their --model-set values: demo-like runs (a trained VQGAN file, a
pre-trained vision tower, a text-pre-trained base carried as llm_base, the demo's stages with stage 3 as two
per-task runs and their 0-step merge) are used by infer / eval / export / serve without repeating --vq or
--model-set; a different VQGAN or a conflicting override is refused; every run exports, and the export serves
and publishes (--dry-run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from healthgpt.cli import app as hg
from vlhealth.cli import app as vl

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

# the demo's runs: stage 3 per task side by side, merged by a 0-step run (`stage3`)
STAGES = ("stage1-generation", "stage1-comprehension", "stage2", "stage3-comprehension", "stage3-generation",
          "stage3")


def _ok(app, argv: list[str]) -> str:
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, f"{argv}\n{result.output}"
    return result.output


def _fails(app, argv: list[str]) -> str:
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, f"{argv}\n{result.output}"
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    """A demo-like folder, made with relative paths from inside it (as `make demo` does from the repository)."""
    import os

    import torch

    from healthgpt.model.presets import build_model
    from healthgpt.model.vision import save_tower
    from vlhealth.vq.convert import save_vq
    from vlhealth.vq.network import TINY_CONFIG, VQGAN, _init_seeded

    root = tmp_path_factory.mktemp("demo")
    old = Path.cwd()
    os.chdir(root)
    try:
        torch.set_num_threads(1)
        _ok(vl, ["demo-data", "raw", "--source", "synthrad2023", "--source", "vqa_rad"])
        model = VQGAN(TINY_CONFIG)  # a "trained" VQGAN: another seed than the random tiny one
        _init_seeded(model, 7)
        save_vq(model, Path("vq/vqgan.safetensors"))
        _ok(vl, ["build", "synthrad", "raw/synthrad2023", "--out", "shards/synthrad", "--slice-step", "4",
                 "--recon", "none", "--vqgan", "vq/vqgan.safetensors"])
        _ok(vl, ["build", "vqa-rad", "raw/vqa_rad", "--out", "shards/vqa_rad"])
        _ok(vl, ["mix", "--from", "shards/synthrad", "--from", "shards/vqa_rad", "--n", "16", "--out", "mix"])
        _ok(hg, ["pretrain-text", "--shards", "shards/vqa_rad", "--out", "text-lm", "--steps", "2"])
        base, _ = build_model("tiny", seed=3)
        save_tower(base.vision.tower, "vision")
        train = ["train", "--preset", "tiny", "--model-set", "vision_path=vision", "--steps", "1", "--micro-batch", "1",
                 "--global-batch", "1", "--no-progress", "--save-every", "0"]
        _ok(hg, [*train, "--stage", "1", "--task", "generation", "--shards", "shards/synthrad", "--init", "text-lm",
                 "--out", "runs/stage1-generation", "--model-set", "new_rows_noise=1"])
        _ok(hg, [*train, "--stage", "1", "--task", "comprehension", "--shards", "shards/vqa_rad", "--init", "text-lm",
                 "--out", "runs/stage1-comprehension"])
        _ok(hg, [*train, "--stage", "2", "--task", "mixed", "--shards", "mix", "--init", "runs/stage1-comprehension",
                 "--init", "runs/stage1-generation", "--out", "runs/stage2"])
        # stage 3 as the demo trains it: one run per task side by side, merged by a 0-step run
        _ok(hg, [*train, "--stage", "3", "--task", "comprehension", "--shards", "shards/vqa_rad", "--init", "runs/stage2",
                 "--out", "runs/stage3-comprehension"])
        _ok(hg, [*train, "--stage", "3", "--task", "generation", "--shards", "shards/synthrad", "--init", "runs/stage2",
                 "--out", "runs/stage3-generation"])
        _ok(hg, [*train, "--stage", "3", "--task", "mixed", "--shards", "shards/vqa_rad", "--shards", "shards/synthrad",
                 "--init", "runs/stage3-comprehension", "--init", "runs/stage3-generation", "--steps", "0",
                 "--out", "runs/stage3"])
        sample = next(p for p in sorted(Path("raw/vqa_rad").rglob("*.jpg")))
        Image.open(sample).convert("L").resize((64, 64)).save("ct.png")
        yield root
    finally:
        os.chdir(old)


def test_runs_record_their_vqgan_and_model_set(demo: Path, monkeypatch) -> None:
    from healthgpt.sharing.run_spec import path_fingerprint

    monkeypatch.chdir(demo)
    vq_sha = path_fingerprint("vq/vqgan.safetensors")
    for name in STAGES:
        summary = json.loads((Path("runs") / name / "final" / "train_summary.json").read_text("utf-8"))
        spec = summary["run_spec"]
        if name == "stage1-comprehension":
            assert spec["vq"] is None  # no generation data, and text-lm has none
        else:
            assert spec["vq"]["sha256"] == vq_sha and spec["vq"]["path"] == "vq/vqgan.safetensors"
            assert spec["vq"]["at_run"] == "../../vq/vqgan.safetensors"
            assert spec["vq"]["config"]["n_embed"] == 8192 and spec["vq"]["random_weights"] is False
        assert spec["model_set"]["vision_path"] == {"path": "vision", "at_run": "../../vision",
                                                    "sha256": path_fingerprint("vision")}
    assert json.loads(Path("runs/stage1-generation/final/train_summary.json").read_text())[
        "run_spec"]["model_set"]["new_rows_noise"] == 1
    # the 0-step merge grew from both per-task stage-3 runs (and everything behind them)
    merged = json.loads(Path("runs/stage3/final/train_summary.json").read_text())
    assert [(e["run"], e["task"]) for e in merged["lineage"] if e["stage"] == 3] == [
        ("stage3-comprehension", "comprehension"), ("stage3-generation", "generation")]
    assert {e["run"] for e in merged["lineage"]} >= {"stage2", "stage1-comprehension", "stage1-generation"}
    assert json.loads(Path("mix/build.json").read_text())["vq"]["sha256"] == vq_sha


def test_infer_and_eval_default_to_the_runs_vqgan_and_tower(demo: Path, monkeypatch) -> None:
    monkeypatch.chdir(demo)
    gen = ["infer", "--checkpoint", "runs/stage3", "--task", "generation", "--image", "ct.png", "--instruction",
           "Convert this CT slice to an MRI slice.", "--constrained"]
    _ok(hg, [*gen, "--output", "a.png"])
    _ok(hg, [*gen, "--output", "b.png", "--vq", "vq/vqgan.safetensors", "--model-set", "vision_path=vision"])
    a, b = np.asarray(Image.open("a.png")), np.asarray(Image.open("b.png"))
    np.testing.assert_array_equal(a, b)
    # the random tiny VQGAN decodes the same codes to another image: refused unless asked for
    line = _fails(hg, [*gen, "--output", "c.png", "--vq", "tiny"])
    assert "--vq tiny" not in line or "vq/vqgan.safetensors" in line
    assert "--vq-mismatch-ok" in line and "stage3" in line
    _ok(hg, [*gen, "--output", "c.png", "--vq", "tiny", "--vq-mismatch-ok"])
    np.testing.assert_array_equal(np.load("a.vq.npy"), np.load("c.vq.npy"))
    assert not np.array_equal(a, np.asarray(Image.open("c.png")))
    # a conflicting override names both values
    line = _fails(hg, [*gen, "--output", "d.png", "--model-set", "vision_path=vq"])
    assert "vision_path=vq" in line and "vision" in line
    line = _fails(hg, ["infer", "--checkpoint", "runs/stage1-generation", "--question", "x", "--model-set",
                       "new_rows_noise=0"])
    assert "new_rows_noise=0" in line and "new_rows_noise=1" in line
    # the run's files moved: found next to the run (at_run) or named in the error
    Path("vision").rename("vision-moved")
    try:
        line = _fails(hg, ["infer", "--checkpoint", "runs/stage3", "--question", "Is there a lesion?"])
        assert "vision_path=vision" in line and "--model-set vision_path=PATH" in line
        _ok(hg, ["infer", "--checkpoint", "runs/stage3", "--question", "Is there a lesion?", "--model-set",
                 "vision_path=vision-moved", "--max-new-tokens", "2"])
    finally:
        Path("vision-moved").rename("vision")
    # eval: the same predictions with and without --vq
    ev = ["eval", "--shards", "shards/synthrad", "--checkpoint", "runs/stage3", "--generation-limit", "1",
          "--no-shuffled-images", "--batch-size", "1", "--constrained-images", "--device", "cpu", "--split", "test"]
    _ok(hg, [*ev, "--out", "ev1"])
    _ok(hg, [*ev, "--out", "ev2", "--vq", "vq/vqgan.safetensors", "--model-set", "vision_path=vision"])
    cfg1 = json.loads(Path("ev1/report.json").read_text())
    cfg2 = json.loads(Path("ev2/report.json").read_text())
    assert cfg1["model"]["vq"]["sha256"] == cfg2["model"]["vq"]["sha256"]
    assert cfg1["model"]["vq"]["name"] == "vqgan.safetensors"
    p1 = Path("ev1/predictions.jsonl").read_text().splitlines()
    p2 = Path("ev2/predictions.jsonl").read_text().splitlines()
    assert p1 and p1 == p2
    assert "vq-mismatch-ok" in _fails(hg, [*ev, "--out", "ev3", "--vq", "tiny"])


def test_every_demo_run_exports_serves_and_publishes(demo: Path, monkeypatch) -> None:
    from fastapi.testclient import TestClient

    from healthgpt.serving.api import create_app
    from healthgpt.serving.infer import load_model, load_vq_decoder
    from healthgpt.serving.service import ServeSettings, Service
    from healthgpt.sharing.run_spec import command_inputs

    monkeypatch.chdir(demo)
    for name in STAGES:
        out = Path("exports") / name
        _ok(hg, ["export", f"runs/{name}", "--out", str(out), "--data", "shards", "--data", "mix"])
        info = json.loads((out / "healthgpt_export.json").read_text())
        assert (out / "base_rows.safetensors").is_file()  # every run carries text-lm's LLM weights
        assert (out / "vision_tower" / "vision_tower.safetensors").is_file()
        assert info["run_spec"]["model_set"]["vision_path"]["at_run"] == "vision_tower"
        if name != "stage1-comprehension":
            assert (out / "vqgan.safetensors").is_file() and "vqgan.safetensors" in info["files"]
        listed = _ok(hg, ["publish", str(out), "--repo-id", "org/healthgpt-tiny", "--dry-run"])
        assert "healthgpt_export.json" in listed
        # serve the export as `healthgpt serve --checkpoint` does (no --vq, no --model-set)
        overrides, vq, _ = command_inputs("tiny", None, None, None, None, None, out, None)
        assert Path(overrides["vision_path"]) == out / "vision_tower"
        model = load_model("tiny", checkpoint=out, **overrides)
        service = Service(model, load_vq_decoder(vq), ServeSettings(model_name=name))
        try:
            with TestClient(create_app(service, ui=False)) as client:
                reply = client.post("/v1/chat/completions", json={
                    "model": name, "max_tokens": 3, "messages": [{"role": "user", "content": "Is there a lesion?"}]})
                assert reply.status_code == 200, reply.text
        finally:
            service.close()
    # the export of stage 3 generates the run's image
    _ok(hg, ["infer", "--checkpoint", "exports/stage3", "--task", "generation", "--image", "ct.png", "--instruction",
             "Convert this CT slice to an MRI slice.", "--constrained", "--output", "e.png"])
    _ok(hg, ["infer", "--checkpoint", "runs/stage3", "--task", "generation", "--image", "ct.png", "--instruction",
             "Convert this CT slice to an MRI slice.", "--constrained", "--output", "r.png"])
    np.testing.assert_array_equal(np.asarray(Image.open("e.png")), np.asarray(Image.open("r.png")))
