"""Training checkpoints and run weights.

Training checkpoints (``write_checkpoint`` / ``read_checkpoint``): ``OUT/checkpoints/step-NNNNNNNN/``
holds ``trainable.safetensors`` (this stage's and the earlier stages' groups), ``optimizer.pt``,
``rng-rank<R>.pt`` (every rank's RNG states) and ``trainer_state.json`` (step, scheduler, spike
guard, every rank's data position, losses), written last: its presence marks a complete
checkpoint. A checkpoint is written to a temporary folder, fsynced and renamed; the last ``keep``
are kept.

The weights file itself is :mod:`healthgpt.model.weights`.

Public API::

    load_run_weights(model, path) -> list[str]   (a run folder, checkpoint or file; returns its groups)
    run_lineage(inits) -> list[dict]
    latest_checkpoint(out_dir) -> Path | None
    write_checkpoint(out, step, model, groups, optimizer, state, keep) -> Path;  read_checkpoint(path) -> dict
    rng_state() -> dict;  set_rng_state(state)
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

__all__ = ["CHECKPOINTS_DIR", "latest_checkpoint", "load_run_weights", "read_checkpoint", "rng_state", "run_lineage", "set_rng_state", "write_checkpoint"]

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"


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
        summary_path = weights.parent / "train_summary.json"
        summary = json.loads(summary_path.read_text("utf-8")) if summary_path.is_file() else None
        if summary is None:
            entries = [{"run": Path(init).name, "stage": None, "task": None, "shards": None}]
        else:
            own_root = weights.parent.parent if weights.parent.name == "final" else weights.parent
            entries = list(summary.get("lineage", [])) + [
                {"run": own_root.name, "stage": summary.get("stage"), "task": summary.get("task"),
                 "shards": summary.get("shards")}]
        out += [e for e in entries if e not in out]
    return out


def latest_checkpoint(out_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete ``checkpoints/step-N`` of a training ``--out`` folder, or None."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    done = sorted((p for p in root.glob("step-*") if (p / STATE_FILE).is_file()),
                  key=lambda p: int(p.name.split("-")[1]))
    return done[-1] if done else None


def write_checkpoint(out: Path, step: int, model: HealthGPT, groups: Sequence[str], optimizer: torch.optim.Optimizer,
                     state: Mapping[str, Any], keep: int) -> Path:
    """Write ``out/checkpoints/step-N`` atomically (weights of ``groups``, optimizer, ``state`` as
    trainer_state.json last) and drop all but the newest ``keep``. The ranks' RNG files are added
    to the final folder afterwards (:func:`rng_state`)."""
    root = Path(out) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_trainable(model, tmp / TRAINABLE_FILE, list(groups))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    with open(tmp / STATE_FILE, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(json.loads(json.dumps(state, default=str)), indent=1))
        fh.flush()
        os.fsync(fh.fileno())
    for f in tmp.iterdir():
        _fsync(f)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    done = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    for old in done[: max(0, len(done) - max(1, keep))]:
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
