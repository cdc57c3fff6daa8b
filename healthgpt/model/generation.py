"""Decoding with a ``HealthGPT``: text and VQ image tokens.

``generate(model, input_ids, ...)`` is greedy decoding with a KV cache (``HealthGPT.generate``);
``image_logits_hook(model, n_codes)`` constrains it to ``model.image_tokens`` (1024) ``<idx_*>`` tokens and ``<end_index>``;
``generate_image_tokens(model, ...)`` decodes image tokens and repairs them into 1024 codes
(``parse_image_tokens``, reported per row as an ``ImageTokenReport``). ``stop_token_ids_for(model)``
is the template's stop tokens and EOS; ``decoder_of(llm)`` the decoder stack under the LM head.
The ``HealthGPT`` methods of the same names are these functions.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from healthgpt.model.conversation import NUM_VQ_CODES, TOKENS_PER_IMAGE, VocabIds, stop_token_ids

__all__ = ["ImageTokenReport", "decoder_of", "generate", "generate_image_tokens", "image_logits_hook",
           "parse_image_tokens", "stop_token_ids_for"]


@dataclass
class ImageTokenReport:
    """What ``parse_image_tokens`` found and repaired in one generated sequence."""

    n_index_tokens: int = 0
    n_other_tokens: int = 0
    had_end: bool = False
    padded: int = 0
    truncated: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.had_end and self.padded == 0 and self.truncated == 0 and self.n_other_tokens == 0


def parse_image_tokens(ids: Iterable[int], vocab: VocabIds, n_codes: int = NUM_VQ_CODES,
                       n_tokens: int = TOKENS_PER_IMAGE
                       ) -> tuple[np.ndarray, ImageTokenReport]:
    """Turn a generated id sequence into ``n_tokens`` VQ codes (1024: the paper's 32x32 grid); never raises
    on malformed input.

    Rules: everything up to the first ``<end_index>`` is read (all of it if there is none);
    ``<start_index>`` and ``<pixel_newline>`` are skipped; other non-index tokens are dropped and
    counted; more than ``n_tokens`` codes are truncated; fewer are padded by repeating the last code (code
    0 if none was produced). Index tokens at or beyond ``n_codes`` (a VQGAN with a smaller codebook
    than the vocabulary's 8192 rows) are dropped like other tokens. The report says what happened
    (``report.ok`` when nothing did).
    """
    rep = ImageTokenReport()
    codes: list[int] = []
    for raw in ids:
        t = int(raw)
        if t == vocab.end_index:
            rep.had_end = True
            break
        if t in (vocab.start_index, vocab.pixel_newline):
            continue
        if vocab.is_index(t) and t - vocab.idx_0 < n_codes:
            codes.append(t - vocab.idx_0)
        else:
            rep.n_other_tokens += 1
    rep.n_index_tokens = len(codes)
    if not rep.had_end:
        rep.notes.append("no <end_index>")
    if rep.n_other_tokens:
        rep.notes.append(f"dropped {rep.n_other_tokens} non-index tokens")
    if len(codes) > n_tokens:
        rep.truncated = len(codes) - n_tokens
        codes = codes[:n_tokens]
        rep.notes.append(f"truncated {rep.truncated} extra codes")
    elif len(codes) < n_tokens:
        rep.padded = n_tokens - len(codes)
        fill = codes[-1] if codes else 0
        codes = codes + [fill] * rep.padded
        rep.notes.append(f"padded {rep.padded} missing codes with code {fill}")
    return np.asarray(codes, dtype=np.int64), rep


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    task: str | None = None,
    max_new_tokens: int = 256,
    stop_token_ids: Sequence[int] | None = None,
    logits_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    streamer: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Greedy decoding with a KV cache. Returns only the new tokens ``[B, n]``.

    Prompts may be right- or left-padded (``attention_mask``); they are re-packed left-padded.
    ``logits_hook(step, logits[B, V]) -> logits`` can constrain decoding; ``streamer(ids[B])``
    is called after every step. A row stops at its first ``stop_token_ids`` token (default:
    the template's stop tokens and EOS) and is padded with that token afterwards.
    """
    task = task or model.active_task or "comprehension"
    if task != model.active_task:
        model.set_task(task)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    stops = list(stop_token_ids) if stop_token_ids is not None else stop_token_ids_for(model)
    embeds, mask, _, pos = model.embed_multimodal(input_ids, attention_mask, None, pixel_values, task,
                                                 pad_side="left")
    decoder = decoder_of(model.llm)
    bsz = embeds.shape[0]
    out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True)
    cache_kw = _cache_keyword(decoder)
    cache = _cache_of(out)
    logits = model.lm_head(out.last_hidden_state[:, -1])
    next_pos = pos[:, -1:] + 1
    stop_t = torch.tensor(stops, dtype=torch.long, device=model.device) if stops else None
    finished = torch.zeros(bsz, dtype=torch.bool, device=model.device)
    fill = torch.zeros(bsz, dtype=torch.long, device=model.device)
    generated: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        if logits_hook is not None:
            logits = logits_hook(step, logits)
        token = logits.argmax(-1)
        token = torch.where(finished, fill, token)
        generated.append(token)
        if streamer is not None:
            streamer(token)
        if stop_t is not None:
            just = torch.isin(token, stop_t) & ~finished
            fill = torch.where(just, token, fill)
            finished |= just
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones((bsz, 1))], dim=1)
        out = decoder(inputs_embeds=model.embed_tokens(token[:, None]), attention_mask=mask,
                      position_ids=next_pos, use_cache=True, **{cache_kw: cache})
        cache = _cache_of(out)
        logits = model.lm_head(out.last_hidden_state[:, -1])
        next_pos = next_pos + 1
    if not generated:
        return torch.zeros((bsz, 0), dtype=torch.long, device=model.device)
    return torch.stack(generated, dim=1)

def image_logits_hook(model: nn.Module, n_codes: int = NUM_VQ_CODES,
                      n_tokens: int | None = None) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """Constrain decoding to ``n_tokens`` ``<idx_*>`` tokens (the first ``n_codes``) followed by ``<end_index>``;
    ``n_tokens`` defaults to the model's ``image_tokens`` (1024 unless its VQ grid is smaller)."""
    lo, hi, end = model.vocab.idx_0, model.vocab.idx_0 + min(n_codes, NUM_VQ_CODES), model.vocab.end_index
    n_tokens = int(n_tokens or getattr(model, "image_tokens", TOKENS_PER_IMAGE))

    def hook(step: int, logits: torch.Tensor) -> torch.Tensor:
        masked = torch.full_like(logits, float("-inf"))
        if step < n_tokens:
            masked[:, lo:hi] = logits[:, lo:hi]
        else:
            masked[:, end] = 0.0
        return masked

    return hook

@torch.no_grad()
def generate_image_tokens(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    *,
    constrained: bool = False,
    max_new_tokens: int | None = None,
    streamer: Callable[[torch.Tensor], None] | None = None,
    n_codes: int = NUM_VQ_CODES,
) -> tuple[np.ndarray, list[ImageTokenReport]]:
    """Generate image tokens (prompt should end with ``<start_index>``, see ``encode_prompt``)
    and parse/repair them into codes ``[B, model.image_tokens]`` (1024 = the paper's 32x32 grid; a smaller
    VQ grid sets the preset override ``image_tokens``). ``constrained`` masks the logits so that the
    output is always well formed; the default is free decoding like the released code (up to
    ``max_new_tokens``, default image tokens + 40). ``n_codes`` is the VQGAN's codebook size (codes
    beyond it cannot be decoded)."""
    n_tokens = int(getattr(model, "image_tokens", TOKENS_PER_IMAGE))
    stops = [model.vocab.end_index] + stop_token_ids_for(model)
    ids = model.generate(
        input_ids, attention_mask, pixel_values, task="generation",
        max_new_tokens=n_tokens + 1 if constrained else (max_new_tokens or n_tokens + 40),
        stop_token_ids=stops, logits_hook=model.image_logits_hook(n_codes, n_tokens) if constrained else None,
        streamer=streamer,
    )
    codes, reports = [], []
    for row in ids.tolist():
        c, r = parse_image_tokens(row, model.vocab, n_codes, n_tokens)
        codes.append(c)
        reports.append(r)
    return np.stack(codes), reports


def _cache_keyword(decoder: nn.Module) -> str:
    """The decoder's KV-cache argument: ``cache`` in transformers 5.2x (``past_key_values`` is deprecated
    there and warns on every call), ``past_key_values`` before."""
    params = inspect.signature(type(decoder).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def stop_token_ids_for(model: nn.Module) -> list[int]:
    return stop_token_ids(model.tokenizer, model.template)


def decoder_of(llm: nn.Module) -> nn.Module:
    if hasattr(llm, "model") and isinstance(llm.model, nn.Module):
        return llm.model
    return llm.get_decoder()
