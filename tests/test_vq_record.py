"""A run finds the VQGAN its shards were tokenized with, also when the build was given an absolute path
outside the working folder (which a record keeps as a file name only): build.json keeps where the file lies
from the shard folder, and a mix re-anchors that on its own folder."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from healthgpt.sharing.run_spec import make_run_spec
from vlhealth.cli import app as vl


def _ok(argv: list[str]) -> None:
    result = CliRunner().invoke(vl, argv)
    assert result.exit_code == 0, f"{argv}\n{result.output}"


@pytest.mark.usefixtures("one_thread")
def test_an_absolute_vqgan_path_outside_the_working_folder_is_found_again(tmp_path, monkeypatch) -> None:
    from vlhealth.vq.convert import save_vq
    from vlhealth.vq.network import TINY_CONFIG, VQGAN, _init_seeded

    elsewhere = tmp_path / "elsewhere"  # the VQGAN, the raw data and the shards: none under the working folder
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    model = VQGAN(TINY_CONFIG)
    _init_seeded(model, 7)
    vq_file = elsewhere / "vq" / "vqgan.safetensors"
    save_vq(model, vq_file)
    _ok(["demo-data", str(elsewhere / "raw"), "--source", "synthrad2023", "--source", "vqa_rad"])
    shards = elsewhere / "shards"
    _ok(["build", "synthrad", str(elsewhere / "raw" / "synthrad2023"), "--out", str(shards / "synthrad"),
         "--slice-step", "6", "--recon", "none", "--vqgan", str(vq_file)])
    _ok(["build", "vqa-rad", str(elsewhere / "raw" / "vqa_rad"), "--out", str(shards / "vqa_rad")])
    record = json.loads((shards / "synthrad" / "build.json").read_text())["vq"]
    assert record["path"] == "vqgan.safetensors"  # no absolute path in the record
    assert record["at_shards"] == "../../vq/vqgan.safetensors"
    _ok(["mix", "--from", str(shards / "synthrad"), "--from", str(shards / "vqa_rad"), "--n", "20",
         "--out", str(elsewhere / "mixes" / "m1")])
    assert json.loads((elsewhere / "mixes" / "m1" / "build.json").read_text())["vq"]["at_shards"] == \
        "../../vq/vqgan.safetensors"
    for source in (shards / "synthrad", elsewhere / "mixes" / "m1"):
        out = elsewhere / "runs" / source.name
        spec = make_run_spec([source], [], {}, 0, out)
        assert spec["vq"]["at_run"] is not None and "_candidates" not in spec["vq"]
        assert (out / spec["vq"]["at_run"]).resolve() == vq_file.resolve()
        assert not os.path.isabs(spec["vq"]["at_run"])
