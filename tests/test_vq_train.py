"""`vlhealth vq train`: the loss falls, a killed run resumes where it stopped, the output builds shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import vlhealth.builders.synthrad as synthrad
from typer.testing import CliRunner

from tests.test_builders_generation import FakeVQ, write_patient
from vlhealth.build import run_build
from vlhealth.cli import app
from vlhealth.shards import iter_samples
from vlhealth.vq import VQConfig, load_vq
from vlhealth.vq.train import VQTrainConfig, codebook_usage, load_target_images, train_vq

# f8 at 256 px (32x32 codes, as the schema needs) with as few channels as the layout allows
SMALL = VQConfig(ch=4, ch_mult=(1, 1, 1, 1), num_res_blocks=0, attn_resolutions=(), z_channels=4, embed_dim=4,
                 n_embed=64, norm_groups=2)


@pytest.fixture(scope="module")
def patients(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthrad_vq")
    for i, pid in enumerate(("1BA001", "1BA002", "1BB003", "1BC004")):
        write_patient(root, "brain", pid, i)
    return root


@pytest.fixture(scope="module")
def shards(patients, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vq_shards") / "synthrad"
    run_build(synthrad, patients, out, vq=FakeVQ(), command=["vlhealth", "build", "synthrad"])
    return out


def _cfg(shards: Path, out: Path, steps: int, **kw) -> VQTrainConfig:
    return VQTrainConfig(shards=[shards], out=out, config=SMALL, steps=steps, batch_size=4, crop=64, lr=3e-3,
                         progress=False, **kw)


def test_codebook_usage_on_known_codes() -> None:
    u = codebook_usage(np.array([0, 0, 1, 1, 2, 2, 3, 3]), 8)
    assert u["codes_used"] == 4 and u["share_used"] == 0.5
    assert u["perplexity"] == pytest.approx(4.0)  # four equally used codes
    assert codebook_usage(np.zeros(10, int), 8)["perplexity"] == pytest.approx(1.0)


def test_loss_falls_and_the_output_is_a_loadable_tokenizer(shards, tmp_path) -> None:
    images = load_target_images([shards], "train", 256, 1000)
    assert len(images) > 8 and images.shape[1:] == (256, 256, 3)
    res = train_vq(_cfg(shards, tmp_path / "vq", 60))
    first, last = np.mean(res.losses[:5]), np.mean(res.losses[-5:])
    assert last < 0.7 * first, (first, last)
    report = json.loads((tmp_path / "vq" / "vq_train_report.json").read_text())
    held = report["held_out"]
    assert held["n"] > 0 and held["split"] in ("test", "val")
    assert 0 < held["ssim"] <= 1 and held["psnr"] > 0 and 1 <= held["perplexity"] <= 64
    assert (tmp_path / "vq" / "vqgan.json").is_file() and (tmp_path / "vq" / "loss.png").is_file()
    tok = load_vq(res.weights)
    assert not tok.random_weights and tok.config == SMALL
    # the saved quantiser's argmax is the nearest codebook entry (the rule it was trained with)
    x = torch.from_numpy(images[:2]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    with torch.no_grad():
        z = tok.model.quant_conv(tok.model.encoder(x)).permute(0, 2, 3, 1).reshape(-1, 4)
        nearest = torch.cdist(z, tok.model.quantize.embed.weight).argmin(1).reshape(2, -1)
    assert (torch.from_numpy(tok.encode(images[:2]).astype(np.int64)) == nearest).float().mean() > 0.99


def test_resume_continues_the_interrupted_run(shards, tmp_path) -> None:
    full = train_vq(_cfg(shards, tmp_path / "full", 12, save_every=4))

    def kill(step: int) -> None:
        if step == 10:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        train_vq(_cfg(shards, tmp_path / "cut", 12, save_every=4), step_hook=kill)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 8
    seen: list[int] = []
    resumed = train_vq(_cfg(shards, tmp_path / "cut", 12, save_every=4, resume=True), step_hook=seen.append)
    assert seen == [9, 10, 11, 12]  # only the steps after the checkpoint run again
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)
    a, b = load_vq(full.weights), load_vq(resumed.weights)
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.allclose(p, q, atol=1e-5), name


def test_gumbel_fine_tuning_from_init(shards, tmp_path) -> None:
    base = train_vq(_cfg(shards, tmp_path / "base", 4))
    tuned = train_vq(_cfg(shards, tmp_path / "tuned", 20, init=base.weights))
    report = json.loads((tmp_path / "tuned" / "vq_train_report.json").read_text())
    assert report["quantizer"] == "gumbel" and report["start"] == "fine-tuned from vqgan.safetensors"
    assert np.mean(tuned.losses[-4:]) < np.mean(tuned.losses[:4])


def test_cli_output_loads_in_build_vqgan(shards, patients, tmp_path) -> None:
    runner = CliRunner()
    out = tmp_path / "vq"
    res = runner.invoke(app, ["vq", "train", str(shards), "--out", str(out), "--steps", "6", "--batch-size", "2",
                              "--crop", "64", "--config", str(_small_json(tmp_path)), "--save-every", "0",
                              "--held-out-max", "2"])
    assert res.exit_code == 0, res.output
    held = json.loads((out / "vq_train_report.json").read_text())["held_out"]
    assert held["n"] == 2 and held["of"] > 2  # evenly spaced over all held-out targets
    built = tmp_path / "built"
    res = runner.invoke(app, ["build", "synthrad", str(patients), "--out", str(built),
                              "--vqgan", str(out / "vqgan.safetensors")])
    assert res.exit_code == 0, res.output
    build = json.loads((built / "build.json").read_text())
    assert build["vq"]["name"] == "vqgan.safetensors" and build["vq"]["random_weights"] is False
    tok = load_vq(out / "vqgan.safetensors")
    samples = [s for s in iter_samples(built) if s.target is not None][:3]
    assert samples
    for s in samples:
        assert s.target_vq.max() < SMALL.n_embed
        target = s.target if s.target.ndim == 3 else np.repeat(s.target[..., None], 3, axis=2)
        assert np.array_equal(s.target_vq, tok.encode(target)[0])


def _small_json(tmp_path: Path) -> Path:
    path = tmp_path / "small.json"
    path.write_text(json.dumps(SMALL.to_dict()))
    return path
