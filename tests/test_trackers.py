"""``healthgpt train --report-to``: every tracker receives the run's scalars, hyper-parameters and lineage.

One tiny stage-3 run logs to all four trackers at once, against local stores only: the CSV and
TensorBoard files under ``--out`` (event files read back with TensorBoard's own reader), W&B in
offline mode (its ``.wandb`` record file read back here) and MLflow's file store (read back with
``MlflowClient``). Every scalar is compared with the run's ``metrics.jsonl``, the hyper-parameters and
lineage with its ``train_summary.json``.
"""

from __future__ import annotations

import csv
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from healthgpt.cli import app
from healthgpt.model.presets import build_model
from healthgpt.model.weights import save_trainable
from healthgpt.training.trackers import TRACKERS, TrackerUnavailable, parse_report_to
from healthgpt.training.train import TrainConfig, train
from tests.helpers import vqa_sample
from tests.train_data import write_shards

AVAILABLE = [t for t in TRACKERS if t in ("csv", "tensorboard") or __import__("importlib").util.find_spec(t)]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> dict:
    """A 4-step stage-3 run from a recorded earlier run, validating every 2 steps, step 3 skipped (NaN pixels)."""
    root = tmp_path_factory.mktemp("trackers")
    shards = write_shards(root / "comp", [vqa_sample(i) for i in range(16)]
                          + [vqa_sample(100 + i, split="val") for i in range(4)], "comp", 8)
    # an earlier run the lineage must carry: its weights and summary, as the trainer writes them
    earlier = root / "stage2"
    (earlier / "final").mkdir(parents=True)
    model, _ = build_model("tiny")
    save_trainable(model, earlier / "final" / "trainable.safetensors")
    (earlier / "final" / "train_summary.json").write_text(json.dumps(
        {"stage": 2, "task": "mixed", "shards": ["vqa_rad", "synthrad"], "lineage": []}))
    out = root / "run"

    def poison(step: int, batch: dict) -> dict:
        if step == 3:
            batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
        return batch

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_PROJECT", "healthgpt-tests")
        mp.setenv("MLFLOW_TRACKING_URI", (root / "mlruns").as_uri())
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this switch
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "healthgpt-tests")
        cfg = TrainConfig(preset="tiny", stage=3, task="comprehension", shards=[str(shards)], out=out,
                          init=(earlier,), overrides={"steps": 4, "micro_batch": 2, "global_batch": 2},
                          val_every=2, val_batches=1, progress=False, report_to=tuple(AVAILABLE),
                          run_name="tracked-run")
        result = train(cfg, batch_hook=poison)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"out": out, "root": root, "result": result, "steps": [r for r in rows if "loss" in r],
            "val": [r for r in rows if "val_loss" in r],
            "summary": json.loads((out / "final" / "train_summary.json").read_text())}


def _expected(tracked: dict) -> dict[str, dict[int, float]]:
    """Tag -> {step: value} from metrics.jsonl, as every tracker should have it."""
    want: dict[str, dict[int, float]] = {}
    skipped = 0
    for r in tracked["steps"]:
        skipped += r["skipped"]
        values = {"train/grad_norm": r["grad_norm"], "train/lr_lora": r["lr"], "train/lr_adapter": r["adapter_lr"],
                  "train/tokens": r["tokens"], "train/tokens_per_s": r["tokens_per_s"],
                  "train/step_time_s": r["step_time_s"], "train/skipped": float(r["skipped"]),
                  "train/skipped_steps": float(skipped)}
        if math.isfinite(r["loss"]):
            values["train/loss"] = values["train/loss_comprehension"] = r["loss"]
        for tag, v in values.items():
            if v is not None and math.isfinite(v):
                want.setdefault(tag, {})[r["step"]] = float(v)
    for r in tracked["val"]:
        for task, v in r["val_loss"].items():
            want.setdefault(f"val/loss_{task}", {})[r["step"]] = float(v)
    return want


def _assert_scalars(got: dict[str, dict[int, float]], tracked: dict, rel: float = 1e-6) -> None:
    want = _expected(tracked)
    assert tracked["result"].skipped == [3]
    assert 3 not in want["train/loss"] and want["train/skipped"][3] == 1.0 and want["train/skipped_steps"][4] == 1.0
    assert sorted(want["val/loss_comprehension"]) == [0, 2, 4]
    for tag, series in want.items():
        assert tag in got, f"{tag} missing; have {sorted(got)}"
        assert sorted(got[tag]) == sorted(series), tag
        for step, v in series.items():
            assert got[tag][step] == pytest.approx(v, rel=rel), (tag, step)


def _assert_config(config: dict, tracked: dict) -> None:
    summary = tracked["summary"]
    assert config["stage"] == 3 and config["task"] == "comprehension" and config["preset"] == "tiny"
    assert config["hparams"]["lr"] == pytest.approx(summary["hparams"]["lr"])
    assert config["hparams"]["global_batch"] == 2 and config["shards"] == ["comp"]
    assert config["lineage"] == summary["lineage"] == [
        {"run": "stage2", "stage": 2, "task": "mixed", "shards": ["vqa_rad", "synthrad"]}]
    assert str(tracked["root"]) not in json.dumps(config)  # names only, never the machine's paths


def test_csv_tracker(tracked) -> None:
    folder = tracked["out"] / "csv"
    got: dict[str, dict[int, float]] = {}
    with open(folder / "metrics.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            got.setdefault(row["metric"], {})[int(row["step"])] = float(row["value"])
    _assert_scalars(got, tracked, rel=0)
    _assert_config(json.loads((folder / "config.json").read_text()), tracked)


def test_tensorboard_tracker_event_files_read_back(tracked) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(tracked["out"] / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    got = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    _assert_scalars(got, tracked, rel=1e-6)  # event files hold float32
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    _assert_config(json.loads(text.removeprefix("```json\n").removesuffix("\n```")), tracked)
    hp = plugin_data_pb2.HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert hp.session_start_info.hparams["stage"].number_value == 3
    assert json.loads(hp.session_start_info.hparams["lineage"].string_value)[0]["run"] == "stage2"


def _wandb_records(path: Path) -> list:
    """The records of a W&B ``.wandb`` file: a 7-byte header, then a LevelDB-style log of protobuf records
    (32 KiB blocks; each chunk: CRC32, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, records, pending = 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer too short for a header: padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # FULL or LAST
            records.append(pb.Record.FromString(pending))
            pending = b""
    return records


def test_wandb_tracker_offline_run_read_back(tracked) -> None:
    pytest.importorskip("wandb")
    files = list((tracked["out"] / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    records = _wandb_records(files[0])
    got: dict[str, dict[int, float]] = {}
    config: dict = {}
    names = []
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            step = int(items.pop("_step"))
            for tag, v in items.items():
                if not tag.startswith("_"):
                    got.setdefault(tag, {})[step] = float(v)
        elif kind == "run":
            names.append(rec.run.display_name)
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
    assert names and names[0] == "tracked-run"
    _assert_scalars(got, tracked)
    _assert_config({k: (v["value"] if isinstance(v, dict) and set(v) == {"value"} else v)
                    for k, v in config.items() if not k.startswith("_")}, tracked)
    assert json.loads((tracked["out"] / "trackers.json").read_text())["wandb"] == files[0].stem.removeprefix("run-")


def test_mlflow_tracker_file_store_read_back(tracked, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(tracked["root"] / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("healthgpt-tests")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked-run" and run.info.status == "FINISHED"
    got = {tag: {m.step: m.value for m in client.get_metric_history(run.info.run_id, tag)} for tag in run.data.metrics}
    _assert_scalars(got, tracked)
    assert float(run.data.params["hparams.lr"]) == pytest.approx(tracked["summary"]["hparams"]["lr"])
    config = json.loads(Path(client.download_artifacts(run.info.run_id, "config.json")).read_text())
    _assert_config(config, tracked)


def test_report_to_parsing_and_missing_extras(tmp_path, monkeypatch) -> None:
    assert parse_report_to(["tensorboard,wandb", "csv", "wandb"]) == ("tensorboard", "wandb", "csv")
    assert parse_report_to("none") == ()
    with pytest.raises(TrackerUnavailable, match="unknown tracker 'comet'"):
        parse_report_to("csv,comet")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    shards = tmp_path / "shards"  # passes the shard-folder check, which runs before the trackers' check
    shards.mkdir()
    (shards / "s-000000.tar").write_bytes(b"")
    result = CliRunner().invoke(app, ["train", "--stage", "3", "--task", "comprehension", "--shards",
                                      str(shards), "--out", str(tmp_path / "out"), "--report-to", "csv,mlflow"])
    assert result.exit_code == 2
    assert "--report-to mlflow: the mlflow package is not installed" in result.output
    assert "pip install -e '.[mlflow]'" in result.output
    assert not (tmp_path / "out" / "csv").exists()  # refused before any work
