"""The ablation harness without training: YAML grid expansion, seeds' statistics and the verdict rule,
``--run i/n`` shares, the runner's skip/resume logic, collect on partial results."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from healthgpt.experiment import runner as runner_mod
from healthgpt.experiment.collect import collect, collect_experiment
from healthgpt.experiment.spec import (
    ExperimentError,
    expand,
    load_experiment,
    parse_experiment,
    partition_runs,
    shipped_experiments,
)
from healthgpt.experiment.stats import (
    NO_DATA,
    NOT_REPRODUCED,
    REPRODUCED,
    WITHIN_NOISE,
    Summary,
    compare,
    evaluate_claim,
    mean_std,
)

SPEC: dict[str, Any] = {
    "name": "toy",
    "title": "Toy: variants x k",
    "seeds": [0, 1, 2],
    "axes": {
        "variant": [{"label": "MoE", "model": {"variant": "moelora"}},
                    {"label": "H", "model": {"variant": "hlora"}}],
        "k": [{"label": "k=2", "model": {"experts": 2}}, {"label": "k=8", "model": {"experts": 8}, "vars": {"n": 7}}],
    },
    "extra_cells": [{"labels": {"variant": "LoRA", "k": "k=1"}, "model": {"variant": "lora"}}],
    "baseline": "LoRA/k=1",
    "columns": [{"name": "comp", "metric": "comp_avg"}, {"name": "time", "metric": "time_ratio", "format": "ratio"}],
    "paper": {"H/k=2": {"comp": 51.5, "time": 0.99}},
    "claims": [
        {"id": "c1", "kind": "compare", "a": "H/k=2", "b": "MoE/k=2", "metric": "comp_avg", "text": "H better"},
        {"id": "t1", "kind": "near", "a": "H/k=8", "metric": "time_ratio", "target": 1.0, "tolerance": 0.1,
         "text": "H as fast as LoRA"},
    ],
    "forms": {
        "small": {
            "vars": {"shards": "data", "n": 3},
            "preset": "tiny",
            "env": {"OMP_NUM_THREADS": "1"},
            "model": {"comp_r": 32},
            "pipelines": {"default": [
                {"name": "a", "stage": 1, "task": "generation", "shards": ["{shards}/gen"], "args": {"steps": "{n}"}},
                {"name": "b", "stage": 3, "task": "mixed", "init": ["a"], "shards": ["{shards}/vqa:2", "{shards}/gen"]},
            ]},
            "eval": {"shards": ["{shards}/vqa"], "args": {"limit": 4, "constrained-images": True}},
        },
    },
}


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


# ------------------------------------------------------------------------------------------ grid expansion


def test_yaml_expands_to_the_product_of_the_axes_plus_extra_cells(tmp_path: Path) -> None:
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(SPEC, sort_keys=False), "utf-8")
    exp = load_experiment(path)
    assert [c.key for c in exp.cells] == ["LoRA/k=1", "MoE/k=2", "MoE/k=8", "H/k=2", "H/k=8"]  # baseline first
    runs = expand(exp, "small", "out")
    assert len(runs) == 5 * 3
    # seed-major, the cells interleaved inside each seed group
    assert [(r.seed, r.cell) for r in runs[:5]] == [(0, c.key) for c in exp.cells]
    assert [r.seed for r in runs] == [0] * 5 + [1] * 5 + [2] * 5
    assert len({r.run_id for r in runs}) == 15 and runs[3].run_id == "h__k-2__s0"
    r = runs[2]  # MoE/k=8, seed 0
    a, b = r.steps
    assert a.argv[:6] == ["--preset", "tiny", "--stage", "1", "--task", "generation"]
    assert _opt(a.argv, "--steps") == ["7"]  # the cell's vars win over the form's
    assert _opt(a.argv, "--model-set") == ["comp_r=32", "variant=moelora", "experts=8"]
    assert _opt(b.argv, "--init") == [a.out] and a.out == "out/runs/moe__k-8__s0/a"
    assert _opt(b.argv, "--shards") == ["data/vqa:2", "data/gen"]
    assert _opt(r.eval_argv, "--checkpoint") == [b.out] and _opt(r.eval_argv, "--seed") == ["0"]
    assert "--constrained-images" in r.eval_argv and _opt(r.eval_argv, "--limit") == ["4"]
    assert _opt(r.eval_argv, "--model-set") == _opt(a.argv, "--model-set")  # eval builds the same model
    assert r.env == {"OMP_NUM_THREADS": "1"} and r.timing_step == "b"
    # --var overrides a path of the YAML
    moved = expand(exp, "small", "out", {"shards": "elsewhere/shards"})
    assert _opt(moved[0].steps[0].argv, "--shards") == ["elsewhere/shards/gen"]


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(seeds=[0, 1]), "at least 3 seeds"),
    (lambda d: d.update(baseline="nope"), "baseline"),
    (lambda d: d["claims"].append({"id": "x", "kind": "compare", "a": "H/k=3", "b": "H/k=2", "metric": "m",
                                   "text": "t"}), "unknown cell"),
    (lambda d: d["forms"]["small"]["pipelines"]["default"][1].update(init=["zzz"]), "not an earlier step"),
    (lambda d: d["axes"]["k"].append({"label": "k=2"}), "duplicate cells"),
])
def test_bad_yaml_is_refused_with_the_reason(change, message) -> None:
    doc = json.loads(json.dumps(SPEC))
    change(doc)
    with pytest.raises(ExperimentError, match=message):
        parse_experiment(doc, "toy.yaml")


def test_unknown_variable_names_the_file_and_the_variable() -> None:
    doc = json.loads(json.dumps(SPEC))
    doc["forms"]["small"]["eval"]["shards"] = ["{nowhere}/vqa"]
    with pytest.raises(ExperimentError, match=r"toy.yaml.*\{nowhere\}"):
        expand(parse_experiment(doc, "toy.yaml"), "small", "out")


def test_every_shipped_experiment_expands_in_both_forms() -> None:
    shipped = shipped_experiments()
    assert {"peft-variants", "experts", "expert-structure", "three-stage-vs-mixed", "visual-perception",
            "task-conflict"} <= set(shipped)
    for name in shipped:
        exp = load_experiment(name)
        assert {"small", "full"} <= set(exp.forms)
        for form in ("small", "full"):
            runs = expand(exp, form, "o")
            assert len(runs) == len(exp.cells) * len(exp.seeds) >= 6
            for r in runs:
                for s in r.steps:
                    assert not any(Path(a).is_absolute() for a in s.argv)
    # same total rank, k experts: every k divides the ranks of the experts experiment
    exp = load_experiment("experts")
    for form in ("small",):
        model = exp.forms[form]["model"]
        for cell in exp.cells:
            k = int(cell.model.get("experts", 1))
            assert model["comp_r"] % k == 0 and model["gen_r"] % k == 0


# ------------------------------------------------------------------------------------------ stats


def test_mean_and_sample_std_on_made_up_numbers() -> None:
    s = mean_std([1.0, 2.0, 3.0, 4.0])
    assert s.mean == pytest.approx(2.5) and s.std == pytest.approx(math.sqrt(5 / 3)) and s.n == 4
    assert mean_std([2.0, None, float("nan"), 4.0]).mean == pytest.approx(3.0)
    one = mean_std([5.0])
    assert one.std is None and one.format() == "5.00 (n=1)"
    assert mean_std([]).mean is None
    assert mean_std([1.0, 3.0]).format(1) == "2.0 ± 1.4"


def test_welch_rule_on_made_up_numbers() -> None:
    a = mean_std([10.0, 11.0, 12.0])  # mean 11, std 1
    assert compare(a, mean_std([10.5, 10.0, 11.0]), "higher") == WITHIN_NOISE  # t = 0.77, p = 0.51
    assert compare(a, mean_std([8.0, 8.5, 9.0]), "higher") == REPRODUCED  # t = 3.87, df = 2.9, p = 0.032
    assert compare(a, mean_std([8.0, 8.5, 9.0]), "lower") == NOT_REPRODUCED
    assert compare(mean_std([8.0, 8.5, 9.0]), a, "higher") == NOT_REPRODUCED
    assert compare(a, mean_std([5.0, 8.0, 11.0]), "higher") == WITHIN_NOISE  # diff 3, but std 3: p = 0.24
    assert compare(a, mean_std([8.0]), "higher") == NO_DATA
    assert compare(a, mean_std([8.0, 8.5]), "higher") == NO_DATA  # fewer than 3 seeds


def test_claim_verdicts_on_made_up_numbers() -> None:
    stats = {
        "LoRA": {"time_ratio": mean_std([1.0, 1.0, 1.0])},
        "H": {"time_ratio": mean_std([1.02, 1.05, 1.03]), "comp": mean_std([50, 51, 52])},
        "M2": {"time_ratio": mean_std([1.2, 1.25, 1.22])},
        "M4": {"time_ratio": mean_std([1.5, 1.45, 1.55])},
        "M8": {"time_ratio": mean_std([1.6, 1.8, 2.0])},  # mean 1.8, std 0.2
        "slow": {"time_ratio": mean_std([1.3, 1.35, 1.32])},
        "edge": {"time_ratio": mean_std([1.05, 1.15, 1.25])},
    }
    near = {"id": "n", "text": "t", "kind": "near", "metric": "time_ratio", "target": 1.0, "tolerance": 0.1}
    res = evaluate_claim({**near, "a": "H"}, stats)
    assert res.verdict == REPRODUCED and res.test.startswith("TOST") and "α = 0.05" in res.test
    assert res.learned.startswith("n/a")  # time has no baseline: no learning gate
    assert evaluate_claim({**near, "a": "slow"}, stats).verdict == NOT_REPRODUCED
    assert evaluate_claim({**near, "a": "edge"}, stats).verdict == WITHIN_NOISE  # 1.15 is 0.05 out, std 0.1
    assert evaluate_claim({**near, "a": "H", "b": "LoRA"}, stats).verdict == REPRODUCED
    trend = {"id": "tr", "text": "t", "kind": "trend", "metric": "time_ratio", "direction": "increasing"}
    assert evaluate_claim({**trend, "cells": ["M2", "M4"]}, stats).verdict == REPRODUCED
    # M4 -> M8 is not significant (p = 0.11): the whole trend is not ...
    assert evaluate_claim({**trend, "cells": ["M2", "M4", "M8"]}, stats).verdict == WITHIN_NOISE
    # ... but its ends are (p = 0.04)
    assert evaluate_claim({**trend, "cells": ["M2", "M4", "M8"], "mode": "ends"}, stats).verdict == REPRODUCED
    assert evaluate_claim({**trend, "cells": ["M4", "M2"]}, stats).verdict == NOT_REPRODUCED
    res = evaluate_claim({"id": "c", "text": "t", "kind": "compare", "a": "H", "b": "nobody", "metric": "comp"}, stats)
    assert res.verdict == NO_DATA and "51.00 ± 1.00" in res.ours


# ------------------------------------------------------------------------------------------ shares


@pytest.mark.parametrize("total", [1, 5, 9, 27, 36])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 40])
def test_run_shares_cover_every_run_exactly_once(total: int, n: int) -> None:
    runs = list(range(total))
    shares = [partition_runs(runs, (i, n)) for i in range(n)]  # type: ignore[arg-type]
    flat = [r for share in shares for r in share]
    assert sorted(flat) == runs and len(flat) == len(set(flat))
    assert flat == runs  # contiguous blocks, in execution order
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1
    assert partition_runs(runs, None) == runs  # type: ignore[arg-type]
    with pytest.raises(ExperimentError):
        partition_runs(runs, (n, n))  # type: ignore[arg-type]


def test_a_share_of_whole_seed_groups_keeps_variants_side_by_side() -> None:
    exp = parse_experiment(SPEC, "toy.yaml")
    runs = expand(exp, "small", "o")
    for i in range(3):
        share = partition_runs(runs, (i, 3))
        assert {r.seed for r in share} == {i} and len(share) == len(exp.cells)


# ------------------------------------------------------------------------------------------ runner (no training)


def _fake_outputs(run_dir: Path, step_times: list[float], losses: list[float]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w", encoding="utf-8") as fh:
        for i, (t, loss) in enumerate(zip(step_times, losses, strict=True)):
            task = "comprehension" if i % 2 == 0 else "generation"
            fh.write(json.dumps({"step": i + 1, "loss": loss, "step_time_s": t, "tasks": {task: 1}}) + "\n")
    (run_dir / "final").mkdir(exist_ok=True)
    (run_dir / "final" / "train_summary.json").write_text("{}", "utf-8")


def _fake_report(eval_dir: Path, comp: float, ssim: float) -> None:
    eval_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "comprehension": {"VQA-RAD": {"close": comp, "all": comp - 10, "open": None, "choice": None, "n_closed": 4,
                                      "n_open": 0, "n_choice": 0}},
        "generation": {"ct2mri/brain": {"subtask": "ct2mri", "body_part": "brain", "n": 2, "ssim": ssim,
                                        "psnr": 20.0, "mse": 30.0},
                       "mri2ct/brain": {"subtask": "mri2ct", "body_part": "brain", "n": 2, "ssim": ssim / 2,
                                        "psnr": 20.0, "mse": 30.0}},
    }
    (eval_dir / "report.json").write_text(json.dumps(report), "utf-8")


class FakeProcesses:
    """Stands in for the train/eval processes: records them and writes what they would write."""

    def __init__(self, step_time: dict[str, float] | None = None, fail: set[str] = frozenset()) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.step_time = step_time or {}
        self.fail = fail

    def __call__(self, run, kind: str, argv, log: Path) -> tuple[int, float]:
        argv = list(argv)
        self.calls.append((kind, argv))
        out = Path(_opt(argv, "--out")[0])
        if out.name in self.fail:
            return 1, 0.1
        if kind == "train":
            t = self.step_time.get(run.cell, 1.0)
            _fake_outputs(out, [5.0] + [t] * 5, [3.0, 2.5, 2.0, 1.8, 1.5, 1.2])
        else:
            seed = int(_opt(argv, "--seed")[0])
            base = {"LoRA/k=1": 40.0, "MoE/k=2": 45.0, "MoE/k=8": 45.0, "H/k=2": 60.0, "H/k=8": 60.0}.get(run.cell, 50.0)
            _fake_report(out, base + seed, 0.5 + 0.01 * seed)
        return 0, 0.1


def test_runner_skips_finished_steps_resumes_checkpointed_ones_and_refuses_changed_configs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exp = parse_experiment(SPEC, "toy.yaml")
    fake = FakeProcesses()
    monkeypatch.setattr(runner_mod, "_run_process", fake)
    outcomes = runner_mod.run_experiments([exp], "small", "out", progress=False)
    assert len(outcomes) == 15 and all(o.status == "finished" for o in outcomes)
    assert len(fake.calls) == 15 * 3  # two train steps + one eval per run
    run_dir = Path("out/toy/runs/h__k-2__s0")
    assert (run_dir / "command.sh").read_text("utf-8").count("healthgpt train") == 2
    record = json.loads((run_dir / "run.json").read_text("utf-8"))
    assert record["status"] == "finished" and record["steps"]["b"]["attempts"][0]["resumed"] is False

    # a rerun trains nothing
    fake.calls.clear()
    outcomes = runner_mod.run_experiments([exp], "small", "out", progress=False)
    assert fake.calls == [] and all(not o.trained and not o.evaluated for o in outcomes)

    # an unfinished step with a checkpoint continues with --resume; the finished step before it is skipped
    import shutil

    shutil.rmtree(run_dir / "b" / "final")
    shutil.rmtree(run_dir / "eval")
    (run_dir / "b" / "checkpoints" / "step-00000003").mkdir(parents=True)
    (run_dir / "b" / "checkpoints" / "step-00000003" / "trainer_state.json").write_text("{}", "utf-8")
    (run_dir / "b" / "checkpoints" / "step-00000003" / "rng-rank0.pt").write_bytes(b"")  # complete: state + RNG
    runner_mod.run_experiments([exp], "small", "out", progress=False)
    assert [(k, "--resume" in a, _opt(a, "--out")[0]) for k, a in fake.calls] == [
        ("train", True, str(run_dir / "b")), ("eval", False, str(run_dir / "eval"))]

    # the same folder with another configuration is refused, naming the run
    changed = json.loads(json.dumps(SPEC))
    changed["forms"]["small"]["pipelines"]["default"][0]["args"]["steps"] = 99
    with pytest.raises(ExperimentError, match="different configuration"):
        runner_mod.run_experiments([parse_experiment(changed, "toy.yaml")], "small", "out", progress=False)


def test_report_to_reaches_every_training_step_and_not_the_configuration(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exp = parse_experiment(SPEC, "toy.yaml")
    fake = FakeProcesses()
    monkeypatch.setattr(runner_mod, "_run_process", fake)
    runner_mod.run_experiments([exp], "small", "out", share=(0, 15), progress=False, report_to=("csv", "wandb"))
    trains = [a for k, a in fake.calls if k == "train"]
    evals = [a for k, a in fake.calls if k == "eval"]
    assert len(trains) == 2 and len(evals) == 1
    for argv, step in zip(trains, ("a", "b"), strict=True):
        assert _opt(argv, "--report-to") == ["csv,wandb"]
        assert _opt(argv, "--run-name")[0].startswith("toy/") and _opt(argv, "--run-name")[0].endswith(f"/{step}")
    assert "--report-to" not in evals[0]
    # logging elsewhere trains the same runs: a rerun without trackers finds them finished
    fake.calls.clear()
    runner_mod.run_experiments([exp], "small", "out", share=(0, 15), progress=False)
    assert fake.calls == []


def test_a_failed_run_is_reported_and_the_others_go_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exp = parse_experiment(SPEC, "toy.yaml")
    monkeypatch.setattr(runner_mod, "_run_process", FakeProcesses(fail={"a"}))
    outcomes = runner_mod.run_experiments([exp], "small", "out", share=(0, 3), progress=False)
    assert len(outcomes) == 5 and all(o.status == "failed" and "healthgpt train (a) failed" in o.message
                                      for o in outcomes)
    res = collect_experiment(Path("out/toy"))
    assert res.counts()["failed"] == 5 and res.counts()["missing"] == 10


# ------------------------------------------------------------------------------------------ collect


def test_collect_on_partial_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exp = parse_experiment(SPEC, "toy.yaml")
    fake = FakeProcesses(step_time={"LoRA/k=1": 1.0, "MoE/k=2": 1.3, "MoE/k=8": 2.0, "H/k=2": 1.02, "H/k=8": 1.01})
    monkeypatch.setattr(runner_mod, "_run_process", fake)
    # two machines' worth of shares, the third never ran: seeds 0 and 1 only
    runner_mod.run_experiments([exp], "small", "out", share=(0, 3), progress=False)
    runner_mod.run_experiments([exp], "small", "out", share=(1, 3), progress=False)
    results = collect("out")
    assert len(results) == 1
    res = results[0]
    assert res.counts() == {"runs": 15, "finished": 10, "failed": 0, "missing": 5, "unfinished": 0}
    h2 = res.stats["H/k=2"]
    assert h2["comp_avg"].n == 2 and h2["comp_avg"].mean == pytest.approx((60 + 50 + 61 + 51) / 4)
    # generation: SSIM x100, MTRANS = CT->MRI and MRI->CT together, gen_avg over the paper's columns
    assert h2["gen/ct2mri/brain/ssim"].mean == pytest.approx(50.5)
    assert h2["gen/mtrans/ssim"].mean == pytest.approx((50.5 + 25.25) / 2)
    assert h2["gen_avg"].mean == pytest.approx(h2["gen/mtrans/ssim"].mean)
    # time per step: median without the first step; ratios to LoRA of the same seed and session
    assert h2["step_time_s"].mean == pytest.approx(1.02)
    assert res.stats["MoE/k=8"]["time_ratio"].mean == pytest.approx(2.0)
    assert res.time_pairs == {"same_session": 10, "different_sessions": 0}
    verdicts = {c.id: c.verdict for c in res.claims}
    assert verdicts == {"c1": NO_DATA, "t1": NO_DATA}  # 2 of 3 seeds: no verdict yet
    doc = json.loads((tmp_path / "out" / "results.json").read_text("utf-8"))
    assert doc["experiments"][0]["missing"] == [r.run_id for r in res.runs if r.seed == 2]
    md = (tmp_path / "out" / "results.md").read_text("utf-8")
    assert "Runs: 10/15 finished" in md and "partial results" in md
    assert "| H/k=2 | ours (n=2) |" in md and "| paper | 51.50 | 0.99× |" in md
    assert (tmp_path / "out" / "toy" / "loss_curves.png").stat().st_size > 1000

    # the third share: 3 seeds, verdicts by the stated tests (the fake reports have no baselines: no learning gate)
    runner_mod.run_experiments([exp], "small", "out", share=(2, 3), progress=False)
    res = collect_experiment(Path("out/toy"))
    claims = {c.id: c for c in res.claims}
    assert {k: c.verdict for k, c in claims.items()} == {"c1": REPRODUCED, "t1": REPRODUCED}
    assert claims["c1"].test.startswith("Welch t = ") and "two-sided, α = 0.05" in claims["c1"].test

    # a cell with fewer than 3 seeds: its claims say "no data"
    import shutil

    for r in res.runs:
        if r.cell == "MoE/k=2" and r.seed == 1:
            shutil.rmtree(Path(r.eval_out))
    res = collect_experiment(Path("out/toy"))
    assert {c.id: c.verdict for c in res.claims}["c1"] == NO_DATA


def test_time_ratios_are_only_formed_within_one_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    doc = json.loads(json.dumps(SPEC))
    exp = parse_experiment(doc, "toy.yaml")
    monkeypatch.setattr(runner_mod, "_run_process", FakeProcesses())
    runs = expand(exp, "small", "out/toy")
    # seed 0 split over two sessions: the baseline alone first, the rest later
    runner_mod.run_experiments([exp], "small", "out", share=(0, 15), progress=False)
    runner_mod.run_experiments([exp], "small", "out", share=(1, 3), progress=False)
    for i in range(1, 5):
        runner_mod.run_experiments([exp], "small", "out", share=(i, 15), progress=False)
    res = collect_experiment(Path("out/toy"))
    assert runs[0].cell == "LoRA/k=1"
    # seed 0: the baseline against itself (1 pair) is one session, the 4 others not; seed 1: all 5
    assert res.time_pairs == {"same_session": 6, "different_sessions": 4}
    assert res.stats["H/k=2"]["time_ratio"].n == 1  # seed 1 only


def test_summary_json_round_trip() -> None:
    s = Summary(1.0, 0.5, 3, (0.5, 1.0, 1.5))
    assert s.to_json() == {"mean": 1.0, "std": 0.5, "n": 3, "values": [0.5, 1.0, 1.5]}
    s = Summary(1.0, 0.5, 3, (0.5, 1.0, 1.5), (0, 1, 2))
    assert s.to_json()["seeds"] == [0, 1, 2]


def test_a_run_equal_to_another_experiments_run_is_reused_not_retrained(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exp = parse_experiment(SPEC, "toy.yaml")
    other = json.loads(json.dumps(SPEC))
    other["name"] = "toy-subset"  # the H/k=2 cell again (model options in another order), and a new one
    other["axes"] = {"variant": [{"label": "H", "model": {"experts": 2, "variant": "hlora"}},
                                 {"label": "H4", "model": {"experts": 4, "variant": "hlora"}}]}
    other["baseline"], other["claims"], other["paper"], other["extra_cells"] = None, [], {}, []
    del other["axes"]["variant"][0]["model"]["experts"]
    other["forms"]["small"]["model"] = {"experts": 2, "comp_r": 32}
    fake = FakeProcesses()
    monkeypatch.setattr(runner_mod, "_run_process", fake)
    runner_mod.run_experiments([exp], "small", "out", progress=False)
    fake.calls.clear()
    outcomes = runner_mod.run_experiments([parse_experiment(other, "sub.yaml")], "small", "out", progress=False)
    reused = [o for o in outcomes if o.reused_from]
    assert [o.reused_from for o in reused] == [f"toy/runs/h__k-2__s{s}" for s in range(3)]
    assert len(fake.calls) == 3 * 3  # only the H4 runs trained and evaluated
    record = json.loads(Path("out/toy-subset/runs/h__s0/run.json").read_text("utf-8"))
    original = json.loads(Path("out/toy/runs/h__k-2__s0/run.json").read_text("utf-8"))
    assert record["reused_from"] == "toy/runs/h__k-2__s0" and record["steps"] == original["steps"]
    assert Path("out/toy-subset/runs/h__s0/eval/report.json").is_file()
    res = collect_experiment(Path("out/toy-subset"))
    assert res.counts()["finished"] == 6
