"""Loader throughput: samples/s from shards to collated batches (no model), per task, one core.

Writes small shard folders (comprehension: 256x256 PNG input + short QA; generation: 256x256 PNG
input + target.png + 1024 VQ codes), then times ``TaskBatchStream`` (in-process, one thread:
``torch.set_num_threads(1)``) from tar bytes to padded tensors + pre-processed pixel values, for
the tiny preset's image pre-processing (32 px) and, with ``--clip336``, CLIP ViT-L/14-336's
(336 px), both through the transformers CLIP image processor ("processor") and through the
loader's default ``FastClipPreprocessor`` ("fast"; the same numbers to float32 rounding), side by
side in the same run. Prints the median over ``--rounds`` rounds, the fast/processor ratio and the
target check (>= 200 generation samples/s on one core). Note the machine load (``uptime``) with
the numbers: on a shared machine it moves them.

    python benchmarks/loader_throughput.py --samples 256 --rounds 5 --clip336
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from healthgpt.model.presets import CLIP_MEAN, CLIP_STD, build_model  # noqa: E402
from healthgpt.training.data import DataConfig, TaskBatchStream, VisionPreprocessor  # noqa: E402
from vlhealth.schema import Record, Sample  # noqa: E402
from vlhealth.shards import ShardWriter, write_index  # noqa: E402


def _phantom(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:256, :256]
    img = 60 + 120 * (((yy - 128) ** 2 + (xx - 128) ** 2) < rng.integers(40, 110) ** 2)
    return np.clip(img + rng.normal(0, 8, (256, 256)), 0, 255).astype(np.uint8)


def write(root: Path, n: int) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    comp, gen = root / "comp", root / "gen"
    with ShardWriter(comp, prefix="comp", max_count=64) as w:
        for i in range(n):
            rec = Record(task="comprehension", subtask="vqa", source="bench", split="train",
                         conversations=[{"from": "human", "value": f"<image>\nIs there an abnormality in region {i}?"},
                                        {"from": "gpt", "value": "Yes, a rounded hyperdense lesion."}],
                         group=f"g{i}", license="CC0", answer_type="open")
            w.write(Sample(key=f"c-{i:06d}", record=rec, input_image=_phantom(rng)))
    write_index(comp, w.shards)
    with ShardWriter(gen, prefix="gen", max_count=64) as w:
        for i in range(n):
            rec = Record(task="generation", subtask="ct2mri", source="bench", split="train",
                         conversations=[{"from": "human", "value": "<image>\nConvert this CT slice to an MRI."},
                                        {"from": "gpt", "value": "<target_image>"}],
                         group=f"g{i}", license="CC0")
            w.write(Sample(key=f"g-{i:06d}", record=rec, input_image=_phantom(rng), target=_phantom(rng),
                           target_vq=rng.integers(0, 8192, 1024).astype(np.int16)))
    write_index(gen, w.shards)
    return {"comprehension": comp, "generation": gen}


def measure(folder: Path, task: str, tok, pre, image_tokens: int, n: int, batch: int) -> float:
    cfg = DataConfig([str(folder)], task, batch_size=batch, image_tokens=image_tokens)
    stream = iter(TaskBatchStream(cfg, tok, pre))
    next(stream)  # tar indexes, first file opens
    got = 0
    t0 = time.perf_counter()
    while got < n:
        got += next(stream)["n_samples"]
    return got / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256, help="samples per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--clip336", action="store_true", help="also time CLIP ViT-L/14-336 pre-processing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = build_model("tiny")
    setups = [("tiny processor", VisionPreprocessor.from_model(model, fast=False), model.vision.num_patches),
              ("tiny fast", VisionPreprocessor.from_model(model), model.vision.num_patches)]
    if args.clip336:
        try:
            from transformers import CLIPImageProcessorPil as Proc
        except ImportError:  # pragma: no cover
            from transformers import CLIPImageProcessor as Proc
        proc = Proc(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_mean=CLIP_MEAN,
                    image_std=CLIP_STD, do_convert_rgb=True)
        setups.append(("CLIP-336 processor", VisionPreprocessor(proc), 576))
        setups.append(("CLIP-336 fast", VisionPreprocessor(proc, fast=True), 576))
    with tempfile.TemporaryDirectory() as tmp:
        folders = write(Path(tmp), args.samples)
        print(f"loader throughput, 1 thread, batch {args.batch}, median of {args.rounds} rounds x {args.samples} samples")
        print(f"load average before: {os.getloadavg()[0]:.2f} (1 min)")
        print(f"{'task':<14} {'pre-processing':<19} {'samples/s':>10} {'min':>8} {'max':>8}")
        results = {}
        for name, pre, image_tokens in setups:
            for task in ("comprehension", "generation"):
                rates = [measure(folders[task], task, tok, pre, image_tokens, args.samples, args.batch)
                         for _ in range(args.rounds)]
                med = statistics.median(rates)
                results[(name, task)] = med
                print(f"{task:<14} {name:<19} {med:>10.1f} {min(rates):>8.1f} {max(rates):>8.1f}")
        print(f"load average after: {os.getloadavg()[0]:.2f} (1 min)")
        for base in sorted({n.rsplit(" ", 1)[0] for n, _, _ in setups}):
            for task in ("comprehension", "generation"):
                fast, slow = results[(f"{base} fast", task)], results[(f"{base} processor", task)]
                print(f"{task} with {base}: fast {fast:.0f} vs processor {slow:.0f} samples/s = {fast / slow:.2f}x")
        for name, _, _ in setups:
            rate = results[(name, "generation")]
            verdict = "meets" if rate >= 200 else "MISSES"
            print(f"generation with {name} pre-processing: {rate:.0f} samples/s = {rate / 200:.2f}x the "
                  f"200 samples/s target ({verdict})")


if __name__ == "__main__":
    main()
