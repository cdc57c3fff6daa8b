"""Image reliance ("does the model look?"): the seeded derangement, the shuffled-image pass and its report
rows on the tiny model, and the generation loss of the true target computed exactly as training does."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from healthgpt.evaluation.evaluate import read_predictions, run_evaluation
from healthgpt.evaluation.reliance import (
    SHUFFLED_NAME,
    ShuffleEntry,
    derangement,
    plan_donors,
    shuffled_selection,
    teacher_forced_loss,
    token_weighted,
)
from tests import test_evaluate
from tests.test_evaluate import _config, _gen, _write
from vlhealth.schema import Sample
from vlhealth.shards import iter_tar, list_shards

torch.set_num_threads(1)

# the evaluator tests' tiny model and shards (module fixtures)
shards = test_evaluate.shards
components = test_evaluate.components


def _entry(key: str, task: str, kind: str, has_image: bool = True, folder: str = "f") -> ShuffleEntry:
    return ShuffleEntry(key, task, kind, has_image, Path(folder) / "x.tar", (folder, kind, None))


# -------------------------------------------------------------------------------- derangement


def test_derangement_moves_every_sample_and_is_seeded() -> None:
    keys = [f"k{i:02d}" for i in range(12)]
    d0 = derangement(keys, 0, "comprehension", "vqa_rad")
    assert set(d0) == set(keys) and sorted(d0.values()) == sorted(keys)  # a permutation
    assert all(k != v for k, v in d0.items())  # no sample keeps its own image
    assert derangement(list(reversed(keys)), 0, "comprehension", "vqa_rad") == d0  # same seed: same, any order
    assert derangement(keys, 1, "comprehension", "vqa_rad") != d0  # another seed: another permutation
    assert derangement(keys, 0, "generation", "vqa_rad") != d0  # each group draws its own
    assert derangement(["a", "b"], 5) == {"a": "b", "b": "a"}
    with pytest.raises(ValueError, match="two"):
        derangement(["a"], 0)
    for seed in range(30):  # small groups too
        d = derangement(keys[:3], seed)
        assert all(k != v for k, v in d.items()) and sorted(d.values()) == keys[:3]


def test_plan_donors_stays_within_the_task_and_kind() -> None:
    entries = ([_entry(f"rad{i}", "comprehension", "vqa_rad") for i in range(4)]
               + [_entry("slake0", "comprehension", "slake"), _entry("path0", "comprehension", "pathvqa")]
               + [_entry("txt0", "comprehension", "vqa_rad", has_image=False)]
               + [_entry(f"ct{i}", "generation", "ct2mri/brain") for i in range(3)]
               + [_entry("pelvis0", "generation", "mri2ct/pelvis")])
    donors, notes = plan_donors(entries, seed=0)
    task = {e.key: e.task for e in entries}
    kind = {e.key: e.kind for e in entries}
    assert "txt0" not in donors and any("without an input image" in n for n in notes)
    assert set(donors) == {e.key for e in entries if e.has_image}
    assert all(k != d for k, d in donors.items())
    assert all(task[k] == task[d] for k, d in donors.items())  # same task only
    for t in ("comprehension", "generation"):  # a permutation within each task
        ks = sorted(k for k in donors if task[k] == t)
        assert sorted(donors[k] for k in ks) == ks
    # the two samples alone of their kind swap with each other; the kind with 4 keeps its images among itself
    assert donors["slake0"] == "path0" and donors["path0"] == "slake0"
    assert all(kind[donors[f"rad{i}"]] == "vqa_rad" for i in range(4))
    # a lone sample of its kind is spliced into another kind's cycle: still no fixed point, still a permutation
    assert kind[donors["pelvis0"]] == "ct2mri/brain"
    assert plan_donors(entries, seed=0) == (donors, notes)
    assert plan_donors(entries, seed=3)[0] != donors


def test_a_task_with_one_sample_is_skipped_and_said_so() -> None:
    entries = [_entry("c0", "comprehension", "a"), _entry("c1", "comprehension", "a"), _entry("g0", "generation", "x")]
    donors, notes = plan_donors(entries, seed=0)
    assert donors == {"c0": "c1", "c1": "c0"}
    assert any(n.startswith("generation: 1 sample(s)") and "cannot be deranged" in n for n in notes)


def test_shuffled_limit_counts_generation_per_group_and_folder() -> None:
    entries = ([_entry(f"g{i}", "generation", "ct2mri/brain") for i in range(4)]
               + [_entry(f"h{i}", "generation", "ct2mri/brain", folder="other") for i in range(2)]
               + [_entry(f"c{i}", "comprehension", "a") for i in range(3)])
    donors, _ = plan_donors(entries, 0)
    assert shuffled_selection(entries, donors, 1) == ["g0", "h0", "c0", "c1", "c2"]  # comprehension is not cut
    assert shuffled_selection(entries, donors, None) == [e.key for e in entries]


# -------------------------------------------------------------------------------- the loss as training computes it


def test_generation_true_target_loss_equals_the_training_forward(shards: list[Path], components: tuple) -> None:
    from healthgpt.training.data import DataConfig, TaskBatchStream

    model, _ = components
    model.eval()
    gen_dir = shards[1]
    stream = TaskBatchStream(DataConfig([gen_dir], "generation", 4, split="test", template=model.template,
                                        image_tokens=model.vision.num_patches), model.tokenizer, model.vision.preprocess)
    examples, samples = [], []
    for tar in list_shards(gen_dir):
        for key, members in iter_tar(tar):
            rec = json.loads(members["json"])
            examples.append(stream._encode(tar, key, rec, members))
            samples.append(Sample.from_members(key, members))
    assert len(examples) == 4
    batch = stream._collate("generation", [[e] for e in examples])
    with torch.no_grad():
        train_loss = float(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 labels=batch["labels"], pixel_values=batch["pixel_values"], task="generation",
                                 return_logits=False).loss)
        ours = [teacher_forced_loss(model, s, s.input_image) for s in samples]
        one = stream._collate("generation", [[examples[0]]])
        first = float(model(input_ids=one["input_ids"], attention_mask=one["attention_mask"], labels=one["labels"],
                            pixel_values=one["pixel_values"], task="generation", return_logits=False).loss)
    assert all(n == int((b.labels[1:] != -100).sum()) for (_, n), b in zip(ours, examples, strict=True))
    assert ours[0][0] == pytest.approx(first, rel=1e-6)  # the same single-sample batch: the same number
    pooled = token_weighted([{"loss": v, "n_loss_tokens": n} for v, n in ours])
    assert pooled == pytest.approx(train_loss, rel=1e-4)  # one training batch of the four
    assert train_loss > 5.0  # the untrained tiny model: roughly log(vocabulary) per token


# -------------------------------------------------------------------------------- the evaluator and its report


def _members_by_key(folders: list[Path]) -> dict[str, dict[str, bytes]]:
    return {k: m for tar in list_shards(folders) for k, m in iter_tar(tar)}


def test_shuffled_rows_in_the_report(shards: list[Path], components: tuple, tmp_path: Path) -> None:
    model, vq = components
    out = tmp_path / "rel"
    result = run_evaluation(_config(shards, out, grids_per_task=0), model=model, vq=vq)
    assert result.complete and result.n_new == 12 and result.n_shuffled_new == 12
    report = json.loads((out / "report.json").read_text())
    preds = read_predictions(out)
    shuffled = [json.loads(line) for line in (out / "predictions_shuffled.jsonl").read_text().splitlines()]
    assert [r["key"] for r in shuffled] == sorted(preds)
    donors = {r["key"]: r["donor"] for r in shuffled}
    assert all(k != d and preds[k]["task"] == preds[d]["task"] for k, d in donors.items())
    assert sorted(donors.values()) == sorted(donors)  # every image lent exactly once
    # the same seed gives the same donors on a second folder; another seed other donors
    again = run_evaluation(_config(shards, tmp_path / "again", grids_per_task=0, shuffle_seed=7), model=model, vq=vq)
    other = {json.loads(x)["key"]: json.loads(x)["donor"]
             for x in (again.out / "predictions_shuffled.jsonl").read_text().splitlines()}
    assert other != donors
    rel = report["image_reliance"]
    assert rel["status"] == "computed" and rel["seed"] == 0 and rel["n_scored"] == 12
    # comprehension: all 8 were scored both ways, so the true-image side is the model's own summary
    assert rel["comprehension"]["n"] == 8 and rel["comprehension"]["true"] == report["comprehension"]
    from healthgpt.evaluation.answer_metrics import summarize_vqa
    from healthgpt.evaluation.reliance import _items

    assert rel["comprehension"]["shuffled"] == summarize_vqa(_items([r for r in shuffled
                                                                     if r["task"] == "comprehension"]))
    # generation: the shuffled row of each group holds the shuffled records' numbers
    members = _members_by_key(shards)
    for r in (r for r in shuffled if r["task"] == "generation"):
        group = next(g for g, v in report["generation"].items() if v["subtask"] == r["subtask"]
                     and v["body_part"] == r["body_part"])
        row = report["generation"][group]["shuffled_images"]
        assert row["n"] == 1 and row["ssim"] == pytest.approx(r["metrics"]["ssim"])
        assert row["loss"] == pytest.approx(r["loss"]) and rel["generation"][group]["loss_shuffled"] == row["loss"]
        assert rel["generation"][group]["loss_true"] == pytest.approx(preds[r["key"]]["loss"])
        assert report["generation"][group]["loss"] == pytest.approx(preds[r["key"]]["loss"])
        # the recorded losses are the true target's, given the sample's own image and the donor's image
        sample = Sample.from_members(r["key"], members[r["key"]])
        donor_image = Sample.from_members(r["donor"], members[r["donor"]]).input_image
        with torch.no_grad():
            true_loss, _ = teacher_forced_loss(model, sample, sample.input_image)
            shuffled_loss, _ = teacher_forced_loss(model, sample, donor_image)
        assert preds[r["key"]]["loss"] == pytest.approx(true_loss, rel=1e-5)
        assert r["loss"] == pytest.approx(shuffled_loss, rel=1e-5)
    pooled = rel["generation_pooled"]
    assert pooled["n"] == 4 and pooled["loss_shuffled"] == pytest.approx(
        token_weighted([r for r in shuffled if r["task"] == "generation"]))
    md = (out / "report.md").read_text()
    table1 = md.split("Per benchmark:")[0]
    assert f"| {SHUFFLED_NAME} |" in table1  # beside majority and random choice
    assert f"| VQA-RAD, {SHUFFLED_NAME} |" in md and f"| OMVQA, {SHUFFLED_NAME} |" in md
    assert f"| CT2MRI-Brain | {SHUFFLED_NAME} | 1 |" in md  # beside identity, train mean, blank, VQGAN ceiling
    assert f"| MRI2CT-Brain | {SHUFFLED_NAME} | 1 |" in md.split("SynthRAD2023 challenge")[1]  # the HU table too
    assert "## Image reliance (does the model look?)" in md and "| all | 4 |" in md


def test_the_shuffled_pass_feeds_the_donor_image(shards: list[Path], tmp_path: Path) -> None:
    """Each sample of the shuffled pass reaches the model with its donor's input image, nothing else changed."""
    from healthgpt.evaluation.evaluate import _ShuffledPass, _stream_batches

    class Capture:
        def comprehension(self, samples: list[Sample]) -> list[dict]:
            return [{"key": s.key, "image": s.input_image, "target_vq": None} for s in samples]

        def shuffled_generation(self, samples: list[Sample]) -> list[dict]:
            return [{"key": s.key, "image": s.input_image, "target_vq": s.target_vq} for s in samples]

    config = _config(shards, tmp_path)
    entries: list[ShuffleEntry] = []
    for _ in _stream_batches(config, 0, 1, set(), [], entries=entries):
        pass
    shuffled = _ShuffledPass(config, entries, tmp_path)
    members = _members_by_key(shards)
    seen = []
    try:
        for batch in shuffled.batches(0, 1):
            for r in shuffled.handle(Capture(), batch):
                assert r["donor"] != r["key"] and r["image"] == members[r["donor"]]["input.png"]
                if r["target_vq"] is not None:  # the target stays the sample's own
                    own = Sample.from_members(r["key"], members[r["key"]]).target_vq
                    np.testing.assert_array_equal(r["target_vq"], own)
                seen.append(r["key"])
    finally:
        shuffled.close()
    assert sorted(seen) == sorted(shuffled.keys) and len(seen) == 12


def test_no_shuffled_images_and_resume_of_the_shuffled_pass(shards: list[Path], components: tuple,
                                                           tmp_path: Path) -> None:
    model, vq = components
    off = run_evaluation(_config(shards, tmp_path / "off", grids_per_task=0, shuffled_images=False), model=model, vq=vq)
    assert off.complete and off.n_shuffled_new == 0 and not (off.out / "predictions_shuffled.jsonl").exists()
    report = json.loads((off.out / "report.json").read_text())
    assert report["image_reliance"]["status"].startswith("not computed")
    assert SHUFFLED_NAME not in (off.out / "report.md").read_text().split("## Notes")[0]
    assert all("shuffled_images" not in v for v in report["generation"].values())
    # the shuffled pass resumes like the rest: stopped after its first batch, finished by a rerun
    full = run_evaluation(_config(shards, tmp_path / "full", grids_per_task=0), model=model, vq=vq)
    part = tmp_path / "part"
    first = run_evaluation(_config(shards, part, grids_per_task=0, max_batches=7), model=model, vq=vq)
    assert not first.complete and first.n_new == 12 and first.n_shuffled_new == 2
    second = run_evaluation(_config(shards, part, grids_per_task=0), model=model, vq=vq)
    assert second.complete and second.n_new == 0 and second.n_shuffled_new == 10
    for name in ("report.json", "report.md", "predictions_shuffled.jsonl"):
        assert (part / name).read_bytes() == (full.out / name).read_bytes(), name
    # another seed on the same folder: the shuffled predictions made with other donors are redone
    third = run_evaluation(_config(shards, part, grids_per_task=0, shuffle_seed=2), model=model, vq=vq)
    assert third.complete and third.n_new == 0 and third.n_shuffled_new > 0
    assert json.loads((part / "report.json").read_text())["image_reliance"]["seed"] == 2


def test_shuffled_limit_bounds_the_generation_pass(components: tuple, tmp_path: Path) -> None:
    model, vq = components
    gen = _write(tmp_path / "gen", [_gen(i, "ct2mri", "brain") for i in range(3)] + [_gen(9, "mri2ct", "pelvis")],
                 "gen", max_count=2)
    res = run_evaluation(_config([gen], tmp_path / "lim", grids_per_task=0, shuffled_limit=1), model=model, vq=vq)
    assert res.complete and res.n_new == 4 and res.n_shuffled_new == 2  # one per subtask/body part
    shuffled = read_predictions(tmp_path / "lim")  # the true-image predictions are all there
    assert len(shuffled) == 4
    cfg = json.loads((res.out / "eval_config.json").read_text())
    assert cfg["shuffled_images"] is True and cfg["shuffle_seed"] == 0 and cfg["shuffled_limit"] == 1
    rel = res.report["image_reliance"]
    assert rel["generation"]["ct2mri/brain"]["n"] == 1 and rel["generation_pooled"]["n"] == 2
    assert res.report["generation"]["ct2mri/brain"]["n"] == 3
    assert res.report["generation"]["ct2mri/brain"]["shuffled_images"]["n"] == 1
    # the three brain samples lend each other their images; the lone pelvis one is spliced into their cycle
    assert rel["n_same_kind"] >= 1 and np.isfinite(rel["generation_pooled"]["loss_true"])


def test_donors_come_from_other_patients_where_there_are_any() -> None:
    # 3 patients x 6 slices: a plain derangement would give many same-patient donors (neighbouring slices)
    keys = [f"p{p}-slice{s:02d}" for p in range(3) for s in range(6)]
    groups = {k: k.split("-")[0] for k in keys}
    for seed in range(5):
        d = derangement(keys, seed, "generation", "ct2mri/brain", groups=groups)
        assert all(d[k] != k for k in keys)
        assert all(groups[d[k]] != groups[k] for k in keys)
        assert sorted(d.values()) == sorted(keys)  # a permutation
    # one patient only: the plain derangement, still no fixed point
    one = {k: "p0" for k in keys}
    d = derangement(keys, 0, "generation", "ct2mri/brain", groups=one)
    assert all(d[k] != k for k in keys)


def test_shuffled_limit_spreads_over_patients() -> None:
    """The shuffled pass cut at --shuffled-limit takes its samples from several patients, as the true pass
    does: swapped images of adjacent slices of one patient would hardly differ."""
    entries = [dataclasses.replace(_entry(f"a{i}", "generation", "ct2mri/brain"), group="pA") for i in range(4)]
    entries += [dataclasses.replace(_entry(f"b{i}", "generation", "ct2mri/brain"), group="pB") for i in range(4)]
    donors, _ = plan_donors(entries, 0)
    assert shuffled_selection(entries, donors, 2) == ["a2", "b2"]
    assert shuffled_selection(entries, donors, 4) == ["a1", "a3", "b1", "b3"]
