import hashlib
import io
import json
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest

from tests.helpers import generation_sample, vqa_sample
from vlhealth.schema import Sample
from vlhealth.shards import (
    ShardError,
    ShardWriter,
    iter_samples,
    iter_tar,
    list_shards,
    load_index,
    verify_shards,
    write_index,
)


def build(out, n=25, max_count=10):
    with ShardWriter(out, prefix="toy", max_count=max_count) as w:
        for i in range(n):
            w.write(vqa_sample(i) if i % 3 else generation_sample(i))
    write_index(out, w.shards)
    return w.shards


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def test_shards_are_deterministic_and_indexed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build(a)
    build(b)
    assert digests(a) == digests(b)
    assert list(digests(a)) == ["toy-000000.tar", "toy-000001.tar", "toy-000002.tar"]
    index = load_index(a)
    assert [s["samples"] for s in index["shards"]] == [10, 10, 5]
    assert index["total_samples"] == 25
    assert all(s["sha256"] == digests(a)[s["name"]] for s in index["shards"])
    assert all(s["bytes"] == (a / s["name"]).stat().st_size for s in index["shards"])
    assert verify_shards(a) == []
    (a / "toy-000001.tar").write_bytes((a / "toy-000001.tar").read_bytes()[:-1024] + b"\0" * 1024 + b"x")
    assert verify_shards(a) == ["toy-000001.tar: sha256 differs from index.json"]


def test_members_are_sorted_with_fixed_metadata(tmp_path):
    build(tmp_path, n=3)
    with tarfile.open(tmp_path / "toy-000000.tar") as tar:
        infos = tar.getmembers()
    names = [i.name for i in infos]
    assert names[:4] == ["toy-gen-00000.input.png", "toy-gen-00000.json", "toy-gen-00000.target.png", "toy-gen-00000.target.vq.npy"]
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {(946684800, 0, 0, "", "", 0o444)}


def test_tar_bytes_match_tarfile_pax_writer(tmp_path):
    # The writer builds member headers itself; they must be exactly what tarfile writes in PAX format
    # (USTAR blocks when the name fits, pax extended headers otherwise) and end the archive alike.
    from vlhealth.shards import _tarinfo

    keys = ["k", "a" * 94, "a" * 95, "b" * 140, "dir/sub/x" * 15, "ümlaut-ü", "sp ace", "tab\tkey"]
    members = {"json": b"{}", "input.png": b"\x89PNG" * 300, "e.bin": b"", "f.bin": b"x" * 512,
               "g.bin": b"y" * 10241}
    with ShardWriter(tmp_path / "ours", prefix="t") as w:
        for key in keys:
            w.write_members(key, members)
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key in keys:
            for suffix in sorted(members):
                tar.addfile(_tarinfo(f"{key}.{suffix}", len(members[suffix])), io.BytesIO(members[suffix]))
    ours = (tmp_path / "ours" / "t-000000.tar").read_bytes()
    assert ours == ref.getvalue()
    with tarfile.open(tmp_path / "ours" / "t-000000.tar") as tar:
        names = tar.getnames()
    assert names == [f"{key}.{suffix}" for key in keys for suffix in sorted(members)]
    assert {99, 100, 101} <= {len(n) for n in names}  # both sides of the 100-character USTAR limit


def test_byte_limit_splits_shards(tmp_path):
    with ShardWriter(tmp_path, prefix="toy", max_bytes=150_000) as w:
        for i in range(6):
            w.write(generation_sample(i))  # ~135 kB each: one per shard
    assert [s.samples for s in w.shards] == [1] * 6


def test_round_trip_and_duplicate_keys(tmp_path):
    build(tmp_path, n=7, max_count=100)
    samples = list(iter_samples(tmp_path))
    assert [s.key for s in samples] == [s.key for s in (vqa_sample(i) if i % 3 else generation_sample(i) for i in range(7))]
    assert np.array_equal(samples[0].target_vq, generation_sample(0).target_vq)
    with pytest.raises(ValueError, match="duplicate"), ShardWriter(tmp_path / "d") as w:
        w.write(vqa_sample(1))
        w.write(vqa_sample(1))
    assert list((tmp_path / "d").iterdir()) == []  # the aborted shard's temporary file is gone


KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {root!r})
    from tests.helpers import vqa_sample
    from vlhealth.shards import ShardWriter
    w = ShardWriter(sys.argv[1], prefix="toy", max_count=10)
    for i in range(15):
        w.write(vqa_sample(i))
    os.kill(os.getpid(), 9)  # killed mid-way through the second shard
    """
)


def test_killed_writer_leaves_no_readable_partial_tar(tmp_path):
    import pathlib

    root = str(pathlib.Path(__file__).resolve().parents[1])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT.format(root=root), str(out)])
    assert proc.returncode == -9
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert tars == ["toy-000000.tar"]  # the complete first shard only
    assert len(list(iter_tar(out / "toy-000000.tar"))) == 10
    assert [p.name for p in out.glob(".*.tmp")] == [".toy-000001.tar.tmp"]
    # a rerun cleans up and completes
    build(out, n=15)
    assert not list(out.glob(".*.tmp"))
    assert load_index(out)["total_samples"] == 15


def _tar_with(path, name, data=b"{}", kind=tarfile.REGTYPE):
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(name)
        info.type = kind
        if kind == tarfile.SYMTYPE:
            info.linkname = "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    ("name", "kind", "reason"),
    [
        ("/etc/evil.json", tarfile.REGTYPE, "absolute"),
        ("../../evil.json", tarfile.REGTYPE, "escapes"),
        ("a/../../evil.json", tarfile.REGTYPE, "escapes"),
        ("link.json", tarfile.SYMTYPE, "regular file"),
    ],
)
def test_reader_refuses_unsafe_members(tmp_path, name, kind, reason):
    path = tmp_path / "evil.tar"
    _tar_with(path, name, kind=kind)
    with pytest.raises(ShardError, match=reason) as err:
        list(iter_tar(path))
    assert "evil.tar" in str(err.value)


def test_reader_names_truncated_tar(tmp_path):
    build(tmp_path, n=3)
    tar = tmp_path / "toy-000000.tar"
    tar.write_bytes(tar.read_bytes()[:700])
    with pytest.raises(ShardError, match="toy-000000.tar"):
        list(iter_tar(tar))


def test_webdataset_reads_our_shards(tmp_path):
    import webdataset as wds

    build(tmp_path, n=12, max_count=5)
    urls = [str(p) for p in list_shards(tmp_path)]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("rgb8")
    rows = list(ds)
    assert [r["__key__"] for r in rows] == [(vqa_sample(i) if i % 3 else generation_sample(i)).key for i in range(12)]
    gen = rows[0]
    assert gen["target.png"].shape == (256, 256, 3)
    assert gen["target.vq.npy"].shape == (1024,) and gen["target.vq.npy"].dtype == np.int16
    assert gen["json"]["task"] == "generation"
    assert rows[1]["input.png"].shape == (32, 32, 3)


def test_hf_datasets_reads_our_shards(tmp_path):
    # The `datasets` webdataset loader needs one member set per folder, which is how builders write.
    import datasets

    for kind, make in (("vqa", vqa_sample), ("gen", generation_sample)):
        with ShardWriter(tmp_path / kind, prefix=kind, max_count=5) as w:
            for i in range(12):
                w.write(make(i))
        ds = datasets.load_dataset(
            "webdataset", data_files={"train": [str(p) for p in list_shards(tmp_path / kind)]}, split="train",
            cache_dir=str(tmp_path / "hf-cache"),
        )
        assert len(ds) == 12
        assert [r["__key__"] for r in ds] == [make(i).key for i in range(12)]
        if kind == "vqa":
            assert ds[1]["json"]["answer_type"] == "closed"
            assert np.array_equal(np.asarray(ds[3]["input.png"]), vqa_sample(3).input_image)
        else:
            assert ds[0]["json"]["subtask"] == "ct2mri"
            assert ds[0]["target.png"].size == (256, 256)
            assert np.array_equal(np.asarray(ds[2]["target.vq.npy"]), generation_sample(2).target_vq)


def test_from_members_of_read_sample_validates(tmp_path):
    build(tmp_path, n=2)
    key, members = next(iter_tar(tmp_path / "toy-000000.tar"))
    rec = json.loads(members["json"])
    rec["split"] = "dev"
    with pytest.raises(Exception, match="split"):
        Sample.from_members(key, {**members, "json": json.dumps(rec).encode()})
