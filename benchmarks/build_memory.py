"""Peak memory of the comprehension builds as the annotation file grows (issue 12).

Writes PubMedVision- and LLaVA-665k-layout sources of ``--rows`` rows (default 40k and 160k) with
small JPEG images, builds each with one worker in its own subprocess, and prints the build
process's peak RSS (``ru_maxrss``, imported libraries included), the growth from the smallest to
the largest size, and the peak extrapolated linearly to PubMedVision's real size (1.3M rows).

Targets: 4x the rows costs less than +20% RSS; the extrapolated peak at 1.3M rows is under 600 MiB.
(Before streaming, PubMedVision measured 226 / 782 / 2,569 MiB at 10k / 160k / 640k rows.)

Rows share ``--images`` distinct image files (writing 160k files would measure the file system);
each row still makes one work item, one sample and one image decode, as in the real sources.

    .venv/bin/python benchmarks/build_memory.py                      # 40k and 160k rows, both layouts
    .venv/bin/python benchmarks/build_memory.py --rows 5000,20000    # a quick look
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL_ROWS = 1_300_000
WORDS = ("the scan shows a well defined lesion in the left lobe with surrounding oedema and no midline shift "
         "contrast enhancement is heterogeneous and the adjacent structures appear preserved").split()

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})
import importlib
try:
    builder = importlib.import_module("vlhealth.builders.{builder}")
except ImportError:
    builder = importlib.import_module("builders.{builder}")
from vlhealth.build import run_build
t = time.perf_counter()
s = run_build(builder, {root!r}, {out!r}, command=["bench"], workers=1)
print(json.dumps({{"seconds": time.perf_counter() - t, "samples": s.samples, "rejects": s.rejects,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def _jpeg(i: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _sentence(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n)).capitalize() + "."


def write_pubmedvision(root: Path, rows: int, images: int) -> None:
    (root / "images").mkdir(parents=True)
    for k in range(images):
        (root / "images" / f"pmc_{k}.jpg").write_bytes(_jpeg(k))
    modalities = ("Computed Tomography", "Magnetic Resonance Imaging", "Digital Photography", "Microscopy Images")
    with open(root / "PubMedVision_InstructionTuning_VQA.json", "w", encoding="utf-8") as fh:
        fh.write("[\n")
        for i in range(rows):
            row = {"id": f"pmc_row_{i}", "image": [f"images/pmc_{i % images}.jpg"], "conversations": [
                {"from": "human", "value": "<image>\nWhat does this image show? " + _sentence(i, 12)},
                {"from": "gpt", "value": " ".join(_sentence(i + j, 25) for j in range(5))}],
                "modality": modalities[i % len(modalities)], "body_part": ("Head", "Chest", "Pelvic Cavity")[i % 3]}
            fh.write(("," if i else "") + json.dumps(row) + "\n")
        fh.write("]\n")


def write_llava_instruct(root: Path, rows: int, images: int) -> None:
    (root / "coco" / "train2017").mkdir(parents=True)
    for k in range(images):
        (root / "coco" / "train2017" / f"{k:012d}.jpg").write_bytes(_jpeg(k))
    with open(root / "llava_v1_5_mix665k.json", "w", encoding="utf-8") as fh:
        fh.write("[")
        for i in range(rows):
            turns = []
            for t in range(3):
                turns += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + _sentence(i + t, 10)},
                          {"from": "gpt", "value": _sentence(i + t + 1, 40)}]
            fh.write(("," if i else "") + json.dumps({"id": f"{i:012d}", "image": f"coco/train2017/{i % images:012d}.jpg",
                                                      "conversations": turns}))
        fh.write("]")


LAYOUTS = {"pubmedvision": write_pubmedvision, "llava_instruct": write_llava_instruct}


def measure(builder: str, rows: int, images: int, work: Path) -> dict:
    root = work / f"{builder}-{rows}"
    LAYOUTS[builder](root, rows, images)
    size = sum(p.stat().st_size for p in root.glob("*.json"))
    code = CHILD.format(repo=str(REPO), builder=builder, root=str(root), out=str(work / f"out-{builder}-{rows}"))
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"build of {builder} ({rows} rows) failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(rows=rows, json_mib=size / 2**20, wall=time.perf_counter() - t)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="40000,160000", help="Row counts, comma-separated (smallest first).")
    ap.add_argument("--images", type=int, default=500, help="Distinct image files the rows share.")
    ap.add_argument("--builders", default="pubmedvision,llava_instruct")
    ap.add_argument("--json", type=Path, help="Also write the results here.")
    args = ap.parse_args()
    sizes = sorted(int(r) for r in args.rows.split(","))
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="build-memory-") as tmp:
        for builder in args.builders.split(","):
            for rows in sizes:
                r = measure(builder, rows, args.images, Path(tmp))
                results.setdefault(builder, []).append(r)
                print(f"{builder:15s} {rows:>8,} rows  json {r['json_mib']:7.1f} MiB  samples {r['samples']:>8,}  "
                      f"build {r['seconds']:7.1f} s  peak RSS {r['rss_mib']:7.1f} MiB", flush=True)
    print()
    print(f"{'builder':15s} {'rows':>17s} {'peak RSS (MiB)':>20s} {'growth':>8s} {'at 1.3M rows':>13s}")
    verdicts = []
    for builder, rs in results.items():
        lo, hi = rs[0], rs[-1]
        growth = hi["rss_mib"] / lo["rss_mib"] - 1
        slope = (hi["rss_mib"] - lo["rss_mib"]) / max(hi["rows"] - lo["rows"], 1)
        at_real = hi["rss_mib"] + slope * (REAL_ROWS - hi["rows"])
        print(f"{builder:15s} {lo['rows']:>8,}->{hi['rows']:<8,} {lo['rss_mib']:>9.1f}->{hi['rss_mib']:<9.1f} "
              f"{growth:>+7.1%} {at_real:>10.1f} MiB")
        ratio = hi["rows"] / lo["rows"]
        verdicts.append(f"{builder}: {ratio:.0f}x rows -> {growth:+.1%} RSS (target < +20% for 4x: "
                        f"{'met' if growth < 0.20 else 'MISSED'}); extrapolated {at_real:.0f} MiB at 1.3M rows "
                        f"(target < 600: {'met' if at_real < 600 else 'MISSED'})")
    print("\n".join(verdicts))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
