"""Helpers for the serving tests: a small trained run, a real uvicorn server on a free local port."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tests.train_data import make_all


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train_small_run(root: Path, steps: int = 20) -> dict[str, Path]:
    """A tiny-preset stage-3 (mixed) run on closed 'yes' VQA + learnable generation shards: it answers
    'yes' after ~20 steps (about 30 s on one CPU thread)."""
    from healthgpt.training.train import TrainConfig, train

    shards = make_all(root / "shards")
    cfg = TrainConfig(preset="tiny", stage=3, task="mixed", shards=[str(shards["comp"]), str(shards["gen"])],
                      out=root / "stage3", progress=False, save_every=1000,
                      overrides={"steps": steps, "lr": 2e-2, "adapter_lr": 2e-2, "micro_batch": 4, "global_batch": 4,
                                 "warmup_steps": 0})
    res = train(cfg)
    assert res.status == "finished"
    return {"run": root / "stage3", **shards}


def scan_png(seed: int = 0, size: tuple[int, int] = (48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def data_url(png: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(png).decode("ascii")


def image_message(png: bytes, question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}},
                                         {"type": "text", "text": question}]}]


@contextmanager
def running_server(service: Any, *, ui: bool = True) -> Iterator[str]:
    """Serve ``service`` with uvicorn on 127.0.0.1 in a thread; yields the base URL."""
    import uvicorn

    from healthgpt.serving.api import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service, ui=ui), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


CHROMIUM = Path("/usr/bin/chromium")  # Debian's (apt-get install chromium), driven by Playwright


def launch_chromium(playwright: Any) -> Any:
    """Headless Debian chromium from a ``sync_playwright()`` context (never Playwright's own download)."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"])
