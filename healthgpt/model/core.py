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
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from healthgpt.model import embedding, generation
from healthgpt.model.conversation import (
    IGNORE_INDEX,
    NUM_VQ_CODES,
    TOKENS_PER_IMAGE,
    VocabIds,
    extend_tokenizer,
)
from healthgpt.model.generation import ImageTokenReport, decoder_of, parse_image_tokens, stop_token_ids_for
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
        # VQ codes per generated image: 1024 (the paper's 32x32 grid); a smaller demo VQ grid sets it
        # (preset override ``image_tokens``)
        self.image_tokens = TOKENS_PER_IMAGE
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
        new_rows_noise: float = 0.0,
    ) -> HealthGPT:
        """Extend the vocabulary, split embeddings, inject H-LoRA, attach vision (see module doc).
        ``feature_levels`` overrides the visual feature level per task (``healthgpt.model.vision``).
        ``new_rows_noise``: the new rows start at the mean of the old rows (LLaVA's initialisation), plus
        this many times the old rows' per-dimension standard deviation of Gaussian noise (1.0 is close
        to transformers' ``mean_resizing``). Identical rows make every image code look alike at the
        start; a small model then learns to tell them apart slowly (a tiny model stayed at the
        unigram loss for 150 steps of an aligned-copy task with 0, and fell below it with 1)."""
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
            if new_rows_noise:
                for old, new in [(old_in, new_in)] + ([] if new_out is new_in else [(old_out, new_out)]):
                    new.add_(float(new_rows_noise) * old.std(0, keepdim=True) * torch.randn_like(new))
        llm.set_input_embeddings(SplitEmbedding(old_in, new_in))
        llm.lm_head = SplitLMHead(old_out, new_out)
        llm.config.vocab_size = vocab.total
        llm.requires_grad_(False)
        decoder = decoder_of(llm)
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

    # the multimodal input (healthgpt.model.embedding): tokens with image features spliced in
    embed_multimodal = embedding.embed_multimodal

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
        hidden = decoder_of(self.llm)(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                    use_cache=False).last_hidden_state
        loss = None
        logits = None
        live = None
        if n_codes is not None and labels is not None and n_codes < NUM_VQ_CODES:
            live = _live_vocabulary(self.vocab, int(n_codes))
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

    # ---------------------------------------------------------------- generation (healthgpt.model.generation)

    generate = generation.generate
    image_logits_hook = generation.image_logits_hook
    generate_image_tokens = generation.generate_image_tokens


def _live_vocabulary(vocab: VocabIds, n_codes: int) -> tuple[list[slice], Callable[[torch.Tensor], torch.Tensor]]:
    """New-row slices of a ``n_codes`` codebook and the map from full-vocabulary labels to live indices."""
    if not 1 <= n_codes <= NUM_VQ_CODES:
        raise ValueError(f"n_codes must be in [1, {NUM_VQ_CODES}], got {n_codes}")
    v = vocab
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
