"""Registered SynthRAD builds are byte-identical run to run (issue #27).

ITK's Mattes metric sums its per-work-unit histograms in the order the threads finish, so a
registration on several threads drifts in the last bits and the moved MR (and every shard) with it.
The registration pins its threads and work units per object (``--register-threads``, default 1);
the two builds below run in separate processes under different process-wide ITK thread defaults,
which is what used to leak into the metric.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import SimpleITK as sitk

from tests.test_builders_generation import write_patient

SHAPE, SPACING = (10, 32, 32), (5.0, 4.0, 4.0)


def _misgrid_mr(folder: Path, shift: tuple[float, float, float]) -> None:
    """Put the patient's MR on another grid (shifted origin, other spacing): it needs registering."""
    mr = sitk.ReadImage(str(folder / "mr.nii.gz"))
    size = [int(n * s / 3.6) for n, s in zip(mr.GetSize(), mr.GetSpacing(), strict=True)]
    origin = tuple(o + d for o, d in zip(mr.GetOrigin(), shift, strict=True))
    moved = sitk.Resample(mr, size, sitk.Euler3DTransform(), sitk.sitkLinear, origin, (3.6, 3.6, 3.6),
                          mr.GetDirection(), 0.0)
    sitk.WriteImage(moved, str(folder / "mr.nii.gz"))


def _start(root: Path, run: Path, itk_threads: int, *extra: str) -> subprocess.Popen:
    run.mkdir()
    env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(itk_threads)}
    cmd = [sys.executable, "-m", "vlhealth.cli", "build", "synthrad", str(root), "--out", "out",
           "--register", "--recon", "none", "--vqgan", "tiny", *extra]
    return subprocess.Popen(cmd, cwd=run, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, run: Path) -> dict[str, bytes]:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    out = run / "out"
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_registered_build_is_byte_identical_across_processes(tmp_path):
    root = tmp_path / "raw"
    _misgrid_mr(write_patient(root, "brain", "1BA001", 0, shape=SHAPE, spacing=SPACING), (3.0, -2.0, 2.0))
    _misgrid_mr(write_patient(root, "pelvis", "1PA001", 10, shape=SHAPE, spacing=SPACING), (-2.0, 3.0, -1.5))
    # side by side (the two builds share the cores, as other work would); the second process has a
    # process-wide ITK default of 4 threads, which must not reach the registration
    runs = [tmp_path / "itk1", tmp_path / "itk4"]
    procs = [_start(root, runs[0], 1), _start(root, runs[1], 4)]
    try:
        a, b = (_finish(proc, run) for proc, run in zip(procs, runs, strict=True))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert sorted(a) == sorted(b)
    assert {"index.json", "build.json", "registration/1BA001.png", "registration/1PA001.png"} <= set(a)
    assert any(name.endswith(".tar") for name in a)
    # the registration numbers live in build.json (items.<item>.registration); the command in it keeps
    # only path names, so the whole file must match, as must every tar, index.json and both figures
    for name in a:
        assert a[name] == b[name], f"{name} differs between two runs"
    build = json.loads(a["build.json"])
    assert build["options"]["register_threads"] == 1
    regs = {item: info["registration"] for item, info in build["items"].items()}
    assert set(regs) == {"brain-1BA001", "pelvis-1PA001"}
    for reg in regs.values():
        assert reg["after"]["nmi"] > reg["before"]["nmi"]
