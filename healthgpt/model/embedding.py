"""The multimodal input of a ``HealthGPT``: token embeddings with image features spliced in.

``embed_multimodal(model, input_ids, attention_mask, labels, pixel_values, task, pad_side)`` embeds
the text ids and replaces every ``IMAGE_TOKEN_ID`` (-200) placeholder by ``model.vision.num_patches``
feature positions of its image (labels -100 there), then re-packs the rows right- or left-padded.
``HealthGPT.embed_multimodal`` is this function.
"""

from __future__ import annotations

import torch
from torch import nn

from healthgpt.model.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID

__all__ = ["embed_multimodal"]


def embed_multimodal(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    task: str,
    pad_side: str = "right",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Embed tokens and splice image features at ``IMAGE_TOKEN_ID`` positions (``model``: a ``HealthGPT``).

    Returns ``(inputs_embeds, attention_mask, labels, position_ids)``, re-padded on ``pad_side``.
    """
    input_ids = input_ids.to(model.device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(model.device)
    is_image = input_ids == IMAGE_TOKEN_ID
    n_placeholders = int(is_image.sum())
    already_packed = pad_side == "right" or bool(attention_mask[:, -1].all())
    if n_placeholders == 0 and already_packed:
        embeds = model.embed_tokens(input_ids)
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return embeds, attention_mask, labels, pos
    text_embeds = model.embed_tokens(input_ids.masked_fill(is_image, 0))
    feats = text_embeds.new_zeros((0, 0, text_embeds.shape[-1]))
    if n_placeholders:
        if pixel_values is None:
            raise ValueError(f"input_ids hold {n_placeholders} <image> placeholder(s) but no pixel_values")
        if pixel_values.shape[0] != n_placeholders:
            raise ValueError(f"{n_placeholders} <image> placeholders but {pixel_values.shape[0]} images")
        feats = model.vision.features(pixel_values.to(model.device), task).to(text_embeds.dtype)  # [N, P, d]
    seqs: list[torch.Tensor] = []
    seq_labels: list[torch.Tensor] = []
    image_i = 0
    n_patches = feats.shape[1]
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool()
        ids_b = input_ids[b][keep]
        emb_b = text_embeds[b][keep]
        lab_b = labels[b].to(model.device)[keep] if labels is not None else None
        parts: list[torch.Tensor] = []
        lparts: list[torch.Tensor] = []
        cuts = torch.nonzero(ids_b == IMAGE_TOKEN_ID).flatten().tolist()
        prev = 0
        for c in cuts:
            parts.append(emb_b[prev:c])
            parts.append(feats[image_i])
            if lab_b is not None:
                lparts.append(lab_b[prev:c])
                lparts.append(torch.full((n_patches,), IGNORE_INDEX, dtype=lab_b.dtype, device=model.device))
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
    mask = torch.zeros((len(seqs), n), dtype=attention_mask.dtype, device=model.device)
    out_labels = (torch.full((len(seqs), n), IGNORE_INDEX, dtype=torch.long, device=model.device)
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
