"""SynthRAD build throughput: full build (tiny VQ) vs bare decoding of the same volumes, and peak RSS.

Writes the demo SynthRAD2023 set (and a 4x copy with renamed patients), then prints

* bare decode: slices/s of reading the CT, MR and mask volumes (``read_volume``) only,
* full build:  slices/s of ``run_build`` (read, window, slice, fit, PNG, VQ encode, tar),
* their time ratio (target: full build <= 3x bare decode),
* peak RSS of a fresh build process at 1x and 4x the patients (target: < 20% growth),

"slices" being the axial slices the build keeps (each gives 4 samples with --recon both). Each
build runs in its own subprocess so its peak RSS is its own. Medians over --repeats.

    .venv/bin/python benchmarks/build_throughput.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads({threads})
import builders.synthrad as synthrad
from vlhealth.build import run_build
vq = None
if {vq!r} != "none":
    from vlhealth.vq import load_vq
    vq = load_vq({vq!r})
t = time.perf_counter()
s = run_build(synthrad, {root!r}, {out!r}, vq=vq, workers={workers}, command=["bench"])
dt = time.perf_counter() - t
print(json.dumps({{"seconds": dt, "samples": s.samples, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def replicate(src: Path, dst: Path, times: int) -> Path:
    """``times`` copies of every patient, renamed 1BA001 -> 1BA001, 1BA101, 1BA201, ..."""
    for anatomy_dir in sorted((src / "Task1").iterdir()):
        for patient in sorted(anatomy_dir.iterdir()):
            for k in range(times):
                name = patient.name[:3] + f"{int(patient.name[3:]) + 100 * k:03d}"
                shutil.copytree(patient, dst / "Task1" / anatomy_dir.name / name)
    return dst


def bare_decode(root: Path) -> float:
    from vlhealth.volumes import read_volume

    t = time.perf_counter()
    for patient in sorted((root / "Task1").glob("*/*")):
        for name in ("ct", "mr", "mask"):
            read_volume(patient / f"{name}.nii.gz", root=root, allow_empty=name == "mask")
    return time.perf_counter() - t


def build(root: Path, out: Path, vq: str, workers: int, threads: int) -> dict:
    code = CHILD.format(repo=str(Path(__file__).resolve().parents[1]), root=str(root), out=str(out), vq=vq,
                        workers=workers, threads=threads)
    res = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--vqgan", default="tiny")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the build process")
    ap.add_argument("--scales", default="1,4")
    args = ap.parse_args()
    from vlhealth.demo import write_demo_data

    with tempfile.TemporaryDirectory() as tmp:
        base = write_demo_data(Path(tmp) / "raw", sources=["synthrad2023"])["synthrad2023"]
        rows = []
        for scale in (int(s) for s in args.scales.split(",")):
            root = replicate(base, Path(tmp) / f"x{scale}", scale)
            decode = statistics.median(bare_decode(root) for _ in range(max(3, args.repeats)))
            runs = [build(root, Path(tmp) / f"out{scale}-{r}", args.vqgan, args.workers, args.threads)
                    for r in range(args.repeats)]
            novq = build(root, Path(tmp) / f"novq{scale}", "none", args.workers, args.threads)
            seconds = statistics.median(r["seconds"] for r in runs)
            slices = runs[0]["samples"] // 4
            rows.append((scale, slices, decode, seconds, novq["seconds"], max(r["rss_mb"] for r in runs)))
            print(f"{scale}x patients: {slices} slices | bare decode {slices / decode:8.1f} slices/s "
                  f"({decode:.2f} s) | full build {slices / seconds:6.2f} slices/s ({seconds:.1f} s, "
                  f"VQ={args.vqgan}) | build without VQ {slices / novq['seconds']:6.2f} slices/s "
                  f"({novq['seconds']:.1f} s) | ratio build/decode {seconds / decode:.1f}x "
                  f"(without VQ {novq['seconds'] / decode:.1f}x; target <= 3x) | peak RSS {rows[-1][5]:.0f} MB",
                  flush=True)
        if len(rows) > 1:
            growth = rows[-1][5] / rows[0][5] - 1
            print(f"peak RSS {rows[0][0]}x -> {rows[-1][0]}x patients: {rows[0][5]:.0f} -> {rows[-1][5]:.0f} MB "
                  f"({growth * 100:+.1f}%; target < +20%)")


if __name__ == "__main__":
    main()
