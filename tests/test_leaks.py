"""Leakage guard: perceptual hashes, near-duplicate search, the planted demo leak, --drop-leaks."""

from __future__ import annotations

import importlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vlhealth.build import run_build
from vlhealth.demo import write_demo_data
from vlhealth.demo._vl import leak_image, natural_image
from vlhealth.leaks import LeakIndex, find_leaks, hamming, phash, thumbnail, to_grey
from vlhealth.shards import iter_samples

SOURCES = ["pubmedvision", "omnimedvqa", "mimic_cxr_vqa"]


def jpeg(arr: np.ndarray, quality: int, scale: float = 1.0) -> bytes:
    img = Image.fromarray(arr)
    if scale != 1.0:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def build(name: str, root: Path, out: Path, **options):
    module = importlib.import_module(f"vlhealth.builders.{name}")
    return run_build(module, root, out, options=module.Options(**options), command=["vlhealth", "build", name])


@pytest.fixture(scope="module")
def demo_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    raw = tmp_path_factory.mktemp("raw")
    shards = tmp_path_factory.mktemp("shards")
    write_demo_data(raw, sources=SOURCES)
    return raw, {name: build(name, raw / name, shards / name).out for name in SOURCES}


def test_phash_survives_resize_and_recompression_but_separates_images() -> None:
    rng = np.random.default_rng(1)
    base = leak_image()
    copy = to_grey(jpeg(base, 60, 0.6))
    assert hamming(phash(base), phash(copy)) <= 4
    assert float(np.dot(thumbnail(base), thumbnail(copy))) > 0.99
    others = [natural_image(rng, (96, 96)).mean(axis=2).astype(np.uint8) for _ in range(8)]
    assert min(hamming(phash(base), phash(o)) for o in others) > 12


def test_multi_index_finds_exactly_the_hashes_within_distance() -> None:
    rng = np.random.default_rng(0)
    index = LeakIndex(max_distance=6, min_similarity=0.0)
    hashes = [int(v) for v in rng.integers(0, 2**63, 300, dtype=np.int64)]
    flat = np.zeros(1024, np.float32)
    for i, h in enumerate(hashes):
        index.add(f"t{i}", "toy", f"g{i}", h, flat)
    for trial in range(200):
        h = hashes[trial % len(hashes)]
        for bit in rng.choice(64, int(rng.integers(0, 10)), replace=False):
            h ^= 1 << int(bit)
        found = {n for n, _d in index.candidates(h)}
        brute = {n for n, x in enumerate(hashes) if hamming(h, x) <= 6}
        assert found == brute


def test_planted_leak_is_found(demo_build) -> None:
    _raw, out = demo_build
    leaks, counts = find_leaks(out.values())
    assert [(x.key, x.test_key) for x in leaks] == [
        ("pubmedvision-alignment-align_leak", "omnimedvqa-Head_CT_Scans_0000")]
    assert leaks[0].distance <= 4 and leaks[0].similarity > 0.99
    assert counts["test_images"] > 5 and counts["checked"] > 10
    # Look-alike radiographs (the MIMIC-CXR-VQA train/test phantoms) are not reported.
    assert not [x for x in leaks if x.source == "mimic_cxr_vqa"]


def test_drop_leaks_at_build_time(demo_build, tmp_path: Path) -> None:
    raw, out = demo_build
    summary = build("pubmedvision", raw / "pubmedvision", tmp_path / "pmv", drop_leaks=[str(out["omnimedvqa"])])
    rejects = [json.loads(x) for x in (tmp_path / "pmv" / "rejects.jsonl").read_text().splitlines()]
    leak = [r for r in rejects if r["reason"].startswith("leak")]
    assert [(r["file"], r["item"]) for r in leak] == [("images/pmc_leak_0001.jpg", "alignment-align_leak")]
    assert "omnimedvqa-Head_CT_Scans_0000" in leak[0]["reason"]
    keys = {s.key for s in iter_samples(tmp_path / "pmv")}
    before = {s.key for s in iter_samples(out["pubmedvision"])}
    assert keys == before - {"pubmedvision-alignment-align_leak"} and summary.samples == len(before) - 1
    leaks, _ = find_leaks([tmp_path / "pmv", out["omnimedvqa"]])
    assert leaks == []
    info = json.loads((tmp_path / "pmv" / "build.json").read_text())
    assert not any(p.startswith("/") for p in info["options"]["drop_leaks"])


def test_cli_check_leaks(demo_build, tmp_path: Path) -> None:
    from vlhealth.cli import app

    _raw, out = demo_build
    report = tmp_path / "leaks.json"
    args = ["check-leaks", *map(str, out.values()), "--json", str(report), "--fail"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    data = json.loads(report.read_text())
    assert data["counts"]["leaks"] == 1 and data["leaks"][0]["test_source"] == "omnimedvqa"
    clean = CliRunner().invoke(app, ["check-leaks", str(out["mimic_cxr_vqa"]), "--fail"])
    assert clean.exit_code == 0, clean.output
