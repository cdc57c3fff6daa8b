"""H-LoRA overhead: forward+backward time of one adapted linear layer, measured side by side.

At the HealthGPT-M3 layer width (3072 -> 3072), total rank r in {64, 256}, experts k in
{2, 4, 8, 32}, it times (frozen base weight; the input requires grad, as inside a model):

* ``lora``     plain LoRA of total rank r (ours, ``variant="lora"``)
* ``peft``     peft's real ``peft.tuners.lora.Linear`` (a ``LoraLayer``) of rank r
* ``hlora``    H-LoRA, k experts merged into one A/B plus the router
* ``moelora``  MoELoRA, k separate experts looped in Python plus the router

Every repeat runs all layers once, in a rotating order, so that machine noise (shared cores) hits
them alike; the printed numbers are medians. Ratios: H-LoRA / LoRA, MoELoRA / LoRA, H-LoRA / peft.
``--adapter-only`` also times the adapter branch alone (no base matmul), the strictest view.

Targets (issue 5): H-LoRA <= 1.10x LoRA at every k and no slower than peft's LoRA. The paper
reports 1.00x for H-LoRA, 1.49x (k=4) and 5.81x (k=32) for MoELoRA.

Example::

    python benchmarks/hlora_overhead.py --tokens 512 --repeats 15 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from healthgpt.model.hlora import AdapterConfig, HLoRALinear


def _peft_layer(base: nn.Linear, r: int, alpha: float) -> nn.Module:
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear
    from peft.tuners.lora import LoraLayer

    layer = PeftLinear(base, "default", LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0), r=r,
                       lora_alpha=alpha, lora_dropout=0.0)
    assert isinstance(layer, LoraLayer)
    return layer


def _ours(base: nn.Linear, r: int, alpha: float, k: int, variant: str) -> nn.Module:
    layer = HLoRALinear(base, {"comprehension": AdapterConfig(r, alpha, k, 0.0, variant)})  # type: ignore[arg-type]
    with torch.no_grad():  # non-zero B, as after some training (no effect on speed)
        for p in layer.plugins.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.01)
    return layer


def _step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        layer(x).backward(g)

    return run


def _adapter_step(layer: HLoRALinear, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    plugin = layer.plugins["comprehension"]

    def run() -> None:
        for p in plugin.parameters():
            p.grad = None
        x.grad = None
        plugin(x).backward(g)

    return run


def _peft_adapter_step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    s = layer.scaling["default"]

    def run() -> None:
        for p in (a.weight, b.weight):
            p.grad = None
        x.grad = None
        (b(a(x)) * s).backward(g)

    return run


def measure(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, float]:
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=3072)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per forward (batch x sequence)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8, 32])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--adapter-only", action="store_true", help="also time the adapter branch alone")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    d = args.width
    print(f"# H-LoRA overhead: width {d}, {args.tokens} tokens, {args.dtype}, {args.device}, "
          f"threads {torch.get_num_threads()}, medians of {args.repeats} side-by-side repeats")
    header = (f"{'r':>4} {'k':>3} {'lora ms':>9} {'peft ms':>9} {'hlora ms':>9} {'moe ms':>9} "
              f"{'H/LoRA':>7} {'MoE/LoRA':>9} {'H/peft':>7}")
    rows = []
    for r in args.ranks:
        alpha = 2.0 * r
        base = nn.Linear(d, d, bias=False).to(dev, dtype).requires_grad_(False)
        x = torch.randn(args.tokens, d, device=dev, dtype=dtype, requires_grad=True)
        # a dense upstream gradient, as inside a model (``.sum().backward()`` would hand the layers
        # a stride-0 gradient and time its copy instead)
        g = torch.randn(args.tokens, d, device=dev, dtype=dtype)
        layers: dict[str, nn.Module] = {
            "lora": _ours(base, r, alpha, 1, "lora"),
            "peft": _peft_layer(base, r, alpha),
        }
        for k in args.experts:
            layers[f"hlora{k}"] = _ours(base, r, alpha, k, "hlora")
            layers[f"moelora{k}"] = _ours(base, r, alpha, k, "moelora")
        for m in layers.values():
            m.to(dev, dtype)
        fns = {n: _step(m, x, g) for n, m in layers.items()}
        if args.adapter_only:
            for n, m in layers.items():
                fns[f"A:{n}"] = _peft_adapter_step(m, x, g) if n == "peft" else _adapter_step(m, x, g)
        med = measure(fns, args.repeats)
        for view, prefix in [("layer (frozen base + adapter)", "")] + (
                [("adapter branch only", "A:")] if args.adapter_only else []):
            print(f"\n## {view}, r={r}\n{header}")
            lo, pe = med[f"{prefix}lora"], med[f"{prefix}peft"]
            for k in args.experts:
                h, mo = med[f"{prefix}hlora{k}"], med[f"{prefix}moelora{k}"]
                rows.append((view, r, k, h / lo, mo / lo, h / pe))
                print(f"{r:>4} {k:>3} {lo * 1e3:9.2f} {pe * 1e3:9.2f} {h * 1e3:9.2f} {mo * 1e3:9.2f} "
                      f"{h / lo:7.3f} {mo / lo:9.3f} {h / pe:7.3f}")
    layer_rows = [row for row in rows if row[0].startswith("layer")]
    worst = max(row[3] for row in layer_rows)
    worst_peft = max(row[5] for row in layer_rows)
    print(f"\nworst H-LoRA/LoRA (layer): {worst:.3f} (target <= 1.10); worst H-LoRA/peft: {worst_peft:.3f} "
          f"(target <= 1.00 within noise)")


if __name__ == "__main__":
    main()
