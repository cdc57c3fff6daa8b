"""Run an experiment's grid: one ``healthgpt train`` process per train step, one ``healthgpt eval``.

Layout under ``--out`` (one folder per experiment)::

    OUT/<experiment>/experiment.json         the spec as run (YAML content, form, variables)
    OUT/<experiment>/runs/<cell>__s<seed>/
        command.sh                           the exact commands (paths relative to the folder the
                                             experiment was started in)
        run.json                             config, status and every attempt (session, host, seconds)
        logs/<step>.log                      each process's output
        <step>/metrics.jsonl, <step>/final/train_summary.json, <step>/checkpoints/
        eval/report.json, eval/report.md, eval/predictions.jsonl
    OUT/results.md, OUT/results.json, OUT/<experiment>/loss_curves.png   (healthgpt.experiment.collect)

Resume: a train step with ``final/train_summary.json`` is skipped; one with a checkpoint continues
with the trainer's ``--resume``; an eval with ``report.json`` is skipped (an interrupted one
continues by itself). A run folder made with a different config is refused.

Twins: a run whose configuration equals a finished run of another experiment under the same OUT
(the same commands up to their own folder, e.g. ``peft-variants``' H-LoRA and ``experts``' H-LoRA at
k = 4 in the small forms) is not trained again: the twin's folder is copied and ``run.json`` says
``reused_from``; the measurement (and its session) is the twin's. For an experiment that compares
training times, only a twin trained in the current session is reused (a time ratio is only formed
within one session), so a later invocation trains its own copy.

Pre-trained parts: the runs' ``requires`` (a form's ``pretrained`` block: the demo's text LM, VQGAN,
vision tower) must exist before anything starts; a missing one is named with what makes it.

Timing: every process is timed, and the session (one ``healthgpt experiment run`` invocation) and
host that trained each step are recorded, so time ratios are only formed between runs trained in
the same session (``collect``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from healthgpt.experiment.spec import Experiment, ExperimentError, RunSpec, StepSpec, expand, partition_runs

__all__ = ["RUN_FILE", "RunOutcome", "canonical_config", "execute_run", "missing_parts", "new_session", "plan",
           "program", "run_experiments", "step_finished"]

RUN_FILE = "run.json"
RUN_FORMAT = "healthgpt-experiment-run/1"
EXPERIMENT_FILE = "experiment.json"
SUMMARY = Path("final") / "train_summary.json"


@dataclass
class Session:
    id: str
    host: str


def new_session() -> Session:
    return Session(uuid.uuid4().hex[:12], socket.gethostname())


@dataclass
class RunOutcome:
    run_id: str
    status: str  # finished | failed
    trained: list[str] = field(default_factory=list)  # steps trained (or continued) by this call
    evaluated: bool = False
    message: str = ""
    reused_from: str | None = None


def canonical_config(run: RunSpec) -> str:
    """The run's configuration with its own folder abstracted and option order ignored: equal for two
    runs that would train and evaluate the same thing."""
    def pairs(argv: Sequence[str]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        i = 0
        while i < len(argv):
            flag = argv[i]
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
            out.append((flag, value.replace(run.dir, "<RUN>")))
            i += 2 if value else 1
        return sorted(out)

    return json.dumps({"env": sorted(run.env.items()), "launcher": run.launcher, "timing": run.timing_step,
                       "train": [[s.name, pairs(s.argv)] for s in run.steps], "eval": pairs(run.eval_argv)})


def _trained_in(record: dict[str, Any], step: str, session: str) -> bool:
    """Was ``step`` trained start to finish in ``session`` (one attempt, not resumed)?"""
    attempts = (record.get("steps") or {}).get(step, {}).get("attempts") or []
    return (len(attempts) == 1 and attempts[0].get("returncode") == 0 and not attempts[0].get("resumed")
            and attempts[0].get("session") == session)


def _times(exp: Experiment) -> bool:
    """Does the experiment compare training times (time ratios to its baseline)?"""
    return exp.baseline is not None and (any(c.metric == "time_ratio" for c in exp.columns)
                                         or any(c.get("metric") == "time_ratio" for c in exp.claims))


def _find_twin(run: RunSpec, out_root: Path, session: str | None = None) -> Path | None:
    """A finished run folder of another experiment under ``out_root`` with the same canonical config
    (with ``session``: only one whose timing step was trained start to finish in that session)."""
    key = canonical_config(run)
    for record_path in sorted(out_root.glob(f"*/runs/*/{RUN_FILE}")):
        twin_dir = record_path.parent
        if twin_dir.resolve() == Path(run.dir).resolve():
            continue
        try:
            record = json.loads(record_path.read_text("utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if record.get("status") != "finished" or record.get("canonical") != key or record.get("reused_from"):
            continue
        if session is not None and not _trained_in(record, run.timing_step, session):
            continue
        if (twin_dir / "eval" / "report.json").is_file():
            return twin_dir
    return None


def _reuse(run: RunSpec, record: dict[str, Any], twin_dir: Path, out_root: Path) -> str:
    import shutil

    twin = json.loads((twin_dir / RUN_FILE).read_text("utf-8"))
    for child in twin_dir.iterdir():
        if child.name in (RUN_FILE, "command.sh"):
            continue
        target = Path(run.dir) / child.name
        if child.is_dir():
            shutil.copytree(child, target, dirs_exist_ok=True)
        else:
            shutil.copy2(child, target)
    name = twin_dir.relative_to(out_root).as_posix()
    record.update(steps=twin["steps"], eval=twin["eval"], reused_from=name)
    return name


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_json(path: Path, obj: Any) -> None:
    """Atomic JSON, keys in their given order (the order of a YAML's axes is its cells' order)."""
    from vlhealth.shards import write_atomic

    write_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def step_finished(step_out: str | os.PathLike[str]) -> bool:
    return (Path(step_out) / SUMMARY).is_file()


def _command_lines(run: RunSpec, exp: Experiment, form: str) -> str:
    lines = ["#!/usr/bin/env bash",
             f"# {exp.name} ({form} form), cell {run.cell}, seed {run.seed}: the exact commands of this run.",
             "# Paths are relative to the folder `healthgpt experiment run` was started in.",
             "# A step with a checkpoint under its --out continues with --resume added.",
             "set -euo pipefail"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in run.env.items()]
    lines += [shlex.join([*program(run, "train"), *s.argv]) for s in run.steps]
    lines.append(shlex.join([*program(run, "eval"), *run.eval_argv]))
    return "\n".join(lines) + "\n"


def _load_record(run: RunSpec) -> dict[str, Any]:
    path = Path(run.dir) / RUN_FILE
    config = run.config()
    if not path.is_file():
        return {"format": RUN_FORMAT, "experiment": run.experiment, "run_id": run.run_id, "cell": run.cell,
                "labels": run.labels, "seed": run.seed, "timing_step": run.timing_step, "config": config,
                "steps": {}, "eval": {"attempts": []}, "status": "pending"}
    try:
        record = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as err:
        raise ExperimentError(f"{run.run_id}/{RUN_FILE}: not valid JSON ({err}); remove the run folder to redo it") from err
    if record.get("config") != config:
        raise ExperimentError(
            f"run {run.run_id} ({run.experiment}) was made with a different configuration (YAML, form, --var or "
            "--out changed); use a new --out folder or remove that run folder")
    return record


def program(run: RunSpec, kind: str) -> list[str]:
    """How a step starts: ``healthgpt <kind>``, or ``<launcher> -m healthgpt.cli <kind>`` (torchrun)."""
    return [*run.launcher, "-m", "healthgpt.cli", kind] if run.launcher else ["healthgpt", kind]


def _run_process(run: RunSpec, kind: str, argv: Sequence[str], log: Path) -> tuple[int, float]:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = run.env
    cmd = ([*run.launcher, "-m", "healthgpt.cli", kind, *argv] if run.launcher
           else [sys.executable, "-m", "healthgpt.cli", kind, *argv])
    full_env = {**os.environ, **env}
    t0 = time.perf_counter()
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n===== {_now()} healthgpt {kind} {shlex.join(list(argv))}\n")
        fh.flush()
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env, check=False).returncode
    return rc, time.perf_counter() - t0


def _tail(path: Path, n: int = 12) -> str:
    try:
        return "\n".join(path.read_text("utf-8", errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def tracker_argv(run: RunSpec, step: StepSpec, report_to: Sequence[str]) -> list[str]:
    """``--report-to`` for one training step, its tracker run named ``<experiment>/<run>/<step>``. Not part of
    the run's configuration: logging somewhere else trains the same run."""
    if not report_to:
        return []
    return ["--report-to", ",".join(report_to), "--run-name", f"{run.experiment}/{run.run_id}/{step.name}"]


def _train_step(run: RunSpec, step: StepSpec, record: dict[str, Any], session: Session,
                report_to: Sequence[str] = ()) -> tuple[bool, bool]:
    """(trained now, ok)."""
    from healthgpt.training.checkpoints import latest_checkpoint

    entry = record["steps"].setdefault(step.name, {"attempts": [], "status": "pending"})
    if step_finished(step.out):
        entry["status"] = "finished"
        return False, True
    resume = latest_checkpoint(Path(step.out)) is not None
    argv = step.argv + tracker_argv(run, step, report_to) + (["--resume"] if resume else [])
    started = _now()
    rc, seconds = _run_process(run, "train", argv, Path(run.dir) / "logs" / f"{step.name}.log")
    entry["attempts"].append({"session": session.id, "host": session.host, "resumed": resume, "started": started,
                              "seconds": round(seconds, 3), "returncode": rc})
    ok = rc == 0 and step_finished(step.out)
    entry["status"] = "finished" if ok else "failed"
    return True, ok


def execute_run(run: RunSpec, exp: Experiment, form: str, session: Session,
                on_phase: Callable[[str], None] | None = None, report_to: Sequence[str] = ()) -> RunOutcome:
    """Train (or continue) every step of ``run``, then evaluate; skips what is finished."""
    run_dir = Path(run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = _load_record(run)
    record["canonical"] = canonical_config(run)
    (run_dir / "command.sh").write_text(_command_lines(run, exp, form), "utf-8")
    outcome = RunOutcome(run.run_id, "finished")
    done = all(step_finished(s.out) for s in run.steps) and (Path(run.eval_out) / "report.json").is_file()
    out_root = Path(run.dir).parent.parent.parent
    twin = None if done or record.get("steps") else _find_twin(run, out_root, session.id if _times(exp) else None)
    if twin is not None:
        outcome.reused_from = _reuse(run, record, twin, out_root)
        record["status"] = "finished"
        _write_json(run_dir / RUN_FILE, record)
        return outcome
    record["status"] = "running"
    _write_json(run_dir / RUN_FILE, record)
    try:
        for step in run.steps:
            if on_phase:
                on_phase(step.name)
            trained, ok = _train_step(run, step, record, session, report_to)
            _write_json(run_dir / RUN_FILE, record)
            if trained:
                outcome.trained.append(step.name)
            if not ok:
                outcome.status = "failed"
                outcome.message = (f"healthgpt train ({step.name}) failed; log {run.run_id}/logs/{step.name}.log:\n"
                                   + _tail(run_dir / "logs" / f"{step.name}.log"))
                return outcome
        if not (Path(run.eval_out) / "report.json").is_file():
            if on_phase:
                on_phase("eval")
            started = _now()
            rc, seconds = _run_process(run, "eval", run.eval_argv, run_dir / "logs" / "eval.log")
            record["eval"]["attempts"].append({"session": session.id, "host": session.host, "started": started,
                                               "seconds": round(seconds, 3), "returncode": rc})
            outcome.evaluated = True
            if rc != 0 or not (Path(run.eval_out) / "report.json").is_file():
                outcome.status = "failed"
                outcome.message = (f"healthgpt eval failed; log {run.run_id}/logs/eval.log:\n"
                                   + _tail(run_dir / "logs" / "eval.log"))
                return outcome
        return outcome
    finally:
        record["status"] = outcome.status
        _write_json(run_dir / RUN_FILE, record)


def _experiment_record(exp: Experiment, form: str, variables: dict[str, Any], n_runs: int,
                       pretrained: bool = True) -> dict[str, Any]:
    return {"format": "healthgpt-experiment/1", "name": exp.name, "title": exp.title, "source": exp.source,
            "form": form, "vars": variables, "pretrained": pretrained, "n_runs": n_runs, "spec": exp.raw}


def plan(experiments: Sequence[Experiment], form: str, out: str | os.PathLike[str],
         variables: dict[str, Any] | None = None, *, pretrained: bool = True) -> list[tuple[Experiment, RunSpec]]:
    """Every run of every experiment, in execution order (experiments one after another)."""
    runs: list[tuple[Experiment, RunSpec]] = []
    for exp in experiments:
        runs += [(exp, r) for r in expand(exp, form, Path(out) / exp.name, variables, pretrained=pretrained)]
    return runs


def missing_parts(runs: Sequence[RunSpec]) -> str | None:
    """The error for pre-trained parts the runs need that do not exist (None: all there)."""
    missing: dict[str, str] = {}
    for run in runs:
        missing.update({p: what for p, what in run.requires.items() if not Path(p).exists()})
    if not missing:
        return None
    listed = "; ".join(f"{p} ({what})" for p, what in sorted(missing.items()))
    return (f"the runs start from pre-trained parts that are missing: {listed}. `make demo` makes the demo's "
            "(scripts/demo.sh); --demo-dir DIR points at another demo folder, --no-pretrained starts from random "
            "weights instead")


def _check_experiment_dir(exp_dir: Path, record: dict[str, Any]) -> None:
    path = exp_dir / EXPERIMENT_FILE
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError:
        return
    for key in ("form", "vars"):  # the runs' own configs are checked one by one (run.json)
        if previous.get(key) != record.get(key):
            raise ExperimentError(f"{exp_dir.name}/: this folder holds the experiment run with a different {key} "
                                  f"({previous.get(key)!r:.80} vs now {record.get(key)!r:.80}); use a new --out")


def run_experiments(experiments: Sequence[Experiment], form: str, out: str | os.PathLike[str], *,
                    share: tuple[int, int] | None = None, variables: dict[str, Any] | None = None,
                    console: Any = None, progress: bool = True, pretrained: bool = True,
                    report_to: Sequence[str] = ()) -> list[RunOutcome]:
    """Run this share of the grid (all of it by default) and return one outcome per run; ``report_to``:
    the trackers every training step logs to (``healthgpt train --report-to``)."""
    from rich.console import Console

    from vlhealth.progress import progress_bar

    console = console or Console(stderr=True)
    variables = dict(variables or {})
    everything = plan(experiments, form, out, variables, pretrained=pretrained)
    problem = missing_parts([r for _, r in everything])
    if problem:
        raise ExperimentError(problem)
    for exp in experiments:
        n = sum(1 for e, _ in everything if e is exp)
        exp_dir = Path(out) / exp.name
        record = _experiment_record(exp, form, variables, n, pretrained)
        _check_experiment_dir(exp_dir, record)
        exp_dir.mkdir(parents=True, exist_ok=True)
        _write_json(exp_dir / EXPERIMENT_FILE, record)
    index = {id(r): i for i, (_, r) in enumerate(everything)}
    mine_runs = partition_runs([r for _, r in everything], share)
    mine = [everything[index[id(r)]] for r in mine_runs]
    for _exp, run in mine:  # refuse a changed config before spending time on anything
        if (Path(run.dir) / RUN_FILE).is_file():
            _load_record(run)
    session = new_session()
    outcomes: list[RunOutcome] = []
    bar = progress_bar("experiment", "{task.fields[current]}", console=console,
                       enabled=progress and console.is_terminal)
    with bar:
        task = bar.add_task("runs", total=len(mine), current="")
        for exp, run in mine:
            def phase(name: str, exp: Experiment = exp, run: RunSpec = run) -> None:
                bar.update(task, current=f"{exp.name}: {run.cell} seed {run.seed} ({name})")

            t0 = time.perf_counter()
            outcome = execute_run(run, exp, form, session, on_phase=phase, report_to=report_to)
            outcomes.append(outcome)
            bar.advance(task)
            did = ", ".join([f"trained {', '.join(outcome.trained)}"] * bool(outcome.trained)
                            + ["evaluated"] * outcome.evaluated
                            + [f"reused {outcome.reused_from} (same configuration)"] * bool(outcome.reused_from)
                            ) or "already finished"
            colour = "green" if outcome.status == "finished" else "red"
            console.print(f"[{colour}]{outcome.status}[/{colour}] {exp.name} {run.run_id}: {did} "
                          f"({time.perf_counter() - t0:.1f} s)")
            if outcome.message:
                console.print(outcome.message, markup=False, highlight=False)
    return outcomes
