"""The HealthGPT model: a causal LM with H-LoRA plugins, hierarchical visual perception and the
unified (text + VQ image token) vocabulary.

Construction (``HealthGPT.from_parts``, used by ``healthgpt.model.presets.build_model``):

1. the tokenizer gets ``<start_index>``, ``<idx_0>``…``<idx_8191>``, ``<end_index>``,
   ``<pixel_newline>`` (ids ``len(tokenizer)`` onwards; old ids unchanged);
2. the input embedding and ``lm_head`` become **split** tables (``SplitEmbedding``,
   ``SplitLMHead``): ``old`` = the first ``len(tokenizer)`` rows of the base model (like the
   released ``resize_token_embeddings(len(tokenizer))``, padding rows beyond the tokenizer are
   dropped) and ``new`` = 8195 rows initialised to the mean of the old rows. Chosen over a
   gradient-mask hook so that stage 1 can train the new rows alone (``new_token_rows``) with an
   exact optimizer state and no wasted gradient memory; a tied base model (SmolLM2) stays tied
   (the head's ``old``/``new`` are the embedding's parameters);
3. every ``nn.Linear`` of the decoder is wrapped in ``HLoRALinear`` (``lm_head`` excluded);
4. a CLIP tower with two ``mlp2x_gelu`` adapters is attached (``healthgpt.model.vision``).

Hard task routing: ``set_task(task)`` (or ``forward(..., task=...)``) selects both the visual
feature level/adapter and the H-LoRA plugin; only the active plugin computes.

Public API (trainer / evaluator)::

    model.forward(input_ids, attention_mask, labels=None, pixel_values=None, task=None,
                  return_logits=True) -> HealthGPTOutput(loss, logits)
    model.set_task("comprehension" | "generation" | None)      # None: adapters off
    model.generate(input_ids, attention_mask=None, pixel_values=None, task=None,
                   max_new_tokens=256, stop_token_ids=None, logits_hook=None, streamer=None)
        -> LongTensor [B, n_new]   (greedy, KV cache; finished rows are padded with their stop id)
    model.generate_image_tokens(input_ids, pixel_values=None, constrained=False, ...)
        -> (codes int64 [B, 1024], list[ImageTokenReport])
    model.parameter_groups() -> dict[str, list[Parameter]]
    model.set_trainable(*group_names) -> list[Parameter]       # freezes everything else
    model.collate(batch_of_encoded, pad_to=None) -> dict(input_ids, attention_mask, labels)
    parse_image_tokens(ids, vocab) -> (codes [1024], ImageTokenReport)

``input_ids`` may contain ``IMAGE_TOKEN_ID`` (-200) placeholders; ``pixel_values`` then holds one
pre-processed image per placeholder, in batch order (``model.vision.preprocess(images)``). Each
placeholder becomes ``vision.num_patches`` feature positions (labels -100 there).

``parameter_groups()`` names: ``abstract_adapter``, ``concrete_adapter``, ``comprehension_plugin``,
``generation_plugin``, ``word_embeddings`` (old input rows), ``lm_head`` (old output rows; the same
tensor as ``word_embeddings`` when the base model ties them), ``new_token_rows`` (the 8195 new
input rows and, when untied, the 8195 new output rows), ``vision_tower`` and ``llm_base`` (frozen
backbone weights). Training "word embeddings and lm_head" in full = the union of
``word_embeddings``, ``lm_head`` and ``new_token_rows``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from healthgpt.model.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    NUM_VQ_CODES,
    TOKENS_PER_IMAGE,
    VocabIds,
    extend_tokenizer,
    stop_token_ids,
)
from healthgpt.model.hlora import TASKS, AdapterConfig, HLoRALinear, hlora_layers, inject_hlora, set_active_task
from healthgpt.model.vision import HierarchicalVision

__all__ = [
    "GROUP_NAMES",
    "HealthGPT",
    "HealthGPTOutput",
    "ImageTokenReport",
    "SplitEmbedding",
    "SplitLMHead",
    "parse_image_tokens",
]

log = logging.getLogger(__name__)

GROUP_NAMES = (
    "abstract_adapter",
    "concrete_adapter",
    "comprehension_plugin",
    "generation_plugin",
    "word_embeddings",
    "lm_head",
    "new_token_rows",
    "vision_tower",
    "llm_base",
)


class SplitEmbedding(nn.Module):
    """Embedding over ``cat([old, new])`` without materialising the concatenation."""

    def __init__(self, old: nn.Parameter, new: nn.Parameter) -> None:
        super().__init__()
        self.old = old
        self.new = new

    @property
    def num_embeddings(self) -> int:
        return self.old.shape[0] + self.new.shape[0]

    @property
    def weight(self) -> torch.Tensor:  # read-only full view, for code that inspects .weight
        return torch.cat([self.old, self.new], 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n_old = self.old.shape[0]
        out = F.embedding(ids.clamp(0, n_old - 1), self.old)
        is_new = ids >= n_old
        if bool(is_new.any()):
            new = F.embedding((ids - n_old).clamp(0, self.new.shape[0] - 1), self.new)
            out = torch.where(is_new.unsqueeze(-1), new.to(out.dtype), out)
        return out


class SplitLMHead(nn.Module):
    """``lm_head`` over ``cat([old, new])`` rows: logits ``[..., n_old + n_new]``."""

    def __init__(self, old: nn.Parameter, new: nn.Parameter) -> None:
        super().__init__()
        self.old = old
        self.new = new

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.old, self.new], 0)

    def forward(self, h: torch.Tensor, new_rows: Sequence[slice] | None = None) -> torch.Tensor:
        """Logits over the old rows and the new rows (or only the ``new_rows`` slices of them, in order)."""
        # the two tables may differ in dtype (fp32 trainable rows next to a bf16 frozen table)
        a = F.linear(h.to(self.old.dtype), self.old)
        new = self.new if new_rows is None else torch.cat([self.new[r] for r in new_rows], 0)
        b = F.linear(h.to(new.dtype), new)
        dtype = torch.promote_types(a.dtype, b.dtype)
        return torch.cat([a.to(dtype), b.to(dtype)], dim=-1)


@dataclass
class HealthGPTOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None
    labels: torch.Tensor | None = None  # labels aligned with logits (after image expansion)
    attention_mask: torch.Tensor | None = None


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


def parse_image_tokens(ids: Iterable[int], vocab: VocabIds, n_codes: int = NUM_VQ_CODES
                       ) -> tuple[np.ndarray, ImageTokenReport]:
    """Turn a generated id sequence into 1024 VQ codes; never raises on malformed input.

    Rules: everything up to the first ``<end_index>`` is read (all of it if there is none);
    ``<start_index>`` and ``<pixel_newline>`` are skipped; other non-index tokens are dropped and
    counted; more than 1024 codes are truncated; fewer are padded by repeating the last code (code
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
    if len(codes) > TOKENS_PER_IMAGE:
        rep.truncated = len(codes) - TOKENS_PER_IMAGE
        codes = codes[:TOKENS_PER_IMAGE]
        rep.notes.append(f"truncated {rep.truncated} extra codes")
    elif len(codes) < TOKENS_PER_IMAGE:
        rep.padded = TOKENS_PER_IMAGE - len(codes)
        fill = codes[-1] if codes else 0
        codes = codes + [fill] * rep.padded
        rep.notes.append(f"padded {rep.padded} missing codes with code {fill}")
    return np.asarray(codes, dtype=np.int64), rep


class HealthGPT(nn.Module):
    """See the module docstring."""

    def __init__(
        self,
        llm: nn.Module,
        vision: HierarchicalVision,
        tokenizer: Any,
        *,
        vocab: VocabIds,
        template: str,
        adapters: Mapping[str, AdapterConfig],
        preset: str = "custom",
    ) -> None:
        super().__init__()
        self.llm = llm
        self.vision = vision
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.template = template
        self.adapters = dict(adapters)
        self.preset = preset
        self.active_task: str | None = "comprehension"
        self.set_task("comprehension")

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_parts(
        cls,
        llm: nn.Module,
        tokenizer: Any,
        vision_tower: nn.Module,
        image_processor: Any,
        *,
        adapters: Mapping[str, AdapterConfig],
        template: str,
        preset: str = "custom",
        feature_levels: Mapping[str, str] | None = None,
    ) -> HealthGPT:
        """Extend the vocabulary, split embeddings, inject H-LoRA, attach vision (see module doc).
        ``feature_levels`` overrides the visual feature level per task (``healthgpt.model.vision``)."""
        n_old = len(tokenizer)
        vocab = extend_tokenizer(tokenizer)
        if vocab.first_new != n_old:
            n_old = vocab.first_new  # tokenizer was already extended
        emb = llm.get_input_embeddings()
        head = llm.get_output_embeddings()
        if emb.weight.shape[0] < n_old:
            raise ValueError(f"the LLM has {emb.weight.shape[0]} embedding rows but the tokenizer "
                             f"{n_old} tokens")
        tied = head is not None and head.weight is emb.weight
        with torch.no_grad():
            old_in = nn.Parameter(emb.weight[:n_old].detach().clone(), requires_grad=False)
            new_in = nn.Parameter(old_in.mean(0, keepdim=True).repeat(vocab.num_new, 1), requires_grad=False)
            if tied or head is None:
                old_out, new_out = old_in, new_in
            else:
                old_out = nn.Parameter(head.weight[:n_old].detach().clone(), requires_grad=False)
                new_out = nn.Parameter(old_out.mean(0, keepdim=True).repeat(vocab.num_new, 1),
                                       requires_grad=False)
        llm.set_input_embeddings(SplitEmbedding(old_in, new_in))
        llm.lm_head = SplitLMHead(old_out, new_out)
        llm.config.vocab_size = vocab.total
        llm.requires_grad_(False)
        decoder = _decoder(llm)
        wrapped = inject_hlora(decoder, adapters)
        if not wrapped:
            raise ValueError("no nn.Linear found in the LLM decoder to wrap with H-LoRA")
        vision = HierarchicalVision(vision_tower, image_processor, int(llm.config.hidden_size),
                                    dict(feature_levels or {}))
        model = cls(llm, vision, tokenizer, vocab=vocab, template=template, adapters=adapters, preset=preset)
        model.set_trainable()  # nothing trainable until the trainer says so
        return model

    # ---------------------------------------------------------------- routing

    def set_task(self, task: str | None) -> None:
        """Hard routing: pick the H-LoRA plugin (and, in forward, the visual features)."""
        if task is not None and task not in self.adapters:
            raise KeyError(f"no plugin for task {task!r}; have {sorted(self.adapters)}")
        self.active_task = task
        set_active_task(self.llm, task)

    @property
    def embed(self) -> SplitEmbedding:
        return self.llm.get_input_embeddings()

    @property
    def lm_head(self) -> SplitLMHead:
        return self.llm.lm_head

    @property
    def device(self) -> torch.device:
        return self.embed.old.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the frozen decoder weights: what its inputs must be in. Trainable tensors are
        kept in fp32 by the trainer (embedding rows too), so the embedding's own dtype is not it."""
        for _, layer in hlora_layers(self.llm):
            return layer.base_layer.weight.dtype
        return self.embed.old.dtype

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings in the decoder's dtype."""
        return self.embed(ids).to(self.compute_dtype)

    # ---------------------------------------------------------------- parameters

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = {name: [] for name in GROUP_NAMES}
        groups["abstract_adapter"] = list(self.vision.abstract_adapter.parameters())
        groups["concrete_adapter"] = list(self.vision.concrete_adapter.parameters())
        for _, layer in hlora_layers(self.llm):
            for task, plugin in layer.plugins.items():
                key = f"{task}_plugin"
                groups.setdefault(key, []).extend(plugin.parameters())
        groups["word_embeddings"] = [self.embed.old]
        groups["lm_head"] = [self.lm_head.old]
        groups["new_token_rows"] = _dedupe([self.embed.new, self.lm_head.new])
        groups["vision_tower"] = list(self.vision.tower.parameters())
        named = {id(p) for ps in groups.values() for p in ps}
        groups["llm_base"] = [p for p in self.llm.parameters() if id(p) not in named]
        return groups

    def set_trainable(self, *names: str) -> list[nn.Parameter]:
        """Freeze everything, then unfreeze the named groups; returns their (deduplicated) params."""
        groups = self.parameter_groups()
        unknown = [n for n in names if n not in groups]
        if unknown:
            raise KeyError(f"unknown parameter group(s) {unknown}; have {sorted(groups)}")
        self.requires_grad_(False)
        params = _dedupe(p for n in names for p in groups[n])
        for p in params:
            p.requires_grad_(True)
        return params

    # ---------------------------------------------------------------- inputs

    def collate(self, batch: Sequence[Mapping[str, Any]], pad_to: int | None = None) -> dict[str, torch.Tensor]:
        """Right-pad encoded samples (``encode_conversation`` outputs) into a batch."""
        pad = self.pad_token_id
        n = max(len(b["input_ids"]) for b in batch) if pad_to is None else pad_to
        ids = torch.full((len(batch), n), pad, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            t = len(b["input_ids"])
            ids[i, :t] = torch.as_tensor(b["input_ids"])
            if "labels" in b:
                labels[i, :t] = torch.as_tensor(b["labels"])
            mask[i, :t] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.tokenizer, "eos_token_id", None)
        return int(pad) if pad is not None else 0

    def embed_multimodal(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        task: str,
        pad_side: str = "right",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Embed tokens and splice image features at ``IMAGE_TOKEN_ID`` positions.

        Returns ``(inputs_embeds, attention_mask, labels, position_ids)``, re-padded on ``pad_side``.
        """
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        is_image = input_ids == IMAGE_TOKEN_ID
        n_placeholders = int(is_image.sum())
        already_packed = pad_side == "right" or bool(attention_mask[:, -1].all())
        if n_placeholders == 0 and already_packed:
            embeds = self.embed_tokens(input_ids)
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            return embeds, attention_mask, labels, pos
        text_embeds = self.embed_tokens(input_ids.masked_fill(is_image, 0))
        feats = text_embeds.new_zeros((0, 0, text_embeds.shape[-1]))
        if n_placeholders:
            if pixel_values is None:
                raise ValueError(f"input_ids hold {n_placeholders} <image> placeholder(s) but no pixel_values")
            if pixel_values.shape[0] != n_placeholders:
                raise ValueError(f"{n_placeholders} <image> placeholders but {pixel_values.shape[0]} images")
            feats = self.vision.features(pixel_values.to(self.device), task).to(text_embeds.dtype)  # [N, P, d]
        seqs: list[torch.Tensor] = []
        seq_labels: list[torch.Tensor] = []
        image_i = 0
        n_patches = feats.shape[1]
        for b in range(input_ids.shape[0]):
            keep = attention_mask[b].bool()
            ids_b = input_ids[b][keep]
            emb_b = text_embeds[b][keep]
            lab_b = labels[b].to(self.device)[keep] if labels is not None else None
            parts: list[torch.Tensor] = []
            lparts: list[torch.Tensor] = []
            cuts = torch.nonzero(ids_b == IMAGE_TOKEN_ID).flatten().tolist()
            prev = 0
            for c in cuts:
                parts.append(emb_b[prev:c])
                parts.append(feats[image_i])
                if lab_b is not None:
                    lparts.append(lab_b[prev:c])
                    lparts.append(torch.full((n_patches,), IGNORE_INDEX, dtype=lab_b.dtype, device=self.device))
                image_i += 1
                prev = c + 1
            parts.append(emb_b[prev:])
            seqs.append(torch.cat(parts, 0))
            if lab_b is not None:
                lparts.append(lab_b[prev:])
                seq_labels.append(torch.cat(lparts, 0))
        n = max(s.shape[0] for s in seqs)
        d = text_embeds.shape[-1]
        out = text_embeds.new_zeros((len(seqs), n, d))
        mask = torch.zeros((len(seqs), n), dtype=attention_mask.dtype, device=self.device)
        out_labels = (torch.full((len(seqs), n), IGNORE_INDEX, dtype=torch.long, device=self.device)
                      if labels is not None else None)
        for b, s in enumerate(seqs):
            t = s.shape[0]
            sl = slice(0, t) if pad_side == "right" else slice(n - t, n)
            out[b, sl] = s
            mask[b, sl] = 1
            if out_labels is not None:
                out_labels[b, sl] = seq_labels[b]
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return out, mask, out_labels, pos

    # ---------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        task: str | None = None,
        return_logits: bool = True,
        n_codes: int | None = None,
    ) -> HealthGPTOutput:
        """Causal-LM loss on ``labels`` != -100 (mean over those tokens).

        ``return_logits=False`` computes the head only at labelled positions (saves the
        ``[B, T, V]`` logits tensor; ``logits`` is then None).

        ``n_codes``: the codebook size of the VQGAN the targets were
        tokenized with, when smaller than 8192. The loss's softmax then runs over the live vocabulary
        only (the text rows, ``<start_index>``, ``<idx_0>``..``<idx_{n_codes-1}>``, ``<end_index>``,
        ``<pixel_newline>``), as constrained decoding samples from it; the 8192 - ``n_codes`` dead
        code rows are never computed (with a 256-code VQGAN that is ~3x less work per generation
        step on the tiny preset; with ``return_logits=True`` the full logits are returned with those rows
        at -inf). A label beyond the codebook raises ``ValueError``. The dead rows get no gradient and
        keep their initial values: decode such a model with the constraint (``eval --constrained-images``).
        """
        task = task or self.active_task or "comprehension"
        if task != self.active_task:
            self.set_task(task)
        embeds, mask, labels, pos = self.embed_multimodal(input_ids, attention_mask, labels, pixel_values, task)
        hidden = _decoder(self.llm)(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                    use_cache=False).last_hidden_state
        loss = None
        logits = None
        live = None
        if n_codes is not None and labels is not None and n_codes < NUM_VQ_CODES:
            live = self._live_vocabulary(int(n_codes))
        if labels is not None:
            shift_labels = labels[:, 1:]
            sel = shift_labels != IGNORE_INDEX
            targets = shift_labels[sel]
            if live is not None:
                rows, to_live = live
                live_targets = to_live(targets)  # a code beyond the codebook: ValueError
            if return_logits:
                logits = self.lm_head(hidden)
                if live is not None:  # the same masked softmax, the full logits kept
                    logits[..., self.vocab.idx_0 + int(n_codes):self.vocab.end_index] = float("-inf")
                sel_logits = logits[:, :-1][sel]
            elif live is not None:  # the dead code rows are never computed
                sel_logits, targets = self.lm_head(hidden[:, :-1][sel], new_rows=rows), live_targets
            else:
                sel_logits = self.lm_head(hidden[:, :-1][sel])
            if sel_logits.shape[0] == 0:
                loss = hidden.sum() * 0.0
            else:
                loss = F.cross_entropy(sel_logits.float(), targets)
        elif return_logits:
            logits = self.lm_head(hidden)
        return HealthGPTOutput(loss=loss, logits=logits, labels=labels, attention_mask=mask)

    def _live_vocabulary(self, n_codes: int) -> tuple[list[slice], Callable[[torch.Tensor], torch.Tensor]]:
        """New-row slices of a ``n_codes`` codebook and the map from full-vocabulary labels to live indices."""
        if not 1 <= n_codes <= NUM_VQ_CODES:
            raise ValueError(f"n_codes must be in [1, {NUM_VQ_CODES}], got {n_codes}")
        v = self.vocab
        first, idx0, end = v.first_new, v.idx_0, v.end_index
        rows = [slice(0, idx0 - first + n_codes), slice(end - first, v.total - first)]
        dead_lo, dead_hi = idx0 + n_codes, end  # label ids of the codes beyond the codebook

        def target(labels: torch.Tensor) -> torch.Tensor:
            dead = (labels >= dead_lo) & (labels < dead_hi)
            if bool(dead.any()):
                code = int(labels[dead][0]) - idx0
                raise ValueError(f"a target image code ({code}) is beyond the {n_codes}-code codebook given as "
                                 f"n_codes (--image-codes): the shards were tokenized with a larger VQGAN")
            return torch.where(labels >= dead_hi, labels - (dead_hi - dead_lo), labels)

        return rows, target

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(
        self,
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
        task = task or self.active_task or "comprehension"
        if task != self.active_task:
            self.set_task(task)
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        stops = list(stop_token_ids) if stop_token_ids is not None else stop_token_ids_for(self)
        embeds, mask, _, pos = self.embed_multimodal(input_ids, attention_mask, None, pixel_values, task,
                                                     pad_side="left")
        decoder = _decoder(self.llm)
        bsz = embeds.shape[0]
        out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True)
        cache = out.past_key_values
        logits = self.lm_head(out.last_hidden_state[:, -1])
        next_pos = pos[:, -1:] + 1
        stop_t = torch.tensor(stops, dtype=torch.long, device=self.device) if stops else None
        finished = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        fill = torch.zeros(bsz, dtype=torch.long, device=self.device)
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
            out = decoder(inputs_embeds=self.embed_tokens(token[:, None]), attention_mask=mask,
                          position_ids=next_pos, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = self.lm_head(out.last_hidden_state[:, -1])
            next_pos = next_pos + 1
        if not generated:
            return torch.zeros((bsz, 0), dtype=torch.long, device=self.device)
        return torch.stack(generated, dim=1)

    def image_logits_hook(self, n_codes: int = NUM_VQ_CODES) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """Constrain decoding to 1024 ``<idx_*>`` tokens (the first ``n_codes``) followed by ``<end_index>``."""
        lo, hi, end = self.vocab.idx_0, self.vocab.idx_0 + min(n_codes, NUM_VQ_CODES), self.vocab.end_index

        def hook(step: int, logits: torch.Tensor) -> torch.Tensor:
            masked = torch.full_like(logits, float("-inf"))
            if step < TOKENS_PER_IMAGE:
                masked[:, lo:hi] = logits[:, lo:hi]
            else:
                masked[:, end] = 0.0
            return masked

        return hook

    @torch.no_grad()
    def generate_image_tokens(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        *,
        constrained: bool = False,
        max_new_tokens: int = TOKENS_PER_IMAGE + 40,
        streamer: Callable[[torch.Tensor], None] | None = None,
        n_codes: int = NUM_VQ_CODES,
    ) -> tuple[np.ndarray, list[ImageTokenReport]]:
        """Generate image tokens (prompt should end with ``<start_index>``, see ``encode_prompt``)
        and parse/repair them into codes ``[B, 1024]``. ``constrained`` masks the logits so that the
        output is always well formed; the default is free decoding like the released code.
        ``n_codes`` is the VQGAN's codebook size (codes beyond it cannot be decoded)."""
        stops = [self.vocab.end_index] + stop_token_ids_for(self)
        ids = self.generate(
            input_ids, attention_mask, pixel_values, task="generation",
            max_new_tokens=TOKENS_PER_IMAGE + 1 if constrained else max_new_tokens,
            stop_token_ids=stops, logits_hook=self.image_logits_hook(n_codes) if constrained else None,
            streamer=streamer,
        )
        codes, reports = [], []
        for row in ids.tolist():
            c, r = parse_image_tokens(row, self.vocab, n_codes)
            codes.append(c)
            reports.append(r)
        return np.stack(codes), reports


def stop_token_ids_for(model: HealthGPT) -> list[int]:
    return stop_token_ids(model.tokenizer, model.template)


def _decoder(llm: nn.Module) -> nn.Module:
    if hasattr(llm, "model") and isinstance(llm.model, nn.Module):
        return llm.model
    return llm.get_decoder()


def _dedupe(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def hlora_modules(model: HealthGPT) -> list[tuple[str, HLoRALinear]]:
    return list(hlora_layers(model.llm))


__all__ += ["TASKS", "hlora_modules", "stop_token_ids_for"]
