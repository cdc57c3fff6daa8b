"""What the HTTP API and the web UI share: settings, request validation and prompt building.

``Service`` turns a request (OpenAI chat messages, or an instruction + image) into a worker job,
refusing bad input with ``ApiError`` before anything reaches the model: at most one image, no
image placeholders typed into the text, sampling parameters in range, and the prompt (each image
counted as the vision tower's patch count) plus ``max_tokens`` within the LLM's context length.
Text that cannot fit the context even at the vocabulary's longest token (characters per token) is
refused before it is tokenised, so a huge prompt costs a length check, not a tokenizer pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from healthgpt.model.conversation import (
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_ID,
    TARGET_IMAGE_PLACEHOLDER,
    TOKENS_PER_IMAGE,
    encode_chat_prompt,
    get_template,
)
from healthgpt.model.core import HealthGPT
from healthgpt.serving.errors import ApiError
from healthgpt.serving.images import image_from_url
from healthgpt.serving.worker import ChatJob, ImageJob, ModelWorker, Sampling

__all__ = ["RESEARCH_NOTICE", "GENERATION_TASKS", "ServeSettings", "Service"]

RESEARCH_NOTICE = ("HealthGPT is a research model. Its answers and images are not for clinical use: "
                   "not for diagnosis, treatment or any decision about a patient.")

# instructions for the generation tab / documented defaults (the wording of the training templates)
GENERATION_TASKS = {
    "CT to MRI": "Convert this CT slice to an MRI slice.",
    "MRI to CT": "Convert this MRI slice to a CT slice.",
    "4x super-resolution": "Reconstruct this MRI slice at 4x resolution.",
    "Reconstruction": "Reconstruct this image.",
}


@dataclass
class ServeSettings:
    model_name: str
    max_image_mb: float = 10.0
    allow_remote_images: bool = False
    default_max_tokens: int = 256
    max_batch: int = 8
    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for
    max_queue: int = 64  # waiting requests at most (0: unbounded); beyond: 429
    request_timeout_s: float = 300.0  # per-request deadline, queueing included (0: none)
    max_request_mb: float | None = None  # request-body limit; None: what one largest image needs
    api_keys: tuple[str, ...] = field(default=(), repr=False)

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 2**20)

    @property
    def max_request_bytes(self) -> int:
        """The body limit: by default one largest image as base64 (4/3) plus 1 MiB of JSON and text."""
        if self.max_request_mb is not None:
            return int(self.max_request_mb * 2**20)
        return int(self.max_image_bytes * 4 / 3) + 2**20


def _max_chars_per_token(tokenizer: Any) -> int:
    """The longest token of the vocabulary, in characters (an upper bound on what one token covers)."""
    try:
        vocab = tokenizer.get_vocab()
        return max(1, max((len(t) for t in vocab), default=1))
    except (AttributeError, TypeError, NotImplementedError):
        return 64


def _message_texts(messages: Sequence[Any]) -> list[str]:
    """The text strings of OpenAI messages, whatever else is malformed in them (checked later)."""
    out: list[str] = []
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return out


def _context_length(model: HealthGPT) -> int:
    cfg = getattr(model.llm, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 4096


class Service:
    def __init__(self, model: HealthGPT, vq: Any, settings: ServeSettings, *, constrained_images: bool = True) -> None:
        self.model = model
        self.settings = settings
        self.context_length = _context_length(model)
        self.max_chars_per_token = _max_chars_per_token(model.tokenizer)
        self.timed_out = 0  # requests cancelled at their deadline
        self.ui_content: Any = None  # the web UI's examples and model card (healthgpt.serving.ui.UiContent)
        self.worker = ModelWorker(model, vq, max_batch=settings.max_batch, constrained_images=constrained_images,
                                  max_queue=settings.max_queue)

    def close(self) -> None:
        self.worker.shutdown()

    # ------------------------------------------------------------------ checks

    def check_model(self, name: str | None, param: str = "model") -> None:
        if name is not None and name != self.settings.model_name:
            raise ApiError(404, f"The model {name!r} does not exist on this server; it serves "
                                f"{self.settings.model_name!r} (GET /v1/models)", code="model_not_found", param=param)

    def sampling(self, *, max_tokens: int | None, temperature: float | None, top_p: float | None,
                 stop: str | Sequence[str] | None, seed: int | None, n: int | None) -> Sampling:
        if n is not None and n != 1:
            raise ApiError(400, f"n={n}: this server returns one choice per request (n=1)", code="invalid_value",
                           param="n")
        if temperature is not None and not 0.0 <= temperature <= 2.0:
            raise ApiError(400, f"temperature={temperature} is out of range [0, 2]", code="invalid_value",
                           param="temperature")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ApiError(400, f"top_p={top_p} is out of range (0, 1]", code="invalid_value", param="top_p")
        if max_tokens is not None and max_tokens < 1:
            raise ApiError(400, f"max_tokens={max_tokens} must be at least 1", code="invalid_value",
                           param="max_tokens")

        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop: up to 4 non-empty strings", code="invalid_value", param="stop")
        return Sampling(max_tokens=max_tokens or 0, temperature=temperature or 0.0,
                        top_p=1.0 if top_p is None else top_p, stop=stops, seed=seed)

    def check_text_length(self, texts: Sequence[str], param: str = "messages") -> None:
        """Refuse text that cannot fit the context at the vocabulary's best characters-per-token ratio,
        before any tokenizer runs on it."""
        chars = sum(len(t) for t in texts)
        most = self.context_length * self.max_chars_per_token
        if chars > most:
            raise ApiError(400, f"This model's maximum context length is {self.context_length} tokens. However, "
                                f"the messages have {chars:,} characters, more than {most:,} ({self.context_length} "
                                f"tokens x {self.max_chars_per_token} characters, the vocabulary's longest token). "
                                "Please reduce the length of the messages.", code="context_length_exceeded",
                           param=param)

    def _fit_context(self, prompt_ids: list[int], sampling: Sampling, explicit: bool) -> tuple[int, Sampling]:
        n_images = prompt_ids.count(IMAGE_TOKEN_ID)
        prompt_tokens = len(prompt_ids) + n_images * (self.model.vision.num_patches - 1)
        room = self.context_length - prompt_tokens
        wanted = sampling.max_tokens if explicit else min(self.settings.default_max_tokens, room)
        if room < 1 or wanted > room:
            raise ApiError(400, f"This model's maximum context length is {self.context_length} tokens. However, you "
                                f"requested {prompt_tokens + max(wanted, 1)} tokens ({prompt_tokens} in the messages, "
                                f"{max(wanted, 1)} in the completion). Please reduce the length of the messages or "
                                "the completion.", code="context_length_exceeded", param="messages")
        return prompt_tokens, Sampling(wanted, sampling.temperature, sampling.top_p, sampling.stop, sampling.seed)

    # ------------------------------------------------------------------ jobs

    def parse_messages(self, messages: Sequence[Any]) -> tuple[list[dict[str, str]], str | None, Any]:
        """OpenAI messages -> (LLaVA turns with ``<image>``, system text or None, the decoded image or None)."""
        if not messages:
            raise ApiError(400, "messages: at least one user message is required", code="invalid_value",
                           param="messages")
        self.check_text_length(_message_texts(messages))  # before any image is decoded or text tokenised
        turns: list[dict[str, str]] = []
        system: list[str] = []
        image = None
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise ApiError(400, f"messages[{i}]: expected an object", code="invalid_value", param=f"messages[{i}]")
            role = msg.get("role")
            if role not in ("system", "developer", "user", "assistant"):
                raise ApiError(400, f"messages[{i}].role {role!r} is not supported (system, user, assistant)",
                               code="invalid_value", param=f"messages[{i}].role")
            text, images = self._content(msg.get("content"), f"messages[{i}].content")
            if images and role != "user":
                raise ApiError(400, f"messages[{i}]: images are accepted in user messages only",
                               code="invalid_value", param=f"messages[{i}].content")
            if images:
                if image is not None or len(images) > 1:
                    raise ApiError(400, "more than one image in the request: HealthGPT reads one image per "
                                        "conversation", code="too_many_images", param=f"messages[{i}].content")
                image = images[0]
                text = IMAGE_PLACEHOLDER + "\n" + text
            if role in ("system", "developer"):
                system.append(text)
            else:
                turns.append({"from": "human" if role == "user" else "gpt", "value": text})
        if not turns or turns[-1]["from"] != "human":
            raise ApiError(400, "messages: the last message must come from the user", code="invalid_value",
                           param="messages")
        return turns, ("\n".join(system) if system else None), image

    def _content(self, content: Any, param: str) -> tuple[str, list[Any]]:
        if isinstance(content, str):
            parts: list[Any] = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = content
        else:
            raise ApiError(400, f"{param}: expected a string or a list of content parts", code="invalid_value",
                           param=param)
        texts, images = [], []
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = str(part.get("text", ""))
                if IMAGE_PLACEHOLDER in text or TARGET_IMAGE_PLACEHOLDER in text:
                    raise ApiError(400, f"{param}[{j}]: the text must not contain {IMAGE_PLACEHOLDER} or "
                                        f"{TARGET_IMAGE_PLACEHOLDER}; send images as image_url parts",
                                   code="invalid_value", param=f"{param}[{j}]")
                texts.append(text)
            elif kind == "image_url":
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str):
                    raise ApiError(400, f"{param}[{j}].image_url.url is missing", code="invalid_image",
                                   param=f"{param}[{j}]")
                images.append(image_from_url(url, param=f"{param}[{j}].image_url", allow_remote=
                                             self.settings.allow_remote_images,
                                             max_bytes=self.settings.max_image_bytes))
            else:
                raise ApiError(400, f"{param}[{j}]: content part type {kind!r} is not supported (text, image_url)",
                               code="invalid_value", param=f"{param}[{j}]")
        return "\n".join(texts), images

    def chat_job(self, request_id: str, turns: list[dict[str, str]], system: str | None, image: Any,
                 sampling: Sampling, emit: Callable[[str, Any], None], *, explicit_max_tokens: bool) -> ChatJob:
        self.check_text_length([t["value"] for t in turns] + [system or ""])
        template = get_template(self.model.template)
        if system is not None:  # keep the template's role header (its first line), replace the text
            template = template.with_system(template.system.split("\n", 1)[0] + "\n" + system)
        ids = encode_chat_prompt(self.model.tokenizer, turns, template=template)
        prompt_tokens, sampling = self._fit_context(ids, sampling, explicit_max_tokens)
        if sampling.max_tokens > self.settings.max_tokens_limit:  # after the context check: its message says more
            raise ApiError(400, f"max_tokens={sampling.max_tokens} is over this server's limit of "
                                f"{self.settings.max_tokens_limit} (--max-tokens-limit)", code="invalid_value",
                           param="max_tokens")
        return ChatJob(request_id, ids, image, sampling, emit, prompt_tokens=prompt_tokens)

    def image_job(self, request_id: str, instruction: str, image: Any, emit: Callable[[str, Any], None]) -> ImageJob:
        if image is None:
            raise ApiError(400, "image generation needs an input image (the CT/MR slice to convert, upscale or "
                                "reconstruct)", code="missing_image", param="image")
        if not instruction.strip():
            raise ApiError(400, "prompt: an instruction is required, e.g. 'Convert this CT slice to an MRI slice.'",
                           code="invalid_value", param="prompt")
        if IMAGE_PLACEHOLDER in instruction or TARGET_IMAGE_PLACEHOLDER in instruction:
            raise ApiError(400, f"prompt must not contain {IMAGE_PLACEHOLDER}", code="invalid_value", param="prompt")
        self.check_text_length([instruction], param="prompt")
        ids = encode_chat_prompt(self.model.tokenizer, [{"from": "human", "value": IMAGE_PLACEHOLDER + "\n" +
                                                         instruction}], template=self.model.template,
                                 task="generation")
        prompt_tokens, _ = self._fit_context(ids, Sampling(max_tokens=TOKENS_PER_IMAGE + 1), True)
        return ImageJob(request_id, instruction, image, emit, prompt_tokens=prompt_tokens)
