"""3D SynthRAD2023 scoring: reassembly round trips, the challenge's formulas, --from-files, refusals.

The volumes are written here in the release's layout (``Task1/{brain,pelvis}/<ID>/{ct,mr,mask}.nii.gz``)
with the geometries that make reassembly hard: non-square pixels, an axis stored flipped, thick slices.
Reference metrics are written from the challenge's definitions on top of scikit-image, not from our code.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import vlhealth.builders.synthrad as synthrad
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.util import crop
from typer.testing import CliRunner

from healthgpt.cli import app
from healthgpt.evaluation.volume_eval import (
    VolumeEvalConfig,
    VolumeEvalError,
    collect_cases,
    load_truth,
    run_volume_evaluation,
)
from healthgpt.evaluation.volume_metrics import volume_metrics
from vlhealth.build import run_build
from vlhealth.demo import phantom
from vlhealth.reassemble import file_sha256
from vlhealth.shards import iter_samples
from vlhealth.volumes import write_volume

runner = CliRunner()
torch.set_num_threads(1)  # the tiny model decodes 1024 tokens per slice; extra threads only contend here

# patient -> (anatomy, shape (z, y, x), spacing (z, y, x) mm, stored flipped in x and y)
PATIENTS = {
    "1BA001": ("brain", (12, 40, 30), (3.0, 1.5, 2.5), False),  # non-square pixels (1.5 x 2.5 mm)
    "1PB002": ("pelvis", (10, 36, 48), (8.0, 3.0, 3.0), True),  # thick slices, stored RAS (x, y flipped)
}


class FakeVQ:
    def encode(self, images):
        return (images[:, ::8, ::8, 0].reshape(len(images), -1).astype(np.int16) * 31) % 8192

    def describe(self):
        return {"name": "fake", "random_weights": True}


def _write_patient(root: Path, pid: str, seed: int, spec: tuple | None = None) -> None:
    anatomy, shape, spacing, flipped = spec or PATIENTS[pid]
    rng = np.random.default_rng(seed)
    region = phantom.head if anatomy == "brain" else phantom.pelvis
    labels = region(shape, spacing).labels
    volumes = {"ct": phantom.render_ct(labels, rng), "mr": phantom.render_mr(labels, rng),
               "mask": phantom.body_mask(labels)}
    origin = (-shape[2] * spacing[2] / 2 + 3.3, -shape[1] * spacing[1] / 2 - 1.7, -20.0)
    for name, arr in volumes.items():
        if flipped:
            data, sp, org, direction = phantom.stored_orientation(arr, spacing, origin, (0, 1, 2), (True, True, False))
        else:
            data, sp, org, direction = arr, spacing, origin, np.eye(3)
        write_volume(data, root / "Task1" / anatomy / pid / f"{name}.nii.gz", sp, org, direction)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("vol")
    root = base / "raw"
    for seed, pid in enumerate(PATIENTS):
        _write_patient(root, pid, seed)
    out = base / "shards"
    summary = run_build(synthrad, root, out, options=synthrad.Options(min_coverage=0.05), vq=FakeVQ(), command=["x"])
    assert summary.rejects == 0, (out / "rejects.jsonl").read_text()
    return root, out


# ------------------------------------------------------------------------ reference metrics


def reference_metrics(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray, lo: float, hi: float) -> dict[str, float]:
    """The challenge's score_patient, written from its definition with scikit-image."""
    m = mask > 0
    g, p = gt.astype(np.float64), pred.astype(np.float64)
    mae = np.sum(np.abs(g * m - p * m)) / m.sum()
    gc, pc = np.clip(g, lo, hi), np.clip(p, lo, hi)
    psnr = peak_signal_noise_ratio(gc[m], pc[m], data_range=hi - lo)
    g0, p0 = np.where(m, gc, lo) - lo, np.where(m, pc, lo) - lo
    _, smap = structural_similarity(g0, p0, data_range=hi - lo, full=True)
    ssim = crop(smap, 3)[crop(m, 3)].mean(dtype=np.float64)
    return {"mae": float(mae), "psnr": float(psnr), "ssim": float(ssim)}


def _blob_mask(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(rng.normal(size=shape), 2.0) > 0.02


@pytest.mark.parametrize("seed", range(6))
def test_volume_metrics_agree_with_scikit_image_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(8, 24, 3))
    gt = rng.normal(0, 900, shape)  # spreads well beyond [-1024, 3000]: clipping matters
    pred = gt + rng.normal(0, 150, shape)
    mask = _blob_mask(rng, shape)
    ours, ref = volume_metrics(gt, pred, mask), reference_metrics(gt, pred, mask, -1024.0, 3000.0)
    for name in ("mae", "psnr", "ssim"):
        assert ours[name] == pytest.approx(ref[name], abs=1e-6), name
    # the MR extension: the same structure on another window
    lo, hi = 12.5, 730.0
    mr, mr_pred = rng.uniform(0, 900, shape), rng.uniform(0, 900, shape)
    ours, ref = volume_metrics(mr, mr_pred, mask, (lo, hi)), reference_metrics(mr, mr_pred, mask, lo, hi)
    for name in ("mae", "psnr", "ssim"):
        assert ours[name] == pytest.approx(ref[name], abs=1e-6), name


# ------------------------------------------------------------------------------ round trips


def _config(root: Path, shards: Path, out: Path, **kw) -> VolumeEvalConfig:
    return VolumeEvalConfig(shards=[shards], source_root=root, out=out, split=None, **kw)


def _sitk_array(path: Path) -> tuple[np.ndarray, tuple]:
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), (img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection())


def _assert_same_geometry(a: tuple, b: tuple) -> None:
    assert a[0] == b[0]
    for x, y in zip(a[1:], b[1:], strict=True):
        assert np.allclose(x, y, atol=1e-4), (x, y)


def test_oracle_16bit_round_trip_in_the_source_geometry(tmp_path, built) -> None:
    root, shards = built
    out = tmp_path / "oracle16"
    report = run_volume_evaluation(_config(root, shards, out, oracle=True, subtasks=("mri2ct", "ct2mri")))
    rows = {(r["task"], r["patient"]): r for r in report["patients"]}
    assert set(rows) == {(t, p) for t in ("mri2ct", "ct2mri") for p in PATIENTS}
    for pid, (anatomy, *_rest) in PATIENTS.items():
        folder = root / "Task1" / anatomy / pid
        mask, mask_geo = _sitk_array(folder / "mask.nii.gz")
        for task, stem, source in (("mri2ct", "sct", "ct"), ("ct2mri", "smr", "mr")):
            pred, pred_geo = _sitk_array(out / "pred" / pid / f"{stem}.mha")
            gt, gt_geo = _sitk_array(folder / f"{source}.nii.gz")
            _assert_same_geometry(pred_geo, gt_geo)  # voxel for voxel on the file's own grid (flips included)
            window = (-1024.0, 3000.0) if task == "mri2ct" else _target_window(shards, pid, task)
            ref = reference_metrics(gt, pred, mask, *window)
            assert ref["ssim"] >= 0.999, (pid, task, ref)
            if task == "mri2ct":
                assert ref["mae"] < 1.0, (pid, ref)
            else:  # MR in scanner units: below 0.1% of the window's width
                assert ref["mae"] < 1e-3 * (window[1] - window[0]), (pid, ref)
            for name in ("mae", "psnr", "ssim"):
                assert rows[(task, pid)][name] == pytest.approx(ref[name], rel=1e-5, abs=1e-6)
    assert (out / "volumes.csv").is_file() and "| MR→CT | brain | 1 |" in (out / "volumes.md").read_text()
    assert sorted(p.name for p in (out / "volumes").glob("*.png")) == sorted(
        f"{t}-{p}.png" for t in ("mri2ct", "ct2mri") for p in PATIENTS)


def _target_window(shards: Path, pid: str, task: str) -> tuple[float, float]:
    rec = next(s.record for s in iter_samples(shards) if s.record.group == pid and s.record.subtask == task)
    w = rec.provenance["target_window"]
    return float(w["lo"]), float(w["hi"])


def test_oracle_8bit_round_trip_is_within_the_quantisation_step(tmp_path, built) -> None:
    root, shards = built
    report = run_volume_evaluation(_config(root, shards, tmp_path / "o8", oracle=True, oracle_bits=8, figures=False))
    step = 4024.0 / 255.0
    for row in report["patients"]:
        assert 0.0 < row["mae"] < step / 2, row  # rounding to 8 bits, nothing more
        assert row["ssim"] > 0.99, row


def test_builder_records_sources_and_grid(built) -> None:
    root, shards = built
    sample = next(s for s in iter_samples(shards) if s.record.subtask == "mri2ct" and s.record.group == "1BA001")
    prov = sample.record.provenance
    assert prov["source_sha256"]["ct"] == file_sha256(root / prov["files"]["ct"])
    grid = prov["grid"]
    assert grid["volume"]["shape"] == [12, 40, 30] and grid["slice_shape"] == [40, 30]
    assert grid["square_shape"] == [40, 50] and grid["fit_shape"] == [205, 256] and grid["fit_offset"] == [25, 0]


# ------------------------------------------------------------------------------ from files


def _write_method_volumes(root: Path, folder: Path, noise: float, patients: dict | None = None,
                          source: str = "ct", stem: str = "sct") -> dict[str, np.ndarray]:
    """Another method's sCTs (or sMRs), stored the way the source files are (RAS-stored patient included)."""
    preds = {}
    for pid, (anatomy, *_rest) in (patients or PATIENTS).items():
        img = sitk.ReadImage(str(root / "Task1" / anatomy / pid / f"{source}.nii.gz"))
        arr = sitk.GetArrayFromImage(img).astype(np.float32)
        arr += np.random.default_rng(len(pid)).normal(0, noise, arr.shape).astype(np.float32)
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        (folder / pid).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(out, str(folder / pid / f"{stem}.mha"))
        preds[pid] = arr
    return preds


def test_from_files_scores_mha_volumes_without_a_model(tmp_path, built, monkeypatch) -> None:
    root, shards = built
    import healthgpt.serving.infer

    def no_model(*args, **kwargs):
        raise AssertionError("--from-files must not load a model")

    monkeypatch.setattr(healthgpt.serving.infer, "load_model", no_model)
    preds = _write_method_volumes(root, tmp_path / "pix2pix", noise=40.0)
    out = tmp_path / "scored"
    result = runner.invoke(app, ["eval-volumes", "--shards", str(shards), "--source-root", str(root),
                                 "--from-files", str(tmp_path / "pix2pix"), "--split", "all", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {r["patient"]: r for r in csv.DictReader((out / "volumes.csv").open())}
    for pid, (anatomy, *_rest) in PATIENTS.items():
        folder = root / "Task1" / anatomy / pid
        gt, _ = _sitk_array(folder / "ct.nii.gz")
        mask, _ = _sitk_array(folder / "mask.nii.gz")
        ref = reference_metrics(gt, preds[pid], mask, -1024.0, 3000.0)
        for name in ("mae", "psnr", "ssim"):
            assert float(rows[pid][name]) == pytest.approx(ref[name], rel=1e-5), (pid, name)
        assert 25 < ref["mae"] < 40  # |N(0, 40)| averages 32 HU
    assert not (out / "pred").exists()
    assert "| MR→CT | pelvis | 1 |" in result.output


# a patient the shards were never built from: in no split at all
OUTSIDER = {"1BC003": ("brain", (11, 34, 38), (2.5, 2.0, 1.5), True)}


@pytest.fixture(scope="module")
def release_plus_one(built, tmp_path_factory) -> Path:
    """The release the shards were built from, plus a patient the shards do not know."""
    import shutil

    root, _ = built
    copy = tmp_path_factory.mktemp("release") / "SynthRAD2023"
    shutil.copytree(root, copy)
    _write_patient(copy, "1BC003", 7, OUTSIDER["1BC003"])
    return copy


def test_from_files_without_shards_scores_any_patient_as_with_shards(tmp_path, built, release_plus_one) -> None:
    root, shards = built
    assert "1BC003" not in {s.record.group for s in iter_samples(shards)}  # in no split of the build
    files = tmp_path / "diffusion"
    every = {**PATIENTS, **OUTSIDER}
    sct = _write_method_volumes(release_plus_one, files, noise=30.0, patients=every)
    _write_method_volumes(release_plus_one, files, noise=20.0, patients=every, source="mr", stem="smr")
    tasks = ("mri2ct", "ct2mri")
    out = tmp_path / "scored"
    result = runner.invoke(app, ["eval-volumes", "--from-files", str(files), "--source-root", str(release_plus_one),
                                 "--task", "mri2ct", "--task", "ct2mri", "--out", str(out), "--no-figures"])
    assert result.exit_code == 0, result.output
    alone = {(r["task"], r["patient"]): r for r in json.loads((out / "volumes.json").read_text())["patients"]}
    assert set(alone) == {(t, p) for t in tasks for p in every}
    # the outsider, checked against the challenge's definitions written with scikit-image
    folder = release_plus_one / "Task1" / "brain" / "1BC003"
    gt, _ = _sitk_array(folder / "ct.nii.gz")
    mask, _ = _sitk_array(folder / "mask.nii.gz")
    ref = reference_metrics(gt, sct["1BC003"], mask, -1024.0, 3000.0)
    for name in ("mae", "psnr", "ssim"):
        assert alone[("mri2ct", "1BC003")][name] == pytest.approx(ref[name], rel=1e-5), name
    assert alone[("mri2ct", "1BC003")]["slices_written"] == alone[("mri2ct", "1BC003")]["slices_total"] == 11
    # where both apply, the numbers equal those scored through the shards (CT→MR's window included)
    with_shards = run_volume_evaluation(_config(root, shards, tmp_path / "via-shards", from_files=files,
                                                subtasks=tasks, figures=False))
    assert len(with_shards["patients"]) == 4
    for row in with_shards["patients"]:
        mine = alone[(row["task"], row["patient"])]
        for name in ("mae", "psnr", "ssim", "mask_voxels"):
            assert mine[name] == row[name], (row["task"], row["patient"], name)
    assert "every patient folder of --from-files" in (out / "volumes.md").read_text()
    # --patients picks some
    picked = run_volume_evaluation(VolumeEvalConfig(shards=[], source_root=release_plus_one, out=tmp_path / "one",
                                                    from_files=files, patients=["1BC003"], figures=False))
    assert [(r["task"], r["patient"]) for r in picked["patients"]] == [("mri2ct", "1BC003")]


def test_without_shards_refusals_name_the_patient(tmp_path, release_plus_one) -> None:
    files = tmp_path / "method"
    _write_method_volumes(release_plus_one, files, noise=10.0)

    def score(**kw):
        return run_volume_evaluation(VolumeEvalConfig(shards=[], source_root=release_plus_one, out=tmp_path / "o",
                                                      from_files=files, figures=False, **kw))

    with pytest.raises(VolumeEvalError, match=r"patient 1BC003 \(brain, mri2ct\): no prediction 1BC003/sct.mha"):
        score(patients=["1BA001", "1BC003"])  # listed but not predicted
    (files / "9ZZ999").mkdir()
    (files / "9ZZ999" / "sct.mha").write_bytes((files / "1BA001" / "sct.mha").read_bytes())
    with pytest.raises(VolumeEvalError, match=r"patient 9ZZ999 \(mri2ct\): not in --source-root 'SynthRAD2023'"):
        score()
    import shutil

    shutil.rmtree(files / "9ZZ999")
    bad = sitk.ReadImage(str(files / "1PB002" / "sct.mha"))
    bad.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(bad, str(files / "1PB002" / "sct.mha"))
    with pytest.raises(VolumeEvalError, match=r"patient 1PB002 \(pelvis, mri2ct\): prediction 1PB002/sct.mha is on "
                                              r"the wrong grid: spacing"):
        score()
    cropped = sitk.GetImageFromArray(sitk.GetArrayFromImage(bad)[1:])
    sitk.WriteImage(cropped, str(files / "1PB002" / "sct.mha"))
    with pytest.raises(VolumeEvalError, match=r"patient 1PB002 .*wrong grid: shape"):
        score()
    mask_path = release_plus_one / "Task1" / "brain" / "1BC003" / "mask.nii.gz"
    img = sitk.ReadImage(str(mask_path))
    empty = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(img)))
    empty.CopyInformation(img)
    saved = mask_path.read_bytes()
    sitk.WriteImage(empty, str(mask_path))
    try:
        _write_method_volumes(release_plus_one, files, noise=10.0, patients=OUTSIDER)
        with pytest.raises(VolumeEvalError, match=r"patient 1BC003 \(brain, mri2ct\): empty body mask"):
            score(patients=["1BC003"])
    finally:
        mask_path.write_bytes(saved)
    result = runner.invoke(app, ["eval-volumes", "--source-root", str(release_plus_one), "--oracle",
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--shards is needed" in result.output


# ------------------------------------------------------------------------------ refusals


def test_refusals_name_the_patient(tmp_path, built) -> None:
    root, shards = built
    files = tmp_path / "method"
    _write_method_volumes(root, files, noise=10.0)
    # a prediction on the wrong grid
    bad = sitk.ReadImage(str(files / "1BA001" / "sct.mha"))
    bad.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(bad, str(files / "1BA001" / "sct.mha"))
    with pytest.raises(VolumeEvalError, match=r"patient 1BA001 .*wrong grid.*spacing"):
        run_volume_evaluation(_config(root, shards, tmp_path / "a", from_files=files))
    # a missing patient
    _write_method_volumes(root, files, noise=10.0)
    (files / "1PB002" / "sct.mha").unlink()
    with pytest.raises(VolumeEvalError, match=r"patient 1PB002 .*no prediction 1PB002/sct.mha"):
        run_volume_evaluation(_config(root, shards, tmp_path / "b", from_files=files))
    # a source volume that is not the one the shards were built from
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(root, copy)
    ct = copy / "Task1" / "pelvis" / "1PB002" / "ct.nii.gz"
    img = sitk.ReadImage(str(ct))
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, 0] += 1
    changed = sitk.GetImageFromArray(arr)
    changed.CopyInformation(img)
    sitk.WriteImage(changed, str(ct))
    result = runner.invoke(app, ["eval-volumes", "--shards", str(shards), "--source-root", str(copy), "--oracle",
                                 "--split", "all", "--out", str(tmp_path / "c")])
    assert result.exit_code == 2
    assert "patient 1PB002" in result.output and "checksum mismatch" in result.output
    assert "Task1/pelvis/1PB002/ct.nii.gz" in result.output
    # an empty body mask (the checksum updated as if the shards had been built from it)
    case = next(c for c in collect_cases(_config(copy, shards, tmp_path / "d", oracle=True)) if c.patient == "1BA001")
    mask_path = copy / case.files["mask"]
    img = sitk.ReadImage(str(mask_path))
    empty = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(img)))
    empty.CopyInformation(img)
    sitk.WriteImage(empty, str(mask_path))
    case.checksums = {**(case.checksums or {}), "mask": file_sha256(mask_path)}
    with pytest.raises(VolumeEvalError, match=r"patient 1BA001 .*empty body mask"):
        load_truth(case, copy)


def test_shards_without_checksums_are_refused(tmp_path, built) -> None:
    root, _ = built
    out = tmp_path / "nosum"
    run_build(synthrad, root, out, options=synthrad.Options(min_coverage=0.05, source_checksums=False),
              vq=FakeVQ(), command=["x"])
    assert "source_sha256" not in next(iter(iter_samples(out))).record.provenance
    with pytest.raises(VolumeEvalError, match=r"patient 1BA001 .*no SHA-256.*--source-checksums"):
        run_volume_evaluation(_config(root, out, tmp_path / "e", oracle=True))


# ------------------------------------------------------------------------------ the model


@pytest.mark.slow  # ~35 s: 22 slices of 1024 tokens each on the tiny model (the demo runs this path too)
def test_model_predictions_are_reassembled_and_scored(tmp_path, built) -> None:
    root, shards = built
    out = tmp_path / "model"
    out.mkdir()
    (out / "report.md").write_text("# Evaluation report\n\n## Notes\n")
    report = run_volume_evaluation(_config(root, shards, out, max_patients=1, batch_size=16,
                                           constrained_images=True, figures=False))
    assert [(r["task"], r["patient"]) for r in report["patients"]] == [("mri2ct", "1BA001"), ("mri2ct", "1PB002")]
    for pid, (anatomy, *_rest) in PATIENTS.items():
        pred, geo = _sitk_array(out / "pred" / pid / "sct.mha")
        _, gt_geo = _sitk_array(root / "Task1" / anatomy / pid / "ct.nii.gz")
        _assert_same_geometry(geo, gt_geo)
        assert pred.min() >= -1024.0 and pred.max() <= 3000.0
    text = (out / "report.md").read_text()
    assert text.count("SynthRAD2023 volumes (3D") == 1 and text.startswith("# Evaluation report")
    run_volume_evaluation(_config(root, shards, out, oracle=True, figures=False))  # rerun replaces the section
    assert (out / "report.md").read_text().count("SynthRAD2023 volumes (3D") == 1
    assert json.loads((out / "volumes.json").read_text())["mode"] == "oracle"


def test_held_out_patients_keep_every_body_slice_unless_told(tmp_path, built) -> None:
    root, shards = built
    report = run_volume_evaluation(_config(root, shards, tmp_path / "whole", oracle=True, figures=False))
    assert all(r["mask_voxels_unwritten"] == 0 for r in report["patients"])
    sparse = tmp_path / "sparse"
    run_build(synthrad, root, sparse, options=synthrad.Options(min_coverage=0.05, slice_step=3, eval_slices="same"),
              vq=FakeVQ(), command=["x"])
    report = run_volume_evaluation(_config(root, sparse, tmp_path / "gaps", oracle=True, figures=False))
    assert all(r["mask_voxels_unwritten"] > 0 and r["slices_written"] < r["slices_total"] for r in report["patients"])
    assert "Incomplete volumes" in (tmp_path / "gaps" / "volumes.md").read_text()
