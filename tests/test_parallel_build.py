"""Parallel, resumable, partitioned builds (vlhealth.build) and MR->CT registration."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import vlhealth.builders.synthrad as synthrad

from tests.test_builders_generation import FakeVQ, write_patient
from vlhealth.build import ResumeError, merge_partitions, run_build
from vlhealth.shards import iter_samples, load_index, verify_shards

OUTPUT_FILES = ("index.json", "rejects.jsonl", "splits.json", "build.json")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthrad_par")
    for i, pid in enumerate(("1BA001", "1BA002", "1BB003", "1BC004")):
        write_patient(root, "brain", pid, i)
    for i, pid in enumerate(("1PA001", "1PB002", "1PC003")):
        write_patient(root, "pelvis", pid, 10 + i)
    write_patient(root, "pelvis", "1PA009", 99, skip=("mask",))  # one reject in the mix
    return root


def folder_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "shards"
    run_build(synthrad, root, out, vq=FakeVQ(), max_count=37, command=["vlhealth", "build", "synthrad"])
    return out


def test_workers_give_byte_identical_output(root, reference, tmp_path):
    out = tmp_path / "w2"
    run_build(synthrad, root, out, vq=FakeVQ(), max_count=37, workers=2,
              command=["vlhealth", "build", "synthrad", "--workers", "2"])
    assert folder_bytes(out) == folder_bytes(reference)
    assert len(load_index(out)["shards"]) > 3


def test_resume_after_interruption_is_byte_identical(root, reference, tmp_path):
    out = tmp_path / "resumed"
    calls = []

    def stop_after_three(done, total):
        calls.append(done)
        if done == 3:
            raise KeyboardInterrupt  # a kill between items, after some tars were finished

    with pytest.raises(KeyboardInterrupt):
        run_build(synthrad, root, out, vq=FakeVQ(), max_count=37, progress=stop_after_three,
                  command=["vlhealth", "build", "synthrad"])
    journal = json.loads((out / ".progress.json").read_text())
    assert journal["shards"] and journal["next_sample"] > 0  # the cut fell inside an item
    assert not (out / "index.json").exists()
    done: list[int] = []
    run_build(synthrad, root, out, vq=FakeVQ(), max_count=37, resume=True, progress=lambda d, t: done.append(d),
              command=["vlhealth", "build", "synthrad", "--resume"])
    assert done[0] > 1  # finished items were skipped
    assert folder_bytes(out) == folder_bytes(reference)
    assert not (out / ".progress.json").exists()


def test_resume_refuses_other_options(root, tmp_path):
    out = tmp_path / "x"
    with pytest.raises(KeyboardInterrupt):
        run_build(synthrad, root, out, vq=FakeVQ(), max_count=37, progress=lambda d, t: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(ResumeError, match="other inputs or options"):
        run_build(synthrad, root, out, vq=FakeVQ(), max_count=50, resume=True)


@pytest.mark.slow
def test_sigkill_and_resume_via_cli(root, reference, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "vlhealth.cli", "build", "synthrad", str(root), "--out", str(out),
           "--shard-size", "37", "--vqgan", "tiny"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / ".progress.json").exists():
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert (out / ".progress.json").exists(), "the build finished or never wrote a tar before the kill"
    subprocess.run([*cmd, "--resume"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fresh = tmp_path / "fresh"
    subprocess.run([*cmd[:7], str(fresh), *cmd[8:]], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a, b = folder_bytes(out), folder_bytes(fresh)
    builds = [json.loads(x.pop("build.json")) for x in (a, b)]
    assert a == b  # every tar, index.json, rejects.jsonl, splits.json
    for build in builds:
        build.pop("command")  # names the output folder, which differs here
    assert builds[0] == builds[1]


def test_partitions_are_disjoint_by_patient_and_merge(root, reference, tmp_path):
    out = tmp_path / "parts"
    for i in range(3):
        run_build(synthrad, root, out, vq=FakeVQ(), max_count=37, partition=f"{i}/3", command=["x"])
    with pytest.raises(ValueError, match="expected /4"):
        merge_partitions(out, expect=4)
    (out / "index-p0002of0003.json").rename(out / "held.json")
    with pytest.raises(ValueError, match=r"partitions \[2\] of 3 are not finished"):
        merge_partitions(out)
    (out / "held.json").rename(out / "index-p0002of0003.json")
    index = merge_partitions(out, expect=3)
    assert verify_shards(out) == []
    merged = list(iter_samples(out))
    full = list(iter_samples(reference))
    assert sorted(s.key for s in merged) == sorted(s.key for s in full)
    assert {s.key: s.record.split for s in merged} == {s.key: s.record.split for s in full}
    owners: dict[str, set[str]] = {}
    for shard in index["shards"]:
        for s in iter_samples(out / shard["name"]):
            owners.setdefault(s.record.group, set()).add(shard["name"].split("-")[1])
    assert all(len(v) == 1 for v in owners.values())  # a patient lives in one partition
    build = json.loads((out / "build.json").read_text())
    assert build["counts"]["samples"] == len(full) and len(build["partitions"]) == 3
    assert [json.loads(x)["file"] for x in (out / "rejects.jsonl").read_text().splitlines()] == \
        ["Task1/pelvis/1PA009/mask.nii.gz"]


def test_registration_recovers_a_known_rigid_transform():
    from vlhealth.demo import phantom
    from vlhealth.registration import register_mr_to_ct, transform_residual_mm
    from vlhealth.volumes import Volume

    rng = np.random.default_rng(0)
    shape, sp = (32, 64, 64), (3.0, 3.0, 3.0)
    labels = phantom.head(shape, sp).labels
    origin = tuple(-(n - 1) * s / 2 for n, s in zip(shape[::-1], sp[::-1], strict=True))
    ct = Volume(phantom.render_ct(labels, rng), sp, origin)
    mr = Volume(phantom.render_mr(labels, rng), sp, origin)
    mask = phantom.body_mask(labels)
    truth = sitk.Euler3DTransform((0.0, 0.0, 0.0), np.radians(4), np.radians(-3), np.radians(6), (5.0, -4.0, 3.0))
    moved = sitk.GetArrayFromImage(sitk.Resample(mr.to_sitk(), mr.to_sitk(), truth, sitk.sitkLinear, 0.0))
    moving = Volume(moved.astype(np.float32), sp, origin)
    reg = register_mr_to_ct(ct, moving, mask=mask)
    # a second run repeats the first exactly (issue #27), even with another process-wide ITK default:
    # the registration pins its own threads and work units (default 1)
    default_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(4)
    try:
        again = register_mr_to_ct(ct, moving, mask=mask)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(default_threads)
    assert again.after["nmi"] == reg.after["nmi"] and again.before["nmi"] == reg.before["nmi"]
    assert again.after == reg.after and again.stages == reg.stages
    assert again.transform.GetParameters() == reg.transform.GetParameters()
    assert np.array_equal(again.moved.array, reg.moved.array)
    with pytest.raises(ValueError, match="threads must be >= 0"):
        register_mr_to_ct(ct, moving, threads=-1)
    points = np.array([ct.physical_point(i) for i in np.argwhere(mask)[::40]])
    before = transform_residual_mm(sitk.Transform(3, sitk.sitkIdentity), truth.GetInverse(), points)
    after = transform_residual_mm(reg.transform, truth.GetInverse(), points)
    print(f"registration residual: before {before['mean_mm']:.2f} mm mean, after {after['mean_mm']:.2f} mm "
          f"mean / {after['max_mm']:.2f} mm max (voxels 3 mm)")
    assert before["mean_mm"] > 8
    assert after["mean_mm"] < 1.5 and after["max_mm"] < 3.0  # under half a voxel on average
    assert reg.after["nmi"] > reg.before["nmi"] and reg.after["mattes_mi"] < reg.before["mattes_mi"]


def test_synthrad_register_writes_figure_and_numbers(tmp_path):
    root = tmp_path / "raw"
    folder = write_patient(root, "brain", "1BA001", 0, shape=(16, 40, 40), spacing=(4.0, 4.0, 4.0))
    # the MR of this patient sits on another grid (shifted origin, finer spacing): not pre-registered
    mr = sitk.ReadImage(str(folder / "mr.nii.gz"))
    mr2 = sitk.Resample(mr, [44, 44, 18], sitk.Euler3DTransform(), sitk.sitkLinear,
                        (-86.0, -86.0, -30.0), (3.8, 3.8, 3.8), mr.GetDirection(), 0.0)
    sitk.WriteImage(mr2, str(folder / "mr.nii.gz"))
    out = tmp_path / "plain"
    run_build(synthrad, root, out, command=["x"])
    assert "CT/MR shape mismatch" in (out / "rejects.jsonl").read_text()
    out = tmp_path / "reg"
    summary = run_build(synthrad, root, out, options=synthrad.Options(register=True), command=["x"])
    assert summary.rejects == 0 and summary.samples > 0
    figure = out / "registration" / "1BA001.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((out / "build.json").read_text())["items"]["brain-1BA001"]["registration"]
    assert info["figure"] == "registration/1BA001.png"
    assert info["after"]["nmi"] >= info["before"]["nmi"]
    assert all(s.record.provenance["registered"] for s in iter_samples(out))
