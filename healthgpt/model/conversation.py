"""Chat templates, the unified vocabulary's token ids, and tokenisation of LLaVA conversations.

Templates (``TEMPLATES``), written as the released HealthGPT ``conv_templates`` lay them out
(``MPT``/``QWEN_2`` separator styles: ``system + sep``, then ``role + message + sep`` per turn,
and a bare assistant role to prompt an answer):

``phi3``   ``<|system|>\\nYou are a helpful AI assistant.<|end|>`` + ``\\n<|user|>\\n``…``<|end|>`` +
           ``\\n<|assistant|>\\n``…``<|end|>``  (HealthGPT-M3)
``phi4``   ``<|im_start|>system<|im_sep|>\\n``(released system text)``<|im_end|>`` + roles
           ``\\n<|im_start|>user<|im_sep|>\\n`` / ``\\n<|im_start|>assistant<|im_sep|>\\n``, sep
           ``<|im_end|>`` (HealthGPT-L14; the released system prompt is kept verbatim so that the
           released weights see what they were trained with; pass ``system=`` to change it)
``qwen2``  ``<|im_start|>system\\nYou are Qwen, ...<|im_end|>\\n`` + ``<|im_start|>user\\n``…
           ``<|im_end|>\\n`` (HealthGPT-XL32)
``chatml`` the same layout as ``qwen2`` with a neutral medical system prompt (``tiny`` preset)
``smollm2`` ``chatml`` with SmolLM2-Instruct's own default system prompt (``smollm2-135m``)

Image placeholder: ``<image>`` in a human turn is encoded as ``IMAGE_TOKEN_ID = -200`` (LLaVA's
convention: a negative id that no embedding row has; the model replaces it with the image's patch
features, one placeholder per image, images in order of appearance in the batch).

Generation targets: ``<target_image>`` in a gpt turn is expanded, from the sample's 1024 VQ
indices, to ``<start_index> <idx_i1> … <idx_i1024> <end_index>``. **No** ``<pixel_newline>`` is
inserted by default: the released inference code reads every ``<idx_N>`` of the output as one flat
1024-long sequence and reshapes it to 32×32, and the token is never produced or consumed anywhere
in the released code (``pixel_newline=True`` inserts one after each row of 32 for experiments).
Index tokens are produced arithmetically from the token ids (``VocabIds``), never via the text
tokenizer.

Labels: ``IGNORE_INDEX = -100`` everywhere except the tokens of gpt responses and the separator that
ends them (the model learns to stop), including the whole image-token span of a generation target.

Public API::

    extend_tokenizer(tokenizer) -> VocabIds          # add the 8195 tokens (idempotent)
    vocab_ids(tokenizer) -> VocabIds
    encode_conversation(tokenizer, conversations, *, template, vq_indices=None, max_len=2048,
                        image_tokens=576, pixel_newline=False)
        -> {"input_ids": LongTensor[T], "labels": LongTensor[T], "truncated": bool}
    encode_prompt(tokenizer, question, *, template, image=True, task="comprehension") -> list[int]
    encode_chat_prompt(tokenizer, turns, *, template, task="comprehension") -> list[int]   # multi-turn
    stop_token_ids(tokenizer, template) -> list[int]
    image_target_ids(vocab, vq_indices, pixel_newline=False) -> list[int]
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "GRID",
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "IMAGE_TOKEN_ID",
    "NEW_TOKENS",
    "NUM_VQ_CODES",
    "TARGET_IMAGE_PLACEHOLDER",
    "TEMPLATES",
    "TOKENS_PER_IMAGE",
    "Template",
    "VocabIds",
    "encode_chat_prompt",
    "encode_conversation",
    "encode_prompt",
    "extend_tokenizer",
    "image_target_ids",
    "stop_token_ids",
    "vocab_ids",
]

IGNORE_INDEX = -100
IMAGE_TOKEN_ID = -200
IMAGE_PLACEHOLDER = "<image>"
TARGET_IMAGE_PLACEHOLDER = "<target_image>"
NUM_VQ_CODES = 8192
GRID = 32
TOKENS_PER_IMAGE = GRID * GRID

NEW_TOKENS: list[str] = (
    ["<start_index>"] + [f"<idx_{i}>" for i in range(NUM_VQ_CODES)] + ["<end_index>", "<pixel_newline>"]
)


@dataclass(frozen=True)
class Template:
    """A conversation layout: ``system + sep_system``, then ``role + message + sep`` per turn."""

    name: str
    system: str
    user: str
    assistant: str
    sep: str  # after each user/assistant message
    sep_system: str  # after the system text
    stop: tuple[str, ...]  # strings whose token ends an answer

    def with_system(self, system: str) -> Template:
        return Template(self.name, system, self.user, self.assistant, self.sep, self.sep_system, self.stop)


TEMPLATES: dict[str, Template] = {
    "phi3": Template(
        "phi3", "<|system|>\nYou are a helpful AI assistant.", "\n<|user|>\n", "\n<|assistant|>\n",
        "<|end|>", "<|end|>", ("<|end|>",),
    ),
    "phi4": Template(
        "phi4",
        "<|im_start|>system<|im_sep|>\nYou are a medieval knight and must provide explanations to modern people.",
        "\n<|im_start|>user<|im_sep|>\n", "\n<|im_start|>assistant<|im_sep|>\n",
        "<|im_end|>", "<|im_end|>", ("<|im_end|>",),
    ),
    "qwen2": Template(
        "qwen2", "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n", "<|im_end|>\n", ("<|im_end|>",),
    ),
    "chatml": Template(
        "chatml", "<|im_start|>system\nYou are a helpful medical assistant.",
        "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n", "<|im_end|>\n", ("<|im_end|>",),
    ),
    "smollm2": Template(
        "smollm2", "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face",
        "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n", "<|im_end|>\n", ("<|im_end|>",),
    ),
}


def get_template(template: str | Template) -> Template:
    if isinstance(template, Template):
        return template
    try:
        return TEMPLATES[template]
    except KeyError:
        raise KeyError(f"unknown chat template {template!r}; have {sorted(TEMPLATES)}") from None


# --------------------------------------------------------------------------------------------
# vocabulary


@dataclass(frozen=True)
class VocabIds:
    """Ids of the unified vocabulary. ``first_new`` is the first added id (= old vocabulary size)."""

    first_new: int
    start_index: int
    idx_0: int
    end_index: int
    pixel_newline: int

    @property
    def num_new(self) -> int:
        return len(NEW_TOKENS)

    @property
    def total(self) -> int:
        return self.first_new + self.num_new

    def idx(self, code: int) -> int:
        return self.idx_0 + int(code)

    def is_index(self, token_id: int) -> bool:
        return self.idx_0 <= token_id < self.idx_0 + NUM_VQ_CODES


def vocab_ids(tokenizer: Any) -> VocabIds:
    """Ids of the added tokens; raises if they are missing or not contiguous in the documented order."""
    ids = tokenizer.convert_tokens_to_ids(["<start_index>", "<idx_0>", "<idx_8191>", "<end_index>",
                                           "<pixel_newline>"])
    unk = getattr(tokenizer, "unk_token_id", None)
    if any(i is None or i == unk for i in ids):
        raise ValueError("tokenizer lacks the HealthGPT tokens; call extend_tokenizer(tokenizer) first")
    start, idx0, idx_last, end, newline = ids
    if not (idx0 == start + 1 and idx_last == idx0 + NUM_VQ_CODES - 1 and end == idx_last + 1
            and newline == end + 1):
        raise ValueError(
            "HealthGPT tokens are not contiguous in the order <start_index>, <idx_0..8191>, "
            f"<end_index>, <pixel_newline> (got start={start}, idx_0={idx0}, end={end})"
        )
    return VocabIds(first_new=start, start_index=start, idx_0=idx0, end_index=end, pixel_newline=newline)


def extend_tokenizer(tokenizer: Any) -> VocabIds:
    """Add ``<start_index>``, ``<idx_0>``…``<idx_8191>``, ``<end_index>``, ``<pixel_newline>`` in that
    order as special tokens (ids ``len(tokenizer)`` onwards; old ids unchanged). Idempotent."""
    if "<start_index>" in tokenizer.get_vocab():
        return vocab_ids(tokenizer)
    before = len(tokenizer)
    added = tokenizer.add_tokens(NEW_TOKENS, special_tokens=True)
    if added != len(NEW_TOKENS):
        raise ValueError(f"expected to add {len(NEW_TOKENS)} tokens, the tokenizer added {added}")
    vocab = vocab_ids(tokenizer)
    if vocab.first_new != before:
        raise ValueError(f"new tokens start at id {vocab.first_new}, expected {before}")
    return vocab


def image_target_ids(vocab: VocabIds, vq_indices: Any, pixel_newline: bool = False) -> list[int]:
    """``<start_index> <idx_…>×1024 <end_index>`` for one image's VQ indices (32×32 grid, codes < 8192); a
    smaller square grid (a demo VQ of 16×16 codes) gives that many index tokens."""
    arr = np.asarray(vq_indices)
    side = math.isqrt(arr.size)
    if arr.size == 0 or arr.size > TOKENS_PER_IMAGE or side * side != arr.size:
        raise ValueError(f"vq_indices must hold a square grid of at most {TOKENS_PER_IMAGE} codes (32x32), "
                         f"got shape {arr.shape}")
    codes = arr.reshape(-1).astype(np.int64)
    if codes.min() < 0 or codes.max() >= NUM_VQ_CODES:
        raise ValueError(f"vq_indices out of range [0, {NUM_VQ_CODES}): min {codes.min()}, max {codes.max()}")
    ids = codes + vocab.idx_0
    out = [vocab.start_index]
    if pixel_newline:
        for row in ids.reshape(side, side):
            out.extend(row.tolist())
            out.append(vocab.pixel_newline)
    else:
        out.extend(ids.tolist())
    out.append(vocab.end_index)
    return out


# --------------------------------------------------------------------------------------------
# tokenisation

_SPLIT = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(TARGET_IMAGE_PLACEHOLDER)})")


def _bos_prefix(tokenizer: Any) -> list[int]:
    """The BOS id if this tokenizer puts one in front of a plain encode (Llama/Phi-3 style)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _tokenize_spans(
    tokenizer: Any, text: str, spans: list[tuple[int, int]]
) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` and, per token, whether it overlaps one of the character ``spans``."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    flags = []
    for start, end in enc["offset_mapping"]:
        end = max(end, start + 1)
        flags.append(any(start < s_end and end > s_start for s_start, s_end in spans))
    return ids, flags


def _role(turn: Mapping[str, Any]) -> str:
    role = str(turn.get("from", turn.get("role", "")))
    if role in ("human", "user"):
        return "human"
    if role in ("gpt", "assistant"):
        return "gpt"
    raise ValueError(f"conversation turn has unknown role {role!r} (expected human/gpt)")


def encode_conversation(
    tokenizer: Any,
    conversations: Sequence[Mapping[str, Any]],
    *,
    template: str | Template,
    vq_indices: Any = None,
    max_len: int = 2048,
    image_tokens: int = 576,
    pixel_newline: bool = False,
) -> dict[str, Any]:
    """Tokenise one LLaVA conversation; labels are ``IGNORE_INDEX`` outside gpt responses.

    ``max_len`` counts each ``<image>`` as ``image_tokens`` positions (what it becomes inside the
    model); longer samples are cut at the end and ``truncated`` is True. A ``<target_image>`` needs
    ``vq_indices`` (1024 codes) and is expanded as documented in the module docstring.
    """
    tpl = get_template(template)
    if not conversations:
        raise ValueError("empty conversation")
    vocab = vocab_ids(tokenizer) if vq_indices is not None else None

    # assemble the text and the character spans that carry loss
    text = tpl.system + tpl.sep_system
    spans: list[tuple[int, int]] = []
    for turn in conversations:
        role = _role(turn)
        value = str(turn.get("value", ""))
        text += tpl.user if role == "human" else tpl.assistant
        if role == "gpt":
            end_sep = tpl.sep.rstrip("\n")
            spans.append((len(text), len(text) + len(value) + len(end_sep)))
        text += value + tpl.sep

    ids: list[int] = list(_bos_prefix(tokenizer))
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    pos = 0
    n_targets = 0
    for piece in _SPLIT.split(text):
        start = pos
        pos += len(piece)
        if piece == IMAGE_PLACEHOLDER:
            ids.append(IMAGE_TOKEN_ID)
            labels.append(IGNORE_INDEX)
        elif piece == TARGET_IMAGE_PLACEHOLDER:
            if vq_indices is None or vocab is None:
                raise ValueError("conversation has <target_image> but no vq_indices were given")
            n_targets += 1
            if n_targets > 1:
                raise ValueError("more than one <target_image> in a conversation")
            target = image_target_ids(vocab, vq_indices, pixel_newline=pixel_newline)
            inside = any(s <= start < e for s, e in spans)
            ids.extend(target)
            labels.extend(target if inside else [IGNORE_INDEX] * len(target))
        elif piece:
            local = [(max(s - start, 0), e - start) for s, e in spans if e > start and s < pos]
            piece_ids, flags = _tokenize_spans(tokenizer, piece, local)
            ids.extend(piece_ids)
            labels.extend(i if f else IGNORE_INDEX for i, f in zip(piece_ids, flags, strict=True))
    if vq_indices is not None and n_targets == 0:
        raise ValueError("vq_indices given but the conversation has no <target_image>")

    # length accounting: an image placeholder occupies image_tokens positions in the model
    n_images = ids.count(IMAGE_TOKEN_ID)
    extra = (image_tokens - 1) * n_images
    truncated = False
    if len(ids) + extra > max_len:
        keep = max_len - extra
        if keep <= 0 or IMAGE_TOKEN_ID in ids[keep:]:
            raise ValueError(f"max_len={max_len} cannot hold the sample's {n_images} image(s) of "
                             f"{image_tokens} tokens each")
        ids, labels, truncated = ids[:keep], labels[:keep], True
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "truncated": truncated,
    }


def encode_prompt(
    tokenizer: Any,
    question: str,
    *,
    template: str | Template,
    image: bool = True,
    task: str = "comprehension",
) -> list[int]:
    """Ids of a one-turn prompt ending with the assistant role (plus ``<start_index>`` for
    generation, as the released generation script does). ``image`` prefixes ``<image>\\n``."""
    text = question
    if image and IMAGE_PLACEHOLDER not in text:
        text = IMAGE_PLACEHOLDER + "\n" + text
    return encode_chat_prompt(tokenizer, [{"from": "human", "value": text}], template=template, task=task)


def encode_chat_prompt(
    tokenizer: Any,
    turns: Sequence[Mapping[str, Any]],
    *,
    template: str | Template,
    task: str = "comprehension",
) -> list[int]:
    """Ids of a multi-turn prompt (LLaVA turns, human/gpt or user/assistant, ``<image>`` where the
    image goes) ending with the assistant role, plus ``<start_index>`` for generation. One
    ``encode_prompt`` turn gives exactly ``encode_prompt``'s ids."""
    tpl = get_template(template)
    prompt = tpl.system + tpl.sep_system
    for turn in turns:
        prompt += (tpl.user if _role(turn) == "human" else tpl.assistant) + str(turn.get("value", "")) + tpl.sep
    prompt += tpl.assistant
    ids: list[int] = list(_bos_prefix(tokenizer))
    for piece in _SPLIT.split(prompt):
        if piece == IMAGE_PLACEHOLDER:
            ids.append(IMAGE_TOKEN_ID)
        elif piece == TARGET_IMAGE_PLACEHOLDER:
            raise ValueError("<target_image> cannot appear in a prompt")
        elif piece:
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    if task == "generation":
        ids.append(vocab_ids(tokenizer).start_index)
    elif task != "comprehension":
        raise ValueError(f"unknown task {task!r} (comprehension, generation)")
    return ids


def stop_token_ids(tokenizer: Any, template: str | Template) -> list[int]:
    """Token ids that end a text answer: the template's stop strings and the tokenizer's EOS."""
    tpl = get_template(template)
    out: list[int] = []
    vocab = tokenizer.get_vocab()
    for s in tpl.stop:
        if s in vocab:
            out.append(vocab[s])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        out.append(int(eos))
    return sorted(set(out))
