"""Verdicts only from runs that learned, by stated tests: Welch's t on known numbers, the learning gate
(margins over each run's own baselines), the seeds gate; Table 4 as the paper ran it (shared-adapter
baselines), the `expert-structure` experiment (equal scores, a time ratio) on synthetic run outputs, and
the small forms' pre-trained parts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from healthgpt.experiment import runner as runner_mod
from healthgpt.experiment.collect import collect
from healthgpt.experiment.learned import baseline_margins, loss_margins
from healthgpt.experiment.runner import canonical_config
from healthgpt.experiment.spec import ExperimentError, expand, load_experiment
from healthgpt.experiment.stats import (
    MARGIN,
    NO_DATA,
    NO_EVIDENCE,
    NOT_REPRODUCED,
    REPRODUCED,
    WITHIN_NOISE,
    evaluate_claim,
    mean_std,
    one_sample_t,
    welch_t,
)

# ------------------------------------------------------------------------------------------ the tests


def test_welch_t_matches_the_hand_computed_value() -> None:
    # a = 10, 11, 12 (mean 11, s² = 1); b = 8, 8.5, 9 (mean 8.5, s² = 0.25); n = 3 each:
    # se = sqrt(1/3 + 0.25/3) = sqrt(5/12); t = 2.5 / sqrt(5/12) = 3.8730
    # df = (5/12)² / ((1/3)²/2 + (1/12)²/2) = (25/144) / (17/288) = 50/17 = 2.9412
    t = welch_t([10.0, 11.0, 12.0], [8.0, 8.5, 9.0])
    assert t.estimate == pytest.approx(2.5)
    assert t.t == pytest.approx(2.5 / math.sqrt(5 / 12), rel=1e-12) == pytest.approx(3.8730, abs=1e-4)
    assert t.df == pytest.approx(50 / 17, rel=1e-12)
    assert t.p == pytest.approx(0.031562, abs=1e-5)  # scipy.stats.ttest_ind(equal_var=False)
    # equal sizes and variances: Welch's df is 2n - 2 = 4; t = -3 / sqrt(2/3) = -3.674, p = 0.0213 (t table, df 4)
    t = welch_t([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert t.df == pytest.approx(4.0) and t.t == pytest.approx(-3.674235, abs=1e-6)
    assert t.p == pytest.approx(0.021312, abs=1e-5)
    # no spread at all: a difference is certain, no difference is not one
    assert welch_t([1.0, 1.0, 1.0], [2.0, 2.0, 2.0]).p == 0.0
    assert welch_t([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]).p == 1.0
    # one-sample: (0.533, 0.567, 0.6) against 0.67: t = -5.369, df = 2, p = 0.033
    t = one_sample_t([0.8 / 1.5, 0.85 / 1.5, 0.9 / 1.5], 0.67)
    assert t.t == pytest.approx(-5.369358, abs=1e-5) and t.df == 2 and t.p == pytest.approx(0.03298, abs=1e-4)


def _stats(a: list[float], b: list[float], margins_a: list[float] | None = None,
           margins_b: list[float] | None = None) -> dict[str, Any]:
    seeds = list(range(len(a)))
    out: dict[str, Any] = {"A": {"comp_avg": mean_std(a, seeds)}, "B": {"comp_avg": mean_std(b, seeds)}}
    if margins_a is not None:
        out["A"][MARGIN + "comp_avg"] = mean_std(margins_a, seeds)
    if margins_b is not None:
        out["B"][MARGIN + "comp_avg"] = mean_std(margins_b, seeds)
    return out


CLAIM = {"id": "c", "text": "A comprehends better than B", "kind": "compare", "a": "A", "b": "B", "metric": "comp_avg"}


def test_runs_that_did_not_beat_their_baselines_give_no_evidence() -> None:
    # A is far above B (Welch p < 0.001), but neither cell's runs beat their majority baseline
    res = evaluate_claim(CLAIM, _stats([60, 61, 62], [40, 41, 42], [-1.0, -2.0, -0.5], [-20.0, -19.0, -18.0]))
    assert res.verdict == NO_EVIDENCE == "no evidence: the runs did not learn"
    assert res.learned == "0 of 6 runs beat their baselines"
    # one run that did not learn is enough to withhold the verdict
    res = evaluate_claim(CLAIM, _stats([60, 61, 62], [40, 41, 42], [5.0, 6.0, 7.0], [1.0, -1.0, 2.0]))
    assert res.verdict == NO_EVIDENCE and res.learned == "5 of 6 runs beat their baselines"
    # the same holds for every kind: an equality check between runs that learned nothing says nothing either
    equal = {"id": "e", "text": "t", "kind": "equal", "a": "A", "b": "B", "metric": "comp_avg", "tolerance": 0.5}
    assert evaluate_claim(equal, _stats([0, 0, 0], [0, 0, 0], [-5.0] * 3, [-5.0] * 3)).verdict == NO_EVIDENCE


def test_reproduced_needs_three_seeds_runs_that_learned_and_the_test() -> None:
    learned = [5.0, 6.0, 7.0]
    res = evaluate_claim(CLAIM, _stats([60, 61, 62], [40, 41, 42], learned, learned))
    assert res.verdict == REPRODUCED and res.learned == "6 of 6 runs beat their baselines"
    assert res.test.startswith("Welch t = 24.49, df = 4.0, p < 0.001") and "two-sided, α = 0.05" in res.test
    # two seeds: no verdict, however large the difference
    res = evaluate_claim(CLAIM, _stats([60, 61], [40, 41], learned[:2], learned[:2]))
    assert res.verdict == NO_DATA
    # the test does not find the difference (p = 0.24): not significant, even though the means differ by 3
    res = evaluate_claim(CLAIM, _stats([10, 11, 12], [5, 8, 11], learned, learned))
    assert res.verdict == WITHIN_NOISE and "p = 0.2" in res.test
    # significant against the claim: not reproduced
    assert evaluate_claim(CLAIM, _stats([40, 41, 42], [60, 61, 62], learned, learned)).verdict == NOT_REPRODUCED


def test_bound_and_equal_claims() -> None:
    stats = {"H": {"time_ratio": mean_std([0.8 / 1.5, 0.85 / 1.5, 0.9 / 1.5])},
             "slow": {"time_ratio": mean_std([0.9, 0.95, 1.0])}}
    bound = {"id": "b", "text": "t", "kind": "bound", "metric": "time_ratio", "target": 0.67, "better": "lower"}
    res = evaluate_claim({**bound, "a": "H"}, stats)
    assert res.verdict == REPRODUCED and "one-sample t vs 0.67 = -5.37, df = 2, p = 0.033" in res.test
    assert evaluate_claim({**bound, "a": "slow"}, stats).verdict == NOT_REPRODUCED
    equal = {"id": "e", "text": "t", "kind": "equal", "a": "A", "b": "B", "metric": "comp_avg", "tolerance": 0.5}
    same = _stats([50.0, 41.0, 66.0], [50.0, 41.0, 66.2], [1.0] * 3, [1.0] * 3)
    res = evaluate_claim(equal, same)
    assert res.verdict == REPRODUCED and "0.2000" in res.test
    differ = _stats([50.0, 41.0, 66.0], [50.0, 49.0, 66.0], [1.0] * 3, [1.0] * 3)
    assert evaluate_claim(equal, differ).verdict == NOT_REPRODUCED


# ------------------------------------------------------------------------------------------ margins


def _report(comp: float, ssim: float) -> dict[str, Any]:
    """A report.json as the evaluator writes it: the model and its baseline rows."""
    def img(s: float | None, psnr: float | None = 20.0, mse: float = 30.0) -> dict[str, Any]:
        return {"n": 2, "ssim": s, "psnr": psnr, "mse": mse}

    return {
        "comprehension": {
            "VQA-RAD": {"close": comp, "all": comp - 10, "open": None, "choice": None, "n_closed": 4, "n_open": 0,
                        "n_choice": 0},
            "OMVQA": {"close": None, "all": None, "open": None, "choice": comp, "n_closed": 0, "n_open": 0,
                      "n_choice": 4}},
        "comprehension_baselines": {
            "majority": {"VQA-RAD": {"close": 50.0, "all": 40.0, "open": None, "choice": None},
                         "OMVQA": {"close": None, "all": None, "open": None, "choice": 30.0}},
            "random_choice": {"OMVQA": {"n_choice": 4, "choice": 25.0}}},
        "generation": {
            "ct2mri/brain": {"subtask": "ct2mri", "body_part": "brain", **img(ssim),
                             "baselines": {"identity": img(0.30), "train_mean": img(0.40), "blank": img(0.20)}},
            "recon_ct": {"subtask": "recon", "target_modality": "CT", **img(0.80),
                         "baselines": {"identity": img(1.0, None, 0.0), "train_mean": img(0.50)}}},
    }


def test_margins_over_each_runs_own_baselines() -> None:
    m = baseline_margins(_report(comp=60.0, ssim=0.50))
    # comp_avg: majority on all three Table-1 columns (60, 50, 60 vs 50, 40, 30: +16.67); random choice on
    # OMVQA's single-choice column only (60 vs 25: +35): the smaller is the margin
    assert m[MARGIN + "comp_avg"] == pytest.approx((170 - 120) / 3)
    assert m[MARGIN + "comp/VQA-RAD/close"] == pytest.approx(10.0)
    assert m[MARGIN + "comp/OMVQA/choice"] == pytest.approx(30.0)  # the majority (30) beats random choice (25)
    # generation, SSIM x100: ct2mri 50 vs the best baseline 40 (train mean); reconstruction 80 vs the train mean
    # 50 (identity left out there: the input is the target); gen_avg over both families
    assert m[MARGIN + "gen/mtrans/ssim"] == pytest.approx(10.0)
    assert m[MARGIN + "gen/recon/ssim"] == pytest.approx(30.0)
    # gen_avg, per baseline over the families it has: identity (mtrans only) 50 - 30 = 20; train mean
    # (50 + 80) / 2 - (40 + 50) / 2 = 20; blank (mtrans only) 50 - 20 = 30
    assert m[MARGIN + "gen_avg"] == pytest.approx(20.0)
    low = baseline_margins(_report(comp=35.0, ssim=0.25))  # below the identity (30) on mtrans
    assert low[MARGIN + "comp_avg"] < 0 and low[MARGIN + "gen_avg"] < 0
    assert loss_margins({"loss/generation/first": 3.0, "loss/generation/last": 2.0, "loss/generation/mean": 2.5}) == {
        MARGIN + "loss/generation/last": 1.0, MARGIN + "loss/generation/mean": 0.5}


# ------------------------------------------------------------------------------------------ Table 4


def test_peft_variants_runs_table4_with_shared_adapter_baselines() -> None:
    peft, experts = load_experiment("peft-variants"), load_experiment("experts")

    def model_sets(run) -> dict[str, str]:
        argv = run.steps[-1].argv
        return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--model-set")

    for form, total in (("small", "96"), ("full", "320")):
        runs = {r.cell: r for r in expand(peft, form, "o", pretrained=False) if r.seed == 0}
        for cell in ("LoRA", "MoELoRA"):
            sets = model_sets(runs[cell])
            assert sets["shared_plugin"] == "true" and sets["comp_r"] == total
        assert "shared_plugin" not in model_sets(runs["H-LoRA"])
        for cell in experts.cells:  # Table 10 follows the same reading for its MoELoRA and LoRA rows
            shared = cell.labels["variant"] != "H-LoRA"
            assert (cell.model.get("shared_plugin") is True) == shared
            assert int(total) % int(cell.model.get("experts", 1)) == 0
    # in the small forms experts' LoRA and k = 4 cells are peft-variants' runs (reused, not retrained)
    mine = {r.cell: r for r in expand(peft, "small", "o/peft-variants", pretrained=False) if r.seed == 1}
    theirs = {r.cell: r for r in expand(experts, "small", "o/experts", pretrained=False) if r.seed == 1}
    for a, b in (("LoRA", "LoRA/k=1"), ("MoELoRA", "MoELoRA/k=4"), ("H-LoRA", "H-LoRA/k=4")):
        assert canonical_config(mine[a]) == canonical_config(theirs[b])


# ------------------------------------------------------------------------------------------ expert-structure


class SyntheticRuns:
    """Stands in for train/eval: MoELoRA and H-LoRA of a seed score the same; H-LoRA steps are faster."""

    def __init__(self, learned: bool = True) -> None:
        self.learned = learned

    def __call__(self, run, kind: str, argv, log: Path) -> tuple[int, float]:
        argv = list(argv)
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        if kind == "train":
            t = 1.5 if run.cell == "MoELoRA" else {0: 0.8, 1: 0.85, 2: 0.9}[run.seed]
            with open(out / "metrics.jsonl", "w", encoding="utf-8") as fh:
                for i in range(6):
                    task = "comprehension" if i % 2 == 0 else "generation"
                    fh.write(json.dumps({"step": i + 1, "loss": 3.0 - 0.3 * i, "step_time_s": 9.0 if i == 0 else t,
                                         "tasks": {task: 1}}) + "\n")
            (out / "final").mkdir(exist_ok=True)
            (out / "final" / "train_summary.json").write_text("{}", "utf-8")
        else:
            comp, ssim = (60.0 + run.seed, 0.5 + 0.01 * run.seed) if self.learned else (20.0, 0.1)
            (out / "report.json").write_text(json.dumps(_report(comp, ssim)), "utf-8")
        return 0, 0.1


@pytest.mark.parametrize("learned", [True, False])
def test_expert_structure_reports_equal_scores_and_a_time_ratio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               learned: bool) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner_mod, "_run_process", SyntheticRuns(learned))
    exp = load_experiment("expert-structure")
    assert [c.key for c in exp.cells] == ["MoELoRA", "H-LoRA"] and exp.baseline == "MoELoRA"
    outcomes = runner_mod.run_experiments([exp], "small", "out", progress=False, pretrained=False)
    assert len(outcomes) == 6 and all(o.status == "finished" for o in outcomes)
    res = collect("out", plots=False)[0]
    h = res.stats["H-LoRA"]
    assert h["time_ratio"].mean == pytest.approx((0.8 + 0.85 + 0.9) / 3 / 1.5)
    assert h["comp_avg"].values == res.stats["MoELoRA"]["comp_avg"].values
    claims = {c.id: c for c in res.claims}
    assert claims["time-merge"].verdict == REPRODUCED  # time has no baseline: no learning gate
    assert "one-sample t vs 0.67" in claims["time-merge"].test
    want = REPRODUCED if learned else NO_EVIDENCE
    assert claims["comp-equal"].verdict == want and claims["gen-equal"].verdict == want
    md = (tmp_path / "out" / "results.md").read_text("utf-8")
    assert "| H-LoRA | ours (n=3) |" in md and "0.57 ± 0.03×" in md and "| paper | – | – | – | 0.67× |" in md
    assert "test (α = 0.05)" in md and ("6 of 6 runs beat their baselines" if learned else "0 of 6 runs") in md


def test_expert_structure_score_equality_fails_when_the_scores_differ(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    class Unequal(SyntheticRuns):
        def __call__(self, run, kind, argv, log):
            rc = super().__call__(run, kind, argv, log)
            if kind == "eval" and run.cell == "H-LoRA" and run.seed == 1:
                out = Path(list(argv)[list(argv).index("--out") + 1])
                (out / "report.json").write_text(json.dumps(_report(69.0, 0.51)), "utf-8")
            return rc

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner_mod, "_run_process", Unequal())
    runner_mod.run_experiments([load_experiment("expert-structure")], "small", "out", progress=False,
                               pretrained=False)
    claims = {c.id: c for c in collect("out", plots=False)[0].claims}
    assert claims["comp-equal"].verdict == NOT_REPRODUCED and claims["gen-equal"].verdict == REPRODUCED


# ------------------------------------------------------------------------------------------ pre-trained parts


def test_small_forms_start_from_the_demos_pretrained_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exp = load_experiment("expert-structure")
    monkeypatch.setattr(runner_mod, "_run_process", SyntheticRuns())
    with pytest.raises(ExperimentError) as err:
        runner_mod.run_experiments([exp], "small", "out", variables={"demo": "mydemo"}, progress=False)
    message = str(err.value)
    for part in ("mydemo/text-lm", "mydemo/vq/vqgan.safetensors", "mydemo/vision", "`make demo`", "pretrain-vision"):
        assert part in message
    assert not Path("out").exists()  # refused before anything started
    demo = Path("mydemo")
    (demo / "text-lm").mkdir(parents=True)
    (demo / "vision").mkdir()
    (demo / "vq").mkdir()
    (demo / "vq" / "vqgan.safetensors").write_bytes(b"")
    (demo / "vq" / "vqgan.json").write_text(json.dumps({"n_embed": 256}), "utf-8")
    for run in expand(exp, "small", "out/expert-structure", {"demo": "mydemo"}):
        first, second = run.steps[0].argv, run.steps[1].argv
        assert first[first.index("--init") + 1] == "mydemo/text-lm"
        assert second[second.index("--init") + 1] == run.steps[0].out  # later steps start from earlier ones
        assert all(s.argv[s.argv.index("--image-codes") + 1] == "256" for s in run.steps)
        assert run.eval_argv[run.eval_argv.index("--vq") + 1] == "mydemo/vq/vqgan.safetensors"
        assert "vision_path=mydemo/vision" in run.eval_argv and "vision_path=mydemo/vision" in first
    outcomes = runner_mod.run_experiments([exp], "small", "out", variables={"demo": "mydemo"}, progress=False)
    assert all(o.status == "finished" for o in outcomes)
    # every shipped small form takes the demo's parts; --no-pretrained leaves them out
    from healthgpt.experiment.spec import shipped_experiments

    for name in shipped_experiments():
        run = expand(load_experiment(name), "small", "o", {"demo": "mydemo"})[0]
        assert set(run.requires) >= {"mydemo/text-lm", "mydemo/vq/vqgan.safetensors", "mydemo/vision"}
        bare = expand(load_experiment(name), "small", "o", pretrained=False)[0]
        assert not bare.requires and "--vq" not in bare.eval_argv


def test_a_timed_experiment_reuses_a_twin_only_from_its_own_session(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner_mod, "_run_process", SyntheticRuns())
    exp = load_experiment("expert-structure")
    doc = json.loads(json.dumps(exp.raw))
    doc["name"] = "again"
    from healthgpt.experiment.spec import parse_experiment

    again = parse_experiment(doc, "again.yaml")
    # one invocation: the second experiment's runs are copies (same session, side by side)
    outcomes = runner_mod.run_experiments([exp, again], "small", "a", progress=False, pretrained=False)
    assert sum(bool(o.reused_from) for o in outcomes) == 6
    # a later invocation trains its own: a ratio to a run of another session would not be formed
    runner_mod.run_experiments([exp], "small", "b", progress=False, pretrained=False)
    outcomes = runner_mod.run_experiments([again], "small", "b", progress=False, pretrained=False)
    assert not any(o.reused_from for o in outcomes)
