"""Faults outside serving, each simulated: a full disk (an injected ``OSError(ENOSPC)``) during a training
checkpoint and during a shard write, and training samples that fail to decode in the middle of a run."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from healthgpt.training.checkpoints import CheckpointWriteError, latest_checkpoint, read_checkpoint
from healthgpt.training.data import held_out
from healthgpt.training.train import TooManyBadSamples, TrainConfig, train
from tests.helpers import vqa_sample
from tests.train_data import write_shards
from vlhealth.shards import ShardWriter, load_index, write_index

pytestmark = pytest.mark.usefixtures("one_thread")


def _enospc(what: str) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def comp(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("comp"), [vqa_sample(i) for i in range(16)], "comp", 4)


def _cfg(out: Path, shards: list[Path], steps: int, **kw) -> TrainConfig:
    return TrainConfig(preset="tiny", stage=3, task="comprehension", shards=[str(s) for s in shards], out=out,
                       overrides={"steps": steps, "micro_batch": 2, "global_batch": 2, "dropout": 0.1},
                       progress=False, **kw)


# ------------------------------------------------------------------------------------ checkpoints

@pytest.mark.parametrize("failing", ["optimizer.pt", "rng-rank0.pt", "trainer_state.json"])
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(comp, tmp_path, monkeypatch, failing) -> None:
    full = train(_cfg(tmp_path / "full", [comp], 6, save_every=2, keep=1))
    out = tmp_path / "run"
    real_save, real_open = torch.save, open

    def save(obj, f, *a, **k):
        if Path(f).name == failing and "step-00000004" in str(f):
            Path(f).write_bytes(b"partial")  # the disk filled up in the middle of the file
            raise _enospc(str(f))
        return real_save(obj, f, *a, **k)

    def opened(file, mode="r", *a, **k):
        if Path(str(file)).name == failing and "step-00000004" in str(file) and "w" in mode:
            raise _enospc(str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr("builtins.open", opened)
    with pytest.raises(CheckpointWriteError) as info:
        train(_cfg(out, [comp], 6, save_every=2, keep=1))
    monkeypatch.undo()
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert f"run/checkpoints/.step-00000004.tmp/{failing}" in message and "No space left on device" in message
    assert "step-00000002 is intact" in message and "--resume" in message
    assert str(tmp_path) not in message
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-00000002"]  # no partial folder left behind, and keep=1 did not drop the good one
    assert latest_checkpoint(out).name == "step-00000002" and read_checkpoint(out / "checkpoints" / "step-00000002")["step"] == 2
    resumed = train(_cfg(out, [comp], 6, save_every=2, keep=1, resume=True))
    assert resumed.status == "finished" and resumed.losses == full.losses  # continued exactly from step 2


def test_an_incomplete_checkpoint_is_skipped_by_resume(comp, tmp_path) -> None:
    out = tmp_path / "run"
    train(_cfg(out, [comp], 4, save_every=2, keep=3))
    (out / "checkpoints" / "step-00000004" / "rng-rank0.pt").unlink()  # as if a rank's RNG file never landed
    assert latest_checkpoint(out).name == "step-00000002"


# ------------------------------------------------------------------------------------ training data

def _with_bad_images(root: Path, bad: int) -> tuple[Path, list[str]]:
    """16 train samples; ``bad`` of them (never held out for validation) have an input image that is not an image."""
    samples = [vqa_sample(i) for i in range(16)]
    broken = [s.key for s in samples if not held_out(s.record.group, s.key)][3:3 + bad]
    with ShardWriter(root, prefix="comp", max_count=4) as w:
        for s in samples:
            members = s.to_members()
            if s.key in broken:
                members["input.png"] = members["input.png"][:40]  # a truncated PNG
            w.write_members(s.key, members)
    write_index(root, w.shards)
    return root, broken


def test_undecodable_samples_are_counted_named_and_skipped(tmp_path) -> None:
    shards, broken = _with_bad_images(tmp_path / "bad2", 2)
    res = train(_cfg(tmp_path / "run", [shards], 12, save_every=0, max_bad_samples=3))
    assert res.status == "finished"
    summary = json.loads((tmp_path / "run" / "final" / "train_summary.json").read_text())
    assert summary["bad_sample_count"] == 2
    named = {b["sample"]: b["reason"] for b in summary["bad_samples"]}
    assert sorted(k.split(":", 1)[1] for k in named) == sorted(broken)
    assert all(k.split(":", 1)[0].startswith("comp-") and k.endswith(tuple(broken)) for k in named)
    assert all("cannot decode input image" in r for r in named.values())


def test_too_many_undecodable_samples_stop_the_run_with_their_list(tmp_path) -> None:
    shards, broken = _with_bad_images(tmp_path / "bad3", 3)
    with pytest.raises(TooManyBadSamples) as info:
        train(_cfg(tmp_path / "run", [shards], 12, save_every=2, max_bad_samples=2))
    message = str(info.value)
    assert "3 training samples could not be decoded (more than --max-bad-samples 2)" in message
    assert all(key in message for key in broken) and "--resume" in message
    assert not (tmp_path / "run" / "final").exists()


# ------------------------------------------------------------------------------------ shards

def test_a_full_disk_during_a_shard_write_leaves_no_partial_tar_and_a_rerun_is_identical(tmp_path, monkeypatch) -> None:
    import vlhealth.builders.synthrad as synthrad

    import vlhealth.shards as shards_mod
    from tests.test_builders_generation import FakeVQ, write_patient
    from vlhealth.build import run_build

    root = tmp_path / "synthrad"
    for i, pid in enumerate(("1BA001", "1BA002", "1BB003")):
        write_patient(root, "brain", pid, i)
    reference = tmp_path / "reference"
    run_build(synthrad, root, reference, vq=FakeVQ(), max_count=11, command=["vlhealth", "build", "synthrad"])
    n_tars = len(load_index(reference)["shards"])
    assert n_tars >= 4

    out = tmp_path / "out"
    run_build(synthrad, root, out, vq=FakeVQ(), max_count=50, command=["vlhealth", "build", "synthrad"])  # an older build
    assert load_index(out)["shards"]
    budget = {"bytes": sum(s["bytes"] for s in load_index(reference)["shards"][:2]) + 5000}
    real_write = shards_mod._HashingFile.write

    def write(self, data: bytes) -> int:  # the disk fills up inside the third tar
        budget["bytes"] -= len(data)
        if budget["bytes"] < 0:
            raise _enospc("tar")
        return real_write(self, data)

    monkeypatch.setattr(shards_mod._HashingFile, "write", write)
    with pytest.raises(OSError) as info:
        run_build(synthrad, root, out, vq=FakeVQ(), max_count=11, command=["vlhealth", "build", "synthrad"])
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and "out/synthrad2023-000002.tar" in str(info.value)
    assert str(tmp_path) not in str(info.value)
    assert not (out / "index.json").exists()  # the older build's index no longer describes the folder
    assert not list(out.glob(".*.tmp"))  # the partial tar is gone
    journal = json.loads((out / ".progress.json").read_text())
    assert sorted(p.name for p in out.glob("*.tar")) == [s["name"] for s in journal["shards"]]
    assert len(journal["shards"]) == 2
    run_build(synthrad, root, out, vq=FakeVQ(), max_count=11, resume=True,
              command=["vlhealth", "build", "synthrad"])
    assert _folder(out) == _folder(reference)
    # and a fresh rerun (no --resume) after the failure is byte-identical too
    fresh = tmp_path / "fresh"
    run_build(synthrad, root, fresh, vq=FakeVQ(), max_count=50, command=["vlhealth", "build", "synthrad"])
    monkeypatch.setattr(shards_mod._HashingFile, "write", write)
    budget["bytes"] = 3000
    with pytest.raises(OSError):
        run_build(synthrad, root, fresh, vq=FakeVQ(), max_count=11, command=["vlhealth", "build", "synthrad"])
    monkeypatch.undo()
    run_build(synthrad, root, fresh, vq=FakeVQ(), max_count=11, command=["vlhealth", "build", "synthrad"])
    assert _folder(fresh) == _folder(reference)


def _folder(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}
