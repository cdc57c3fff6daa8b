"""SynthRAD build throughput: full build (tiny VQ) and build without VQ vs bare decoding, peak RSS.

What is measured, per row (one row per data set and scale):

* **bare decode**: ``read_volume`` of each patient's ``ct``, ``mr`` and ``mask`` files (the same
  reader, checks and reorientation the build uses), nothing else;
* **full build**: ``run_build(builders.synthrad, ...)`` with the VQ tokenizer (``--vqgan``,
  default the seeded ``tiny`` stand-in): read, window, slice, fit to 256, PNG encode, VQ encode,
  tar write, index/build.json;
* **build without VQ**: the same build with ``vq=None`` (no ``target.vq.npy``), so the VQ share
  is ``full - without``.

Throughput is in *slices/s*: axial slices the build keeps (each gives 4 samples with
``--recon both``); bare decode is divided by the same slice count, so the ratios are times for
the same slices. Every run is its own subprocess with imports done before the clock starts (the
~1 s one-time import of torch/skimage/SimpleITK is not per-slice work), ``torch`` limited to
``--threads`` (default 1: the shared 2-core dev box makes OpenMP threads slower, not faster).
Runs are interleaved (decode, full, without VQ, decode, ...) so machine load hits all alike;
the table gives medians over ``--repeats`` (>= 3). Peak RSS is the build process's
``ru_maxrss`` (includes ~0.3 GB of imported libraries).

Rows:

* ``demo Nx``: the demo SynthRAD2023 set (7 patients, volumes ~64x56x24) copied N times under new
  patient IDs; tiny volumes make bare decoding nearly free (~1 ms/slice), so the ratio there is
  dominated by fixed per-slice work and says little on its own;
* ``realistic Nx``: synthetic SynthRAD-sized patients (a brain and a pelvis, 256x256x120 voxels,
  CT int16 HU, MR float32, mask uint8; phantom anatomy written with ``write_volume``), N copies.
  Their 256x256 square-pixel slices need no resize (``fit_square`` only pads); released SynthRAD
  pelvis scans are ~410x586 in-plane, which ``--realistic-shape 60,410,586`` reproduces (then the
  anti-aliased resize to 256 is part of the per-slice work and decoding costs more per slice).

Targets (issue 3): full build <= 3x bare decode time; peak RSS grows < 20% from 1x to 4x.

    .venv/bin/python benchmarks/build_throughput.py                 # demo 1x,4x + realistic 1x
    .venv/bin/python benchmarks/build_throughput.py --png           # also the PNG encoder table
    .venv/bin/python benchmarks/build_throughput.py --realistic-scales 1,4 --repeats 5
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD_PRELUDE = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads({threads})
import numpy, SimpleITK, nibabel, skimage.transform, scipy.ndimage, PIL.PngImagePlugin  # warm imports
"""

CHILD_BUILD = CHILD_PRELUDE + r"""
import vlhealth.builders.synthrad as synthrad
from vlhealth.build import run_build
vq = None
if {vq!r} != "none":
    from vlhealth.vq import load_vq
    vq = load_vq({vq!r})
t = time.perf_counter()
s = run_build(synthrad, {root!r}, {out!r}, vq=vq, workers={workers}, command=["bench"])
dt = time.perf_counter() - t
print(json.dumps({{"seconds": dt, "samples": s.samples,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

CHILD_DECODE = CHILD_PRELUDE + r"""
from pathlib import Path
from vlhealth.volumes import read_volume
root = Path({root!r})
t = time.perf_counter()
for patient in sorted((root / "Task1").glob("*/*")):
    for name in ("ct", "mr", "mask"):
        read_volume(patient / f"{{name}}.nii.gz", root=root, allow_empty=name == "mask")
print(json.dumps({{"seconds": time.perf_counter() - t}}))
"""


def replicate(src: Path, dst: Path, times: int) -> Path:
    """``times`` copies of every patient, renamed 1BA001 -> 1BA001, 1BA101, 1BA201, ..."""
    for anatomy_dir in sorted((src / "Task1").iterdir()):
        for patient in sorted(anatomy_dir.iterdir()):
            for k in range(times):
                name = patient.name[:3] + f"{int(patient.name[3:]) + 100 * k:03d}"
                shutil.copytree(patient, dst / "Task1" / anatomy_dir.name / name)
    return dst


def write_realistic(root: Path, shape: tuple[int, int, int], seed: int = 0) -> Path:
    """One brain and one pelvis patient of SynthRAD-like size (phantom anatomy, CT/MR/mask)."""
    import numpy as np

    from vlhealth.demo import phantom
    from vlhealth.volumes import write_volume

    rng = np.random.default_rng(seed)
    for anatomy, pid, spacing in (("brain", "1BA001", (1.5, 1.0, 1.0)), ("pelvis", "1PA001", (2.5, 1.5, 1.5))):
        pose = phantom.random_pose(rng)
        anat = phantom.head(shape, spacing, pose) if anatomy == "brain" else phantom.pelvis(shape, spacing, pose)
        volumes = {"ct": phantom.render_ct(anat.labels, rng), "mr": phantom.render_mr(anat.labels, rng, "T1"),
                   "mask": phantom.body_mask(anat.labels)}
        for name, arr in volumes.items():
            write_volume(arr, root / "Task1" / anatomy / pid / f"{name}.nii.gz", spacing)
    return root


def child(code: str) -> dict:
    res = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(label: str, root: Path, tmp: Path, args: argparse.Namespace) -> dict:
    common = {"repo": str(REPO), "threads": args.threads}
    decode, full, novq = [], [], []
    for r in range(args.repeats):
        decode.append(child(CHILD_DECODE.format(root=str(root), **common))["seconds"])
        for vq, runs in ((args.vqgan, full), ("none", novq)):
            out = tmp / f"out-{label}-{vq}-{r}"
            runs.append(child(CHILD_BUILD.format(root=str(root), out=str(out), vq=vq, workers=args.workers,
                                                 **common)))
            shutil.rmtree(out)
    slices = full[0]["samples"] // 4
    row = {
        "label": label, "slices": slices,
        "decode": statistics.median(decode),
        "full": statistics.median(r["seconds"] for r in full),
        "novq": statistics.median(r["seconds"] for r in novq),
        "rss": statistics.median(r["rss_mb"] for r in full),
    }
    ms = {k: row[k] / slices * 1000 for k in ("decode", "full", "novq")}
    print(f"{label:14s} {slices:5d} | {slices / row['decode']:8.1f} {slices / row['full']:8.1f} "
          f"{slices / row['novq']:8.1f} | {ms['decode']:6.2f} {ms['novq'] - ms['decode']:6.2f} "
          f"{ms['full'] - ms['novq']:6.2f} | {row['full'] / row['decode']:6.1f}x {row['novq'] / row['decode']:6.1f}x "
          f"| {row['rss']:7.0f}", flush=True)
    return row


def png_table(tar_path: Path, limit: int = 80) -> None:
    """Pillow (adaptive filter, zlib 6, as before) vs encode_png, per member kind of a built shard."""
    import tarfile

    import numpy as np
    from PIL import Image

    from vlhealth.schema import decode_image, encode_png

    def pillow(a: np.ndarray, level: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG", optimize=False, compress_level=level)
        return buf.getvalue()

    arrays: dict[str, list] = {}
    with tarfile.open(tar_path) as tf:
        for m in tf.getmembers():
            kind = m.name.split(".", 1)[1]
            if kind in ("input.png", "reference.png", "mask.png") and len(arrays.get(kind, [])) < limit:
                arrays.setdefault(kind, []).append(decode_image(tf.extractfile(m).read()))  # type: ignore[union-attr]
    print(f"  {'member':14s} {'encoder':22s} {'ms/image':>8s} {'KiB/image':>9s}")
    for kind, images in sorted(arrays.items()):
        for name, fn in (("Pillow zlib 6 (before)", lambda a: pillow(a, 6)), ("Pillow zlib 1", lambda a: pillow(a, 1)),
                         ("encode_png (Up, RLE)", encode_png)):
            times = []
            for _ in range(3):
                t = time.perf_counter()
                blobs = [fn(a) for a in images]
                times.append(time.perf_counter() - t)
            kib = sum(map(len, blobs)) / len(images) / 1024
            print(f"  {kind:14s} {name:22s} {min(times) / len(images) * 1000:8.2f} {kib:9.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement (medians; at least 3)")
    ap.add_argument("--vqgan", default="tiny")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each build process")
    ap.add_argument("--scales", default="1,4", help="copies of the demo set (empty: none)")
    ap.add_argument("--realistic-scales", default="1", help="copies of the realistic pair (empty: none)")
    ap.add_argument("--realistic-shape", default="120,256,256", help="z,y,x of the realistic volumes")
    ap.add_argument("--png", action="store_true", help="also time PNG encoders on the built slices")
    args = ap.parse_args()
    args.repeats = max(3, args.repeats)
    from vlhealth.demo import write_demo_data

    print(f"build_throughput: vq={args.vqgan} workers={args.workers} torch threads={args.threads} "
          f"repeats={args.repeats} (medians); load average before: {open('/proc/loadavg').read().split()[:3]}")
    print(f"{'row':14s} {'slices':>5s} | {'slices/s: decode':>8s} {'full':>8s} {'no VQ':>8s} | "
          f"{'ms/slice: decode':>6s} {'rest':>6s} {'VQ':>6s} | {'full/dec':>7s} {'noVQ/dec':>7s} | {'RSS MB':>7s}")
    rows: dict[str, list[dict]] = {"demo": [], "realistic": []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.scales:
            base = write_demo_data(tmp / "raw", sources=["synthrad2023"])["synthrad2023"]
            for scale in (int(s) for s in args.scales.split(",")):
                root = replicate(base, tmp / f"demo{scale}", scale)
                rows["demo"].append(measure(f"demo {scale}x", root, tmp, args))
                shutil.rmtree(root)
        if args.realistic_scales:
            shape = tuple(int(v) for v in args.realistic_shape.split(","))
            base = write_realistic(tmp / "realraw", shape)  # type: ignore[arg-type]
            for scale in (int(s) for s in args.realistic_scales.split(",")):
                root = replicate(base, tmp / f"real{scale}", scale)
                rows["realistic"].append(measure(f"realistic {scale}x", root, tmp, args))
                if args.png and scale == int(args.realistic_scales.split(",")[0]):
                    out = tmp / "png"
                    child(CHILD_BUILD.format(repo=str(REPO), threads=args.threads, root=str(root), out=str(out),
                                             vq="none", workers=1))
                    print(f"PNG encoders on realistic {'x'.join(map(str, shape))} slices (one core):")
                    png_table(next(out.glob("*.tar")))
                shutil.rmtree(root)
    for name, data in rows.items():
        if len(data) > 1:
            a, b = data[0], data[-1]
            growth = b["rss"] / a["rss"] - 1
            print(f"{name}: peak RSS {a['label']} -> {b['label']}: {a['rss']:.0f} -> {b['rss']:.0f} MB "
                  f"({growth * 100:+.1f}%; target < +20%)")
    for data in rows.values():
        for row in data:
            verdict = "met" if row["full"] / row["decode"] <= 3 else "NOT met"
            print(f"{row['label']}: full build / bare decode = {row['full'] / row['decode']:.1f}x "
                  f"(target <= 3x: {verdict}); without VQ {row['novq'] / row['decode']:.1f}x")
    print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
