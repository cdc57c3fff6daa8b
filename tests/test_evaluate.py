"""The eval runner on the tiny model: all report files, resume after an interruption, HU metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from healthgpt import RESEARCH_USE
from healthgpt.evaluation.evaluate import EvalConfig, EvalError, hu_reference, read_predictions, run_evaluation
from vlhealth.schema import Record, Sample, encode_png
from vlhealth.shards import ShardWriter, write_index

torch.set_num_threads(1)

OPTIONS = ["CT", "MRI", "X-ray", "Ultrasound"]


def _comp(i: int, answer_type: str, source: str, split: str = "test") -> Sample:
    rng = np.random.default_rng(i)
    options = None
    if answer_type == "closed":
        question, answer = f"Is there a lesion {i}?", "yes" if i % 2 else "no"
    elif answer_type == "open":
        question, answer = f"Where is the lesion {i}?", "right lower lobe"
    else:
        options = OPTIONS
        question = f"Which modality is this? A. CT B. MRI C. X-ray D. Ultrasound ({i})"
        answer = OPTIONS[i % 4]
    rec = Record(
        task="comprehension", subtask="vqa", source=source, split=split,
        conversations=[{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
        group=f"g{i}", license="CC0", answer_type=answer_type, options=options,
        modality=["CT", "MRI"][i % 2], body_part="chest",
    )
    return Sample(key=f"{source}-{i:04d}", record=rec, input_image=rng.integers(0, 255, (40, 48), dtype=np.uint8))


def _gen(i: int, subtask: str, body: str, split: str = "test", target_modality: str | None = None) -> Sample:
    """A generation sample laid out like the SynthRAD2023 builder's (16-bit reference + body mask)."""
    rng = np.random.default_rng(100 + i)
    target = rng.integers(0, 255, (256, 256), dtype=np.uint8)
    tm = target_modality or {"mri2ct": "CT", "ct2mri": "MR"}.get(subtask, "MR")
    window = {"kind": "ct", "lo": -1024.0, "hi": 3000.0} if tm == "CT" else {"kind": "mr", "lo": 0.0, "hi": 812.5}
    mask = np.zeros((256, 256), dtype=np.uint8)
    mask[40:216, 50:200] = 255
    extras = {"reference.png": encode_png(target.astype(np.uint16) * 257), "mask.png": encode_png(mask)}
    rec = Record(
        task="generation", subtask=subtask, source="synthrad2023", split=split,
        conversations=[{"from": "human", "value": f"<image>\nConvert this scan ({subtask})."},
                       {"from": "gpt", "value": "<target_image>"}],
        group=f"p{i}", license="CC-BY-NC-4.0", modality="MR" if tm == "CT" else "CT", body_part=body,
        provenance={"target_modality": tm, "target_window": window,
                    "reference": {"member": "reference.png", "dtype": "uint16", "mask_member": "mask.png"}},
    )
    return Sample(key=f"synthrad2023-{subtask}-{body}-{i:03d}", record=rec,
                  input_image=rng.integers(0, 255, (256, 256), dtype=np.uint8), target=target,
                  target_vq=rng.integers(0, 8192, 1024).astype(np.int16), extras=extras)


def _write(out: Path, samples: list[Sample], prefix: str = "eval", max_count: int = 4) -> Path:
    with ShardWriter(out, prefix=prefix, max_count=max_count) as w:
        for s in samples:
            w.write(s)
    write_index(out, w.shards)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("shards")
    comp = [_comp(i, t, src) for i, (t, src) in enumerate(
        [("closed", "vqa_rad"), ("open", "vqa_rad"), ("closed", "vqa_rad"), ("closed", "slake"),
         ("open", "slake"), ("choice", "omnimedvqa"), ("choice", "omnimedvqa"), ("choice", "omnimedvqa")])]
    comp.append(_comp(50, "closed", "vqa_rad", split="train"))  # not evaluated: wrong split
    gen = [_gen(0, "ct2mri", "brain"), _gen(1, "mri2ct", "brain"), _gen(2, "mri2ct", "pelvis"),
           _gen(3, "recon", "pelvis", target_modality="CT")]
    return [_write(root / "comp", comp, "comp"), _write(root / "gen", gen, "gen", max_count=2)]


@pytest.fixture(scope="module")
def components() -> tuple:
    from healthgpt.serving.infer import load_model
    from vlhealth.vq import load_vq

    return load_model("tiny"), load_vq("tiny")


def _config(shards: list[Path], out: Path, **kw) -> EvalConfig:
    base = dict(shards=shards, out=out, batch_size=2, max_new_tokens=6, max_image_tokens=4, device="cpu",
                grids_per_task=2)
    base.update(kw)
    return EvalConfig(**base)


def test_eval_writes_all_report_files(shards: list[Path], components: tuple, tmp_path: Path) -> None:
    model, vq = components
    out = tmp_path / "report"
    result = run_evaluation(_config(shards, out), model=model, vq=vq)
    assert result.complete and result.n_total == 12 and result.n_new == 12
    for name in ("report.json", "report.md", "predictions.jsonl", "eval_config.json", "run.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {"comprehension": 8, "generation": 4}
    comp = report["comprehension"]
    assert set(comp) == {"VQA-RAD", "SLAKE", "OMVQA"}
    assert (comp["VQA-RAD"]["n_closed"], comp["VQA-RAD"]["n_open"]) == (2, 1)
    assert comp["OMVQA"]["n_choice"] == 3 and comp["OMVQA"]["close"] is None
    assert set(comp["OMVQA"]["by_modality"]) == {"CT", "MRI"}
    gen = report["generation"]
    assert set(gen) == {"ct2mri/brain", "mri2ct/brain", "mri2ct/pelvis", "recon_ct/pelvis"}
    for v in gen.values():
        assert 0 < v["mse"] and v["psnr"] is not None and -1 <= v["ssim"] <= 1
        assert v["lpips"] is None
        assert v["vq_ceiling"]["n"] == 1
        assert v["n_repaired_tokens"] == 1  # 4 generated tokens are padded to 1024 and reported
    # SynthRAD HU metrics only for CT targets that carry their 16-bit reference
    assert gen["mri2ct/brain"]["hu"]["n"] == 1 and gen["recon_ct/pelvis"]["hu"]["n"] == 1
    assert gen["ct2mri/brain"]["hu"] is None  # an MR target: no HU metrics
    # the baselines sit in the HU table too, scored by the same code
    assert gen["mri2ct/brain"]["baselines_hu"]["identity"]["n"] == 1 and not gen["ct2mri/brain"]["baselines_hu"]
    hu_table = (out / "report.md").read_text().split("SynthRAD2023 challenge metrics")[1].split("###")[0]
    assert "identity (input)" in hu_table and "| model |" in hu_table
    assert report["lpips"].startswith("not computed")
    # grids: input | prediction | target, 256 px each with 4 px gaps
    assert len(report["grids"]) == 4
    from PIL import Image

    with Image.open(out / report["grids"][0]) as im:
        assert im.size == (3 * 256 + 8, 256)
    md = (out / "report.md").read_text()
    for text in ("VQA-RAD close", "VQA-RAD all", "OMVQA op", "Table 9", "Table 4", "Reconstruction CT-Pelvis",
                 "SynthRAD2023", "Definition of `all`", "LPIPS: not computed", "grids/"):
        assert text in md, text
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["key"] for p in preds] == sorted(p["key"] for p in preds)
    assert all(len(p["codes"]) == 1024 for p in preds if p["task"] == "generation")
    assert "/" not in json.dumps(json.loads((out / "eval_config.json").read_text())["shards"])


def test_interrupted_eval_resumes_to_the_same_report(shards: list[Path], components: tuple, tmp_path: Path) -> None:
    model, vq = components
    full = tmp_path / "full"
    run_evaluation(_config(shards, full, grids_per_task=0), model=model, vq=vq)

    part = tmp_path / "part"
    first = run_evaluation(_config(shards, part, grids_per_task=0, max_batches=2), model=model, vq=vq)
    assert not first.complete and first.n_new == 4
    assert not (part / "report.json").exists()
    # a kill in the middle of writing leaves a torn line: it is dropped and that sample redone
    part_file = next((part / "predictions").glob("part-r*.jsonl"))
    with open(part_file, "a") as fh:
        fh.write('{"key": "torn", "task": "compre')
    assert len(read_predictions(part)) == 4
    second = run_evaluation(_config(shards, part, grids_per_task=0, max_batches=1), model=model, vq=vq)
    assert not second.complete and second.n_new == 2
    third = run_evaluation(_config(shards, part, grids_per_task=0), model=model, vq=vq)
    assert third.complete and third.n_new == 6
    assert (part / "report.json").read_bytes() == (full / "report.json").read_bytes()
    assert (part / "report.md").read_bytes() == (full / "report.md").read_bytes()
    assert (part / "predictions.jsonl").read_bytes() == (full / "predictions.jsonl").read_bytes()
    # nothing left to do: a rerun predicts nothing new and rewrites the same report
    again = run_evaluation(_config(shards, part, grids_per_task=0), model=model, vq=vq)
    assert again.complete and again.n_new == 0
    assert (part / "report.json").read_bytes() == (full / "report.json").read_bytes()


def test_resume_with_other_settings_is_refused(shards: list[Path], components: tuple, tmp_path: Path) -> None:
    model, vq = components
    out = tmp_path / "r"
    run_evaluation(_config(shards, out, max_batches=1, limit=2), model=model, vq=vq)
    with pytest.raises(EvalError, match="max_new_tokens"):
        run_evaluation(_config(shards, out, max_new_tokens=7, limit=2), model=model, vq=vq)


def test_rank_sharding_is_disjoint_and_merges(shards: list[Path], components: tuple, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks (simulated one after the other, as torchrun would run them side by side)."""
    model, vq = components
    out = tmp_path / "ranks"
    monkeypatch.setenv("WORLD_SIZE", "2")
    from healthgpt.training.dist import Dist

    class NoProcessGroup(Dist):  # ranks run one after the other here: nothing to wait for
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__()  # WORLD_SIZE=2 but no group is created: enabled only if one could be
            self.enabled = False

    monkeypatch.setattr("healthgpt.training.dist.dist.is_available", lambda: False)
    monkeypatch.setattr("healthgpt.evaluation.evaluate.Dist", NoProcessGroup)
    monkeypatch.setenv("RANK", "1")
    r1 = run_evaluation(_config(shards, out, grids_per_task=0), model=model, vq=vq)
    assert not r1.complete and r1.report is None
    monkeypatch.setenv("RANK", "0")
    r0 = run_evaluation(_config(shards, out, grids_per_task=0), model=model, vq=vq)
    assert r0.complete and r0.n_new + r1.n_new == 12
    keys0 = {json.loads(x)["key"] for x in (out / "predictions" / "part-r000.jsonl").read_text().splitlines()}
    keys1 = {json.loads(x)["key"] for x in (out / "predictions" / "part-r001.jsonl").read_text().splitlines()}
    assert keys0 and keys1 and not keys0 & keys1
    assert len(keys0 | keys1) == 12


def test_no_samples_and_hu_reference_errors(shards: list[Path], components: tuple, tmp_path: Path) -> None:
    model, vq = components
    with pytest.raises(EvalError, match="no samples"):
        run_evaluation(_config(shards, tmp_path / "none", split="val"), model=model, vq=vq)
    sample = _gen(9, "mri2ct", "brain")
    hu, mask, window = hu_reference(sample)
    assert window == (-1024.0, 3000.0) and mask is not None and mask.sum() == 176 * 150
    assert hu.min() >= -1024 and hu.max() <= 3000
    np.testing.assert_allclose(hu, -1024 + sample.target / 255.0 * 4024, atol=1e-9)
    assert hu_reference(_gen(8, "ct2mri", "brain")) is not None  # found; the runner only uses it for CT targets
    del sample.extras["reference.png"]
    assert hu_reference(sample) is None
    sample = _gen(7, "mri2ct", "brain")
    del sample.record.provenance["target_window"]
    with pytest.raises(EvalError, match="window"):
        hu_reference(sample)


def test_eval_cli(shards: list[Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from healthgpt.cli import app

    runner = CliRunner()
    helped = runner.invoke(app, ["eval", "--help"])
    assert helped.exit_code == 0 and "Example" in helped.output and "--lpips-weights" in helped.output
    out = tmp_path / "cli"
    args = ["eval", "--shards", str(shards[0]), "--shards", str(shards[1]), "--out", str(out), "--preset", "tiny",
            "--limit", "10", "--batch-size", "4", "--max-new-tokens", "4", "--max-image-tokens", "2",
            "--grids", "1", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "VQA-RAD close" in result.output
    # the research-use notice, once in report.md and once in what eval prints
    assert (out / "report.md").read_text("utf-8").count(RESEARCH_USE) == 1
    assert result.output.count(RESEARCH_USE) == 1, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {"comprehension": 8, "generation": 4}  # --limit counts per shard folder
    assert "--shuffled-limit" in helped.output and "--shuffle-seed" in helped.output
    # image reliance is on by default: the shuffled-image pass ran and has its own predictions
    assert report["image_reliance"]["status"] == "computed" and (out / "predictions_shuffled.jsonl").is_file()
    # a checkpoint that does not exist is a clear error, not a traceback
    bad = runner.invoke(app, args[:-2] + ["--checkpoint", str(tmp_path / "missing.safetensors")])
    assert bad.exit_code == 2 and "missing.safetensors" in bad.output


@pytest.mark.slow
def test_torchrun_two_ranks(shards: list[Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
           "-m", "healthgpt.cli", "eval", "--shards", str(shards[0]), "--shards", str(shards[1]), "--out", str(out),
           "--max-new-tokens", "4", "--max-image-tokens", "2", "--batch-size", "2", "--grids", "0", "--device", "cpu"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = sorted((out / "predictions").glob("part-r*.jsonl"))
    assert [p.name for p in parts] == ["part-r000.jsonl", "part-r001.jsonl"]
    keys = [set(json.loads(x)["key"] for x in p.read_text().splitlines()) for p in parts]
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == 12
    assert json.loads((out / "report.json").read_text())["counts"] == {"comprehension": 8, "generation": 4}


def test_eval_on_demo_builds(components: tuple, tmp_path: Path) -> None:
    """The builders' real output (demo SynthRAD2023, VQA-RAD, OmniMedVQA) through the evaluator."""
    import vlhealth.builders.omnimedvqa as omnimedvqa
    import vlhealth.builders.synthrad as synthrad
    import vlhealth.builders.vqa_rad as vqa_rad

    from vlhealth.build import run_build
    from vlhealth.demo import write_demo_data

    model, vq = components
    roots = write_demo_data(tmp_path / "raw", sources=["synthrad2023", "vqa_rad", "omnimedvqa"])
    shards = []
    for module, name, options, partition in [
        (vqa_rad, "vqa_rad", vqa_rad.Options(), None),
        (omnimedvqa, "omnimedvqa", omnimedvqa.Options(), None),
        (synthrad, "synthrad2023", synthrad.Options(slice_step=8, eval_slices="same"), (0, 4)),  # a few slices
    ]:
        run_build(module, roots[name], tmp_path / name, options=options, partition=partition)
        shards.append(tmp_path / name)
    out = tmp_path / "eval"
    result = run_evaluation(_config(shards, out, batch_size=8, max_new_tokens=4, max_image_tokens=2,
                                    grids_per_task=1), model=model, vq=vq)
    assert result.complete
    report = json.loads((out / "report.json").read_text())
    assert {"VQA-RAD", "OMVQA"} <= set(report["comprehension"])
    assert report["comprehension"]["OMVQA"]["n_choice"] > 0
    gen = report["generation"]
    assert any(k.startswith("ct2mri/") for k in gen) and any(k.startswith("mri2ct/") for k in gen)
    # the builder's 16-bit CT references give the SynthRAD HU metrics, MR targets none
    assert all(v["hu"] is not None for k, v in gen.items() if k.startswith(("mri2ct/", "recon_ct/")))
    assert all(v["hu"] is None for k, v in gen.items() if k.startswith(("ct2mri/", "recon_mr/")))
    assert len(report["grids"]) == 3  # one per subtask: ct2mri, mri2ct, recon
    assert (out / "report.md").is_file() and (out / "predictions.jsonl").is_file()


def test_multi_turn_prompt_keeps_the_context(components: tuple) -> None:
    from healthgpt.evaluation.evaluate import _Runner

    model, vq = components
    conv = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A CT scan."},
            {"from": "human", "value": "Which organ?"}, {"from": "gpt", "value": "liver"}]
    rec = Record(task="comprehension", subtask="conversation", source="llava_med", split="test",
                 conversations=conv, group="g", license="CC0", answer_type="open")
    sample = Sample(key="k", record=rec, input_image=np.zeros((32, 32), np.uint8))
    runner = _Runner(_config([], Path("unused")), model, vq, None)
    ids, question = runner._prompt(sample, "comprehension")
    text = model.tokenizer.decode([i for i in ids if i >= 0])
    assert question == "Which organ?"
    assert "A CT scan." in text and text.rstrip().endswith("assistant") and "liver" not in text
    assert ids.count(-200) == 1  # one image placeholder
    (record,) = runner.comprehension([sample])
    assert record["reference"] == "liver" and record["question"] == "Which organ?"


def test_eval_loads_a_training_checkpoint(shards: list[Path], components: tuple, tmp_path: Path) -> None:
    """A trainer output folder (final/trainable.safetensors) is found, loaded and fingerprinted."""
    from healthgpt.model.weights import save_trainable
    from healthgpt.serving.infer import load_model

    base_model, vq = components
    trained = load_model("tiny")
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "plugins.comprehension.lora_B" in name or "abstract_adapter" in name:
                p.add_(torch.randn_like(p))
    save_trainable(trained, tmp_path / "run" / "final" / "trainable.safetensors")

    base = run_evaluation(_config(shards, tmp_path / "base", limit=4, grids_per_task=0), model=base_model, vq=vq)
    loaded = run_evaluation(_config(shards, tmp_path / "loaded", limit=4, grids_per_task=0,
                                    checkpoint=tmp_path / "run"), vq=vq)
    assert base.complete and loaded.complete
    ckpt = loaded.report["model"]["checkpoint"]
    assert ckpt["name"] == "trainable.safetensors" and len(ckpt["sha256"]) == 64
    preds = [read_predictions(tmp_path / d) for d in ("base", "loaded")]
    answers = [[p["prediction"] for p in run.values() if "prediction" in p] for run in preds]
    assert answers[0] and answers[0] != answers[1]
    with pytest.raises(EvalError, match="no trainable.safetensors"):
        run_evaluation(_config(shards, tmp_path / "x", limit=1, checkpoint=tmp_path), vq=vq)


def test_validation_split_is_val_or_the_held_out_train_groups(tmp_path: Path) -> None:
    """--split validation reads what the trainer validates on: a folder's val split, or, where it has none,
    the 1 in 20 train groups no training step reads (--split held-out); never test samples."""
    from healthgpt.evaluation.evaluate import _iter_members
    from healthgpt.training.data import held_out

    with_val = _write(tmp_path / "slake", [_comp(i, "closed", "slake", split="train") for i in range(40)]
                      + [_comp(100 + i, "closed", "slake", split="val") for i in range(5)]
                      + [_comp(200 + i, "closed", "slake") for i in range(5)], prefix="slake")
    without = _write(tmp_path / "vqa_rad", [_comp(i, "closed", "vqa_rad", split="train") for i in range(80)]
                     + [_comp(200 + i, "closed", "vqa_rad") for i in range(5)], prefix="vqa_rad")

    def keys(folder: Path, split: str) -> set[str]:
        return {key for key, *_ in _iter_members([folder], split, verify=False)}

    held = {f"vqa_rad-{i:04d}" for i in range(80) if held_out(f"g{i}")}
    assert held and len(held) < 20
    assert keys(without, "held-out") == keys(without, "validation") == held
    assert keys(with_val, "validation") == keys(with_val, "val") == {f"slake-{100 + i:04d}" for i in range(5)}
    assert keys(with_val, "held-out") == {f"slake-{i:04d}" for i in range(40) if held_out(f"g{i}")}

    # decided per task, as the trainer decides it: comprehension validates on its val split, generation
    # (no val samples in this folder) on its held-out train groups
    mixed = _write(tmp_path / "mixed", [_comp(100 + i, "closed", "slake", split="val") for i in range(3)]
                   + [_gen(i, "ct2mri", "brain", split="train") for i in range(60)], prefix="mixed")
    held_gen = {f"synthrad2023-ct2mri-brain-{i:03d}" for i in range(60) if held_out(f"p{i}")}
    assert held_gen
    assert keys(mixed, "validation") == {f"slake-{100 + i:04d}" for i in range(3)} | held_gen


def test_held_out_baselines_are_not_fitted_on_the_held_out_answers(tmp_path: Path) -> None:
    """With --split held-out / validation the majority answer is read from the train groups that training
    reads: a question asked only in a held-out group has no majority of its own there."""
    from healthgpt.evaluation.baselines import collect_train_reference, question_key
    from healthgpt.training.data import held_out

    samples = [_comp(i, "closed", "vqa_rad", split="train") for i in range(80)]
    folder = _write(tmp_path / "vqa_rad", samples, prefix="vqa_rad")
    held = [s for s in samples if held_out(s.record.group, s.key)]
    assert held
    questions = {question_key(s.record.conversations[0]["value"]) for s in held}
    every = collect_train_reference([folder])
    fitted = collect_train_reference([folder], skip_held_out=True)
    assert every.n_answers - fitted.n_answers == len(held)
    assert questions <= {q for _, _, q in every.by_question}
    assert not questions & {q for _, _, q in fitted.by_question}


def test_generation_limit_spreads_over_patients_and_slices(tmp_path: Path) -> None:
    """--generation-limit N scores N samples per subtask and body part taken from as many patients as there
    are (one each in turn), spaced through each patient's slices, not the first patient's first N slices:
    a conversion score, and an image swapped between its samples, must not rest on one patient."""
    import dataclasses

    from healthgpt.evaluation.evaluate import _iter_members
    from healthgpt.evaluation.samples import spread_selection

    samples = []
    for i in range(12):  # patients p0 (slices 0-5), p1 (6-9), p2 (10-11), in stream order
        s = _gen(i, "ct2mri", "brain")
        samples.append(dataclasses.replace(s, record=dataclasses.replace(s.record, group=f"p{0 if i < 6 else 1 if i < 10 else 2}")))
    samples += [_gen(20 + i, "mri2ct", "pelvis") for i in range(3)]  # one patient each
    folder = _write(tmp_path / "synthrad", samples, prefix="synthrad")

    def keys(n: int) -> list[str]:
        return [key for key, *_ in _iter_members([folder], "test", verify=False, generation_limit=n)]

    brain = [k for k in keys(6) if "brain" in k]
    by_patient = [sum(1 for k in brain if lo <= int(k[-3:]) < hi) for lo, hi in ((0, 6), (6, 10), (10, 12))]
    assert by_patient == [2, 2, 2]  # not the first six slices, all of p0
    assert [k for k in keys(6) if "brain" in k] == sorted(brain)  # stream order kept
    assert [k[-3:] for k in keys(3) if "brain" in k] == ["003", "008", "011"]  # each patient's middle slice
    assert [k[-3:] for k in keys(2) if "pelvis" in k] == ["020", "021"]
    assert len(keys(100)) == 15 and keys(0) == []
    # evenly spaced inside a patient: 3 of 6 slices are the centres of its thirds, not the first three
    assert spread_selection([("p", f"s{i}") for i in range(6)], 3) == ["s1", "s3", "s5"]
