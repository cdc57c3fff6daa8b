"""The trainer as users run it: the CLI under torchrun (2 CPU ranks, gloo), SIGTERM, hard kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.train_data import make_all

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_all(tmp_path_factory.mktemp("shards"))


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "healthgpt.training.train", "--preset", "tiny", "--stage", "3", "--task", "comprehension",
            "--shards", str(shards), "--out", str(out), "--no-progress", *extra]


def test_torchrun_two_ranks_train_on_disjoint_data(tmp_path, shards) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *_train_args(shards["bright"], out, "--steps", "4", "--micro-batch", "2", "--global-batch", "4",
                        "--save-every", "2", "--debug-log-keys", "--report-to", "csv")]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    keys = [(out / f"keys-rank{r}.txt").read_text().split() for r in range(2)]
    assert len(keys[0]) == len(keys[1]) == 4 * 2  # 4 steps x 2 samples per rank
    assert not set(keys[0]) & set(keys[1])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # only the main rank logs to trackers: one train/loss row per step, equal to metrics.jsonl's
    assert _csv_series(out, "train/loss") == {r["step"]: r["loss"] for r in rows}
    state = json.loads((out / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["data"]) == 2
    assert (out / "checkpoints" / "step-00000004" / "rng-rank1.pt").is_file()
    assert (out / "final" / "trainable.safetensors").is_file()


def _csv_series(out: Path, metric: str) -> dict[int, float]:
    """One metric of ``--report-to csv`` (OUT/csv/metrics.csv, long form); a step logged twice is an error."""
    lines = (out / "csv" / "metrics.csv").read_text().splitlines()
    assert lines[0] == "step,metric,value"
    rows = [(int(s), float(v)) for s, m, v in (ln.split(",") for ln in lines[1:]) if m == metric]
    assert len({s for s, _ in rows}) == len(rows), rows
    return dict(rows)


def test_cli_hard_kill_then_resume_matches(tmp_path, shards) -> None:
    base = ["--steps", "5", "--micro-batch", "2", "--global-batch", "2", "--save-every", "2", "--dropout", "0.1",
            "--report-to", "csv"]
    full = tmp_path / "full"
    r = subprocess.run([sys.executable, *_train_args(shards["bright"], full, *base)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cut = tmp_path / "cut"
    r = subprocess.run([sys.executable, *_train_args(shards["bright"], cut, *base, "--debug-exit-after", "3")],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 137
    r = subprocess.run([sys.executable, *_train_args(shards["bright"], cut, *base, "--resume")], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step-00000002" in r.stderr

    def losses(p: Path) -> list[float]:
        return [json.loads(x)["loss"] for x in (p / "metrics.jsonl").read_text().splitlines()]

    assert losses(cut) == losses(full) and len(losses(full)) == 5
    # the CSV tracker drops what the killed run logged after its checkpoint, as metrics.jsonl does
    assert _csv_series(cut, "train/loss") == _csv_series(full, "train/loss") == dict(enumerate(losses(full), 1))


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path, shards) -> None:
    out = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, *_train_args(shards["bright"], out, "--steps", "100000",
                                                           "--save-every", "0", "--micro-batch", "1",
                                                           "--global-batch", "1")],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM" in err
    ckpts = list((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "trainer_state.json").is_file()
    assert not (out / "final").exists()


def test_torchrun_stage2_mixed_trains(tmp_path, shards) -> None:
    """Under DDP every stage must run although some trainable tensors sit out some batches: in stage 2
    the new input-embedding rows get no gradient from a batch without new-token ids (comprehension),
    and in mixed stages the idle task's plugin and adapter sit out."""
    out = tmp_path / "ddp2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "healthgpt.training.train", "--preset", "tiny", "--stage", "2", "--task", "mixed",
           "--shards", str(shards["comp"]), "--shards", str(shards["gen"]), "--out", str(out), "--no-progress",
           "--steps", "3", "--micro-batch", "1", "--global-batch", "2", "--save-every", "0"]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {t for r in rows for t in r["tasks"]} >= {"comprehension"}
