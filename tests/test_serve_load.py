"""The soak's verdict (benchmarks/serve_load.py --soak): every good request must be answered 200, no response may
be a 5xx, and what else happened is counted, not dropped."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def serve_load():
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("serve_load", None)


CLEAN = {"good": {200: 85}, "oversized": {413: 2}, "malformed": {400: 2}, "wrong_type": {400: 2},
         "no_key": {401: 2}, "wrong_key": {401: 2}, "disconnect": {"disconnected": 5}}


def _with(kind: str, outcome: int | str, n: int = 1) -> dict:
    kinds = {k: dict(v) for k, v in CLEAN.items()}
    kinds[kind][outcome] = kinds[kind].get(outcome, 0) + n
    return kinds


def test_a_clean_soak_meets_the_targets(serve_load) -> None:
    ok, line = serve_load.soak_verdict(CLEAN, 0.2, 0.4, 0.01)
    assert ok and "met" in line and serve_load.unexpected(CLEAN) == {}
    assert serve_load.soak_verdict(CLEAN, 0.2, 0.4, math.nan)[0]  # RSS not measured (a --url server)


@pytest.mark.parametrize("outcome", [429, 404, "ReadTimeout", "RemoteProtocolError", "200 without an answer"])
def test_a_good_request_without_a_200_misses(serve_load, outcome) -> None:
    kinds = _with("good", outcome)
    ok, line = serve_load.soak_verdict(kinds, 0.2, 0.4, 0.01)
    assert not ok and "MISSED" in line and "not answered 200: 1" in line
    assert serve_load.unexpected(kinds) == {"good": {outcome: 1}}


def test_other_misses(serve_load) -> None:
    assert not serve_load.soak_verdict(_with("malformed", 500), 0.2, 0.4, 0.01)[0]  # a 5xx, on any request
    assert not serve_load.soak_verdict(CLEAN, 0.2, 0.7, 0.01)[0]  # p95/p50 > 3
    assert not serve_load.soak_verdict(CLEAN, 0.2, 0.4, 0.15)[0]  # RSS growth >= 10%
    assert not serve_load.soak_verdict({"good": {}}, math.nan, math.nan, 0.0)[0]  # no good request at all
    # a bad request that saw no 4xx, or a hang-up without its first chunk, is shown but is not a 5xx
    kinds = _with("oversized", "WriteError")
    kinds["disconnect"][200] = 1
    assert serve_load.unexpected(kinds) == {"oversized": {"WriteError": 1}, "disconnect": {200: 1}}
    assert serve_load.soak_verdict(kinds, 0.2, 0.4, 0.01)[0]
