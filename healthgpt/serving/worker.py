"""The model worker: one thread owns the model and runs one batch at a time.

Requests are jobs in a queue. The worker takes the oldest job; when it is a comprehension job it
also takes every other comprehension job already waiting (up to ``max_batch``) and decodes them
together in one ``HealthGPT.generate`` call (prompts left-padded, images spliced in order).
Generation jobs (1024 image tokens) run one at a time.

Per-row decoding rules are applied through ``generate``'s ``logits_hook``: temperature / top-p
sampling (a seeded ``torch.Generator`` per request), ``max_tokens`` and ``stop`` strings (a row
that has hit either is forced to emit a stop token, so it finishes without holding the batch).
Text pieces are handed to each job's ``emit`` callback as soon as they are decoded; ``emit`` must
not block (the HTTP layer hands them to its event loop with ``call_soon_threadsafe``, the UI puts
them in a ``queue.Queue``), so a slow client never slows the worker or the other requests.

Backpressure: at most ``max_queue`` jobs wait (``submit`` raises :class:`QueueFull` beyond, which the
API answers with 429). A job whose ``cancelled`` flag is set (its client went away, or its deadline
passed) is dropped if it is still waiting; a running chat row emits its stop token at the next
decoding step, and a running image job stops at its next token (:class:`JobCancelled`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from healthgpt.model.core import HealthGPT, stop_token_ids_for

__all__ = ["ChatJob", "ChatResult", "ImageJob", "ImageJobResult", "JobCancelled", "ModelWorker", "QueueFull", "Sampling",
           "WorkerStopped"]

log = logging.getLogger("healthgpt.serve")


class WorkerStopped(RuntimeError):
    """The worker was shut down before the job ran."""


class QueueFull(RuntimeError):
    """``max_queue`` jobs are already waiting."""


class JobCancelled(RuntimeError):
    """The job was cancelled (its client went away or its deadline passed) before it finished."""


@dataclass(frozen=True)
class Sampling:
    """Decoding settings of one request; ``temperature == 0`` is greedy decoding."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class ChatResult:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class ChatJob:
    """A comprehension request. ``emit(kind, value)`` receives ``("text", piece)`` while decoding,
    then exactly one of ``("done", ChatResult)`` or ``("error", exception)``."""

    request_id: str
    prompt_ids: list[int]
    image: Any  # PIL image or None
    sampling: Sampling
    emit: Callable[[str, Any], None]
    prompt_tokens: int = 0
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set when the client went away: the row stops at the next step


@dataclass
class ImageJobResult:
    image: np.ndarray  # uint8 [H, W, 3]
    codes: np.ndarray
    repairs: list[str]
    prompt_tokens: int


@dataclass
class ImageJob:
    """A generation request; ``emit`` receives ``("done", ImageJobResult)`` or ``("error", exc)``."""

    request_id: str
    instruction: str
    image: Any
    emit: Callable[[str, Any], None]
    prompt_tokens: int = 0
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set when the client went away: decoding stops at the next token


class _Row:
    """Decoding state of one comprehension request inside a batch."""

    def __init__(self, job: ChatJob, tokenizer: Any, stop_ids: set[int]) -> None:
        self.job = job
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters already emitted
        self.reason: str | None = None  # why the row must stop: "stop" (a stop string) or "length"
        self.finish: str | None = None  # set once the row's stop token has been generated
        # text that might be the start of a stop string is held back until it is decided
        self.holdback = max((len(s) for s in job.sampling.stop), default=1) - 1
        self.generator: torch.Generator | None = None
        if job.sampling.temperature > 0:
            seed = job.sampling.seed
            self.generator = torch.Generator()
            self.generator.manual_seed(seed if seed is not None else int(torch.seed() % (2**63)))

    @property
    def force_stop(self) -> bool:
        if self.job.cancelled and self.reason is None:
            self.reason = "cancelled"
        return self.reason is not None and self.finish is None

    def feed(self, token: int) -> None:
        if self.finish is not None:
            return
        if token in self.stop_ids:
            self.finish = self.reason or "stop"
            self._flush(final=True)
            return
        if self.reason is not None:
            return
        self.ids.append(token)
        # the whole answer is decoded each step so that multi-token characters come out whole;
        # leading whitespace is dropped, as `healthgpt infer` strips its answer
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for more
            if len(self.ids) >= self.job.sampling.max_tokens:  # unless max_tokens is reached
                self.reason = "length"
                self._flush(final=True)
            return
        self.text = text
        for stop in self.job.sampling.stop:
            cut = text.find(stop)
            if cut >= 0:
                self.text, self.reason = text[:cut], "stop"
                break
        if self.reason is None and len(self.ids) >= self.job.sampling.max_tokens:
            self.reason = "length"
        self._flush(final=self.reason is not None)

    def _flush(self, final: bool) -> None:
        end = len(self.text) if final else len(self.text) - self.holdback
        if end > self.sent:
            piece = self.text[self.sent:end]
            self.sent = end
            self.job.emit("text", piece)

    def result(self) -> ChatResult:
        if self.finish is None:  # the batch ran out of steps before this row's stop token
            self.finish = self.reason or "length"
        self._flush(final=True)
        return ChatResult(self.text[:self.sent], self.finish, self.job.prompt_tokens, len(self.ids))


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


class ModelWorker:
    """Owns ``model`` (and the VQGAN ``vq``) on one thread; ``submit`` queues a job."""

    def __init__(self, model: HealthGPT, vq: Any, *, max_batch: int = 8, constrained_images: bool = True,
                 max_queue: int = 0) -> None:
        self.model = model
        self.vq = vq
        self.max_batch = max(1, max_batch)
        self.max_queue = max_queue  # 0: unbounded
        self.constrained_images = constrained_images
        self.stop_ids = stop_token_ids_for(model)
        self._jobs: deque[ChatJob | ImageJob] = deque()
        self._cv = threading.Condition()
        self._stopped = False
        self.batches_run = 0
        self.largest_batch = 0
        self.refused = 0  # submits refused because the queue was full
        self.cancelled = 0  # jobs dropped from the queue or stopped while running, their client gone
        self.running = 0  # jobs in the batch being decoded
        self._thread = threading.Thread(target=self._loop, name="healthgpt-model-worker", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ queue

    def submit(self, job: ChatJob | ImageJob) -> None:
        with self._cv:
            if self._stopped:
                raise WorkerStopped("the model worker is shut down")
            if self.max_queue and len(self._jobs) >= self.max_queue:
                self.refused += 1
                raise QueueFull(f"{len(self._jobs)} requests are already waiting (--max-queue {self.max_queue})")
            self._jobs.append(job)
            self._cv.notify()

    def queued(self) -> int:
        with self._cv:
            return len(self._jobs)

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopped = True
            pending = list(self._jobs)
            self._jobs.clear()
            self._cv.notify_all()
        for job in pending:
            job.emit("error", WorkerStopped("the server is shutting down"))
        self._thread.join(timeout)

    def count_cancelled(self) -> None:
        with self._cv:
            self.cancelled += 1

    def _drop_cancelled(self) -> None:
        """Jobs whose client went away while they waited never reach the model (called under the lock)."""
        gone = [job for job in self._jobs if job.cancelled]
        for job in gone:
            self._jobs.remove(job)
            self.cancelled += 1
            job.emit("error", JobCancelled("cancelled while waiting"))

    def _next_batch(self) -> list[ChatJob] | ImageJob | None:
        with self._cv:
            while True:
                self._drop_cancelled()
                if self._jobs or self._stopped:
                    break
                self._cv.wait()
            if self._stopped:
                return None
            first = self._jobs.popleft()
            if isinstance(first, ImageJob):
                return first
            batch = [first]
            for job in list(self._jobs):
                if len(batch) >= self.max_batch:
                    break
                if isinstance(job, ChatJob):
                    self._jobs.remove(job)
                    batch.append(job)
            return batch

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            work = self._next_batch()
            if work is None:
                return
            jobs = [work] if isinstance(work, ImageJob) else work
            self.running = len(jobs)
            try:
                if isinstance(work, ImageJob):
                    self._run_image(work)
                else:
                    self._run_chat(work)
            except Exception as err:  # one failed batch must not stop the server
                for job in jobs:
                    log.exception("request %s failed in the model", job.request_id)
                    job.emit("error", err)
            self.running = 0
            self.batches_run += 1
            self.largest_batch = max(self.largest_batch, len(jobs))

    # ------------------------------------------------------------------ running

    def _run_chat(self, jobs: list[ChatJob]) -> None:
        model = self.model
        rows = [_Row(job, model.tokenizer, set(self.stop_ids)) for job in jobs]
        batch = model.collate([{"input_ids": job.prompt_ids} for job in jobs])
        images = [job.image for job in jobs if job.image is not None]
        pixels = model.vision.preprocess(images).to(model.device) if images else None
        stop_id = self.stop_ids[0]

        def hook(step: int, logits: torch.Tensor) -> torch.Tensor:
            for i, row in enumerate(rows):
                if row.finish is not None:
                    continue
                if row.force_stop:
                    choice = stop_id
                elif row.generator is not None:
                    s = row.job.sampling
                    choice = _sample(logits[i], s.temperature, s.top_p, row.generator)
                else:
                    continue
                logits[i] = float("-inf")
                logits[i, choice] = 0.0
            return logits

        def streamer(tokens: torch.Tensor) -> None:
            for row, t in zip(rows, tokens.tolist(), strict=True):
                row.feed(int(t))

        steps = max(job.sampling.max_tokens for job in jobs) + 1
        model.generate(batch["input_ids"], batch["attention_mask"], pixels, task="comprehension",
                       max_new_tokens=steps, stop_token_ids=self.stop_ids, logits_hook=hook, streamer=streamer)
        for row in rows:
            if row.reason == "cancelled":
                self.count_cancelled()
                row.job.emit("error", JobCancelled("cancelled while decoding"))
            else:
                row.job.emit("done", row.result())

    def _run_image(self, job: ImageJob) -> None:
        from healthgpt.serving.infer import generate_image

        if self.vq is None:
            raise RuntimeError("no VQGAN decoder is loaded")
        def stop_if_cancelled(_tokens: torch.Tensor) -> None:
            if job.cancelled:
                raise JobCancelled("cancelled while decoding")

        try:
            result = generate_image(self.model, job.image, job.instruction, vq=self.vq,
                                    constrained=self.constrained_images, streamer=stop_if_cancelled)
        except JobCancelled as err:
            self.count_cancelled()
            job.emit("error", err)
            return
        if result.image is None:
            raise RuntimeError("the VQGAN returned no image")
        job.emit("done", ImageJobResult(result.image, result.codes, list(result.report.notes), job.prompt_tokens))
