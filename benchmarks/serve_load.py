"""Load on `healthgpt serve`: N concurrent chat requests, latency percentiles, throughput, errors.

Starts ``healthgpt serve --preset tiny`` (or ``--checkpoint RUN``) as its own process on a free
local port (or uses ``--url`` of a running server), then sends ``--n`` chat completions (each with
one PNG image as a data: URL and ``max_tokens`` tokens) through ``--concurrency`` parallel
keep-alive connections. Each request is timed from send to the full response. The same requests
are then sent one at a time (concurrency 1), side by side in the same run, so the table shows
what queueing and batching give.

Target (issue 13), with the tiny preset: 0 errors, and p95 <= 3x p50 at concurrency 8.

``--soak`` (issue 24) instead sends ``--n`` (default 5000) requests over ``--concurrency`` (default 16)
connections to a server started with an API key and ``--max-request-mb 1``: 85% good chat requests,
10% bad ones (in turn: a body over the limit, malformed JSON, a wrong type, no key, a wrong key) and 5%
streamed requests whose client disconnects after the first chunk. It prints the count of 5xx answers,
p50/p95 of the good requests, the server's resident memory (RSS) at start, after a warm-up of the
first ``--warmup`` requests and at the end, and the server's own counts (cancelled, refused). Every outcome
other than the expected one is counted and shown: a good request that did not get 200 with an answer (a 429,
a transport error, ...), a bad one without a 4xx answer, a hang-up that did not get its first chunk.
Targets: 0 responses 5xx, every good request answered 200, RSS growth after warm-up < 10%, p95/p50 <= 3
on the good requests. A missed target exits 1 (both modes).

    .venv/bin/python benchmarks/serve_load.py                          # 64 requests, 8 connections
    .venv/bin/python benchmarks/serve_load.py --n 128 --concurrency 16 --max-tokens 32
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model healthgpt-tiny
    .venv/bin/python benchmarks/serve_load.py --soak                   # 5000 requests, 16 connections
    .venv/bin/python benchmarks/serve_load.py --soak --n 300           # a short check (warm-up: 30)
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
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


def _start_server(args: argparse.Namespace, log: Path, extra: tuple[str, ...] = (), key: str | None = None
                  ) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "healthgpt.cli", "serve", "--preset", args.preset, "--port", str(port), "--no-ui",
           "--threads", str(args.threads), "--max-batch", str(args.max_batch), *extra]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if key is not None:
        env["HEALTHGPT_API_KEY"] = key  # not on the command line
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
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


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class SoakResult:
    kinds: dict[str, dict[int | str, int]]  # request kind -> status (or "disconnected" / exception) -> count
    good_latencies: list[float]
    seconds: float


def _soak_kind(i: int) -> str:
    """85% good, 10% bad (five kinds in turn), 5% disconnecting; spread evenly over the run."""
    r = i % 20
    if r == 7:
        return "disconnect"
    if r in (3, 13):
        return ("oversized", "malformed", "wrong_type", "no_key", "wrong_key")[(i // 10) % 5]
    return "good"


def run_soak(url: str, model: str, key: str, n: int, concurrency: int, max_tokens: int, start: int = 0,
             oversized: int = 2**20 + 2**19) -> SoakResult:
    images = [_image_url(i) for i in range(8)]
    clients = [httpx.Client(base_url=url, timeout=120, headers={"authorization": f"Bearer {key}"})
               for _ in range(concurrency)]
    kinds: dict[str, dict[int | str, int]] = {}
    good: list[float] = []
    lock = threading.Lock()

    def body(i: int, **extra: object) -> dict:
        return {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": images[i % len(images)]}},
            {"type": "text", "text": f"Question {i}: is there a lesion?"}]}], **extra}

    def one(j: int) -> None:
        i = start + j
        kind = _soak_kind(i)
        http = clients[j % concurrency]
        t0 = time.perf_counter()
        outcome: int | str
        try:
            if kind == "good":
                r = http.post("/v1/chat/completions", json=body(i))
                outcome = r.status_code
                if r.status_code == 200:
                    if r.json()["choices"][0]["message"]["content"] is None:
                        outcome = NO_ANSWER
                    else:
                        with lock:
                            good.append(time.perf_counter() - t0)
            elif kind == "disconnect":
                with http.stream("POST", "/v1/chat/completions", json=body(i, stream=True, max_tokens=200)) as r:
                    outcome = r.status_code
                    if r.status_code == 200:
                        for _ in r.iter_lines():
                            outcome = HUNG_UP  # the first chunk came: hang up in the middle of the answer
                            break
            elif kind == "oversized":
                payload = json.dumps(body(i, padding="x" * oversized)).encode()
                outcome = http.post("/v1/chat/completions", content=payload,
                                    headers={"content-type": "application/json"}).status_code
            elif kind == "malformed":
                outcome = http.post("/v1/chat/completions", content=b'{"model": "' + model.encode() + b'", "messages": [',
                                    headers={"content-type": "application/json"}).status_code
            elif kind == "wrong_type":
                outcome = http.post("/v1/chat/completions", json={"model": model, "messages": "hello",
                                                                  "max_tokens": "many"}).status_code
            elif kind == "no_key":
                outcome = httpx.post(url + "/v1/chat/completions", json=body(i), timeout=60).status_code
            else:
                outcome = http.post("/v1/chat/completions", json=body(i),
                                    headers={"authorization": "Bearer not-the-key-0000"}).status_code
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as err:  # transport error, bad JSON
            outcome = type(err).__name__
        with lock:
            counts = kinds.setdefault(kind, {})
            counts[outcome] = counts.get(outcome, 0) + 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    seconds = time.perf_counter() - t0
    for c in clients:
        c.close()
    return SoakResult(kinds, good, seconds)


NO_ANSWER, HUNG_UP = "200 without an answer", "disconnected"
BAD_KINDS = ("oversized", "malformed", "wrong_type", "no_key", "wrong_key")


def unexpected(kinds: dict[str, dict[int | str, int]]) -> dict[str, dict[int | str, int]]:
    """Per request kind, the outcomes other than the expected one: 200 with an answer for a good request, a
    4xx for a bad one, the first chunk then a hang-up for a disconnecting one."""
    def expected(kind: str, outcome: int | str) -> bool:
        if kind == "good":
            return outcome == 200
        if kind == "disconnect":
            return outcome == HUNG_UP
        return isinstance(outcome, int) and 400 <= outcome < 500
    return {kind: odd for kind, counts in kinds.items()
            if (odd := {k: v for k, v in counts.items() if not expected(kind, k)})}


def soak_verdict(kinds: dict[str, dict[int | str, int]], p50: float, p95: float, growth: float) -> tuple[bool, str]:
    """(targets met, the line that says so): 0 responses 5xx, every good request 200 with an answer, p95/p50
    <= 3 on the good requests, RSS growth after warm-up < 10% (not measured against a --url server: NaN)."""
    n5xx = sum(v for c in kinds.values() for k, v in c.items() if isinstance(k, int) and k >= 500)
    good_failed = sum(unexpected(kinds).get("good", {}).values())
    ok = (n5xx == 0 and good_failed == 0 and sum(kinds.get("good", {}).values()) > 0 and p95 <= 3 * p50
          and (growth < 0.10 or growth != growth))
    return ok, (f"targets (0 x 5xx, every good request 200, RSS growth after warm-up < 10%, p95/p50 <= 3): "
                f"{'met' if ok else 'MISSED'} (5xx: {n5xx}, good requests not answered 200: {good_failed})")


def soak(args: argparse.Namespace) -> None:
    n = args.n or 5000
    concurrency = args.concurrency or 16
    warmup = min(500, n // 10) if args.warmup is None else args.warmup
    if not 0 < warmup < n:
        raise SystemExit(f"--warmup {warmup} must be between 1 and --n {n} - 1")
    tmp = Path(tempfile.mkdtemp(prefix="serve-soak-"))
    key = args.api_key or secrets.token_urlsafe(24)
    proc = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        proc, url = _start_server(args, tmp / "server.log", ("--max-request-mb", "1"), key=key)
    try:
        headers = {"authorization": f"Bearer {key}"}
        model = args.model or httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"]
        rss = {"start": _rss_mb(proc.pid) if proc else float("nan")}
        warm = run_soak(url, model, key, warmup, concurrency, args.max_tokens)
        rss["after warm-up"] = _rss_mb(proc.pid) if proc else float("nan")
        main_run = run_soak(url, model, key, n - warmup, concurrency, args.max_tokens, start=warmup)
        time.sleep(1.0)  # let the last cancelled jobs leave the worker
        rss["end"] = _rss_mb(proc.pid) if proc else float("nan")
        health = httpx.get(url + "/healthz").json()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    kinds: dict[str, dict[int | str, int]] = {}
    for res in (warm, main_run):
        for kind, counts in res.kinds.items():
            for k, v in counts.items():
                kinds.setdefault(kind, {})[k] = kinds.setdefault(kind, {}).get(k, 0) + v
    total = sum(sum(c.values()) for c in kinds.values())
    n5xx = sum(v for c in kinds.values() for k, v in c.items() if isinstance(k, int) and k >= 500)
    lat = LoadResult(concurrency, warm.good_latencies + main_run.good_latencies, 0, warm.seconds + main_run.seconds)
    p50, p95 = lat.pct(50), lat.pct(95)
    print(f"soak: {total} requests over {concurrency} connections to {model} in {lat.seconds:.0f} s "
          f"(good: chat with 1 image, max_tokens {args.max_tokens})")
    for kind in ("good", "oversized", "malformed", "wrong_type", "no_key", "wrong_key", "disconnect"):
        if kind in kinds:
            print(f"  {kind:>11}: " + ", ".join(f"{k} x{v}" for k, v in sorted(kinds[kind].items(), key=str)))
    print(f"  5xx responses: {n5xx}")
    odd = unexpected(kinds)
    print("  unexpected outcomes: " + ("; ".join(
        f"{kind} " + ", ".join(f"{k} x{v}" for k, v in sorted(c.items(), key=str)) for kind, c in odd.items())
        or "none"))
    print(f"  good requests: p50 {p50:.3f} s, p95 {p95:.3f} s, p95/p50 {p95 / p50:.2f}")
    print("  server RSS: " + ", ".join(f"{k} {v:.0f} MB" for k, v in rss.items())
          + f"; growth after warm-up {100 * (rss['end'] / rss['after warm-up'] - 1):+.1f}%")
    print(f"  server counts: cancelled {health['cancelled']}, refused {health['refused']}, "
          f"timed out {health['timed_out']}, batches {health['batches_run']}")
    growth = rss["end"] / rss["after warm-up"] - 1
    ok, line = soak_verdict(kinds, p50, p95, growth)
    print(line)
    if not ok:
        raise SystemExit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server (default: start `healthgpt serve` here)")
    ap.add_argument("--model", help="model id (default: the server's only model)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--checkpoint", help="run or export folder for the started server")
    ap.add_argument("--n", type=int, help="requests (default 64; --soak: 5000)")
    ap.add_argument("--concurrency", type=int, help="parallel connections (default 8; --soak: 16)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=8, help="the started server's --max-batch")
    ap.add_argument("--threads", type=int, default=1, help="the started server's torch threads")
    ap.add_argument("--no-sequential", action="store_true", help="skip the concurrency-1 comparison")
    ap.add_argument("--soak", action="store_true", help="the soak run (see above): 5000 requests, 16 connections")
    ap.add_argument("--warmup", type=int, help="soak: requests before the 'after warm-up' RSS (default: 500, "
                                                "at most a tenth of --n)")
    ap.add_argument("--api-key", help="soak with --url: the server's key (default: a new one for the started server)")
    args = ap.parse_args()
    if args.soak:
        soak(args)
        return
    args.n = args.n or 64
    args.concurrency = args.concurrency or 8

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
          f"median request {statistics.median(main_row.latencies or [float('nan')]):.3f} s")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
