"""Models by Hub id (``hf://ORG/NAME[@REVISION]``) through huggingface_hub's cache, offline.

No network: each test writes a Hugging Face cache in the real layout (``models--ORG--NAME/blobs/<hash>``,
``snapshots/<commit>/<file>`` symlinks into blobs, ``refs/<branch or tag>`` holding the commit) and runs
with ``HF_HUB_OFFLINE=1``, so the real ``snapshot_download`` code path finds the files there. The export
is a real ``healthgpt export`` of a small run whose weights differ from the preset's.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from healthgpt.cli import app
from healthgpt.model.presets import build_model
from healthgpt.model.weights import save_trainable
from healthgpt.serving.infer import load_model
from healthgpt.sharing.export import EXPORT_INFO, ExportError, export_run
from healthgpt.sharing.hub import HubError, HubId, parse_hub_id, resolve_model
from healthgpt.training.train import TrainConfig, train
from tests.helpers import vqa_sample
from tests.serve_helpers import scan_png
from tests.train_data import write_shards

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "my-lab/healthgpt-tiny"
pytestmark = pytest.mark.usefixtures("one_thread")


def populate_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT, refs=("main",),
                   extra: dict[str, bytes] | None = None) -> Path:
    """Put ``folder``'s files into ``cache`` as huggingface_hub lays out a downloaded snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    files.update(extra or {})
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return repo / "snapshots" / commit


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """A run (tiny weights changed from the preset's, two recorded earlier stages) and its export."""
    root = tmp_path_factory.mktemp("hub")
    model, _ = build_model("tiny", seed=0)
    g = torch.Generator().manual_seed(1)
    groups = ["abstract_adapter", "concrete_adapter", "comprehension_plugin", "generation_plugin", "new_token_rows"]
    params = model.parameter_groups()
    with torch.no_grad():  # (the new token rows stay: changed, they make every answer a run of image tokens)
        for name in groups[:-1]:
            for p in params[name]:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    run = root / "stage3"
    (run / "final").mkdir(parents=True)
    save_trainable(model, run / "final" / "trainable.safetensors", groups)
    lineage = [{"run": "stage1-gen", "stage": 1, "task": "generation", "shards": ["synthrad"]},
               {"run": "stage2", "stage": 2, "task": "mixed", "shards": ["vqa_rad", "synthrad"]}]
    (run / "final" / "train_summary.json").write_text(json.dumps(
        {"stage": 3, "task": "mixed", "steps": 7, "shards": ["vqa_rad"], "groups": groups, "lineage": lineage}))
    export = root / "export"
    export_run(run, export)
    shards = write_shards(root / "comp", [vqa_sample(i) for i in range(8)], "comp", 8)
    return {"root": root, "run": run, "export": export, "lineage": lineage, "groups": groups, "shards": shards,
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


@pytest.fixture
def hub_cache(tmp_path, exported, monkeypatch) -> Path:
    """A cache holding the export at COMMIT (branch main, tag v1) and an unrelated large file; offline."""
    cache = tmp_path / "hf-cache"
    populate_cache(cache, REPO, exported["export"], refs=("main", "v1"), extra={"other/big.bin": b"\0" * 4096})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def _same_weights(model, state) -> None:
    own = model.state_dict()
    changed = [k for k in state if not torch.equal(own[k], state[k])]
    assert not changed, changed[:3]


def test_hub_ids_parse_and_local_paths_pass_through(tmp_path) -> None:
    assert parse_hub_id("hf://my-lab/healthgpt-tiny") == HubId("my-lab/healthgpt-tiny", None)
    assert parse_hub_id("hf://my-lab/healthgpt-tiny@v1.2") == HubId("my-lab/healthgpt-tiny", "v1.2")
    assert parse_hub_id(Path("hf://lintw/HealthGPT-M3")) == HubId("lintw/HealthGPT-M3", None)  # pathlib's hf:/
    assert str(HubId("a/b", COMMIT)) == f"hf://a/b@{COMMIT}"
    assert parse_hub_id(tmp_path / "run") is None and resolve_model(tmp_path / "run") == tmp_path / "run"
    for bad in ("hf://only-a-name", "hf://a/b/c", "hf://a/b@"):
        with pytest.raises(HubError, match="not a Hub model id"):
            parse_hub_id(bad)


@pytest.mark.parametrize("suffix", ["", "@v1", f"@{COMMIT}"])
def test_load_model_takes_an_export_by_hub_id_offline(exported, hub_cache, suffix, monkeypatch) -> None:
    calls = []
    real = huggingface_hub.snapshot_download

    def recording(repo_id, **kw):
        calls.append(kw["allow_patterns"])
        return real(repo_id, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    model = load_model("tiny", checkpoint=f"hf://{REPO}{suffix}", seed=0)
    _same_weights(model, exported["state"])
    # only what is needed: the manifest first, then exactly the files it lists (never other/big.bin)
    listed = json.loads((exported["export"] / EXPORT_INFO).read_text())["files"]
    assert EXPORT_INFO in calls[0] and "final/trainable.safetensors" in calls[0]
    assert sorted(calls[1]) == sorted([EXPORT_INFO, *listed])
    assert not any("big.bin" in p for c in calls for p in c)


def test_infer_cli_with_a_hub_id_answers_as_the_export_folder(exported, hub_cache, tmp_path) -> None:
    scan = tmp_path / "scan.png"
    scan.write_bytes(scan_png(3))
    args = ["infer", "--preset", "tiny", "--image", str(scan), "--question", "Is there a lesion?",
            "--max-new-tokens", "8"]
    local = CliRunner().invoke(app, [*args, "--checkpoint", str(exported["export"])])
    by_id = CliRunner().invoke(app, [*args, "--checkpoint", f"hf://{REPO}@v1"])
    assert local.exit_code == 0 and by_id.exit_code == 0, by_id.output
    assert by_id.stdout == local.stdout and local.stdout.strip()
    fresh = CliRunner().invoke(app, args)  # the preset's own weights answer otherwise
    assert fresh.exit_code == 0 and fresh.stdout != local.stdout


def test_a_fresh_process_reads_hf_hub_offline_and_hf_hub_cache(exported, hub_cache) -> None:
    """The variables as a user sets them, read by huggingface_hub when a new process imports it."""
    code = f"from healthgpt.sharing.hub import resolve_model; print(resolve_model('hf://{REPO}@v1'))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache), "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    snapshot = hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert Path(res.stdout.strip()).resolve() == snapshot.resolve()


def test_eval_and_serve_take_a_hub_id(exported, hub_cache, monkeypatch) -> None:
    from healthgpt.evaluation.evaluate import EvalConfig, _config_record, _load_components

    config = EvalConfig(shards=[exported["shards"]], out=exported["root"] / "eval", checkpoint=f"hf://{REPO}",
                        overrides={"seed": 0})
    model, vq, _ = _load_components(config, "cpu", None, object(), None)
    _same_weights(model, exported["state"])
    record = _config_record(config, model, vq, None)
    assert record["checkpoint"]["name"] == COMMIT  # the pinned snapshot, by its commit
    assert str(hub_cache) not in json.dumps(record)

    import uvicorn
    from fastapi.testclient import TestClient

    seen = {}

    def fake_run(app_, **kw):
        with TestClient(app_) as client:
            seen["models"] = [m["id"] for m in client.get("/v1/models").json()["data"]]

    monkeypatch.setattr(uvicorn, "run", fake_run)
    result = CliRunner().invoke(app, ["serve", "--preset", "tiny", "--checkpoint", f"hf://{REPO}", "--no-ui"])
    assert result.exit_code == 0, result.output
    assert seen["models"] == [REPO]


@pytest.mark.parametrize("where", ["local", "hub"])
def test_train_init_from_an_export_carries_weights_and_lineage(exported, hub_cache, tmp_path, where) -> None:
    init = str(exported["export"]) if where == "local" else f"hf://{REPO}@v1"
    out = tmp_path / "stage3b"
    res = train(TrainConfig(preset="tiny", stage=3, task="comprehension", shards=[str(exported["shards"])], out=out,
                            init=(init,), progress=False,
                            overrides={"steps": 1, "lr": 0.0, "adapter_lr": 0.0, "micro_batch": 2, "global_batch": 2,
                                       "weight_decay": 0.0}))
    assert res.status == "finished"
    summary = json.loads((out / "final" / "train_summary.json").read_text())
    assert summary["lineage"] == [*exported["lineage"],
                                  {"run": "stage3", "stage": 3, "task": "mixed", "shards": ["vqa_rad"]}]
    assert set(exported["groups"]) <= set(summary["saved_groups"])  # the export's groups are carried
    weights = load_file(str(out / "final" / "trainable.safetensors"))
    state = exported["state"]
    assert weights and all(torch.equal(v, state[k]) for k, v in weights.items())  # lr 0: the export's tensors


def test_sha256_manifest_is_checked_for_hub_and_local_exports(exported, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    snap = populate_cache(cache, REPO, exported["export"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    blob = (snap / "comprehension" / "adapter_model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(HubError, match=r"hf://my-lab/healthgpt-tiny: .*comprehension/adapter_model.safetensors.*changed"):
        load_model("tiny", checkpoint=f"hf://{REPO}", seed=0)
    local = tmp_path / "copy"
    local.mkdir()
    for p in exported["export"].rglob("*"):
        if p.is_file():
            (local / p.relative_to(exported["export"])).parent.mkdir(parents=True, exist_ok=True)
            (local / p.relative_to(exported["export"])).write_bytes(p.read_bytes())
    (local / "token_rows.safetensors").write_bytes(b"truncated")
    with pytest.raises(ExportError, match=r"copy: \['token_rows.safetensors'\] changed since the export"):
        load_model("tiny", checkpoint=local, seed=0)
    result = CliRunner().invoke(app, ["infer", "--preset", "tiny", "--question", "hi", "--checkpoint", str(local)])
    assert result.exit_code == 2 and "token_rows.safetensors" in result.output


def test_offline_errors_say_what_to_download(exported, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache.mkdir()
    with pytest.raises(HubError, match=r"hf://my-lab/healthgpt-tiny@v2: not in the local Hugging Face cache.*"
                                       r"hf download my-lab/healthgpt-tiny healthgpt_export.json.* --revision v2"):
        resolve_model(f"hf://{REPO}@v2")
    snap = populate_cache(cache, REPO, exported["export"])
    (snap / "generation" / "adapter_model.safetensors").unlink()  # an interrupted download
    with pytest.raises(HubError, match=r"not in the local cache .*generation/adapter_model.safetensors.*"
                                       r"hf download my-lab/healthgpt-tiny"):
        resolve_model(f"hf://{REPO}")
    result = CliRunner().invoke(app, ["infer", "--preset", "tiny", "--question", "hi", "--checkpoint", f"hf://{REPO}"])
    assert result.exit_code == 2 and "hf download" in result.output


def test_released_weights_by_hub_id_fetch_only_the_released_files(tmp_path, monkeypatch) -> None:
    model, _ = build_model("tiny", seed=0, arch="phi3")
    bias = torch.randn(model.vision.abstract_adapter[2].bias.shape)
    folder = tmp_path / "release"
    folder.mkdir()
    torch.save({"base_model.model.model.mm_projector.2.bias": bias}, folder / "com_hlora_weights.bin")
    cache = tmp_path / "cache"
    populate_cache(cache, "lintw/HealthGPT-M3", folder, extra={"README.md": b"card", "L14/big.bin": b"x"})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    calls = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: calls.append(kw["allow_patterns"]) or real(repo_id, **kw))
    loaded = load_model("tiny", released="hf://lintw/HealthGPT-M3", seed=0, arch="phi3")
    assert torch.equal(loaded.vision.abstract_adapter[2].bias, bias)
    assert calls == [["com_hlora_weights.bin", "com_hlora_weights_phi4.bin", "gen_hlora_weights.bin",
                      "fusion_layer_weights.bin"]]
