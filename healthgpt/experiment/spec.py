"""Experiment YAMLs and their expansion into runs.

An experiment is a grid of training runs that differ in one factor (or two, as Table 10's
variant x experts). The YAML (``healthgpt/experiment/experiments/<name>.yaml`` ships one per paper result)::

    name: peft-variants
    title: "Table 4: ..."
    seeds: [0, 1, 2]
    axes:                           # product of the axes' values (+ extra_cells) = the cells
      variant:
        - {label: LoRA, model: {variant: lora}}
        - {label: H-LoRA, model: {variant: hlora, experts: 4}}
    extra_cells: []                 # cells outside the product: {labels: {axis: label}, model: ..., ...}
    baseline: LoRA                  # the cell time ratios are relative to (per seed, same session)
    columns:                        # the table: column name -> metric (see healthgpt.experiment.results)
      - {name: comp. avg, metric: comp_avg}
      - {name: training time, metric: time_ratio, format: ratio}
    paper: {LoRA: {training time: 1.00}, ...}     # the paper's numbers, by cell key and column name
    claims: [...]                   # see healthgpt.experiment.stats
    forms:
      small:                        # CPU, demo shards
        vars: {shards: demo/shards} # "{shards}" in any string below; --var shards=... overrides
        preset: tiny
        env: {OMP_NUM_THREADS: "1"}
        launcher: []                # e.g. [torchrun, --nproc-per-node, 8]: how train/eval processes start
        model: {}                   # --model-set for every cell (cells add theirs)
        pipelines:                  # named train pipelines; a cell picks one (default: "default")
          default:
            - {name: train, stage: 3, task: mixed, shards: ["{shards}/vqa_rad", "{shards}/synthrad:0.5"],
               args: {steps: 8, global-batch: 2}}
        eval: {shards: ["{shards}/vqa_rad"], args: {limit: 4}}
        evals: {}                   # per pipeline name, when pipelines need different eval shards
        timing_step: train          # the step whose time per optimizer step is compared (default: last)
        pretrained:                 # pre-trained parts to start from (the demo's; `--no-pretrained` drops them)
          init: "{demo}/text-lm"    # --init of every train step that has no init of its own
          vq: "{demo}/vq/vqgan.safetensors"   # eval --vq; train --image-codes = n_embed of vqgan.json beside it
          model: {vision_path: "{demo}/vision"}   # --model-set for train and eval
        note: "..."                 # printed under the table (what the form's numbers can and cannot show)
      full: {...}                   # the same for M3 on GPUs

A cell value may carry ``model`` (preset overrides, ``--model-set``; its strings take the form's
variables too, e.g. a rank that differs between the forms), ``vars`` (variables for the
strings of the form, e.g. shard weights and step counts of Figure 2), ``pipeline`` (a pipeline
name), ``train_args`` (extra ``healthgpt train`` options for every step of the cell) and
``eval_args``. A train step's ``init`` names earlier steps of the same run.

``pretrained`` (:func:`pretrained_parts`) names files the runs start from; each run lists them in
``RunSpec.requires`` and the runner refuses to start while one is missing, saying which and what
makes it (``make demo`` for the demo's parts).

Expansion (:func:`expand`) gives the runs in execution order: seed-major, the cells interleaved
inside each seed (baseline first), so that variants run side by side in time; ``--run i/n``
(:func:`partition_runs`) takes a contiguous block of that order, which keeps whole seed groups
together on one machine when n divides the number of seeds.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "EXPERIMENTS_DIR",
    "Cell",
    "Column",
    "Experiment",
    "ExperimentError",
    "RunSpec",
    "StepSpec",
    "expand",
    "load_experiment",
    "partition_runs",
    "pretrained_parts",
    "shipped_experiments",
]

EXPERIMENTS_DIR = Path(__file__).resolve().parent / "experiments"
_VAR = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ExperimentError(ValueError):
    """An experiment YAML (or a run folder) that cannot be used; the message names the file."""


@dataclass(frozen=True)
class Column:
    name: str
    metric: str
    format: str = "number"  # number | ratio
    better: str | None = None  # higher | lower (for the reader; shown in the header)


@dataclass(frozen=True)
class Cell:
    """One point of the grid: ``key`` = its labels joined by "/" in axis order."""

    key: str
    labels: dict[str, str]
    model: dict[str, Any] = field(default_factory=dict)
    vars: dict[str, Any] = field(default_factory=dict)
    pipeline: str = "default"
    train_args: dict[str, Any] = field(default_factory=dict)
    eval_args: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return "__".join(_slug(v) for v in self.labels.values())


@dataclass
class Experiment:
    name: str
    title: str
    source: str  # file name the spec came from (no directories)
    seeds: list[int]
    cells: list[Cell]
    baseline: str | None
    columns: list[Column]
    paper: dict[str, dict[str, Any]]
    claims: list[dict[str, Any]]
    forms: dict[str, dict[str, Any]]
    description: str = ""
    paper_note: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    def cell(self, key: str) -> Cell:
        for c in self.cells:
            if c.key == key:
                return c
        raise ExperimentError(f"{self.source}: no cell {key!r}; cells are {[c.key for c in self.cells]}")


@dataclass
class StepSpec:
    """One ``healthgpt train`` invocation of a run (``argv`` without the program name)."""

    name: str
    out: str
    argv: list[str]
    task: str


@dataclass
class RunSpec:
    """One run: a cell x seed, its train steps and its eval, with every path relative to the cwd."""

    experiment: str
    index: int
    run_id: str
    cell: str
    labels: dict[str, str]
    seed: int
    dir: str
    steps: list[StepSpec]
    eval_argv: list[str]
    eval_out: str
    env: dict[str, str]
    timing_step: str
    launcher: list[str] = field(default_factory=list)  # e.g. [torchrun, --nproc-per-node, "8"]; [] = python
    requires: dict[str, str] = field(default_factory=dict)  # path -> what it is and what makes it

    def config(self) -> dict[str, Any]:
        """What fully determines the run (compared on resume)."""
        return {"cell": self.cell, "seed": self.seed, "env": self.env, "launcher": self.launcher,
                "train": [[s.name, s.argv] for s in self.steps], "eval": self.eval_argv}


# ------------------------------------------------------------------------------------------ loading


def shipped_experiments() -> dict[str, Path]:
    """Name -> YAML of the experiments shipped with the package."""
    return {p.stem: p for p in sorted(EXPERIMENTS_DIR.glob("*.yaml"))}


def load_experiment(ref: str | os.PathLike[str]) -> Experiment:
    """A shipped experiment by name (``peft-variants``) or a YAML file."""
    path = Path(ref)
    if not path.is_file():
        shipped = shipped_experiments()
        if str(ref) not in shipped:
            raise ExperimentError(f"{os.fspath(ref)}: no such file and no shipped experiment of that name; give a YAML "
                                  f"file or one of {', '.join(shipped)}")
        path = shipped[str(ref)]
    try:
        doc = yaml.safe_load(path.read_text("utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ExperimentError(f"{path.name}: cannot read the experiment YAML ({err})") from err
    return parse_experiment(doc, path.name)


def parse_experiment(doc: Any, source: str = "<experiment>") -> Experiment:
    if not isinstance(doc, dict):
        raise ExperimentError(f"{source}: an experiment YAML is a mapping, got {type(doc).__name__}")
    for key in ("name", "axes", "forms", "columns"):
        if key not in doc:
            raise ExperimentError(f"{source}: missing required key {key!r}")
    seeds = [int(s) for s in doc.get("seeds", [0, 1, 2])]
    if len(seeds) < 3:
        raise ExperimentError(f"{source}: at least 3 seeds per cell are needed for mean ± std, got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise ExperimentError(f"{source}: duplicate seeds {seeds}")
    cells = _cells(doc, source)
    baseline = doc.get("baseline")
    if baseline is not None and baseline not in {c.key for c in cells}:
        raise ExperimentError(f"{source}: baseline {baseline!r} is not a cell ({[c.key for c in cells]})")
    if baseline is not None:  # baseline first in every seed group
        cells.sort(key=lambda c: c.key != baseline)
    columns = []
    for i, col in enumerate(doc["columns"]):
        if not isinstance(col, dict) or "name" not in col or "metric" not in col:
            raise ExperimentError(f"{source}: columns[{i}] needs name and metric, got {col!r}")
        columns.append(Column(str(col["name"]), str(col["metric"]), str(col.get("format", "number")),
                              col.get("better")))
    forms = doc["forms"]
    if not isinstance(forms, dict) or not forms:
        raise ExperimentError(f"{source}: forms must map form names (small, full) to their settings")
    for fname, form in forms.items():
        _check_form(form, fname, source, cells)
    paper = {str(k): dict(v or {}) for k, v in (doc.get("paper") or {}).items()}
    keys = {c.key for c in cells}
    for k in paper:
        if k not in keys:
            raise ExperimentError(f"{source}: paper numbers for unknown cell {k!r} (cells: {sorted(keys)})")
    claims = list(doc.get("claims") or [])
    from healthgpt.experiment.stats import check_claim_spec

    for i, claim in enumerate(claims):
        problem = check_claim_spec(claim, keys)
        if problem:
            raise ExperimentError(f"{source}: claims[{i}]: {problem}")
    return Experiment(name=str(doc["name"]), title=str(doc.get("title", doc["name"])), source=source, seeds=seeds,
                      cells=cells, baseline=baseline, columns=columns, paper=paper, claims=claims, forms=forms,
                      description=str(doc.get("description", "")).strip(),
                      paper_note=str(doc.get("paper_note", "")).strip(), raw=doc)


def _cell_from(labels: dict[str, str], values: Sequence[Mapping[str, Any]]) -> Cell:
    merged: dict[str, Any] = {"model": {}, "vars": {}, "train_args": {}, "eval_args": {}, "pipeline": "default"}
    for v in values:
        for key in ("model", "vars", "train_args", "eval_args"):
            merged[key].update(v.get(key) or {})
        if v.get("pipeline"):
            merged["pipeline"] = str(v["pipeline"])
    return Cell(key="/".join(labels.values()), labels=labels, **merged)


_CELL_KEYS = {"label", "labels", "model", "vars", "pipeline", "train_args", "eval_args"}


def _cells(doc: dict[str, Any], source: str) -> list[Cell]:
    axes = doc["axes"]
    if not isinstance(axes, dict) or not axes:
        raise ExperimentError(f"{source}: axes must map an axis name to a list of values")
    names = list(axes)
    for name, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ExperimentError(f"{source}: axis {name!r} needs a non-empty list of values")
        for v in values:
            if not isinstance(v, dict) or "label" not in v:
                raise ExperimentError(f"{source}: every value of axis {name!r} needs a label, got {v!r}")
            unknown = set(v) - _CELL_KEYS
            if unknown:
                raise ExperimentError(f"{source}: axis {name!r} value {v['label']!r}: unknown key(s) "
                                      f"{sorted(unknown)} (allowed: {sorted(_CELL_KEYS - {'labels'})})")
    cells = []
    for combo in itertools.product(*(axes[n] for n in names)):
        labels = {n: str(v["label"]) for n, v in zip(names, combo, strict=True)}
        cells.append(_cell_from(labels, combo))
    for i, extra in enumerate(doc.get("extra_cells") or []):
        labels = extra.get("labels") if isinstance(extra, dict) else None
        if not isinstance(labels, dict) or set(labels) != set(names):
            raise ExperimentError(f"{source}: extra_cells[{i}] needs labels for every axis {names}")
        cells.append(_cell_from({n: str(labels[n]) for n in names}, [extra]))
    keys = [c.key for c in cells]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ExperimentError(f"{source}: duplicate cells {dupes}")
    slugs = [c.slug for c in cells]
    if len(set(slugs)) != len(slugs):
        raise ExperimentError(f"{source}: cell labels {keys} give clashing folder names {slugs}")
    return cells


def _check_form(form: Any, fname: str, source: str, cells: Sequence[Cell]) -> None:
    where = f"{source}: forms.{fname}"
    if not isinstance(form, dict):
        raise ExperimentError(f"{where} must be a mapping")
    pipelines = form.get("pipelines")
    if not isinstance(pipelines, dict) or not pipelines:
        raise ExperimentError(f"{where}.pipelines must map pipeline names to lists of train steps")
    for pname, steps in pipelines.items():
        if not isinstance(steps, list) or not steps:
            raise ExperimentError(f"{where}.pipelines.{pname} needs at least one train step")
        seen: set[str] = set()
        for i, step in enumerate(steps):
            if not isinstance(step, dict):
                raise ExperimentError(f"{where}.pipelines.{pname}[{i}] must be a mapping")
            missing = [k for k in ("name", "stage", "task", "shards") if k not in step]
            if missing:
                raise ExperimentError(f"{where}.pipelines.{pname}[{i}] misses {missing}")
            if step["name"] in seen or step["name"] == "eval":
                raise ExperimentError(f"{where}.pipelines.{pname}: step name {step['name']!r} repeated or reserved")
            for init in step.get("init") or []:
                if init not in seen:
                    raise ExperimentError(f"{where}.pipelines.{pname}.{step['name']}: init {init!r} is not an "
                                          "earlier step of the pipeline")
            seen.add(step["name"])
        timing = form.get("timing_step")
        if timing is not None and timing not in seen and len(pipelines) == 1:
            raise ExperimentError(f"{where}.timing_step {timing!r} is not a step of pipeline {pname!r}")
    for cell in cells:
        if cell.pipeline not in pipelines:
            raise ExperimentError(f"{where}: cell {cell.key!r} wants pipeline {cell.pipeline!r}; the form has "
                                  f"{sorted(pipelines)}")
    for pname in pipelines:
        ev = _eval_of(form, pname)
        if not isinstance(ev, dict) or not ev.get("shards"):
            raise ExperimentError(f"{where}: pipeline {pname!r} has no eval with shards (eval: or evals.{pname}:)")


def _eval_of(form: Mapping[str, Any], pipeline: str) -> Any:
    """The eval settings of a pipeline: ``evals.<pipeline>`` if given, else ``eval``."""
    return (form.get("evals") or {}).get(pipeline) or form.get("eval")


# ------------------------------------------------------------------------------------------ expansion


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-")
    return s or "x"


def _substitute(value: Any, variables: Mapping[str, Any], where: str) -> Any:
    if isinstance(value, str):
        def one(m: re.Match[str]) -> str:
            if m.group(1) not in variables:
                raise ExperimentError(f"{where}: unknown variable {{{m.group(1)}}} (have {sorted(variables)}); "
                                      "define it under vars: or pass --var NAME=VALUE")
            return str(variables[m.group(1)])

        return _VAR.sub(one, value)
    if isinstance(value, list):
        return [_substitute(v, variables, where) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, variables, where) for k, v in value.items()}
    return value


def _options(args: Mapping[str, Any]) -> list[str]:
    """``{steps: 8, no-progress: true, shards: [a, b]}`` -> ``--steps 8 --no-progress --shards a --shards b``."""
    out: list[str] = []
    for key, value in args.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False:
            out.append("--no-" + str(key).replace("_", "-"))
        elif value is None:
            continue
        elif isinstance(value, list):
            for v in value:
                out += [flag, str(v)]
        else:
            out += [flag, str(value)]
    return out


def _rel(path: str) -> str:
    """Paths go into saved commands relative to the working folder, never absolute."""
    p = str(path)
    if os.path.isabs(p):
        return os.path.relpath(p)
    return p


def _model_sets(model: Mapping[str, Any]) -> list[str]:
    """``--model-set key=value`` per preset override (values are read back as YAML by the CLIs)."""
    out = []
    for k, v in model.items():
        text = json.dumps(v) if isinstance(v, list | dict | bool) or v is None else str(v)
        out += ["--model-set", f"{k}={text}"]
    return out


# what makes each pre-trained part (named in the error when one is missing)
_PART_NAMES = {"init": "the pre-trained text LM (`healthgpt pretrain-text`)",
               "vq": "the trained VQGAN (`vlhealth vq train`)",
               "vision_path": "the pre-trained vision tower (`healthgpt pretrain-vision`)"}


@dataclass
class Pretrained:
    """A form's ``pretrained`` block with its variables substituted."""

    init: str | None = None
    vq: str | None = None
    image_codes: int | None = None
    model: dict[str, Any] = field(default_factory=dict)
    requires: dict[str, str] = field(default_factory=dict)


def pretrained_parts(form: Mapping[str, Any], variables: Mapping[str, Any], where: str) -> Pretrained:
    """The pre-trained parts of a form: ``init`` (--init of every step without one), ``vq`` (eval --vq;
    train --image-codes = the ``n_embed`` of the ``.json`` beside it, unless ``image_codes`` is given) and
    ``model`` (--model-set overrides, e.g. ``vision_path``), each listed in ``requires``."""
    block = _substitute(form.get("pretrained") or {}, variables, f"{where}, pretrained")
    unknown = set(block) - {"init", "vq", "image_codes", "model"}
    if unknown:
        raise ExperimentError(f"{where}: pretrained has unknown key(s) {sorted(unknown)} (init, vq, image_codes, "
                              "model)")
    out = Pretrained(init=_rel(str(block["init"])) if block.get("init") else None,
                     vq=_rel(str(block["vq"])) if block.get("vq") else None,
                     model={str(k): v for k, v in (block.get("model") or {}).items()})
    for key in ("init", "vq"):
        if getattr(out, key):
            out.requires[getattr(out, key)] = _PART_NAMES[key]
    for key, value in out.model.items():
        if key.endswith("_path"):
            out.model[key] = _rel(str(value))
            out.requires[out.model[key]] = _PART_NAMES.get(key, f"the pre-trained part `{key}`")
    if block.get("image_codes") is not None:
        out.image_codes = int(block["image_codes"])
    elif out.vq:
        config = Path(out.vq).with_suffix(".json")
        try:  # absent before `make demo`: the run is refused then (requires), the dry run shows no --image-codes
            out.image_codes = int(json.loads(config.read_text("utf-8"))["n_embed"])
        except (OSError, ValueError, KeyError, TypeError):
            out.requires[str(config)] = "the trained VQGAN's config (n_embed; `vlhealth vq train`)"
    return out


def _train_argv(step: Mapping[str, Any], preset: str, outs: Mapping[str, str], step_out: str, seed: int,
                pre: Pretrained) -> list[str]:
    argv = ["--preset", preset, "--stage", str(step["stage"]), "--task", str(step["task"])]
    for s in step["shards"]:
        argv += ["--shards", _rel(str(s))]
    inits = [outs[init] for init in step.get("init") or []] or ([pre.init] if pre.init else [])
    for init in inits:
        argv += ["--init", init]
    argv += ["--out", step_out, "--seed", str(seed)]
    if pre.image_codes is not None:
        argv += ["--image-codes", str(pre.image_codes)]
    return argv


def expand(exp: Experiment, form_name: str, out: str | os.PathLike[str],
           var_overrides: Mapping[str, Any] | None = None, *, pretrained: bool = True) -> list[RunSpec]:
    """Every run of ``exp`` in its ``form_name`` form, in execution order, under ``out`` (``pretrained=False``:
    without the form's pre-trained parts, from random weights)."""
    if form_name not in exp.forms:
        raise ExperimentError(f"{exp.source}: no form {form_name!r} (have {sorted(exp.forms)})")
    form = exp.forms[form_name]
    root = Path(_rel(os.fspath(out)))
    runs: list[RunSpec] = []
    for seed in exp.seeds:
        for cell in exp.cells:
            variables = {**(form.get("vars") or {}), **cell.vars, **(var_overrides or {}), "seed": seed}
            where = f"{exp.source}: forms.{form_name} (cell {cell.key})"
            pre = pretrained_parts(form, variables, where) if pretrained else Pretrained()
            preset = str(_substitute(form.get("preset", "tiny"), variables, where))
            env = {str(k): str(v) for k, v in _substitute(form.get("env") or {}, variables, where).items()}
            run_id = f"{cell.slug}__s{seed}"
            run_dir = root / "runs" / run_id
            model = _substitute({**(form.get("model") or {}), **pre.model, **cell.model}, variables, where)
            steps: list[StepSpec] = []
            outs: dict[str, str] = {}
            for step in exp.forms[form_name]["pipelines"][cell.pipeline]:
                step = _substitute(step, variables, f"{where}, step {step['name']}")
                step_out = str(run_dir / step["name"])
                argv = _train_argv(step, preset, outs, step_out, seed, pre) + _model_sets(model)
                argv += _options({**_substitute(form.get("train_args") or {}, variables, where),
                                  **(step.get("args") or {}),
                                  **_substitute(cell.train_args, variables, where)})
                outs[step["name"]] = step_out
                steps.append(StepSpec(step["name"], step_out, argv, str(step["task"])))
            ev = _substitute(_eval_of(form, cell.pipeline), variables, f"{where}, eval")
            eval_out = str(run_dir / "eval")
            eval_argv = ["--preset", preset]
            for s in ev["shards"]:
                eval_argv += ["--shards", _rel(str(s))]
            eval_argv += ["--checkpoint", steps[-1].out, "--out", eval_out, "--seed", str(seed)]
            eval_argv += ["--vq", pre.vq] if pre.vq else []
            eval_argv += _model_sets(model)
            eval_argv += _options({**(ev.get("args") or {}), **_substitute(cell.eval_args, variables, where)})
            timing = str(form.get("timing_step") or steps[-1].name)
            if timing not in outs:
                timing = steps[-1].name
            runs.append(RunSpec(experiment=exp.name, index=len(runs), run_id=run_id, cell=cell.key,
                                labels=dict(cell.labels), seed=seed, dir=str(run_dir), steps=steps,
                                eval_argv=eval_argv, eval_out=eval_out, env=env, timing_step=timing,
                                launcher=[str(x) for x in _substitute(form.get("launcher") or [], variables, where)],
                                requires=dict(pre.requires)))
    return runs


def partition_runs(runs: Sequence[RunSpec], share: tuple[int, int] | None) -> list[RunSpec]:
    """Share ``i`` of ``n`` (0-based): a contiguous block of the execution order; the n shares cover every
    run exactly once and differ in size by at most one."""
    if share is None:
        return list(runs)
    i, n = share
    if n < 1 or not 0 <= i < n:
        raise ExperimentError(f"--run {i}/{n}: need n >= 1 and 0 <= i < n")
    total = len(runs)
    lo, hi = (i * total) // n, ((i + 1) * total) // n
    return list(runs[lo:hi])
