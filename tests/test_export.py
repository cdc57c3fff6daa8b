"""`healthgpt export` / `publish`: a run as a self-describing folder that serve, infer and eval load
with exactly the run's weights; publishing stages exactly the exported files and refuses credentialed data."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from healthgpt.cli import app
from healthgpt.evaluation.evaluate import EvalConfig, read_predictions, run_evaluation
from healthgpt.model.presets import build_model
from healthgpt.serving.infer import load_model
from healthgpt.sharing.export import EXPORT_INFO, ExportError, export_run, load_export, read_export_info
from healthgpt.sharing.publish import plan_model_publish, publish_model
from tests.serve_helpers import free_port, image_message, scan_png

pytestmark = pytest.mark.usefixtures("one_thread")


def _build_json(folder: Path, manifest: str, access: str) -> None:
    (folder / "build.json").write_text(json.dumps({"source": manifest, "manifest": {
        "name": manifest, "access": access, "license": "test licence"}}), "utf-8")


@pytest.fixture(scope="module")
def report(small_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "eval"
    run_evaluation(EvalConfig(shards=[small_run["comp"]], out=out, preset="tiny", checkpoint=small_run["run"],
                              split="val", limit=2, batch_size=2, max_new_tokens=6, device="cpu", progress=False,
                              overrides={"seed": 0}))
    return out


@pytest.fixture(scope="module")
def exported(small_run, report, tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data")
    for name, manifest in (("comp", "vqa_rad"), ("gen", "synthrad2023")):
        (data / name).mkdir()
        _build_json(data / name, manifest, "open" if name == "comp" else "registered")
    out = tmp_path_factory.mktemp("exports") / "healthgpt-tiny-demo"
    result = CliRunner().invoke(app, ["export", str(small_run["run"]), "--out", str(out), "--data", str(data),
                                      "--eval", str(report)])
    assert result.exit_code == 0, result.output
    return out


def test_export_folder_holds_exactly_the_runs_weights(small_run, exported) -> None:
    names = {p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()}
    for task in ("comprehension", "generation"):
        for f in ("adapter_config.json", "adapter_model.safetensors", "healthgpt_plugin.json",
                  "visual_adapter.safetensors"):
            assert f"{task}/{f}" in names
        assert json.loads((exported / task / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert {"README.md", EXPORT_INFO, "token_rows.safetensors", "eval/report.md"} <= names
    info = read_export_info(exported)
    assert info["preset"] == "tiny" and info["vqgan"]["random_weights"] is True
    assert [d["access"] for d in info["training_data"]] == ["open", "registered"]
    assert info["stages"][-1]["stage"] == 3 and info["stages"][-1]["shards"] == ["comp", "gen"]
    assert "/" not in info["source_run"] and str(Path.home()) not in (exported / EXPORT_INFO).read_text()

    from_run = load_model("tiny", checkpoint=small_run["run"])
    from_export, _ = build_model("tiny", seed=0)
    loaded = load_export(from_export, exported)
    assert loaded
    theirs = dict(from_export.named_parameters())
    for name, p in from_run.named_parameters():
        assert torch.equal(p, theirs[name]), name
    # a different untrained model really differs (the comparison above can fail)
    fresh, _ = build_model("tiny", seed=0)
    assert any(not torch.equal(p, theirs[n]) for n, p in fresh.named_parameters())


def test_model_card_front_matter_and_content(exported, report) -> None:
    card = (exported / "README.md").read_text("utf-8")
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "peft" and "medical" in meta["tags"]
    assert set(meta["datasets"]) == {"vqa_rad", "synthrad2023"}
    assert "Research use only" in card and "not be used for diagnosis" in card
    model_line = next(ln for ln in (report / "report.md").read_text("utf-8").splitlines() if ln.startswith("Model: "))
    assert "## Evaluation" in card and model_line in card
    assert "| 3 | mixed | 20 |" in card


def test_dry_run_publish_stages_exactly_the_exported_files(exported) -> None:
    on_disk = sorted(p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file())
    result = CliRunner().invoke(app, ["publish", str(exported), "--repo-id", "my-org/healthgpt-tiny", "--dry-run"])
    assert result.exit_code == 0, result.output
    staged = [line for line in result.stdout.splitlines() if line.strip()]
    assert staged == on_disk


def test_publish_makes_one_upload_call(exported, monkeypatch) -> None:
    calls: list[tuple[str, dict]] = []

    class FakeApi:
        def __init__(self, token=None) -> None:
            pass

        def create_repo(self, repo_id, **kw) -> None:
            calls.append(("create_repo", {"repo_id": repo_id, **kw}))

        def upload_folder(self, **kw) -> None:
            calls.append(("upload_folder", kw))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    plan = publish_model(exported, "my-org/healthgpt-tiny")
    uploads = [kw for name, kw in calls if name == "upload_folder"]
    assert len(uploads) == 1 and uploads[0]["allow_patterns"] == plan.files
    assert uploads[0]["repo_type"] == "model" and Path(uploads[0]["folder_path"]) == exported


def test_publish_refuses_credentialed_or_unknown_training_data(small_run, tmp_path) -> None:
    data = tmp_path / "data"
    (data / "comp").mkdir(parents=True)
    _build_json(data / "comp", "mimic_cxr_vqa", "credentialed")
    out = export_run(small_run["run"], tmp_path / "mimic-export", data=[data]).out
    with pytest.raises(ExportError, match="credentialed"):
        plan_model_publish(out)
    result = CliRunner().invoke(app, ["publish", str(out), "--repo-id", "o/n", "--dry-run"])
    assert result.exit_code == 2 and "mimic_cxr_vqa" in result.output
    assert plan_model_publish(out, i_have_the_rights=True).restricted  # allowed, and said so
    # 'gen' had no build.json here and no manifest of that name: unknown access is refused too
    info = read_export_info(out)
    assert {d["name"]: d["access"] for d in info["training_data"]}["gen"] == "unknown"
    # a file changed after the export is refused
    (out / "README.md").write_text("edited", "utf-8")
    with pytest.raises(ExportError, match="changed since the export"):
        plan_model_publish(out, i_have_the_rights=True)


def test_infer_and_eval_accept_the_export_folder(small_run, exported, report, tmp_path) -> None:
    scan = tmp_path / "scan.png"
    scan.write_bytes(scan_png(3))
    runner = CliRunner()
    args = ["infer", "--preset", "tiny", "--image", str(scan), "--question", "Is there a lesion?",
            "--max-new-tokens", "8"]
    from_run = runner.invoke(app, [*args, "--checkpoint", str(small_run["run"])])
    from_export = runner.invoke(app, [*args, "--checkpoint", str(exported)])
    assert from_run.exit_code == 0 and from_export.exit_code == 0, from_export.output
    assert from_export.stdout == from_run.stdout and from_run.stdout.strip()
    out = tmp_path / "eval-export"
    run_evaluation(EvalConfig(shards=[small_run["comp"]], out=out, preset="tiny", checkpoint=exported, split="val",
                              limit=2, batch_size=2, max_new_tokens=6, device="cpu", progress=False,
                              overrides={"seed": 0}))
    theirs, ours = read_predictions(report), read_predictions(out)
    assert theirs.keys() == ours.keys() and theirs
    assert all(ours[k]["prediction"] == theirs[k]["prediction"] for k in theirs)


@pytest.mark.slow
def test_serving_the_export_folder_gives_the_runs_answers(small_run, exported, tmp_path) -> None:
    """`healthgpt serve` (a real process) on the export folder and on the run: same answers, same image."""
    import openai

    def start(checkpoint: Path) -> tuple[subprocess.Popen, str]:
        port = free_port()
        log = open(tmp_path / f"serve-{port}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "healthgpt.cli", "serve", "--preset", "tiny", "--checkpoint",
                                 str(checkpoint), "--port", str(port), "--no-ui", "--threads", "1"],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return proc, f"http://127.0.0.1:{port}"

    def wait(proc: subprocess.Popen, url: str) -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the server exited"
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise AssertionError("the server did not come up")

    servers = [start(small_run["run"]), start(exported)]
    try:
        for proc, url in servers:
            wait(proc, url)
        results = []
        for (_, url), model in zip(servers, ("healthgpt-tiny", exported.name), strict=True):
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
            assert [m.id for m in client.models.list().data] == [model]
            answers = [client.chat.completions.create(model=model, messages=image_message(scan_png(50 + i), q),
                                                      max_tokens=8).choices[0].message.content
                       for i, q in enumerate(["Is there a lesion?", "Question 3?", "What modality is this?"])]
            image = client.images.edit(model=model, image=("ct.png", scan_png(60), "image/png"),
                                       prompt="Convert this CT slice to an MRI slice.").data[0].b64_json
            results.append((answers, np.asarray(Image.open(io.BytesIO(base64.b64decode(image))))))
        (run_answers, run_image), (export_answers, export_image) = results
        assert export_answers == run_answers and all(run_answers)
        assert export_image.shape == (256, 256, 3)
        np.testing.assert_array_equal(export_image, run_image)
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(30)


def test_cli_help_and_errors(small_run, exported, tmp_path) -> None:
    runner = CliRunner()
    for command in ("serve", "export", "publish"):
        res = runner.invoke(app, [command, "--help"])
        assert res.exit_code == 0 and "Example" in res.output, command
    missing = runner.invoke(app, ["serve", "--preset", "tiny", "--checkpoint", str(tmp_path / "no-such-run")])
    assert missing.exit_code == 2 and "no-such-run" in missing.output and str(tmp_path) not in missing.output
    from healthgpt.model.weights import CheckpointError

    other, _ = build_model("tiny", seed=0)
    other.preset = "smollm2-135m"  # what a model of another preset reports
    with pytest.raises(CheckpointError, match="exported from preset 'tiny'"):
        load_export(other, exported)
    again = runner.invoke(app, ["export", str(exported), "--out", str(tmp_path / "again")])
    assert again.exit_code == 2 and "already an export folder" in again.output
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    res = runner.invoke(app, ["export", str(small_run["run"]), "--out", str(busy)])
    assert res.exit_code == 2 and "not empty" in res.output and (busy / "keep.txt").read_text() == "x"


def test_the_init_chain_is_recorded_and_its_data_reaches_the_export(small_run, tmp_path) -> None:
    """A stage trained from earlier runs records them (stage, task, data) in train_summary.json, and an
    export of it sees that data without --earlier: data behind the weights cannot be forgotten."""
    import json
    import shutil

    from healthgpt.training.train import TrainConfig, train

    earlier = tmp_path / "stage2"
    shutil.copytree(small_run["run"], earlier)
    summary_path = earlier / "final" / "train_summary.json"
    summary = json.loads(summary_path.read_text("utf-8"))
    summary.update(stage=2, shards=["mimic_mix"], lineage=[{"run": "s1", "stage": 1, "task": "generation",
                                                             "shards": ["llava_pretrain"]}])
    summary_path.write_text(json.dumps(summary), "utf-8")
    bare = tmp_path / "bare.safetensors"
    shutil.copy(small_run["run"] / "final" / "trainable.safetensors", bare)
    out = tmp_path / "stage3"
    train(TrainConfig(preset="tiny", stage=3, task="comprehension", shards=[str(small_run["comp"])], out=out,
                      init=(earlier, bare), overrides={"steps": 1, "micro_batch": 2, "global_batch": 2},
                      save_every=0, progress=False))
    lineage = json.loads((out / "final" / "train_summary.json").read_text("utf-8"))["lineage"]
    assert [(e["run"], e["stage"], e["shards"]) for e in lineage] == [
        ("s1", 1, ["llava_pretrain"]), ("stage2", 2, ["mimic_mix"]), ("bare.safetensors", None, None)]

    info = read_export_info(export_run(out, tmp_path / "export").out)
    names = {d["name"] for d in info["training_data"]}
    assert {"llava_pretrain", "mimic_mix", "unrecorded data of bare.safetensors"} <= names
    assert [s["run"] for s in info["stages"]][-1] == "stage3"
    with pytest.raises(ExportError, match="unknown|credentialed"):
        plan_model_publish(tmp_path / "export")


def test_a_run_that_carries_the_base_llm_exports_and_loads(small_run, tmp_path) -> None:
    """A run grown from a text pre-training (the demo's runs start from text-lm) saves llm_base: its export
    holds those weights too, and loading the export gives back the run's model."""
    import torch

    from healthgpt.model.presets import build_model
    from healthgpt.model.weights import load_trainable, save_trainable
    from healthgpt.training.train import TrainConfig, train

    text_lm = tmp_path / "text-lm.safetensors"
    base, _ = build_model("tiny", seed=7)  # another seed: LLM weights unlike the default tiny model's
    save_trainable(base, text_lm, ["word_embeddings", "lm_head", "llm_base"])
    out = tmp_path / "run"
    train(TrainConfig(preset="tiny", stage=3, task="comprehension", shards=[str(small_run["comp"])], out=out,
                      init=(text_lm,), overrides={"steps": 1, "micro_batch": 2, "global_batch": 2},
                      save_every=0, progress=False))
    summary = export_run(out, tmp_path / "export")
    assert (summary.out / "base_rows.safetensors").is_file()
    card = (summary.out / "README.md").read_text("utf-8")
    assert "base_rows.safetensors" in card and "every\n  LLM weight" in card
    run_model, _ = build_model("tiny")
    load_trainable(run_model, out / "final" / "trainable.safetensors")
    exported, _ = build_model("tiny")
    load_export(exported, summary.out)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids, task="comprehension").logits,
                                   run_model(ids, task="comprehension").logits)
        assert not torch.equal(exported.llm.model.layers[0].mlp.down_proj.base_layer.weight,
                               build_model("tiny")[0].llm.model.layers[0].mlp.down_proj.base_layer.weight)
