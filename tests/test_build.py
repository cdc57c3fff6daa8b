import json
import types
from dataclasses import dataclass

import numpy as np
import pytest

from vlhealth.build import Item, Reject, Rejected, assign_splits, run_build
from vlhealth.schema import Record, Sample
from vlhealth.shards import iter_samples, load_index

MANIFEST = {"name": "toy", "license": "CC0-1.0", "access": "open", "sha256": "0" * 64,
            "templates": {"ct2mri": ["Convert this CT slice to MRI.", "Synthesise the MR image of this CT."]}}


class FakeVQ:
    def encode(self, images):
        assert images.ndim == 4 and images.shape[1:] == (256, 256, 3)
        return (images[:, ::8, ::8, 0].reshape(len(images), -1).astype(np.int16) * 32) % 8192

    def describe(self):
        return {"name": "fake", "random_weights": True}


def toy_builder():
    mod = types.ModuleType("toy")
    mod.NAME = "toy"
    mod.MANIFEST = "toy"

    @dataclass
    class Options:
        slices: int = 2

    mod.Options = Options

    def discover(ctx):
        for p in sorted(ctx.root.iterdir()):
            if p.suffix != ".npy":
                yield Reject(ctx.rel(p), "not a .npy volume")
            else:
                yield Item(id=p.stem, group=p.stem.split("_")[0], files=(ctx.rel(p),))

    def process(item, ctx):
        vol = np.load(ctx.root / item.files[0])
        if vol.ndim != 3:
            raise Rejected(item.files[0], f"expected a 3D volume, got {vol.ndim}D")
        if not np.isfinite(vol).all():
            raise ValueError(f"NaN voxels in {ctx.root / item.files[0]}")
        for z in range(ctx.options.slices):
            key = f"toy-{item.id}-{z}"
            img = np.full((256, 256), int(vol[z].mean()) % 256, np.uint8)
            rec = Record(task="generation", subtask="ct2mri", source="toy", split=ctx.split_of(item.group),
                         conversations=[{"from": "human", "value": "<image>\n" + ctx.template("ct2mri", key)},
                                        {"from": "gpt", "value": "<target_image>"}],
                         group=item.group, license=ctx.license, provenance={"file": item.files[0], "slice": z})
            yield Sample(key=key, record=rec, input_image=img, target=img)

    mod.discover = discover
    mod.process = process
    return mod


@pytest.fixture
def toy_root(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    for i in range(6):
        np.save(root / f"p{i}_vol.npy", np.full((3, 4, 4), i * 40, np.float32))
    np.save(root / "p9_flat.npy", np.zeros((4, 4), np.float32))
    bad = np.zeros((3, 4, 4), np.float32)
    bad[1, 1, 1] = np.nan
    np.save(root / "p8_nan.npy", bad)
    (root / "notes.txt").write_text("hello")
    return root


def test_run_build_writes_samples_rejects_and_metadata(tmp_path, toy_root):
    out = tmp_path / "shards"
    summary = run_build(toy_builder(), toy_root, out, vq=FakeVQ(), manifest=MANIFEST, max_count=5, command=["vlhealth", "build", str(toy_root)])
    assert (summary.samples, summary.rejects, summary.items) == (12, 3, 8)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["file"]: r["reason"] for r in rejects} == {
        "notes.txt": "not a .npy volume",
        "p8_nan.npy": "ValueError: NaN voxels in p8_nan.npy",
        "p9_flat.npy": "expected a 3D volume, got 2D",
    }
    samples = list(iter_samples(out))
    assert len(samples) == 12 and load_index(out)["total_samples"] == 12
    assert all(s.target_vq is not None and s.target_vq.shape == (1024,) for s in samples)
    assert samples[2].target_vq[0] == (40 * 32) % 8192
    build = json.loads((out / "build.json").read_text())
    assert build["vq"] == {"name": "fake", "random_weights": True}
    assert build["counts"]["rejects"] == 3
    assert str(tmp_path) not in (out / "build.json").read_text() + (out / "rejects.jsonl").read_text()
    splits = json.loads((out / "splits.json").read_text())["groups"]
    assert {s.record.split for s in samples} <= {"train", "val", "test"}
    assert all(s.record.split == splits[s.record.group] for s in samples)


def test_run_build_is_deterministic(tmp_path, toy_root):
    for name in ("a", "b"):
        run_build(toy_builder(), toy_root, tmp_path / name, vq=FakeVQ(), manifest=MANIFEST)
    for f in ("index.json", "rejects.jsonl", "splits.json", "toy-000000.tar"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_assign_splits_is_stable_stratified_and_non_empty():
    groups = [f"1BA{i:03d}" for i in range(3)] + [f"1PA{i:03d}" for i in range(3)]
    strata = {g: g[:3] for g in groups}
    a = assign_splits(groups, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=0, strata=strata)
    assert a == assign_splits(list(reversed(groups)), {"train": 0.7, "val": 0.1, "test": 0.2}, seed=0, strata=strata)
    for prefix in ("1BA", "1PA"):
        assert sorted(v for k, v in a.items() if k.startswith(prefix)) == ["test", "train", "val"]
    big = assign_splits([f"g{i}" for i in range(1000)], {"train": 0.7, "val": 0.1, "test": 0.2})
    assert abs(sum(v == "test" for v in big.values()) - 200) <= 1
    assert assign_splits(["only"], None) == {"only": "train"}


def test_upstream_split_builders_say_so_in_splits_json(tmp_path, toy_root):
    builder = toy_builder()
    builder.SPLITS = "upstream"
    out = tmp_path / "up"
    run_build(builder, toy_root, out, vq=FakeVQ(), manifest={**MANIFEST, "splits": {"upstream": "the source's files"}})
    record = json.loads((out / "splits.json").read_text())
    assert record == {"seed": 0, "upstream": True, "groups": {}, "note": "the source's files"}


def test_scrub_removes_the_absolute_root_whatever_the_hash_seed(tmp_path):
    # BuildContext.scrub once looped over a set of prefixes: with a relative root, the order
    # (PYTHONHASHSEED) decided whether "/abs/<root>/x" became "x" or "/abs/x" (a leaked path).
    import os
    import subprocess
    import sys

    (tmp_path / "data" / "src").mkdir(parents=True)
    code = ("from pathlib import Path; from vlhealth.build import BuildContext; "
            "ctx = BuildContext(root=Path('data/src'), options=None, manifest={}); "
            "print(ctx.scrub(str(Path('data/src').absolute()) + '/Task1/ct.nii.gz: bad'))")
    repo = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    outs = set()
    for seed in range(8):
        env = {**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": repo}
        res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                             text=True, check=True)
        outs.add(res.stdout.strip())
    assert outs == {"Task1/ct.nii.gz: bad"}


def test_build_json_keeps_no_absolute_path_from_options_or_command(tmp_path, toy_root):
    # e.g. `vlhealth build mimic-cxr ROOT --reports=/data/mimic-cxr-reports`: a str option and a
    # --flag=/abs/path argument both named the building machine's folders in build.json.
    builder = toy_builder()

    @dataclass
    class Options:
        slices: int = 1
        reports: str = ""

    builder.Options = Options
    elsewhere = tmp_path / "reports-folder"
    out = tmp_path / "shards"
    run_build(builder, toy_root, out, manifest=MANIFEST, options=Options(reports=str(elsewhere)),
              command=["vlhealth", "build", "toy", str(toy_root), f"--reports={elsewhere}", f"--out={out}"])
    text = (out / "build.json").read_text()
    assert str(tmp_path) not in text
    build = json.loads(text)
    assert build["options"]["reports"] == "reports-folder"
    assert "--reports=reports-folder" in build["command"] and "--out=shards" in build["command"]


def test_merge_refuses_partitions_built_with_other_settings(tmp_path, toy_root):
    # splits are assigned from the seed over all groups: partitions built with different seeds (or
    # options, VQ models) cannot be one dataset, and splits.json would describe only the last one
    from vlhealth.build import merge_partitions

    out = tmp_path / "parts"
    run_build(toy_builder(), toy_root, out, vq=FakeVQ(), manifest=MANIFEST, partition="0/2", seed=0, command=["x"])
    run_build(toy_builder(), toy_root, out, vq=FakeVQ(), manifest=MANIFEST, partition="1/2", seed=1, command=["x"])
    with pytest.raises(ValueError, match="seed"):
        merge_partitions(out)
    assert not (out / "index.json").exists()
    run_build(toy_builder(), toy_root, out, vq=FakeVQ(), manifest=MANIFEST, partition="1/2", seed=0, command=["x"])
    assert merge_partitions(out)["total_samples"] == 12


def test_a_fresh_build_replaces_the_tars_of_an_earlier_one(tmp_path, toy_root):
    out = tmp_path / "out"
    run_build(toy_builder(), toy_root, out, vq=FakeVQ(), manifest=MANIFEST, max_count=2)
    assert len(list(out.glob("toy-*.tar"))) == 6
    (out / "other-000000.tar").write_bytes(b"not ours")
    run_build(toy_builder(), toy_root, out, vq=FakeVQ(), manifest=MANIFEST, max_count=100)
    assert sorted(p.name for p in out.glob("*.tar")) == ["other-000000.tar", "toy-000000.tar"]


def test_duplicate_sample_keys_across_items_are_refused_not_fatal(tmp_path, toy_root):
    builder = toy_builder()
    process = builder.process

    def colliding(item, ctx):  # every item writes the keys of slice 0 and 1 under one shared name
        for sample in process(item, ctx):
            sample.key = "toy-same-" + sample.key.rsplit("-", 1)[1]
            yield sample

    builder.process = colliding
    out = tmp_path / "dup"
    summary = run_build(builder, toy_root, out, vq=FakeVQ(), manifest=MANIFEST)
    assert summary.samples == 2  # the first item's two slices
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    dups = [r for r in rejects if "duplicate sample key" in r["reason"]]
    assert len(dups) == 10 and {r["file"] for r in dups} == {f"p{i}_vol.npy" for i in range(1, 6)}


def test_every_registered_builder_satisfies_the_builder_protocol() -> None:
    """The builder contract is explicit: required members by the Protocol, optional ones only from
    OPTIONAL_HOOKS, each of the documented kind."""
    import dataclasses
    import inspect

    from vlhealth.build import OPTIONAL_HOOKS, Builder
    from vlhealth.cli import builder_modules

    modules = builder_modules()
    assert len(modules) >= 12
    for name, module in modules.items():
        assert isinstance(module, Builder), f"{name}: misses a required builder member"
        assert isinstance(module.NAME, str) and isinstance(module.MANIFEST, str)
        assert dataclasses.is_dataclass(module.Options), f"{name}: Options is not a dataclass"
        assert list(inspect.signature(module.discover).parameters) == ["ctx"]
        assert list(inspect.signature(module.process).parameters) == ["item", "ctx"]
        hooks = {k for k in vars(module) if k in OPTIONAL_HOOKS}
        if "SPLITS" in hooks:
            assert module.SPLITS in ("upstream", "assigned"), name
        if "GENERATES" in hooks:
            assert isinstance(module.GENERATES, bool), name
        for fn in ("split_strata", "preset_splits"):
            if fn in hooks:
                assert callable(getattr(module, fn)), f"{name}.{fn} is not callable"


def test_builder_hook_refuses_an_undocumented_name() -> None:
    import vlhealth.builders.vqa_rad as vqa_rad

    from vlhealth.build import builder_hook

    assert builder_hook(vqa_rad, "SPLITS") == "upstream"
    assert builder_hook(vqa_rad, "GENERATES") is False
    with pytest.raises(KeyError, match="not a builder hook"):
        builder_hook(vqa_rad, "SPLIT")
