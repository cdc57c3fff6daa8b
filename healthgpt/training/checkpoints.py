"""Training checkpoints and run weights.

Training checkpoints (``write_checkpoint`` / ``read_checkpoint``): ``OUT/checkpoints/step-NNNNNNNN/``
holds ``trainable.safetensors`` (this stage's and the earlier stages' groups), ``optimizer.pt``,
``rng-rank<R>.pt`` (every rank's RNG states) and ``trainer_state.json`` (step, scheduler, spike
guard, every rank's data position, losses). A checkpoint is written to a temporary folder (with the
main rank's RNG file), fsynced and renamed; the other ranks add theirs atomically. It is complete
when ``trainer_state.json`` and every rank's RNG file are there: ``latest_checkpoint`` skips any
other, and only complete checkpoints count towards the ``keep`` newest that are kept. A write that
fails (a full disk: ``OSError(ENOSPC)``) removes its temporary folder and raises
:class:`CheckpointWriteError`, naming the file; the earlier checkpoints are untouched.

The weights file itself is :mod:`healthgpt.model.weights`.

Public API::

    load_run_weights(model, path) -> list[str]   (a run folder, checkpoint or file; returns its groups)
    run_lineage(inits) -> list[dict]
    latest_checkpoint(out_dir) -> Path | None
    write_checkpoint(out, step, model, groups, optimizer, state, keep, rng=None) -> Path;  read_checkpoint(path) -> dict
    save_rng(checkpoint, rank, state);  rng_state() -> dict;  set_rng_state(state)
    CheckpointWriteError (an OSError)
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from healthgpt.model.core import HealthGPT
from healthgpt.model.weights import (
    TRAINABLE_FILE,
    _fsync,
    load_trainable,
    read_metadata,
    resolve_trainable,
    save_trainable,
)
from vlhealth.shards import fsync_dir

__all__ = ["CHECKPOINTS_DIR", "CheckpointWriteError", "latest_checkpoint", "load_run_weights", "read_checkpoint",
           "rng_state", "run_lineage", "save_rng", "set_rng_state", "write_checkpoint"]

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the earlier ones are intact."""


def load_run_weights(model: HealthGPT, path: str | os.PathLike[str]) -> list[str]:
    """Load the weights of a run (``--out`` folder), a checkpoint folder or a ``.safetensors`` file
    into ``model`` (every key must fit); returns the parameter groups the file holds."""
    weights = resolve_trainable(path)
    load_trainable(model, weights)
    return list(read_metadata(weights).get("groups", []))


def run_lineage(inits: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """The earlier training runs behind ``--init`` weights, oldest first: per run its folder name, stage,
    task and shard folder names, read from each run's ``final/train_summary.json`` (which carries its own
    lineage in turn). A run without a summary (a bare weights file, a checkpoint) is listed with
    ``shards: None``: its data is unknown, and exports and publishing treat it so."""
    out: list[dict[str, Any]] = []
    for init in inits:
        weights = resolve_trainable(init)
        # a training run's summary, or a text pre-training's (`healthgpt pretrain-text`: its data is known too)
        summary_path = next((weights.parent / n for n in ("train_summary.json", "pretrain_summary.json")
                             if (weights.parent / n).is_file()), None)
        summary = json.loads(summary_path.read_text("utf-8")) if summary_path is not None else None
        if summary is None:
            entries = [{"run": Path(init).name, "stage": None, "task": None, "shards": None}]
        else:
            own_root = weights.parent.parent if weights.parent.name == "final" else weights.parent
            entries = list(summary.get("lineage", [])) + [
                {"run": own_root.name, "stage": summary.get("stage"), "task": summary.get("task"),
                 "shards": summary.get("shards")}]
        out += [e for e in entries if e not in out]
    return out


def _complete(ckpt: Path) -> bool:
    """trainer_state.json and the RNG file of every rank that wrote the checkpoint are there."""
    try:
        world = int(json.loads((ckpt / STATE_FILE).read_text("utf-8")).get("world_size", 1))
    except (OSError, ValueError, AttributeError):
        return False
    return all((ckpt / f"rng-rank{r}.pt").is_file() for r in range(world))


def _steps(root: Path) -> list[Path]:
    return sorted((p for p in root.glob("step-*") if p.is_dir() and p.name.split("-")[1].isdigit()),
                  key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(out_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete ``checkpoints/step-N`` of a training ``--out`` folder, or None."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    done = [p for p in _steps(root) if _complete(p)]
    return done[-1] if done else None


def _where(path: Path, out: Path) -> str:
    """``path`` as shown in messages: from the run folder's name down (no absolute paths)."""
    try:
        return (Path(out.name) / path.relative_to(out)).as_posix()
    except ValueError:
        return path.name


def _write_failed(err: OSError, current: Path, out: Path, step: int) -> CheckpointWriteError:
    previous = latest_checkpoint(out)
    kept = (f"the previous checkpoint {previous.name} is intact; free space, then continue with --resume"
            if previous is not None else "there is no earlier checkpoint; free space and start again")
    return CheckpointWriteError(err.errno, f"checkpoint step-{step:08d} could not be written: "
                                           f"{err.strerror or err} ({_where(current, out)}); {kept}")


def save_rng(checkpoint: Path, rank: int, state: Mapping[str, Any]) -> None:
    """Write ``rng-rank<rank>.pt`` into a checkpoint folder atomically (its presence means it is whole)."""
    final = Path(checkpoint) / f"rng-rank{rank}.pt"
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        torch.save(dict(state), tmp)
        _fsync(tmp)
        os.replace(tmp, final)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        out = Path(checkpoint).parent.parent
        raise _write_failed(err, tmp, out, int(Path(checkpoint).name.split("-")[1])) from err


def write_checkpoint(out: Path, step: int, model: HealthGPT, groups: Sequence[str], optimizer: torch.optim.Optimizer,
                     state: Mapping[str, Any], keep: int, rng: Mapping[str, Any] | None = None) -> Path:
    """Write ``out/checkpoints/step-N`` atomically (weights of ``groups``, optimizer, ``rng`` as this
    (main) rank's RNG file, ``state`` as trainer_state.json) and drop all but the newest ``keep``
    complete ones. The other ranks add their RNG files with :func:`save_rng`. A failed write raises
    :class:`CheckpointWriteError` and leaves the earlier checkpoints as they were."""
    out = Path(out)
    root = out / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    current = tmp
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        current = tmp / TRAINABLE_FILE
        save_trainable(model, current, list(groups))
        current = tmp / "optimizer.pt"
        torch.save(optimizer.state_dict(), current)
        if rng is not None:
            current = tmp / "rng-rank0.pt"
            torch.save(dict(rng), current)
        current = tmp / STATE_FILE
        with open(current, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(json.loads(json.dumps(state, default=str)), indent=1))
            fh.flush()
            os.fsync(fh.fileno())
        for f in tmp.iterdir():
            current = f
            _fsync(f)
        current = final
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint is never read, and frees the space
        raise _write_failed(err, current, out, step) from err
    complete = [p for p in _steps(root) if _complete(p)]
    survivors = complete[-max(1, keep):]
    for old in _steps(root):  # older than the newest kept complete one and not kept: gone
        if old not in survivors and survivors and int(old.name.split("-")[1]) < int(survivors[-1].name.split("-")[1]):
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint folder."""
    return json.loads((Path(path) / STATE_FILE).read_text("utf-8"))


def rng_state() -> dict[str, Any]:
    """Every RNG the trainer draws from (torch, Python, NumPy, CUDA), as tensors torch.save can hold."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, list | tuple) else x
