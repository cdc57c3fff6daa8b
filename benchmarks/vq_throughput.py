"""VQ tokenizer throughput: images/s of encode and decode, per thread count (medians of rounds).

    .venv/bin/python benchmarks/vq_throughput.py                    # tiny, 1 and 2 threads, CPU
    .venv/bin/python benchmarks/vq_throughput.py --spec last.ckpt --device cuda --threads 16

Rounds alternate between thread counts (and memory layouts with --layouts) so that a busy shared
machine slows all variants alike; the printed ratios are side by side, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from vlhealth.vq import load_vq


def demo_images(n: int, size: int = 256) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    out = [
        (np.sin(xx / (5 + i)) + np.cos(yy / (7 + 2 * i)) + 2) * 60 + rng.normal(0, 5, (size, size)) for i in range(n)
    ]
    return np.stack(out).clip(0, 255).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layouts", action="store_true", help="also compare NCHW/channels-last layouts")
    args = ap.parse_args()

    tok = load_vq(args.spec, device=args.device, batch_size=args.batch_size)
    images = demo_images(args.images)
    codes = tok.encode(images)
    tok.decode(codes[:2])
    cl, nc = torch.channels_last, torch.contiguous_format
    layouts = [("default", None)]
    if args.layouts:
        layouts += [("enc CL/dec CL", (cl, cl)), ("enc CL/dec NCHW", (cl, nc)), ("NCHW/NCHW", (nc, nc))]
    default_formats = (tok.model._encode_format, tok.model._decode_format)

    times: dict[tuple[str, int, str], list[float]] = {}
    for _ in range(args.rounds):
        for label, formats in layouts:
            tok.model.use_memory_formats(*(formats or default_formats))
            for threads in args.threads:
                torch.set_num_threads(threads)
                for op, fn, arg in (("encode", tok.encode, images), ("decode", tok.decode, codes)):
                    start = time.perf_counter()
                    fn(arg)
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    times.setdefault((label, threads, op), []).append(time.perf_counter() - start)
    tok.model.use_memory_formats(*default_formats)

    print(f"spec={tok.describe()['name']} device={args.device} images={args.images} rounds={args.rounds}")
    base = {op: statistics.median(times[(layouts[0][0], args.threads[0], op)]) for op in ("encode", "decode")}
    for (label, threads, op), ts in sorted(times.items()):
        med = statistics.median(ts)
        print(
            f"{label:16s} threads={threads:2d} {op}: {args.images / med:8.1f} images/s"
            f"  (x{base[op] / med:.2f} vs {layouts[0][0]}, {args.threads[0]} thread)"
        )
    unique = np.unique(codes).size
    print(
        f"distinct codes over {args.images} images: {unique}; per image (mean): "
        f"{np.mean([np.unique(c).size for c in codes]):.0f} of {codes.shape[1]}"
    )


if __name__ == "__main__":
    main()
