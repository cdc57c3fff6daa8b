"""Inference helpers behind ``healthgpt infer`` (and usable from Python / the evaluator).

``answer`` runs comprehension: greedy decoding with a KV cache, optionally streaming text pieces to
a callback. ``generate_image`` runs generation: the prompt ends with ``<start_index>`` (as in the
released generation script), the model emits ``<idx_*>`` tokens, ``parse_image_tokens`` reads and
repairs them (wrong length -> padded/truncated to 1024, missing ``<end_index>`` or stray text
tokens -> reported, never an exception), and the VQGAN (``vlhealth.vq``) decodes the 32×32 codes
to a 256×256 RGB image.

Public API::

    load_model(preset, *, checkpoint=None, released=None, device="cpu", **overrides) -> HealthGPT
        (checkpoint / released: a local path or a Hub id hf://ORG/NAME[@REVISION])
    answer(model, image, question, *, max_new_tokens=256, on_text=None) -> str
    generate_image(model, image, instruction, *, vq=None, constrained=False)
        -> ImageResult(image uint8 [256,256,3] | None, codes int64 [1024], report)
    generate_images(model, images, instructions, *, vq=None, constrained=False) -> list[ImageResult]
    load_vq_decoder(spec="tiny", device="cpu")      # raises VQUnavailableError if vlhealth.vq is missing
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from healthgpt.model.conversation import encode_prompt
from healthgpt.model.core import HealthGPT, ImageTokenReport

__all__ = ["ImageResult", "VQUnavailableError", "answer", "generate_image", "generate_images", "load_model",
           "load_vq_decoder"]


class VQUnavailableError(RuntimeError):
    """The VQGAN decoder (``vlhealth.vq``) cannot be imported or loaded."""


@dataclass
class ImageResult:
    image: np.ndarray | None
    codes: np.ndarray
    report: ImageTokenReport


def load_model(
    preset: str,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    released: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    **overrides: Any,
) -> HealthGPT:
    """Build a preset, then load our checkpoint (a file, a training folder or a ``healthgpt export`` folder)
    and/or a released HealthGPT-M3 folder; either may be a Hub id ``hf://ORG/NAME[@REVISION]``
    (:mod:`healthgpt.sharing.hub`: only the files needed come down, an export's SHA-256 are checked)."""
    from healthgpt.model.presets import build_model
    from healthgpt.model.released import load_released_m3
    from healthgpt.model.weights import load_trainable, resolve_trainable
    from healthgpt.sharing.hub import resolve_model

    checkpoint = resolve_model(checkpoint)
    released = resolve_model(released, kind="released")
    model, _ = build_model(preset, **overrides)
    if released is not None:
        load_released_m3(model, released)
    if checkpoint is not None:
        from healthgpt.sharing.export import is_export_folder, load_export

        if is_export_folder(checkpoint):  # a `healthgpt export` folder
            load_export(model, checkpoint)
        else:
            load_trainable(model, resolve_trainable(checkpoint))
    return model.to(device).eval()


def _pixel_values(model: HealthGPT, image: Any) -> torch.Tensor | None:
    if image is None:
        return None
    return model.vision.preprocess([image]).to(model.device)


class _TextStream:
    """Turns streamed token ids into text pieces (decoding the whole answer so far each step,
    so multi-token characters come out whole)."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None], stops: set[int]) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.stops = stops
        self.ids: list[int] = []
        self.printed = 0
        self.done = False

    def __call__(self, token: torch.Tensor) -> None:
        if self.done:
            return
        t = int(token[0])
        if t in self.stops:
            self.done = True
            return
        self.ids.append(t)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for more
            return
        if len(text) > self.printed:
            self.on_text(text[self.printed:])
            self.printed = len(text)


def answer(
    model: HealthGPT,
    image: Any,
    question: str,
    *,
    max_new_tokens: int = 256,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """Answer ``question`` about ``image`` (a path, PIL image or uint8 array; None = text only)."""
    from healthgpt.model.core import stop_token_ids_for

    ids = encode_prompt(model.tokenizer, question, template=model.template, image=image is not None)
    stops = stop_token_ids_for(model)
    stream = _TextStream(model.tokenizer, on_text, set(stops)) if on_text is not None else None
    out = model.generate(torch.tensor([ids]), pixel_values=_pixel_values(model, image), task="comprehension",
                         max_new_tokens=max_new_tokens, stop_token_ids=stops, streamer=stream)
    row = [t for t in out[0].tolist()]
    for i, t in enumerate(row):
        if t in stops:
            row = row[:i]
            break
    return model.tokenizer.decode(row, skip_special_tokens=True).strip()


def load_vq_decoder(spec: str | os.PathLike[str] = "tiny", device: str = "cpu") -> Any:
    try:
        from vlhealth.vq import load_vq
    except ImportError as err:
        raise VQUnavailableError(f"the VQGAN decoder vlhealth.vq is not available ({err})") from err
    return load_vq(spec, device=device)


def generate_image(
    model: HealthGPT,
    image: Any,
    instruction: str,
    *,
    vq: Any = None,
    constrained: bool = False,
    max_new_tokens: int | None = None,
    streamer: Any = None,
) -> ImageResult:
    """Generate an image for ``instruction`` (e.g. "Convert this CT to MRI") from ``image``.

    ``vq``: a loaded VQ tokenizer (``load_vq_decoder``) or None to return only the codes.
    """
    return generate_images(model, [image], [instruction], vq=vq, constrained=constrained,
                           max_new_tokens=max_new_tokens, streamer=streamer)[0]


def generate_images(
    model: HealthGPT,
    images: list[Any],
    instructions: list[str],
    *,
    vq: Any = None,
    constrained: bool = False,
    max_new_tokens: int | None = None,
    streamer: Any = None,
) -> list[ImageResult]:
    """:func:`generate_image` for a batch (prompts left-padded so every one ends at the last column).

    ``images`` are all given or all None (the batch shares one visual input path). ``streamer(ids[B])``
    sees each decoded step (the server's worker raises from it to stop a cancelled job).
    """
    if len(images) != len(instructions) or not images:
        raise ValueError(f"need one instruction per image, got {len(images)} images and {len(instructions)} instructions")
    with_image = images[0] is not None
    if any((im is not None) != with_image for im in images):
        raise ValueError("a batch is either all with images or all without")
    prompts = [encode_prompt(model.tokenizer, text, template=model.template, image=with_image, task="generation")
               for text in instructions]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), model.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    pixel_values = model.vision.preprocess(images).to(model.device) if with_image else None
    kwargs: dict[str, Any] = {}
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    if getattr(vq, "config", None) is not None:  # a smaller codebook than the 8192 token rows
        kwargs["n_codes"] = int(vq.config.n_embed)
    if streamer is not None:
        kwargs["streamer"] = streamer
    codes, reports = model.generate_image_tokens(ids, mask, pixel_values, constrained=constrained, **kwargs)
    decoded = np.asarray(vq.decode(codes)) if vq is not None else [None] * len(prompts)
    return [ImageResult(image=decoded[i], codes=codes[i], report=reports[i]) for i in range(len(prompts))]
