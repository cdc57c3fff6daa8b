import pytest

from healthgpt.model.weights import CheckpointError, resolve_trainable


def test_resolve_trainable_finds_files_runs_and_latest_step(tmp_path):
    run = tmp_path / "run"
    for step in (2, 10, 9):
        (run / "checkpoints" / f"step-{step:08d}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step:08d}" / "trainable.safetensors").write_bytes(b"x")
    assert resolve_trainable(run) == run / "checkpoints" / "step-00000010" / "trainable.safetensors"
    (run / "final").mkdir()
    (run / "final" / "trainable.safetensors").write_bytes(b"x")
    assert resolve_trainable(run) == run / "final" / "trainable.safetensors"
    assert resolve_trainable(run / "final") == run / "final" / "trainable.safetensors"
    single = tmp_path / "w.safetensors"
    single.write_bytes(b"x")
    assert resolve_trainable(single) == single


def test_resolve_trainable_errors_name_the_path_not_the_machine(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty/: no trainable.safetensors") as err:
        resolve_trainable(tmp_path / "empty")
    assert str(tmp_path) not in str(err.value)
    with pytest.raises(CheckpointError, match="missing.safetensors: checkpoint not found"):
        resolve_trainable(tmp_path / "missing.safetensors")
