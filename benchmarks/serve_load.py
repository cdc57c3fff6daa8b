"""Load on `healthgpt serve`: N concurrent chat requests, latency percentiles, throughput, errors.

Starts ``healthgpt serve --preset tiny`` (or ``--checkpoint RUN``) as its own process on a free
local port (or uses ``--url`` of a running server), then sends ``--n`` chat completions (each with
one PNG image as a data: URL and ``max_tokens`` tokens) through ``--concurrency`` parallel
keep-alive connections. Each request is timed from send to the full response. The same requests
are then sent one at a time (concurrency 1), side by side in the same run, so the table shows
what queueing and batching give.

Target (issue 13), with the tiny preset: 0 errors, and p95 <= 3x p50 at concurrency 8.

    .venv/bin/python benchmarks/serve_load.py                          # 64 requests, 8 connections
    .venv/bin/python benchmarks/serve_load.py --n 128 --concurrency 16 --max-tokens 32
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model healthgpt-tiny
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


@dataclass
class LoadResult:
    concurrency: int
    latencies: list[float]
    errors: int
    seconds: float

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _image_url(seed: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _requests(n: int, model: str, max_tokens: int) -> list[dict]:
    images = [_image_url(i) for i in range(8)]
    return [{"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": images[i % len(images)]}},
        {"type": "text", "text": f"Question {i}: is there a lesion?"}]}]} for i in range(n)]


def run_load(url: str, bodies: list[dict], concurrency: int) -> LoadResult:
    clients = [httpx.Client(base_url=url, timeout=300) for _ in range(concurrency)]

    def one(i: int) -> tuple[float, bool]:
        t0 = time.perf_counter()
        try:
            r = clients[i % concurrency].post("/v1/chat/completions", json=bodies[i])
            ok = r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
        except httpx.HTTPError:
            ok = False
        return time.perf_counter() - t0, ok

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(len(bodies))))
    seconds = time.perf_counter() - t0
    for c in clients:
        c.close()
    return LoadResult(concurrency, [t for t, ok in results if ok], sum(not ok for _, ok in results), seconds)


def _start_server(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "healthgpt.cli", "serve", "--preset", args.preset, "--port", str(port), "--no-ui",
           "--threads", str(args.threads), "--max-batch", str(args.max_batch)]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the server did not come up within 300 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server (default: start `healthgpt serve` here)")
    ap.add_argument("--model", help="model id (default: the server's only model)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--checkpoint", help="run or export folder for the started server")
    ap.add_argument("--n", type=int, default=64, help="requests")
    ap.add_argument("--concurrency", type=int, default=8, help="parallel connections")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=8, help="the started server's --max-batch")
    ap.add_argument("--threads", type=int, default=1, help="the started server's torch threads")
    ap.add_argument("--no-sequential", action="store_true", help="skip the concurrency-1 comparison")
    args = ap.parse_args()

    proc = None
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            proc, url = _start_server(args, tmp / "server.log")
        model = args.model or httpx.get(url + "/v1/models").json()["data"][0]["id"]
        bodies = _requests(args.n, model, args.max_tokens)
        run_load(url, bodies[: min(8, args.n)], min(args.concurrency, 8))  # warm-up (first-call allocations)
        before = httpx.get(url + "/healthz").json()
        rows = [run_load(url, bodies, args.concurrency)]
        after = httpx.get(url + "/healthz").json()
        if not args.no_sequential and args.concurrency > 1:
            rows.append(run_load(url, bodies, 1))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)

    print(f"{args.n} chat requests (1 image, max_tokens {args.max_tokens}) to {model}")
    print(f"{'connections':>11} {'p50 s':>8} {'p95 s':>8} {'max s':>8} {'req/s':>8} {'errors':>6} {'p95/p50':>8}")
    for r in rows:
        p50, p95 = r.pct(50), r.pct(95)
        print(f"{r.concurrency:>11} {p50:>8.3f} {p95:>8.3f} {max(r.latencies, default=float('nan')):>8.3f} "
              f"{len(r.latencies) / r.seconds:>8.2f} {r.errors:>6} {p95 / p50:>8.2f}")
    batches = after["batches_run"] - before["batches_run"]
    print(f"server: {batches} model batches for {args.n} requests at {args.concurrency} connections "
          f"(mean {args.n / max(batches, 1):.1f} per batch, largest {after['largest_batch']})")
    if len(rows) == 2:
        print(f"throughput ratio, {args.concurrency} connections vs 1: "
              f"{(len(rows[0].latencies) / rows[0].seconds) / (len(rows[1].latencies) / rows[1].seconds):.2f}x")
    main_row = rows[0]
    ok = main_row.errors == 0 and main_row.pct(95) <= 3 * main_row.pct(50)
    print(f"target (0 errors, p95 <= 3x p50): {'met' if ok else 'MISSED'} "
          f"(p95/p50 = {main_row.pct(95) / main_row.pct(50):.2f}, errors {main_row.errors}); "
          f"median request {statistics.median(main_row.latencies):.3f} s")


if __name__ == "__main__":
    main()
