"""One command that checks and measures a CUDA machine for HealthGPT training, and compares the
measured peak memory with ``healthgpt plan``'s prediction for the same configuration.

    .venv/bin/python benchmarks/gpu_check.py                 # CUDA: writes benchmarks/results/gpu-<date>.md
    .venv/bin/python benchmarks/gpu_check.py --layers 8      # M3-shaped model with 8 of Phi-3-mini's 32 layers
    .venv/bin/python benchmarks/gpu_check.py --smoke         # the same code paths on the CPU at tiny sizes

Checks (each a row of the report; a failing check is reported, the others still run):

1. bf16 autocast: the loss under ``torch.autocast(bf16)`` against fp32 on the same batch (< 2%).
2. gradient checkpointing: loss and trainable gradients equal with and without (fp32, dropout 0).
3. FSDP at world size 1, wrapped as the trainer wraps it (one unit, ``use_orig_params``), with the
   trainer's dtypes (bf16 frozen + fp32 trainable) and, if that is refused, all fp32.
4. H-LoRA vs LoRA: training-step time ratio at equal rank (the paper's Table 4 says 1.00x).
5. VQGAN encode images/s: the real f8-8192 architecture (``vlhealth.vq.GUMBEL_F8_CONFIG``, random
   weights); ``--smoke``: ``TINY_CONFIG`` (same 256 -> 32x32 geometry).
6. Training MFU of an M3-shaped model (Phi-3-mini widths, CLIP ViT-L/14-336, M3's H-LoRA ranks,
   random bf16 weights; ``--layers`` of the 32 decoder layers), stage 3 comprehension, bf16 autocast
   + gradient checkpointing as the trainer runs on CUDA; its measured peak memory
   (``torch.cuda.max_memory_allocated``) against ``plan``'s traced prediction of the same model.
   ``--smoke``: the tiny preset in fp32 on the CPU (peak measured with the torch profiler).
7. Evaluation decoding: greedy generation tokens/s (KV cache) of the same model.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _amp(device: str, on: bool) -> Any:
    return torch.autocast(device, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def _tiny(device: str, smoke: bool, **overrides: Any) -> Any:
    from healthgpt.model.presets import build_model

    size = {} if smoke else {"hidden": 512, "layers": 4, "image_size": 224, "patch_size": 14}
    model, _ = build_model("tiny", **{**size, **overrides})
    return model.to(device)


def _trainable(model: Any, preset: str, stage: int, task: str, dropout: float | None = None) -> list[Any]:
    from healthgpt.model.hlora import set_dropout
    from healthgpt.training.hparams import load_hparams
    from healthgpt.training.stages import stage_groups

    hp = load_hparams(preset, stage, task=task)
    params = model.set_trainable(*stage_groups(stage, task))
    for p in params:
        p.data = p.data.float()
    for t in ("comprehension", "generation"):
        set_dropout(model.llm, hp.dropout_for(t) if dropout is None else dropout, tasks=[t])
    model.train()
    model.vision.tower.eval()
    return params


def _batch(model: Any, task: str, micro: int, device: str) -> dict[str, Any]:
    from healthgpt.training.plan.measure import real_batch
    from healthgpt.training.plan.trace import workloads

    w = workloads(task, model.vision.num_patches)[0]
    return {k: v.to(device) for k, v in real_batch(model, w, micro).items()}


def check_bf16(device: str, smoke: bool) -> dict[str, Any]:
    model = _tiny(device, smoke)
    _trainable(model, "tiny", 3, "comprehension", dropout=0.0)
    batch = _batch(model, "comprehension", 2, device)
    with torch.no_grad():
        fp32 = float(model(**batch, task="comprehension", return_logits=False).loss)
        with _amp(device, True):
            bf16 = float(model(**batch, task="comprehension", return_logits=False).loss)
    rel = abs(bf16 - fp32) / abs(fp32)
    return {"check": "bf16 autocast vs fp32 loss", "ok": rel < 0.02,
            "result": f"fp32 {fp32:.5f}, bf16 {bf16:.5f}, relative difference {rel:.2e} (limit 2e-2)"}


def _loss_and_grads(model: Any, params: list[Any], batch: dict[str, Any]) -> tuple[float, list[torch.Tensor]]:
    for p in params:
        p.grad = None
    loss = model(**batch, task="generation", return_logits=False).loss
    loss.backward()
    return float(loss.detach()), [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def check_checkpointing(device: str, smoke: bool) -> dict[str, Any]:
    model = _tiny(device, smoke)
    params = _trainable(model, "tiny", 3, "generation", dropout=0.0)
    batch = _batch(model, "generation", 2, device)
    loss_a, grads_a = _loss_and_grads(model, params, batch)
    model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_b, grads_b = _loss_and_grads(model, params, batch)
    worst = max(float((a - b).abs().max() / (a.abs().max() + 1e-12)) for a, b in zip(grads_a, grads_b, strict=True))
    ok = abs(loss_a - loss_b) <= 1e-5 * abs(loss_a) and worst < 1e-4
    return {"check": "gradient checkpointing (loss, gradients)", "ok": ok,
            "result": f"loss {loss_a:.6f} vs {loss_b:.6f}; max relative gradient difference {worst:.1e} (limit 1e-4)"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fsdp_step(device: str, smoke: bool, mixed_dtypes: bool) -> str:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = _tiny(device, smoke)
    if mixed_dtypes:
        model.to(torch.bfloat16)
    params = _trainable(model, "tiny", 3, "comprehension", dropout=0.0)
    wrapped = FSDP(model, use_orig_params=True, device_id=torch.device(device) if device == "cuda" else None,
                   sync_module_states=True)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = _batch(model, "comprehension", 2, device)
    with _amp(device, mixed_dtypes):
        loss = wrapped(**batch, task="comprehension", return_logits=False).loss
    loss.backward()
    wrapped.clip_grad_norm_(1.0)
    optimizer.step()
    return f"one step ran, loss {float(loss):.4f}"


def check_fsdp(device: str, smoke: bool) -> dict[str, Any]:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    results = []
    try:
        for mixed in (True, False):
            label = "bf16 frozen + fp32 trainable (the trainer's)" if mixed else "all fp32"
            try:
                results.append((mixed, True, f"{label}: {_fsdp_step(device, smoke, mixed)}"))
            except Exception as err:  # noqa: BLE001 - the report says what failed
                results.append((mixed, False, f"{label}: FAILED {type(err).__name__}: {str(err)[:160]}"))
            if results[-1][1]:
                break
    finally:
        dist.destroy_process_group()
    text = "; ".join(r[2] for r in results)
    if smoke and all(not ok and "accelerator" in msg for _, ok, msg in results):  # CUDA-only by nature
        return {"check": "FSDP world size 1 (trainer's wrapping)", "ok": True,
                "result": f"skipped on the CPU: torch's FSDP needs an accelerator ({results[0][2][-90:]})"}
    return {"check": "FSDP world size 1 (trainer's wrapping)", "ok": results[0][1], "result": text}


def _train_step(model: Any, params: list[Any], optimizer: Any, batch: dict[str, Any], task: str, amp: bool,
                device: str) -> None:
    with _amp(device, amp):
        loss = model(**batch, task=task, return_logits=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def check_hlora_vs_lora(device: str, smoke: bool, repeats: int) -> dict[str, Any]:
    seconds = {}
    for variant in ("hlora", "lora"):
        model = _tiny(device, smoke, variant=variant, comp_r=64 if not smoke else 8)
        params = _trainable(model, "tiny", 3, "comprehension", dropout=0.0)
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        batch = _batch(model, "comprehension", 4, device)
        seconds[variant] = _timed(lambda m=model, p=params, o=optimizer, b=batch: _train_step(
            m, p, o, b, "comprehension", device == "cuda", device), device, repeats)
    ratio = seconds["hlora"] / seconds["lora"]
    return {"check": "H-LoRA vs LoRA step time", "ok": True,
            "result": f"H-LoRA {seconds['hlora'] * 1e3:.1f} ms, LoRA {seconds['lora'] * 1e3:.1f} ms: "
                      f"ratio {ratio:.2f}x (paper Table 4: 1.00x)"}


def check_vq(device: str, smoke: bool, repeats: int) -> dict[str, Any]:
    from vlhealth.vq import GUMBEL_F8_CONFIG, TINY_CONFIG, VQGAN

    cfg = TINY_CONFIG if smoke else GUMBEL_F8_CONFIG
    model = VQGAN(cfg).to(device).eval()
    n = 2 if smoke else 32
    x = torch.rand(n, 3, cfg.resolution, cfg.resolution, device=device) * 2 - 1
    with torch.inference_mode():
        seconds = _timed(lambda: model.encode_codes(x), device, repeats)
    name = "tiny (smoke)" if smoke else "f8-8192 (taming GumbelVQ layout, random weights)"
    return {"check": "VQGAN encode", "ok": True, "result": f"{name}: {n / seconds:,.1f} images/s (batch {n})"}


def _gpu_peak_tflops() -> float | None:
    from healthgpt.training.plan.core import GPUS

    name = torch.cuda.get_device_name().lower()
    for key, (_, bf16, _) in GPUS.items():
        if key.split("-")[0] in name:
            return bf16
    return None


def _m3_shaped(device: str, smoke: bool, layers: int) -> tuple[Any, str]:
    from healthgpt.training.plan.arch import build_shape_model

    if smoke:
        return _tiny(device, True), "tiny"
    torch.manual_seed(0)
    return build_shape_model("m3", device=device, layers=layers), "m3"


def check_training(device: str, smoke: bool, layers: int, micro: int, repeats: int) -> tuple[dict, dict, Any]:
    """MFU of the M3-shaped model and its measured peak memory against plan's prediction."""
    from healthgpt.training.plan.measure import measure_cpu_step
    from healthgpt.training.plan.trace import trace_step

    model, preset = _m3_shaped(device, smoke, layers)
    cuda = device == "cuda"
    lay = None if smoke else layers
    predicted = trace_step(preset, 3, "comprehension", micro, precision="bf16" if cuda else "fp32",
                           gradient_checkpointing=cuda, accum=1, foreach=True if cuda else None, layers=lay)
    if not cuda:
        measured = measure_cpu_step(preset, 3, "comprehension", micro, accum=1, model=model)
        peak, seconds = measured.peak_bytes, measured.seconds
        mfu_text = "MFU not measured on the CPU"
    else:
        params = _trainable(model, preset, 3, "comprehension")
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
        batch = _batch(model, "comprehension", micro, device)
        _train_step(model, params, optimizer, batch, "comprehension", True, device)
        torch.cuda.reset_peak_memory_stats()
        seconds = _timed(lambda: _train_step(model, params, optimizer, batch, "comprehension", True, device),
                         device, repeats)
        peak = torch.cuda.max_memory_allocated()
        tflops = _gpu_peak_tflops()
        flops = predicted.flops_fwd_bwd["comprehension"]
        mfu_text = (f"{flops / seconds / 1e12:,.1f} model TFLOP/s"
                    + (f" = MFU {flops / seconds / (tflops * 1e12):.3f} of {tflops:.0f}" if tflops else ""))
    shape = "tiny preset, fp32" if smoke else f"M3-shaped, {layers}/32 Phi-3-mini layers, bf16 + grad-ckpt"
    train = {"check": "training step (stage 3 comprehension)", "ok": True,
             "result": f"{shape}, micro-batch {micro}: {seconds * 1e3:,.0f} ms/step, {mfu_text}"}
    ratio = predicted.peak_bytes / peak
    memory = {"check": "peak memory: plan vs measured", "ok": 0.85 <= ratio <= 1.15,
              "result": f"predicted {predicted.peak_bytes / 2**30:.3f} GiB, measured {peak / 2**30:.3f} GiB "
                        f"({'torch.cuda.max_memory_allocated' if cuda else 'torch profiler'}): ratio {ratio:.3f}"}
    return train, memory, model


def check_generation(model: Any, device: str, smoke: bool) -> dict[str, Any]:
    model.eval()
    n_new = 8 if smoke else 128
    batch = _batch(model, "comprehension", 4, device)
    prompt_len = batch["input_ids"].shape[1] - 128  # the prompt: drop the answer positions
    ids, mask = batch["input_ids"][:, :prompt_len], batch["attention_mask"][:, :prompt_len]
    with torch.inference_mode(), _amp(device, device == "cuda"):
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, pixel_values=batch["pixel_values"], task="comprehension",
                             max_new_tokens=n_new, stop_token_ids=[-1])
        _sync(device)
        seconds = time.perf_counter() - t0
    tokens = out.shape[0] * out.shape[1]
    return {"check": "evaluation decoding", "ok": tokens > 0,
            "result": f"{tokens / seconds:,.1f} tokens/s (batch 4, {out.shape[1]} new tokens each, greedy, KV cache)"}


def _report(rows: list[dict[str, Any]], device: str, smoke: bool, args: Any) -> str:
    what = torch.cuda.get_device_name() if device == "cuda" else "CPU (--smoke)"
    lines = [f"# gpu_check: {what}", "",
             f"{dt.datetime.now().isoformat(timespec='seconds')} | torch {torch.__version__} | "
             f"layers {args.layers} | micro-batch {args.micro_batch}", "",
             "| check | ok | result |", "| --- | --- | --- |"]
    lines += [f"| {r['check']} | {'yes' if r['ok'] else 'NO'} | {r['result']} |" for r in rows]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU code paths")
    device = "cpu" if smoke else "cuda"
    repeats = 2 if smoke else args.repeats
    checks: list[Callable[[], Any]] = [
        lambda: check_bf16(device, smoke), lambda: check_checkpointing(device, smoke),
        lambda: check_fsdp(device, smoke), lambda: check_hlora_vs_lora(device, smoke, repeats),
        lambda: check_vq(device, smoke, repeats),
    ]
    rows = []
    for check in checks:
        rows.append(check())
    train, memory, model = check_training(device, smoke, args.layers, args.micro_batch, repeats)
    rows += [train, memory, check_generation(model, device, smoke)]
    return rows, _report(rows, device, smoke, args)


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (the test suite runs this)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the M3-shaped model (of 32)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="report path (default benchmarks/results/gpu-<date>.md)")
    args = parser.parse_args(argv)
    if args.smoke and args.micro_batch == 4:
        args.micro_batch = 2
    rows, text = run(args)
    out = args.out or RESULTS / f"gpu-{dt.date.today().isoformat()}{'-smoke' if args.smoke else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, "utf-8")
    print(text)
    print(f"wrote {out}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
