"""H-LoRA layer maths, variants, hard routing and injection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from healthgpt.model.hlora import (
    AdapterConfig,
    HLoRALinear,
    HLoRAPlugin,
    MoELoRAPlugin,
    hlora_layers,
    inject_hlora,
    set_active_task,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def _layer(d_in=12, d_out=10, r=8, k=4, alpha=16.0, variant="hlora", dtype=torch.float64) -> HLoRALinear:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out).to(dtype)
    cfgs = {"comprehension": AdapterConfig(r, alpha, k, variant=variant),
            "generation": AdapterConfig(2 * r, alpha, k, variant=variant)}
    layer = HLoRALinear(base, cfgs).to(dtype)
    _randomize(layer.plugins)
    return layer


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_hlora_equals_sum_over_experts(k: int) -> None:
    layer = _layer(r=8, k=k)
    plugin = layer.plugins["comprehension"]
    assert isinstance(plugin, HLoRAPlugin)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    got = layer(x)
    gate = torch.softmax(x @ plugin.lora_route.weight.T, dim=-1)
    rk = 8 // k
    scaling = 16.0 / 8 * k
    want = layer.base_layer(x)
    for i in range(k):
        a_i = plugin.lora_A.weight[i * rk:(i + 1) * rk]  # [r/k, d_in]
        b_i = plugin.lora_B.weight[:, i * rk:(i + 1) * rk]  # [d_out, r/k]
        want = want + gate[..., i:i + 1] * (x @ a_i.T @ b_i.T) * scaling
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # the documented repeat_interleave formula gives the same
    rep = gate.repeat_interleave(rk, dim=-1)
    formula = layer.base_layer(x) + ((rep * (x @ plugin.lora_A.weight.T)) * scaling) @ plugin.lora_B.weight.T
    torch.testing.assert_close(got, formula, rtol=1e-10, atol=1e-12)


def test_moelora_matches_hlora_with_same_weights() -> None:
    h = _layer(k=4)
    m = _layer(k=4, variant="moelora")
    hp, mp = h.plugins["comprehension"], m.plugins["comprehension"]
    assert isinstance(mp, MoELoRAPlugin)
    with torch.no_grad():
        m.base_layer.load_state_dict(h.base_layer.state_dict())
        mp.lora_route.weight.copy_(hp.lora_route.weight)
        for i, e in enumerate(mp.experts):
            e.lora_A.weight.copy_(hp.lora_A.weight[2 * i:2 * i + 2])
            e.lora_B.weight.copy_(hp.lora_B.weight[:, 2 * i:2 * i + 2])
    x = torch.randn(4, 12, dtype=torch.float64)
    torch.testing.assert_close(m(x), h(x), rtol=1e-10, atol=1e-12)


def _per_task_layer(variant: str) -> HLoRALinear:
    """A comprehension and a generation plugin (different ranks), built from seed 0 without dropout."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10).to(torch.float64)
    cfgs = {"comprehension": AdapterConfig(8, 16.0, 4, variant=variant),
            "generation": AdapterConfig(16, 32.0, 4, variant=variant)}
    return HLoRALinear(base, cfgs).to(torch.float64)


def _as_merged(plugin: MoELoRAPlugin | HLoRAPlugin, grad: bool = False) -> dict[str, torch.Tensor]:
    """A plugin's weights (or their gradients) in the merged H-LoRA layout."""
    def get(p: torch.Tensor) -> torch.Tensor:
        return p.grad if grad else p.detach()

    if isinstance(plugin, HLoRAPlugin):
        return {"A": get(plugin.lora_A.weight), "B": get(plugin.lora_B.weight), "route": get(plugin.lora_route.weight)}
    return {"A": torch.cat([get(e.lora_A.weight) for e in plugin.experts]),
            "B": torch.cat([get(e.lora_B.weight) for e in plugin.experts], dim=1),
            "route": get(plugin.lora_route.weight)}


def test_per_task_moelora_and_hlora_give_equal_outputs_and_gradients() -> None:
    """Per-task plugins from the same seed: MoELoRA's k looped experts and H-LoRA's merged pair start from the
    same weights and give the same outputs and the same gradients (to float64 rounding) for both tasks; the
    merge changes the speed only (the `expert-structure` experiment)."""
    h, m = _per_task_layer("hlora"), _per_task_layer("moelora")
    for task in ("comprehension", "generation"):
        hp, mp = h.plugins[task], m.plugins[task]
        assert isinstance(hp, HLoRAPlugin) and isinstance(mp, MoELoRAPlugin)
        for key, value in _as_merged(mp).items():  # the same initialisation from the same seed
            assert torch.equal(value, _as_merged(hp)[key]), (task, key)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B is zero at init: give it values so that every gradient is non-trivial
        for task in ("comprehension", "generation"):
            b = torch.randn(h.plugins[task].lora_B.weight.shape, generator=g, dtype=torch.float64) * 0.1
            h.plugins[task].lora_B.weight.copy_(b)
            m.plugins[task]._load_merged(h.plugins[task].lora_A.weight, b)
    for task in ("comprehension", "generation"):
        h.set_task(task)
        m.set_task(task)
        x = torch.randn(3, 5, 12, dtype=torch.float64, generator=g)
        xh, xm = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        target = torch.randn(3, 5, 10, dtype=torch.float64, generator=g)
        out_h, out_m = h(xh), m(xm)
        torch.testing.assert_close(out_m, out_h, rtol=1e-12, atol=1e-12)
        ((out_h - target) ** 2).sum().backward()
        ((out_m - target) ** 2).sum().backward()
        torch.testing.assert_close(xm.grad, xh.grad, rtol=1e-12, atol=1e-12)
        grads_h, grads_m = _as_merged(h.plugins[task], grad=True), _as_merged(m.plugins[task], grad=True)
        for key in ("A", "B", "route"):
            assert grads_h[key].abs().sum() > 0
            torch.testing.assert_close(grads_m[key], grads_h[key], rtol=1e-10, atol=1e-12)
    other = "generation"  # the inactive plugin of the last pass got nothing in either layer
    h.zero_grad(set_to_none=True)
    m.zero_grad(set_to_none=True)
    h.set_task("comprehension")
    m.set_task("comprehension")
    h(torch.randn(2, 12, dtype=torch.float64)).sum().backward()
    m(torch.randn(2, 12, dtype=torch.float64)).sum().backward()
    assert all(p.grad is None for p in h.plugins[other].parameters())
    assert all(p.grad is None for p in m.plugins[other].parameters())


def test_plain_lora_scaling() -> None:
    layer = _layer(variant="lora", alpha=4.0)
    p = layer.plugins["comprehension"]
    x = torch.randn(2, 12, dtype=torch.float64)
    want = layer.base_layer(x) + (x @ p.lora_A.weight.T @ p.lora_B.weight.T) * (4.0 / 8)
    torch.testing.assert_close(layer(x), want)


def test_fresh_plugin_is_identity_and_b_is_zero() -> None:
    torch.manual_seed(1)
    base = nn.Linear(12, 10)
    layer = HLoRALinear(base, {"comprehension": AdapterConfig(8, 16, 4), "generation": AdapterConfig(16, 32, 4)})
    x = torch.randn(7, 12)
    for task in ("comprehension", "generation", None):
        layer.set_task(task)
        assert torch.equal(layer(x), base(x))
    assert all(int(torch.count_nonzero(p.lora_B.weight.detach())) == 0 for p in layer.plugins.values())
    assert not base.weight.requires_grad


def test_only_active_plugin_computes_and_gets_grad() -> None:
    layer = _layer()
    layer.requires_grad_(True)
    layer.base_layer.requires_grad_(False)
    calls = {"comprehension": 0, "generation": 0}
    for task, plugin in layer.plugins.items():
        plugin.register_forward_hook(lambda *_, t=task: calls.__setitem__(t, calls[t] + 1))
    layer.set_task("generation")
    layer(torch.randn(3, 12, dtype=torch.float64)).sum().backward()
    assert calls == {"comprehension": 0, "generation": 1}
    assert all(p.grad is None for p in layer.plugins["comprehension"].parameters())
    assert all(p.grad is not None for p in layer.plugins["generation"].parameters())
    with pytest.raises(KeyError):
        layer.set_task("segmentation")


def test_inject_wraps_every_linear_but_lm_head() -> None:
    model = nn.ModuleDict({
        "block": nn.ModuleDict({"q_proj": nn.Linear(8, 8), "mlp": nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8))}),
        "lm_head": nn.Linear(8, 20),
    })
    wrapped = inject_hlora(model, {"comprehension": AdapterConfig(4, 8, 2)})
    assert sorted(wrapped) == ["block.mlp.0", "block.mlp.1", "block.q_proj"]
    assert isinstance(model["lm_head"], nn.Linear)
    assert len(list(hlora_layers(model))) == 3
    # idempotent: a second pass wraps nothing
    assert inject_hlora(model, {"comprehension": AdapterConfig(4, 8, 2)}) == []
    set_active_task(model, None)
    assert all(layer.active_task is None for _, layer in hlora_layers(model))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="multiple"):
        AdapterConfig(r=10, alpha=20, experts=4)
    with pytest.raises(ValueError, match="variant"):
        AdapterConfig(r=8, alpha=16, variant="dora")  # type: ignore[arg-type]
    assert AdapterConfig(64, 128, 4).scaling == 8.0
    assert AdapterConfig(64, 128, 4, variant="lora").scaling == 2.0
