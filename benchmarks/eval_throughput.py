"""Eval decoding throughput: batched greedy decoding (KV cache) against one sample at a time.

Times ``model.generate`` as the evaluator calls it (left-padded prompts with an image, greedy,
KV cache) for comprehension answers of ``--answer-tokens`` and image-token sequences of
``--image-tokens``, at batch 1 and batch ``--batch``; rounds alternate the variants so a busy
shared machine slows them alike. Prints medians and the batched/unbatched samples-per-second
ratio, plus the eval runner's per-sample overhead (VQ decode + metrics) for generation.

    .venv/bin/python benchmarks/eval_throughput.py                       # tiny, CPU
    .venv/bin/python benchmarks/eval_throughput.py --device cuda --batch 16 --image-tokens 1064
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--image-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from healthgpt.model.conversation import encode_prompt
    from healthgpt.serving.infer import load_model
    from vlhealth.image_metrics import image_metrics
    from vlhealth.vq import load_vq

    model = load_model(args.preset, device=args.device)
    vq = load_vq("tiny", device=args.device)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (256, 256), dtype=np.uint8) for _ in range(args.batch)]

    def inputs(n: int, task: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prompts = [encode_prompt(model.tokenizer, f"Question number {i} about this image?" + " more" * (i % 3),
                                 template=model.template, task=task) for i in range(n)]
        width = max(len(p) for p in prompts)
        ids = torch.full((n, width), model.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        return ids, mask, model.vision.preprocess(images[:n]).to(model.device)

    def run(n: int, task: str, tokens: int) -> float:
        """Seconds to decode args.batch samples in batches of n."""
        start = time.perf_counter()
        for _ in range(args.batch // n):
            ids, mask, pv = inputs(n, task)
            with torch.inference_mode():
                model.generate(ids, mask, pv, task=task, max_new_tokens=tokens, stop_token_ids=[])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {}
    variants = [("comprehension", args.answer_tokens), ("generation", args.image_tokens)]
    run(args.batch, "comprehension", 2)  # warm-up
    for r in range(args.rounds):
        order = [(t, k, n) for t, k in variants for n in (1, args.batch)]
        for t, k, n in order[r % len(order):] + order[: r % len(order)]:
            times.setdefault(f"{t} b{n}", []).append(run(n, t, k))
    codes = rng.integers(0, 8192, (args.batch, 1024))
    post = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        preds = vq.decode(codes)
        for p, img in zip(preds, images, strict=True):
            image_metrics(p, img)
        post.append((time.perf_counter() - start) / args.batch)

    print(f"preset {args.preset}, device {args.device}, threads {args.threads}, {args.batch} samples, "
          f"medians of {args.rounds} rounds")
    for t, k in variants:
        one = statistics.median(times[f"{t} b1"])
        many = statistics.median(times[f"{t} b{args.batch}"])
        print(f"{t:13s} {k:5d} tokens: batch 1 {args.batch / one:7.2f} samples/s | batch {args.batch} "
              f"{args.batch / many:7.2f} samples/s | batched/unbatched {one / many:5.2f}x")
    print(f"generation post-processing (VQ decode + SSIM/PSNR/MSE): {1000 * statistics.median(post):.1f} ms/sample")


if __name__ == "__main__":
    main()
