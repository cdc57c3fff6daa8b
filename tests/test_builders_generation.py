"""Generation builders (SynthRAD, IXI, MIMIC-CXR, LLaVA-558k) on small layouts made here."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import vlhealth.builders.ixi as ixi
import vlhealth.builders.llava_pretrain as llava_pretrain
import vlhealth.builders.mimic_cxr as mimic_cxr
import vlhealth.builders.synthrad as synthrad

from vlhealth.build import run_build
from vlhealth.demo import phantom
from vlhealth.schema import decode_image
from vlhealth.shards import iter_samples, iter_tar, list_shards
from vlhealth.volumes import write_volume


class FakeVQ:
    """Deterministic stand-in for the VQGAN (the real one has its own tests)."""

    def encode(self, images):
        assert images.ndim == 4 and images.shape[1:] == (256, 256, 3)
        return (images[:, ::8, ::8, 0].reshape(len(images), -1).astype(np.int16) * 31) % 8192

    def describe(self):
        return {"name": "fake", "random_weights": True}


SHAPE, SPACING = (10, 40, 36), (5.0, 4.0, 4.0)


def write_patient(root: Path, anatomy: str, pid: str, seed: int, shape=SHAPE, spacing=SPACING,
                  skip: tuple[str, ...] = ()) -> Path:
    rng = np.random.default_rng(seed)
    region = phantom.head if anatomy == "brain" else phantom.pelvis
    labels = region(shape, spacing).labels
    ct = phantom.render_ct(labels, rng)
    mr = phantom.render_mr(labels, rng)
    mask = phantom.body_mask(labels)
    folder = root / "Task1" / anatomy / pid
    origin = (-shape[2] * spacing[2] / 2, -shape[1] * spacing[1] / 2, -shape[0] * spacing[0] / 2)
    for name, arr in (("ct", ct), ("mr", mr), ("mask", mask)):
        if name not in skip:
            write_volume(arr, folder / f"{name}.nii.gz", spacing, origin)
    return folder


@pytest.fixture(scope="module")
def synthrad_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthrad")
    for i, pid in enumerate(("1BA001", "1BA002", "1BB003")):
        write_patient(root, "brain", pid, i)
    for i, pid in enumerate(("1PA001", "1PB002", "1PC003")):
        write_patient(root, "pelvis", pid, 10 + i)
    return root


def members_of(out: Path) -> dict[str, dict[str, bytes]]:
    return {key: m for tar in list_shards(out) for key, m in iter_tar(tar)}


def test_synthrad_writes_all_subtasks_with_reference_members(tmp_path, synthrad_root):
    out = tmp_path / "shards"
    summary = run_build(synthrad, synthrad_root, out, vq=FakeVQ(), command=["vlhealth", "build", "synthrad"])
    assert summary.rejects == 0 and summary.items == 6
    samples = list(iter_samples(out))
    subtasks = {(s.record.subtask, s.record.modality, s.record.body_part) for s in samples}
    for part in ("brain", "pelvis"):
        assert {("ct2mri", "CT", part), ("mri2ct", "MRI", part), ("recon", "MRI", part), ("recon", "CT", part)} <= subtasks
    assert {s.record.split for s in samples} == {"train", "val", "test"}
    # one member set for the whole folder (HF datasets' WebDataset loader needs it)
    sets = {tuple(sorted(m)) for m in members_of(out).values()}
    assert sets == {("input.png", "json", "mask.png", "reference.png", "target.png", "target.vq.npy")}
    mri2ct = next(s for s in samples if s.record.subtask == "mri2ct" and s.record.split == "test")
    ref = decode_image(mri2ct.extras["reference.png"])
    assert ref.dtype == np.uint16 and ref.shape == (256, 256)
    assert np.array_equal(mri2ct.target, np.rint(ref / 257.0).astype(np.uint8))
    w = mri2ct.record.provenance["target_window"]
    assert (w["lo"], w["hi"]) == (-1024.0, 3000.0)
    hu = w["lo"] + ref.astype(np.float64) / 65535 * (w["hi"] - w["lo"])
    mask = decode_image(mri2ct.extras["mask.png"]) > 0
    # inside the body the phantom holds soft tissue / bone HU, outside it is air (-1024)
    assert hu[~mask].max() == -1024.0 and np.median(hu[mask]) > -200
    ct2mri = next(s for s in samples if s.record.subtask == "ct2mri")
    assert ct2mri.record.conversations[1]["value"] == "<target_image>"
    assert ct2mri.record.provenance["target_window"]["kind"] == "mr_percentile"
    assert ct2mri.record.provenance["files"]["ct"].startswith("Task1/")
    # input and target of one slice are pixel-aligned: the recon of the target equals it
    splits = json.loads((out / "splits.json").read_text())["groups"]
    assert {splits[g] for g in ("1BA001", "1BA002", "1BB003")} == {"train", "val", "test"}


def test_synthrad_refuses_each_bad_input_and_keeps_the_good(tmp_path):
    root = tmp_path / "raw"
    good = [write_patient(root, "brain", "1BA001", 1), write_patient(root, "pelvis", "1PA001", 2)]
    # truncated gzip
    f = write_patient(root, "brain", "1BA010", 3)
    data = (f / "ct.nii.gz").read_bytes()
    (f / "ct.nii.gz").write_bytes(data[: len(data) // 2])
    # unreadable file (not a NIfTI at all)
    f = write_patient(root, "brain", "1BA011", 4)
    (f / "mr.nii.gz").write_bytes(gzip.compress(b"this is not an image"))
    # NaN voxels
    f = write_patient(root, "brain", "1BA012", 5)
    nan = np.ones(SHAPE, np.float32)
    nan[3, 10, 10] = np.nan
    write_volume(nan, f / "mr.nii.gz", SPACING)
    # CT/MR shape mismatch
    f = write_patient(root, "pelvis", "1PA013", 6)
    write_volume(np.ones((SHAPE[0] + 2, *SHAPE[1:]), np.float32) * np.arange(SHAPE[0] + 2)[:, None, None],
                 f / "mr.nii.gz", SPACING)
    # CT/MR spacing mismatch
    f = write_patient(root, "pelvis", "1PA014", 7)
    write_volume(np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE), f / "mr.nii.gz", (5.0, 4.5, 4.5))
    # missing mask
    write_patient(root, "pelvis", "1PA015", 8, skip=("mask",))
    # 2D where 3D is expected
    f = write_patient(root, "brain", "1BA016", 9)
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.arange(40 * 36, dtype=np.int16).reshape(40, 36)), str(f / "ct.nii.gz"))
    # empty volume (one value everywhere)
    f = write_patient(root, "brain", "1BA017", 10)
    write_volume(np.zeros(SHAPE, np.float32), f / "mr.nii.gz", SPACING)

    out = tmp_path / "shards"
    summary = run_build(synthrad, root, out, vq=FakeVQ(), command=["x"])
    rejects = {r["file"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    expected = {
        "Task1/brain/1BA010/ct.nii.gz": "truncated gzip",
        "Task1/brain/1BA011/mr.nii.gz": "unreadable",
        "Task1/brain/1BA012/mr.nii.gz": "non-finite (NaN/Inf) voxels",
        "Task1/pelvis/1PA013/mr.nii.gz": "CT/MR shape mismatch",
        "Task1/pelvis/1PA014/mr.nii.gz": "CT/MR spacing mismatch",
        "Task1/pelvis/1PA015/mask.nii.gz": "missing mask.nii.gz",
        "Task1/brain/1BA016/ct.nii.gz": "2D image",
        "Task1/brain/1BA017/mr.nii.gz": "empty volume",
    }
    assert set(rejects) == set(expected), rejects
    for file, reason in expected.items():
        assert reason in rejects[file], (file, rejects[file])
    assert str(tmp_path) not in (out / "rejects.jsonl").read_text()
    landed = {s.record.group for s in iter_samples(out)}
    assert landed == {p.name for p in good}
    assert summary.rejects == len(expected)


def test_ixi_super_resolution_pairs_with_demographics(tmp_path):
    from vlhealth.demo import write_demo_data

    root = write_demo_data(tmp_path / "raw", sources=["ixi"])["ixi"]
    (root / "IXI-T1" / "IXI999-Guys-0001-T1.nii.gz").write_bytes(b"\x1f\x8b\x08\x00broken")
    (root / "IXI-T1" / "notes.nii.gz").write_bytes(b"")
    for degradation in ("bicubic", "kspace"):
        out = tmp_path / degradation
        run_build(ixi, root, out, options=ixi.Options(slices=2, degradation=degradation), vq=FakeVQ(), command=["x"])
        samples = list(iter_samples(out))
        assert samples and {s.record.subtask for s in samples} == {"sr4x"}
        s = samples[0]
        low = decode_image(s.input_image)
        assert low.shape == (64, 64) and s.target.shape == (256, 256)
        # the low-resolution input is the target seen at a quarter of the resolution
        from PIL import Image

        small = np.asarray(Image.fromarray(s.target).resize((64, 64), Image.Resampling.BOX), dtype=float)
        assert np.corrcoef(small.ravel(), low.astype(float).ravel())[0, 1] > 0.9
        assert {s.record.extra["contrast"] for s in samples} == {"T1", "T2", "PD"}
        axes = {(s.record.extra["contrast"], s.record.provenance["axis"]) for s in samples}
        assert ("T1", "sagittal") in axes and ("T2", "axial") in axes
        assert any("sex" in s.record.extra and "age" in s.record.extra for s in samples)
        groups = {}
        for smp in samples:
            groups.setdefault(smp.record.group, set()).add(smp.record.split)
        assert all(len(v) == 1 for v in groups.values())
        rejects = {json.loads(x)["file"]: json.loads(x)["reason"] for x in (out / "rejects.jsonl").read_text().splitlines()}
        assert "IXI-T1/notes.nii.gz" in rejects and "unreadable" in rejects["IXI-T1/IXI999-Guys-0001-T1.nii.gz"]


def test_mimic_cxr_report_to_image(tmp_path):
    from vlhealth.demo import write_demo_data

    root = write_demo_data(tmp_path / "raw", sources=["mimic_cxr"])["mimic_cxr"]
    out = tmp_path / "shards"
    summary = run_build(mimic_cxr, root, out, vq=FakeVQ(), command=["x"])
    samples = list(iter_samples(out))
    assert summary.samples == len(samples) > 0
    for s in samples:
        assert s.input_image is None and s.record.subtask == "report2cxr" and s.target.shape == (256, 256)
        assert "<image>" not in s.record.conversations[0]["value"]
        assert "Impression:" in s.record.conversations[0]["value"]
        assert s.target_vq is not None
    # official split file: validate -> val, and a subject keeps one split
    assert {s.record.split for s in samples} == {"train", "val", "test"}
    reasons = [json.loads(x)["reason"] for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert any("no report" in r for r in reasons) and any("unreadable JPEG" in r for r in reasons)
    assert str(tmp_path) not in (out / "rejects.jsonl").read_text()
    # lateral views are left out by default
    assert all("LATERAL" not in s.key for s in samples)
    assert mimic_cxr.report_text(" FINDINGS: a\n b\n IMPRESSION: c\n", "both") == "Findings: a b Impression: c"


def test_llava_pretrain_reconstruction_keeps_upstream_jpeg(tmp_path):
    from vlhealth.demo import write_demo_data

    root = write_demo_data(tmp_path / "raw", sources=["llava_pretrain"])["llava_pretrain"]
    out = tmp_path / "shards"
    run_build(llava_pretrain, root, out, vq=FakeVQ(), command=["x"])
    samples = list(iter_samples(out))
    assert len(samples) == 8
    for s in samples:
        rel = s.record.provenance["file"]
        assert s.input_image == (root / rel).read_bytes()  # verbatim JPEG
        assert s.target.shape == (256, 256, 3) and s.record.subtask == "recon"
    reasons = sorted(json.loads(x)["reason"].split(" (")[0] for x in (out / "rejects.jsonl").read_text().splitlines())
    assert reasons == ["image file is missing", "unreadable image"]


def test_source_root_with_a_symlinked_subfolder(tmp_path):
    # Task1/ (or images/) living on another disk behind a symlink is common; paths relative to the
    # root must follow the layout as named, not only the resolved targets (which lie outside it).
    write_patient(tmp_path / "disk2", "brain", "1BA001", 1)
    root = tmp_path / "root"
    root.mkdir()
    (root / "Task1").symlink_to(tmp_path / "disk2" / "Task1", target_is_directory=True)
    out = tmp_path / "shards"
    summary = run_build(synthrad, root, out, vq=FakeVQ(), command=["x"])
    assert summary.rejects == 0, (out / "rejects.jsonl").read_text()
    sample = next(iter(iter_samples(out)))
    assert sample.record.provenance["files"]["ct"] == "Task1/brain/1BA001/ct.nii.gz"


@pytest.mark.parametrize("slices,step", [(8, 1), (3, 3), (50, 1)])
def test_ixi_central_slices_stay_inside_the_volume(tmp_path, slices, step):
    # an even number of slices n with count*step spanning it once picked index n (out of range),
    # which refused the whole volume
    root = tmp_path / "raw"
    rng = np.random.default_rng(0)
    write_volume(rng.uniform(0, 100, (8, 24, 24)).astype(np.float32), root / "IXI002-Guys-0828-T2.nii.gz",
                 (3.0, 1.0, 1.0))
    out = tmp_path / "shards"
    summary = run_build(ixi, root, out, options=ixi.Options(slices=slices, slice_step=step), vq=FakeVQ(),
                        command=["x"])
    assert summary.rejects == 0, (out / "rejects.jsonl").read_text()
    picked = sorted(s.record.provenance["slice"] for s in iter_samples(out))
    assert picked and all(0 <= k < 8 for k in picked)
    assert len(picked) == min(slices, (8 - 1) // step + 1)
    assert all(b - a == step for a, b in zip(picked, picked[1:], strict=False))


def test_a_second_copy_of_a_volume_is_refused_not_a_crash(tmp_path):
    # IXI files are found anywhere under the root: an extra copy of a subject's scan gave two items
    # with one id, and the build stopped with a ValueError instead of refusing the copy.
    root = tmp_path / "raw"
    rng = np.random.default_rng(0)
    vol = rng.uniform(0, 100, (8, 24, 24)).astype(np.float32)
    for folder in ("IXI-T2", "backup"):
        write_volume(vol, root / folder / "IXI002-Guys-0828-T2.nii.gz", (3.0, 1.0, 1.0))
    write_volume(vol[::-1].copy(), root / "IXI-T2" / "IXI012-HH-1211-T2.nii.gz", (3.0, 1.0, 1.0))
    out = tmp_path / "shards"
    summary = run_build(ixi, root, out, options=ixi.Options(slices=2), vq=FakeVQ(), command=["x"])
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rejects] == ["backup/IXI002-Guys-0828-T2.nii.gz"]
    assert "duplicate" in rejects[0]["reason"] and "IXI-T2/IXI002-Guys-0828-T2.nii.gz" in rejects[0]["reason"]
    assert summary.items == 2 and {s.record.group for s in iter_samples(out)} == {"IXI002", "IXI012"}


def test_synthrad_slices_keep_physical_aspect_with_non_square_pixels(tmp_path):
    # in-plane spacing 2 x 4 mm on a 40 x 20 grid is an 80 x 80 mm field of view: the 256x256 slice
    # must be filled (square pixels, as volumes.slice_volume gives), not squeezed to 256 x 128
    shape, spacing = (6, 40, 20), (5.0, 2.0, 4.0)
    folder = write_patient(tmp_path / "raw", "brain", "1BA001", 1, shape=shape, spacing=spacing)
    origin = (-40.0, -40.0, -15.0)
    write_volume(np.ones(shape, np.uint8), folder / "mask.nii.gz", spacing, origin)
    out = tmp_path / "shards"
    summary = run_build(synthrad, tmp_path / "raw", out, vq=FakeVQ(), command=["x"])
    assert summary.rejects == 0, (out / "rejects.jsonl").read_text()
    sample = next(iter(iter_samples(out)))
    mask = decode_image(sample.extras["mask.png"])
    assert mask.shape == (256, 256) and mask.min() == 255


def test_llava_pretrain_refuses_image_paths_leaving_the_image_folder(tmp_path):
    from vlhealth.demo import write_demo_data

    root = write_demo_data(tmp_path / "raw", sources=["llava_pretrain"])["llava_pretrain"]
    ann = root / llava_pretrain.ANNOTATIONS
    rows = json.loads(ann.read_text())
    some_jpg = next(p for p in sorted(root.rglob("*.jpg")))
    (root / "secret.jpg").write_bytes(some_jpg.read_bytes())
    rows += [{"id": "zz_up", "image": "../../secret.jpg", "conversations": []},
             {"id": "zz_abs", "image": str(tmp_path / "secret.jpg"), "conversations": []}]
    ann.write_text(json.dumps(rows))
    out = tmp_path / "shards"
    run_build(llava_pretrain, root, out, vq=FakeVQ(), command=["x"])
    keys = {s.key for s in iter_samples(out)}
    assert not {"llava_pretrain-zz_up", "llava_pretrain-zz_abs"} & keys  # never some other file
    text = (out / "rejects.jsonl").read_text()
    assert text.count("leaves the image folder") == 2 and str(tmp_path) not in text
