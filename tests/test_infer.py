"""Inference on the tiny preset: answers (streamed), image generation with repair, the CLI."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from healthgpt import RESEARCH_USE
from healthgpt.cli import app
from healthgpt.serving.infer import answer, generate_image, load_model

HAVE_VQ = importlib.util.find_spec("vlhealth.vq") is not None


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", seed=0)


@pytest.fixture
def scan(tmp_path):
    path = tmp_path / "scan.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40), dtype=np.uint8)).save(path)
    return path


def test_answer_streams_the_same_text(tiny, scan) -> None:
    pieces: list[str] = []
    text = answer(tiny, scan, "What organ is shown?", max_new_tokens=12, on_text=pieces.append)
    assert isinstance(text, str) and pieces
    assert "".join(pieces).strip() == text
    assert answer(tiny, None, "Text only?", max_new_tokens=4) is not None


def test_generate_image_free_decoding_is_repaired(tiny, scan) -> None:
    vq = None
    if HAVE_VQ:
        from healthgpt.serving.infer import load_vq_decoder

        vq = load_vq_decoder("tiny")
    res = generate_image(tiny, scan, "Convert this CT to MRI.", vq=vq, max_new_tokens=64)
    # an untrained model does not emit 1024 index tokens: the result is repaired, not an error
    assert res.codes.shape == (1024,) and res.codes.dtype == np.int64
    assert not res.report.ok and res.report.notes
    if HAVE_VQ:
        assert res.image is not None and res.image.shape == (256, 256, 3) and res.image.dtype == np.uint8


def test_generate_image_constrained(tiny, scan) -> None:
    res = generate_image(tiny, scan, "Reconstruct the image.", constrained=True)
    assert res.report.ok and res.report.n_index_tokens == 1024
    assert 0 <= res.codes.min() and res.codes.max() < 8192


def test_cli_help_has_examples() -> None:
    runner = CliRunner()
    top = runner.invoke(app, [])
    assert "infer" in top.output  # no_args_is_help
    for args in (["--help"], ["infer", "--help"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0 and "Example" in res.output


def test_cli_infer_comprehension(scan) -> None:
    res = CliRunner().invoke(app, ["infer", "--preset", "tiny", "--image", str(scan), "--question",
                                   "Is there a fracture?", "--max-new-tokens", "6"])
    assert res.exit_code == 0, res.output
    assert res.output.count(RESEARCH_USE) == 1, res.output  # the research-use notice, once


@pytest.mark.skipif(not HAVE_VQ, reason="vlhealth.vq (VQGAN decoder) not available yet")
def test_cli_infer_generation_writes_png(scan, tmp_path) -> None:
    out = tmp_path / "out" / "mri.png"
    res = CliRunner().invoke(app, ["infer", "--preset", "tiny", "--task", "generation", "--image", str(scan),
                                   "--instruction", "Convert this CT to MRI", "--output", str(out),
                                   "--constrained"])
    assert res.exit_code == 0, res.output
    assert res.output.count(RESEARCH_USE) == 1, res.output
    with Image.open(out) as im:
        assert im.size == (256, 256)
    codes = np.load(out.with_suffix(".vq.npy"))
    assert codes.shape == (1024,) and codes.dtype == np.int16


def test_cli_errors_are_clear(tmp_path, monkeypatch) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["infer", "--image", str(tmp_path / "missing.png"), "--question", "Q?"])
    assert res.exit_code == 2 and "missing.png" in res.output
    monkeypatch.delenv("HEALTHGPT_PHI3_DIR", raising=False)
    res = runner.invoke(app, ["infer", "--preset", "m3", "--question", "Q?"])
    assert res.exit_code == 2 and "Phi-3-mini-4k-instruct" in res.output
