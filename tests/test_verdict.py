"""`healthgpt verdict`: one line per task from a hand-made report, targets met or missed with their numbers."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from healthgpt.cli import app
from healthgpt.evaluation.verdict import collect_checks


def _report() -> dict:
    def gen(ssim: float, identity: float, mean: float) -> dict:
        return {"n": 8, "ssim": ssim, "vq_ceiling": {"n": 8, "ssim": 0.9},
                "baselines": {"identity": {"n": 8, "ssim": identity}, "train_mean": {"n": 8, "ssim": mean}}}

    return {
        "generation": {"ct2mri/brain": gen(0.6, 0.2, 0.5), "mri2ct/pelvis": gen(0.4, 0.3, 0.45)},
        "comprehension": {"VQA-RAD": {"n_closed": 30, "close": 90.0, "n_choice": 10, "choice": 50.0},
                          "SLAKE": {"n_closed": 10, "close": 70.0, "n_choice": 0, "choice": None}},
        "comprehension_baselines": {"majority": {"VQA-RAD": {"close": 60.0, "choice": 20.0}, "SLAKE": {"close": 80.0}},
                                    "random_choice": {"VQA-RAD": {"n_choice": 10, "choice": 25.0}}},
    }


def _runs(root: Path) -> Path:
    for name, by_task in (("stage1", {"generation": {"first": 9.0, "last": 4.5, "n": 3, "steps": 40}}),
                          ("stage2", {"generation": {"first": 4.0, "last": 3.9, "n": 3, "steps": 13}})):
        (root / name / "final").mkdir(parents=True)
        (root / name / "final" / "train_summary.json").write_text(json.dumps({"loss_by_task": by_task}))
    return root


def test_checks_give_model_best_baseline_and_targets(tmp_path: Path) -> None:
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "report.json").write_text(json.dumps(_report()))
    checks = {c.name: c for c in collect_checks(tmp_path / "eval", _runs(tmp_path / "runs"))}
    assert checks["vq_ceiling"].passed and "SSIM 0.900 on 16" in checks["vq_ceiling"].line
    assert checks["gen:ct2mri/brain"].passed and "best baseline train mean 0.500" in checks["gen:ct2mri/brain"].line
    assert checks["gen:mri2ct/pelvis"].passed is False and "NOT all baselines" in checks["gen:mri2ct/pelvis"].line
    # closed: (30*90 + 10*70)/40 = 85.0 vs majority (30*60 + 10*80)/40 = 65.0 -> +20 points
    assert checks["closed"].passed and "model 85.0% | majority 65.0% | +20.0 points" in checks["closed"].line
    assert "best baseline random choice 25.0%" in checks["choice:VQA-RAD"].line and checks["choice:VQA-RAD"].passed is None
    assert checks["loss:stage1:generation"].passed and "(50% of start" in checks["loss:stage1:generation"].line
    assert checks["loss:stage2:generation"].passed is False and "MISSED" in checks["loss:stage2:generation"].line


def test_a_collapsed_model_loses_to_the_blank_image(tmp_path: Path) -> None:
    report = _report()
    # beats identity and train mean, but a flat background scores higher: not learned
    report["generation"]["ct2mri/brain"]["baselines"]["blank"] = {"n": 8, "ssim": 0.7}
    report["generation"]["ct2mri/brain"].update(n_flat=8, distinct_codes_median=3.0)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "report.json").write_text(json.dumps(report))
    check = {c.name: c for c in collect_checks(tmp_path / "eval")}["gen:ct2mri/brain"]
    assert check.passed is False
    assert "best baseline blank 0.700" in check.line and "8 of 8 model images flat (one tone), median 3 distinct codes" in check.line


def test_cli_prints_the_verdict(tmp_path: Path) -> None:
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "report.json").write_text(json.dumps(_report()))
    res = CliRunner().invoke(app, ["verdict", "--eval", str(tmp_path / "eval"), "--runs", str(_runs(tmp_path / "r")),
                                   "--json", str(tmp_path / "v.json")])
    assert res.exit_code == 0, res.output
    assert "targets met: 4 of 6; missed: gen:mri2ct/pelvis, loss:stage2:generation" in res.output
    assert len(json.loads((tmp_path / "v.json").read_text())) == 7


def test_new_commands_have_examples() -> None:
    from vlhealth.cli import app as vlhealth_app

    runner = CliRunner()
    for cli, args in ((app, ["verdict", "--help"]), (app, ["pretrain-text", "--help"]),
                      (vlhealth_app, ["vq", "train", "--help"]), (vlhealth_app, ["demo-data", "--help"])):
        res = runner.invoke(cli, args)
        assert res.exit_code == 0 and "Example" in res.output, args
