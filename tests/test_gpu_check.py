"""benchmarks/gpu_check.py --smoke: every check's code path on the CPU at tiny sizes (the CUDA run
uses the same functions; FSDP is reported as skipped on the CPU, where torch refuses it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_smoke_runs_every_check(tmp_path) -> None:
    out = tmp_path / "gpu-smoke.md"
    rc = _gpu_check().main(["--smoke", "--out", str(out)])
    text = out.read_text("utf-8")
    assert rc == 0, text
    for check in ("bf16 autocast", "gradient checkpointing", "FSDP", "H-LoRA vs LoRA", "VQGAN encode",
                  "training step", "peak memory: plan vs measured", "evaluation decoding"):
        assert check in text, check
    assert "| NO |" not in text
