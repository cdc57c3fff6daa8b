"""Baseline rows of the eval report on a hand-made case whose values are known, and the trainer's
divergence warning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from healthgpt.evaluation.baselines import collect_train_reference, comprehension_baselines, generation_baselines
from healthgpt.evaluation.report import prediction_diversity, write_report
from healthgpt.training.loss_trend import divergence_warnings
from tests.train_data import write_shards
from vlhealth.image_metrics import image_metrics
from vlhealth.schema import Record, Sample


def _qa(i: int, split: str, question: str, answer: str, answer_type: str = "closed",
        options: list[str] | None = None) -> Sample:
    rec = Record(task="comprehension", subtask="vqa", source="vqa_rad", split=split,
                 conversations=[{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
                 group=f"g{i}", license="CC0", answer_type=answer_type, options=options, modality="CT")
    return Sample(key=f"qa-{split}-{i:03d}", record=rec, input_image=np.zeros((16, 16), np.uint8))


def _gen(i: int, split: str, target: np.ndarray, input_image: np.ndarray) -> Sample:
    rec = Record(task="generation", subtask="ct2mri", source="toy", split=split,
                 conversations=[{"from": "human", "value": "<image>\nConvert this CT to MRI."},
                                {"from": "gpt", "value": "<target_image>"}],
                 group=f"p{i}", license="CC0", modality="CT", body_part="brain")
    return Sample(key=f"gen-{split}-{i:03d}", record=rec, input_image=input_image, target=target,
                  target_vq=np.zeros(1024, np.int16))


HALVES = np.concatenate([np.full((256, 128), 100, np.uint8), np.full((256, 128), 200, np.uint8)], axis=1)


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    samples = [
        # train answers: "Is there a lesion?" yes, yes, no -> yes; "What organ?" brain, Brain., chest -> brain
        _qa(0, "train", "Is there a lesion?", "yes"), _qa(1, "train", "Is there a lesion?", "Yes"),
        _qa(2, "train", "Is there a lesion?", "no"),
        _qa(3, "train", "What organ is shown?", "brain", "open"), _qa(4, "train", "What organ is shown?", "Brain.", "open"),
        _qa(5, "train", "What organ is shown?", "chest", "open"),
        # train targets: all 100 and all 200 -> mean image all 150
        _gen(0, "train", np.full((256, 256), 100, np.uint8), HALVES),
        _gen(1, "train", np.full((256, 256), 200, np.uint8), HALVES),
        _gen(2, "test", HALVES, HALVES),  # never averaged in: test split
    ]
    return write_shards(tmp_path / "shards", samples, "toy", 4)


def test_train_reference_and_generation_baselines(shards: Path) -> None:
    ref = collect_train_reference([shards])
    assert ref.n_images == {"ct2mri/brain": 2} and ref.n_answers == 6
    assert np.array_equal(ref.mean_targets["ct2mri/brain"], np.full((256, 256), 150, np.uint8))
    # identity: the input is the target -> MSE 0; train mean 150 vs halves 100/200 -> MSE 2500 exactly
    b = generation_baselines(HALVES, HALVES, "ct2mri/brain", ref)
    assert b["identity"]["mse"] == 0 and b["identity"]["ssim"] == pytest.approx(1.0)
    assert b["train_mean"]["mse"] == pytest.approx(2500.0)
    assert b["train_mean"]["psnr"] == pytest.approx(10 * math.log10(255**2 / 2500))
    # a 128 px constant input is resized to 256 px (still constant 100): MSE (0 + 100^2) / 2
    small = np.full((128, 128), 100, np.uint8)
    assert generation_baselines(small, HALVES, "ct2mri/brain", ref)["identity"]["mse"] == pytest.approx(5000.0)
    # no train targets for a group: no train-mean row
    assert set(generation_baselines(HALVES, HALVES, "mri2ct/pelvis", ref)) == {"identity"}
    # blank: train targets are all-100 and all-200 (65,536 pixels each); the tie goes to the darker level 100,
    # so the flat 100 image against halves 100/200 has MSE (0 + 100^2) / 2
    assert ref.blank_levels == {"ct2mri/brain": 100}
    assert b["blank"]["mse"] == pytest.approx(5000.0)
    assert b["blank"] == image_metrics(np.full((256, 256), 100, np.uint8), HALVES)


def test_blank_level_is_the_most_frequent_grey_level(tmp_path: Path) -> None:
    # two all-200 targets and one all-100: 200 is the most frequent level (not the darkest, not the mean)
    samples = [_gen(i, "train", np.full((256, 256), v, np.uint8), HALVES) for i, v in enumerate((200, 100, 200))]
    ref = collect_train_reference([write_shards(tmp_path / "s", samples, "toy", 4)])
    assert ref.blank_levels == {"ct2mri/brain": 200}
    assert ref.describe()["blank_grey_levels"] == {"ct2mri/brain": 200}
    assert generation_baselines(HALVES, HALVES, "ct2mri/brain", ref)["blank"]["mse"] == pytest.approx(5000.0)


def test_loss_window_is_five_percent_of_a_tasks_steps() -> None:
    from healthgpt.training.train import loss_by_task

    # 200 comprehension steps falling 2.0 -> 0.01 per step, and 40 generation steps at 5.0 then 3.0
    comp = [2.0 - 0.01 * i for i in range(200)]
    tasks = ["comprehension"] * 200 + ["generation"] * 40
    by_task = loss_by_task(comp + [5.0] * 20 + [3.0] * 20, tasks)
    c = by_task["comprehension"]
    assert c["n"] == 10 and c["steps"] == 200  # 5% of 200
    assert c["first"] == pytest.approx(sum(comp[:10]) / 10) and c["last"] == pytest.approx(sum(comp[-10:]) / 10)
    assert by_task["generation"] == {"first": 5.0, "last": 3.0, "n": 3, "steps": 40}  # at least 3
    assert loss_by_task([1.0] * 2000, ["generation"] * 2000)["generation"]["n"] == 25  # at most 25
    assert loss_by_task([1.0, float("nan"), 2.0], ["g"] * 3, n=1)["g"] == {"first": 1.0, "last": 2.0, "n": 1, "steps": 2}


def test_prediction_diversity_counts_flat_images() -> None:
    rows = [{"codes": [7] * 1024, "pred_std": 0.0},  # one code, one tone
            {"codes": [7, 8, 9] * 341 + [7], "pred_std": 4.9},  # three near-black codes: still flat
            {"codes": [i % 64 for i in range(1024)], "pred_std": 41.0},
            {"codes": None, "pred_std": None}]
    assert prediction_diversity(rows) == {"distinct_codes_median": 3.0, "n_flat": 2}
    assert prediction_diversity([]) == {"distinct_codes_median": None, "n_flat": None}


def _record(key: str, question: str, reference: str, answer_type: str = "closed",
            options: list[str] | None = None) -> dict:
    return {"key": key, "task": "comprehension", "subtask": "vqa", "source": "vqa_rad", "split": "test",
            "answer_type": answer_type, "options": options, "modality": "CT", "body_part": None,
            "question": question, "reference": reference, "prediction": "no", "n_tokens": 1,
            "hit_max_new_tokens": False}


def test_majority_and_random_choice_rows(shards: Path, tmp_path: Path) -> None:
    ref = collect_train_reference([shards])
    assert ref.majority("VQA-RAD", "closed", "<image>\nIs there a lesion?") == "yes"
    assert ref.majority("VQA-RAD", "open", "What organ is shown") == "brain"
    records = [
        _record("a", "Is there a lesion?", "no"),  # majority says yes: wrong
        _record("b", "Is there a lesion?", "yes"),  # right
        _record("c", "Is this an axial image?", "yes"),  # unseen question: the closed majority "yes": right
        _record("d", "What organ is shown?", "chest", "open"),  # "brain": recall 0
        _record("e", "Which organ?", "brain", "choice", ["brain", "chest", "liver", "bone"]),
        _record("f", "Which modality?", "CT", "choice", ["CT", "MRI"]),
    ]
    rows = comprehension_baselines(records, ref)
    maj = rows["majority"]["VQA-RAD"]
    assert maj["close"] == pytest.approx(200 / 3) and maj["open"] == 0.0
    assert maj["all"] == pytest.approx(100 * 2 / 4)
    # no choice answers in train: the fallback has nothing, so an empty guess (wrong) for both
    assert maj["choice"] == 0.0
    assert rows["random_choice"]["VQA-RAD"] == {"n_choice": 2, "choice": pytest.approx(100 * (1 / 4 + 1 / 2) / 2)}

    (tmp_path / "report").mkdir()
    report = write_report(tmp_path / "report", records, {"preset": "tiny", "shards": ["shards"]}, train_ref=ref)
    assert report["comprehension_baselines"]["majority"]["VQA-RAD"]["close"] == pytest.approx(200 / 3)
    md = (tmp_path / "report" / "report.md").read_text()
    table1 = [line for line in md.splitlines() if line.startswith("| ")][:4]
    assert table1[0].startswith("| Model | VQA-RAD close | VQA-RAD all | VQA-RAD op")
    # model row: prediction "no" for all -> close 1/3; majority 66.67; random choice 37.50 in the op column only
    assert table1[2].startswith("| tiny | 33.33 | ")
    assert table1[3].startswith("| majority (train) | 66.67 | 50.00 | 0.00 |")
    assert "| random choice | – | – | 37.50 |" in md


def test_generation_table_has_baseline_rows(tmp_path: Path) -> None:
    metrics = {"ssim": 0.5, "psnr": 20.0, "mse": 100.0}
    rec = {"key": "k", "task": "generation", "subtask": "ct2mri", "source": "synthrad2023", "split": "test",
           "modality": "CT", "body_part": "brain", "target_modality": "MR", "question": "q", "codes": [0] * 1024,
           "tokens_ok": True, "token_notes": [], "metrics": metrics, "hu_metrics": None,
           "vq_ceiling": {"ssim": 0.9, "psnr": 30.0, "mse": 10.0},
           "baselines": {"identity": {"ssim": 0.2, "psnr": 12.0, "mse": 900.0},
                         "train_mean": {"ssim": 0.4, "psnr": 15.0, "mse": 500.0}}}
    report = write_report(tmp_path, [rec], {"preset": "tiny", "shards": ["s"]})
    entry = report["generation"]["ct2mri/brain"]
    assert entry["baselines"]["identity"] == {"n": 1, "ssim": 0.2, "psnr": 12.0, "mse": 900.0}
    md = (tmp_path / "report.md").read_text()
    for row in ("| CT2MRI-Brain | model | 1 | 50.00 | 20.00 | 100.00 |",
                "| CT2MRI-Brain | identity (input) | 1 | 20.00 | 12.00 | 900.00 |",
                "| CT2MRI-Brain | train mean image | 1 | 40.00 | 15.00 | 500.00 |",
                "| CT2MRI-Brain | VQGAN ceiling | 1 | 90.00 | 30.00 | 10.00 |"):
        assert row in md, row


def test_divergence_warning_names_the_rising_task() -> None:
    by_task = {"comprehension": {"first": 3.0, "last": 1.0, "n": 3, "steps": 10},
               "generation": {"first": 5.4, "last": 11.9, "n": 3, "steps": 5}}
    warnings = divergence_warnings(by_task)
    assert len(warnings) == 1 and warnings[0].startswith("generation: loss rose from 5.4000 to 11.9000")
    assert divergence_warnings({"generation": {"first": 5.0, "last": float("nan"), "n": 1, "steps": 1}})
    assert divergence_warnings({"comprehension": {"first": 2.0, "last": 2.0, "n": 3, "steps": 6}}) == []


def test_trainer_warns_when_a_task_loss_rises(tmp_path: Path) -> None:
    """A run that learns "yes" and is then asked for random tokens: the loss ends above its start,
    and the trainer says so in train_summary.json."""
    import torch

    from healthgpt.training.train import TrainConfig, train

    data = write_shards(tmp_path / "yes", [_qa(i, "train", "Is it?", "yes") for i in range(16)], "yes", 8)
    noise = torch.Generator().manual_seed(0)

    def scramble(step: int, batch: dict) -> dict:
        if step > 7:  # the last three steps: every answer token replaced by a random byte token
            labels = batch["labels"]
            keep = labels != -100
            labels[keep] = torch.randint(3, 250, (int(keep.sum()),), generator=noise)
        return batch

    # stage 2 trains the embeddings and the output head: "yes" is learned within a few steps
    cfg = TrainConfig(preset="tiny", stage=2, task="mixed", shards=[str(data)], out=tmp_path / "run",
                      overrides={"steps": 10, "lr": 3e-2, "micro_batch": 4, "global_batch": 4,
                                 "warmup_steps": 0, "schedule": "constant"}, progress=False)
    res = train(cfg, batch_hook=scramble)
    summary = json.loads((tmp_path / "run" / "final" / "train_summary.json").read_text())
    v = summary["loss_by_task"]["comprehension"]
    assert v["last"] > v["first"], (v, res.losses)
    assert len(summary["warnings"]) == 1 and summary["warnings"][0].startswith("comprehension: loss rose")
