"""Experiment trackers behind ``healthgpt train --report-to csv,tensorboard,wandb,mlflow`` (any subset).

Every tracker receives the same things, from the main rank only:

* once, the run's configuration (:func:`run_config` in the trainer): preset, stage, task, seed, the
  resolved hyper-parameters, the trained groups, the shard folder *names*, model overrides (paths by
  folder name only) and the lineage of ``--init`` runs;
* per optimizer step, the scalars of the step's ``metrics.jsonl`` line (:func:`step_scalars`):
  ``train/loss``, ``train/loss_<task>``, ``train/grad_norm``, ``train/lr_<group>`` per optimizer
  group, ``train/tokens_per_s``, ``train/tokens``, ``train/step_time_s``, ``train/skipped`` (1 for a
  step the spike guard skipped) and ``train/skipped_steps`` (how many so far);
* per validation, ``val/loss_<task>``.

Non-finite values (a skipped step's loss) are left out; ``train/skipped`` says why a step has none.

Where each tracker writes:

* ``csv``: ``OUT/csv/metrics.csv`` (long form: ``step,metric,value``; ``pandas.read_csv(...).pivot(
  index="step", columns="metric", values="value")`` makes it wide) and ``OUT/csv/config.json``;
* ``tensorboard``: ``OUT/tensorboard/`` event files (scalars, the configuration as text and in the
  HParams dashboard); needs the ``tensorboard`` extra;
* ``wandb``: a Weights & Biases run (project ``$WANDB_PROJECT`` or ``healthgpt``, named ``--run-name``
  or the ``--out`` folder's name; ``WANDB_MODE=offline`` keeps it in ``OUT/wandb/``); needs the
  ``wandb`` extra. Code, git state and system metadata are not uploaded;
* ``mlflow``: an MLflow run in the experiment ``$MLFLOW_EXPERIMENT_NAME`` (default ``healthgpt``) of the
  tracking server ``$MLFLOW_TRACKING_URI`` (MLflow's own default when unset); hyper-parameters as
  params, the full configuration as the artifact ``config.json``; needs the ``mlflow`` extra.

``--resume`` continues the same W&B and MLflow runs (their ids are kept in ``OUT/trackers.json``),
drops the CSV rows after the checkpoint's step and purges the TensorBoard events after it, as the
trainer does with ``metrics.jsonl``.

Public API::

    TRACKERS;  parse_report_to(items) -> tuple[str, ...];  check_available(names)
    open_trackers(names, out, run_name, config, start_step=0) -> Trackers
    Trackers.log(scalars, step);  Trackers.close(status="finished")
    step_scalars(record, lrs, skipped_so_far) -> dict[str, float]
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["TRACKERS", "Trackers", "TrackerUnavailable", "check_available", "flatten_config", "open_trackers",
           "parse_report_to", "step_scalars"]

TRACKERS = ("csv", "tensorboard", "wandb", "mlflow")
IDS_FILE = "trackers.json"
# tracker -> (module that must import, the pip extra that installs it)
_NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


class TrackerUnavailable(ValueError):
    """A tracker was asked for whose package is not installed (or an unknown tracker name)."""


def parse_report_to(items: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"tensorboard,wandb"`` (or repeated options) -> ``("tensorboard", "wandb")``; ``none`` -> ``()``."""
    if items is None:
        return ()
    parts = [items] if isinstance(items, str) else list(items)
    names: list[str] = []
    for part in parts:
        for name in str(part).split(","):
            name = name.strip().lower()
            if not name or name == "none":
                continue
            if name not in TRACKERS:
                raise TrackerUnavailable(f"--report-to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
            if name not in names:
                names.append(name)
    return tuple(names)


def check_available(names: Sequence[str]) -> None:
    """Refuse, before any training, a tracker whose package is missing (with the extra that installs it)."""
    for name in names:
        if name in _NEEDS:
            module, extra = _NEEDS[name]
            if importlib.util.find_spec(module) is None:
                raise TrackerUnavailable(f"--report-to {name}: the {module} package is not installed; install the "
                                         f"{extra} extra: pip install -e '.[{extra}]'")


def step_scalars(record: Mapping[str, Any], lrs: Mapping[str, float], skipped_so_far: int) -> dict[str, float]:
    """The scalars of one optimizer step's ``metrics.jsonl`` record, by tracker tag."""
    out: dict[str, float] = {"train/loss": float(record["loss"])}
    tasks = record.get("tasks") or {}
    if tasks:
        out[f"train/loss_{max(tasks, key=tasks.get)}"] = float(record["loss"])
    out["train/grad_norm"] = float(record["grad_norm"])
    for name, lr in lrs.items():
        out[f"train/lr_{name}"] = float(lr)
    for key in ("tokens_per_s", "tokens", "step_time_s"):
        out[f"train/{key}"] = float(record[key])
    out["train/skipped"] = float(bool(record["skipped"]))
    out["train/skipped_steps"] = float(skipped_so_far)
    return out


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """Nested configuration -> ``{"hparams.lr": 2e-4, ...}``; lists become JSON text."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_config(value, name + "."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        elif value is None:
            out[name] = "None"
        else:
            out[name] = json.dumps(value, default=str)
    return out


# ------------------------------------------------------------------------------------ the trackers


class _CSV:
    def __init__(self, out: Path, config: Mapping[str, Any], start_step: int) -> None:
        folder = out / "csv"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n", "utf-8")
        self.path = folder / "metrics.csv"
        kept: list[list[str]] = []
        if start_step > 0 and self.path.is_file():  # --resume: drop what was logged after the checkpoint
            with open(self.path, newline="", encoding="utf-8") as fh:
                kept = [row for row in list(csv.reader(fh))[1:] if row and int(row[0]) <= start_step]
        self.fh = open(self.path, "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.writer = csv.writer(self.fh, lineterminator="\n")
        self.writer.writerow(["step", "metric", "value"])
        self.writer.writerows(kept)
        self.fh.flush()

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        self.writer.writerows([step, k, repr(float(v))] for k, v in scalars.items())
        self.fh.flush()

    def close(self, status: str) -> None:
        self.fh.close()


class _TensorBoard:
    def __init__(self, out: Path, config: Mapping[str, Any], start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```", start_step)
        for summary in hparams(flatten_config(config), {}):  # the HParams dashboard, in the same event file
            self.writer.file_writer.add_summary(summary)

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def close(self, status: str) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, out: Path, run_name: str, config: Mapping[str, Any], ids: dict[str, Any]) -> None:
        import wandb

        settings: dict[str, Any] = {"disable_code": True, "disable_git": True, "console": "off", "silent": True,
                                    "x_disable_meta": True, "x_save_requirements": False}
        try:
            wb_settings = wandb.Settings(**settings)
        except Exception:  # an older wandb without some of these settings
            wb_settings = wandb.Settings(disable_code=True, disable_git=True)
        previous = ids.get("wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "healthgpt", name=run_name, dir=str(out),
                              config=dict(config), id=previous, resume="allow" if previous else None,
                              settings=wb_settings)
        ids["wandb"] = self.run.id

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status in ("finished", "preempted") else 1)


class _MLflow:
    def __init__(self, run_name: str, config: Mapping[str, Any], ids: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        previous = ids.get("mlflow")
        if previous:
            self.run_id = previous
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "healthgpt"
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in flatten_config(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])
            self.client.log_dict(self.run_id, json.loads(json.dumps(config, default=str)), "config.json")
        ids["mlflow"] = self.run_id

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in scalars.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, {"finished": "FINISHED", "preempted": "KILLED"}.get(status, "FAILED"))


class Trackers:
    """The trackers of one run, logged to together (none at all on ranks other than the main one)."""

    def __init__(self, trackers: Sequence[Any] = ()) -> None:
        self.trackers = list(trackers)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        finite = {k: float(v) for k, v in scalars.items() if v is not None and math.isfinite(float(v))}
        for tracker in self.trackers:
            tracker.log(finite, step)

    def close(self, status: str = "finished") -> None:
        for tracker in self.trackers:
            tracker.close(status)
        self.trackers = []


def open_trackers(names: Sequence[str], out: str | os.PathLike[str], run_name: str, config: Mapping[str, Any],
                  start_step: int = 0) -> Trackers:
    """Open each named tracker (call on the main rank only); ``start_step`` > 0 continues a resumed run."""
    check_available(names)
    out = Path(out)
    ids_path = out / IDS_FILE
    ids: dict[str, Any] = json.loads(ids_path.read_text("utf-8")) if start_step and ids_path.is_file() else {}
    opened: list[Any] = []
    try:
        for name in names:
            if name == "csv":
                opened.append(_CSV(out, config, start_step))
            elif name == "tensorboard":
                opened.append(_TensorBoard(out, config, start_step))
            elif name == "wandb":
                opened.append(_WandB(out, run_name, config, ids))
            elif name == "mlflow":
                opened.append(_MLflow(run_name, config, ids))
    except Exception:
        Trackers(opened).close("failed")
        raise
    if ids:
        ids_path.write_text(json.dumps(ids, indent=2) + "\n", "utf-8")
    return Trackers(opened)
