"""Closed-form memory and FLOPs of a training step: the cross-check printed beside the trace.

Derived for the model as this repository runs it (``healthgpt.model``), per token of a sample of
``s`` positions, ``n`` labelled positions, one decoder layer of width ``d``, query width
``dq = heads x head_dim``, KV width ``dkv = kv_heads x head_dim`` (grouped-query attention: K and V
are saved at ``dkv``), SwiGLU MLP width ``f``, H-LoRA rank ``r`` of the active plugin, compute bytes
``c`` (2 under bf16 autocast, 4 in fp32). What autograd keeps for the backward pass, per token and
layer:

* the two RMSNorms: their fp32 input, ``2 x 4d``;
* every wrapped linear's plugin input ``x``: under autocast each of ``lora_A`` and ``lora_route``
  saves its own bf16 cast of ``x`` (``2 x c x d_in``), in fp32 both share ``x`` (once per
  distinct input: the norm output, the attention output, the MLP product); the frozen base layer
  saves nothing (its weight needs no gradient). Inputs: ``d`` (qkv, or q/k/v), ``dq`` (o), ``d``
  (gate/up), ``f`` (down);
* per wrapped linear, the rank-``r`` path: ``A x`` (kept by the gate product), the gated product
  (kept by ``lora_B``), and the dropout mask when dropout > 0: ``r (2c + 1)``;
* attention (SDPA, flash-style: no ``s x s`` matrix kept): rotated Q (``dq``), rotated K
  (``dkv``), V (``dkv``; with Phi-3's fused ``qkv_proj`` V is a view of the whole qkv output,
  ``dq + 2 dkv``) and the output (``dq``), times ``c``;
* SwiGLU: the gate pre-activation, the up projection and the SiLU output, ``3 f c`` (Phi-3's
  ``gate_up_proj`` output holds gate and up in one storage).

The head computes logits only at labelled positions; ``log_softmax`` keeps its fp32 output
(``4 n V``) and the start of the backward pass adds two more ``4 n V`` (the loss gradient and the
``log_softmax`` input gradient). Gradient checkpointing keeps each layer's input (``c_res x d``)
and recomputes one layer at a time. Parameters: frozen at the preset's dtype, trainable in fp32
with fp32 gradients and two fp32 AdamW moments; foreach AdamW adds one trainable-sized temporary.

FLOPs (multiply-add = 2): forward ``2 x params`` per token for every linear, ``4 s dq`` per token
and layer for attention (the full ``s x s`` scores, torch's convention), the head on the ``n``
labelled positions, the frozen CLIP layers that run (23 for comprehension, 1 for generation) and
the adapter; backward ``1x`` forward for frozen layers (input gradient only), ``2x`` for trainable
ones (input and weight gradients), ``2x`` for attention; gradient checkpointing adds one more
decoder forward (hardware FLOPs, not model FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from healthgpt.training.plan.arch import PRESET_SHAPES, architecture, new_token_count
from healthgpt.training.plan.trace import KINDS, Workload

__all__ = ["Dims", "closed_form_flops", "closed_form_memory", "dims", "param_counts"]

LLAMA_STYLE = ("llama", "qwen2")  # separate q/k/v and gate/up projections


@dataclass(frozen=True)
class Dims:
    kind: str
    d: int
    layers: int
    dq: int
    dkv: int
    f: int
    vocab: int  # tokenizer rows kept by the split embedding
    tied: bool
    qkv_bias: bool
    dv: int  # CLIP
    vlayers: int
    vf: int
    patches: int
    patch: int
    comp_r: int
    gen_r: int | None
    experts: int


def dims(preset: str) -> Dims:
    shape = PRESET_SHAPES[preset]
    a, v = architecture(shape.llm), architecture(shape.vision)["config"]
    c = a["config"]
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return Dims(c["model_type"], c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"] * hd,
                c.get("num_key_value_heads", c["num_attention_heads"]) * hd, c["intermediate_size"],
                int(a["tokenizer_size"]), bool(c.get("tie_word_embeddings", False)), c["model_type"] == "qwen2",
                v["hidden_size"], v["num_hidden_layers"], v["intermediate_size"],
                (v["image_size"] // v["patch_size"]) ** 2, v["patch_size"], shape.comp[0],
                shape.gen[0] if shape.gen else None, shape.experts)


def _linears(m: Dims) -> list[tuple[int, int]]:
    """(d_in, d_out) of every wrapped linear of one decoder layer."""
    if m.kind in LLAMA_STYLE:
        return [(m.d, m.dq), (m.d, m.dkv), (m.d, m.dkv), (m.dq, m.d), (m.d, m.f), (m.d, m.f), (m.f, m.d)]
    return [(m.d, m.dq + 2 * m.dkv), (m.dq, m.d), (m.d, 2 * m.f), (m.f, m.d)]


def _plugin_params(m: Dims, r: int) -> int:
    return m.layers * sum(i * r + r * o + i * m.experts for i, o in _linears(m))


def param_counts(preset: str) -> dict[str, int]:
    """Parameters per ``HealthGPT.parameter_groups()`` name, by formula."""
    m = dims(preset)
    new = new_token_count()
    base_layer = sum(i * o for i, o in _linears(m)) + 2 * m.d + (m.dq + 2 * m.dkv if m.qkv_bias else 0)
    vision = (3 * m.patch ** 2 * m.dv + m.dv + (m.patches + 1) * m.dv + 4 * m.dv
              + m.vlayers * (4 * (m.dv * m.dv + m.dv) + 2 * m.dv * m.vf + m.vf + m.dv + 4 * m.dv))
    adapter = m.dv * m.d + m.d + m.d * m.d + m.d
    out = {"abstract_adapter": adapter, "concrete_adapter": adapter,
           "comprehension_plugin": _plugin_params(m, m.comp_r),
           "generation_plugin": _plugin_params(m, m.gen_r) if m.gen_r else 0,
           "word_embeddings": m.vocab * m.d, "lm_head": m.vocab * m.d,
           "new_token_rows": new * m.d * (1 if m.tied else 2), "vision_tower": vision,
           "llm_base": m.layers * base_layer + m.d}
    return out


def total_params(preset: str) -> int:
    counts = param_counts(preset)
    m = dims(preset)
    return sum(counts.values()) - (counts["lm_head"] if m.tied else 0)


def _lora_rank(m: Dims, task: str) -> int:
    return m.comp_r if task == "comprehension" or not m.gen_r else m.gen_r


def layer_bytes_per_token(m: Dims, task: str, c: int, dropout: bool) -> int:
    """Saved bytes per token of one decoder layer (module docstring)."""
    r = _lora_rank(m, task)
    n_lin = len(_linears(m))
    norms = 2 * 4 * m.d
    inputs = [m.d] * (3 if m.kind in LLAMA_STYLE else 1) + [m.dq] + [m.d] * (2 if m.kind in LLAMA_STYLE else 1) + [m.f]
    lora_inputs = 2 * c * sum(inputs) if c == 2 else 4 * (m.d + m.dq + m.d + m.f)
    rank = n_lin * r * (2 * c + (1 if dropout else 0))
    v_bytes = m.dkv if m.kind in LLAMA_STYLE else m.dq + 2 * m.dkv
    attention = c * (m.dq + m.dkv + v_bytes + m.dq)
    mlp = 3 * m.f * c
    return norms + lora_inputs + rank + attention + mlp


def closed_form_memory(preset: str, groups: tuple[str, ...], loads: list[Workload], micro_batch: int, *,
                       precision: str, gradient_checkpointing: bool, dropout: bool,
                       foreach: bool = True) -> dict[str, int]:
    """Peak bytes by kind (``trace.KINDS``) of one steady-state step (the worst task's micro-batch)."""
    m = dims(preset)
    counts = param_counts(preset)
    n_total = total_params(preset)
    n_train = sum(counts[g] for g in set(groups)) - (counts["lm_head"] if m.tied and "lm_head" in groups
                                                    and "word_embeddings" in groups else 0)
    c = 2 if precision == "bf16" else 4
    w_bytes = 2 if PRESET_SHAPES[preset].dtype.itemsize == 2 and precision == "bf16" else 4
    out = dict.fromkeys(KINDS, 0)
    out["frozen_weights"] = (n_total - n_train) * w_bytes
    out["trainable_weights"] = out["gradients"] = 4 * n_train
    out["optimizer_states"] = 8 * n_train
    best = (0, 0)
    V = m.vocab + new_token_count()
    for w in loads:
        b, s, n = micro_batch, w.seq_len, micro_batch * w.answer
        per_layer = b * s * layer_bytes_per_token(m, w.task, c, dropout)
        adapter = (b * m.patches * (c * m.dv + 2 * c * m.d)
                   if {"abstract_adapter", "concrete_adapter"} & set(groups) else 0)
        head_saved, head_grads = 4 * n * V, 8 * n * V
        if gradient_checkpointing:
            acts = m.layers * b * s * c * m.d + head_saved + adapter
            temps = max(head_grads, per_layer)
        else:
            acts, temps = m.layers * per_layer + head_saved + adapter, head_grads
        if acts + temps > sum(best):
            best = (acts, temps)
    out["activations"], out["temporaries"] = best
    if foreach and 4 * n_train > sum(best):  # the optimizer step's peak: one foreach temporary list
        out["activations"], out["temporaries"] = 0, 4 * n_train
    return out


def closed_form_flops(preset: str, groups: tuple[str, ...], w: Workload, micro_batch: int,
                      gradient_checkpointing: bool = False) -> dict[str, int]:
    """Model FLOPs (forward + backward) of one micro-batch of one task, and hardware FLOPs."""
    m = dims(preset)
    counts = param_counts(preset)
    b, s, n = micro_batch, w.seq_len, w.answer
    r = _lora_rank(m, w.task)
    base = sum(i * o for i, o in _linears(m))
    lora = sum(i * r + r * o + i * m.experts for i, o in _linears(m))
    plugin_trained = f"{w.task}_plugin" in groups or (w.task == "generation" and m.gen_r is None)
    attn = 4 * s * m.dq  # per token per layer, forward
    layer_fwd = s * (2 * (base + lora) + attn)
    layer_bwd = s * (2 * base + (4 if plugin_trained else 2) * lora + 2 * attn)
    V = m.vocab + new_token_count()
    head_fwd = 2 * n * m.d * V
    head_trained = n * m.d * ((m.vocab if "lm_head" in groups else 0) + (
        new_token_count() if "new_token_rows" in groups else 0))
    head_bwd = head_fwd + 2 * head_trained
    depth = m.vlayers - 1 if w.task == "comprehension" else 1  # hidden state -2 / 1
    tokens_v = m.patches + 1
    clip = (2 * m.patches * 3 * m.patch ** 2 * m.dv
            + depth * (tokens_v * 2 * (4 * m.dv * m.dv + 2 * m.dv * m.vf) + 4 * tokens_v * tokens_v * m.dv))
    adapter_fwd = 2 * m.patches * counts["abstract_adapter"]
    adapter_name = "abstract_adapter" if w.task == "comprehension" else "concrete_adapter"
    adapter_bwd = adapter_fwd if adapter_name in groups else 0
    model = b * (m.layers * (layer_fwd + layer_bwd) + head_fwd + head_bwd + clip + adapter_fwd + adapter_bwd)
    hardware = model + (b * m.layers * layer_fwd if gradient_checkpointing else 0)
    return {"model": model, "hardware": hardware}


def describe(preset: str) -> dict[str, Any]:
    m = dims(preset)
    return {"llm": PRESET_SHAPES[preset].llm, "vision": PRESET_SHAPES[preset].vision, "d": m.d,
            "layers": m.layers, "dq": m.dq, "dkv": m.dkv, "ffn": m.f, "vocab": m.vocab}
