"""The OpenAI-compatible HTTP API (FastAPI) and the app that also mounts the web UI at ``/``.

Routes::

    GET  /healthz                 {"status": "ok", model, queued, batches_run, largest_batch, ...}
    GET  /v1/models               the one served model
    POST /v1/chat/completions     comprehension: messages with at most one image_url part (data: URL);
                                  max_tokens, temperature (default 0 = greedy), top_p, stop, seed, stream
                                  (server-sent events in OpenAI's chunk format, stream_options.include_usage);
                                  "task": "generation" instead returns the generated image in
                                  choices[0].message.image = {"b64_json": <PNG>, "mime_type": "image/png"}
    POST /v1/images/edits         generation (what ``openai`` ``client.images.edit(image=..., prompt=...)``
                                  sends): multipart image + prompt; data[0].b64_json is a 256x256 PNG

Every refusal is an OpenAI-style error body with a 4xx status; a failure inside the model is a 500
whose body carries only the request id (the log has the traceback under the same id). Every
response has an ``x-request-id`` header.

Before a route runs, :class:`~healthgpt.serving.guard.RequestGuard` checks the API key and the body
size (401 / 413). Then: a full queue is a 429 with ``Retry-After``; a request whose client disconnects
(streamed or not) has its job cancelled; one that passes its deadline (``request_timeout_s``,
queueing included) is cancelled and answered 504.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from healthgpt.model.conversation import IMAGE_PLACEHOLDER
from healthgpt.serving.errors import ApiError, error_body, new_request_id
from healthgpt.serving.guard import ApiKeys, RequestGuard
from healthgpt.serving.images import decode_image_bytes, png_base64
from healthgpt.serving.service import RESEARCH_NOTICE, Service
from healthgpt.serving.worker import ChatResult, ImageJobResult, JobCancelled, QueueFull, WorkerStopped

__all__ = ["ChatCompletionRequest", "create_app"]

log = logging.getLogger("healthgpt.serve")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Any]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int | None = None
    seed: int | None = None
    task: str | None = None


def _error_response(err: ApiError, request_id: str) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers={"x-request-id": request_id, **err.headers})


def _server_error(request_id: str, status: int = 500) -> JSONResponse:
    message = (f"The server failed on this request (request id {request_id}); the server log has the details."
               if status == 500 else "The server is shutting down; retry later.")
    return JSONResponse(error_body(message, type="server_error", code="internal_error" if status == 500
                                   else "unavailable"), status_code=status, headers={"x-request-id": request_id})


class _Events:
    """Hands worker events to this request's event loop without ever blocking the worker."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def emit(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop is gone (server shutting down): nobody is listening
            pass

    async def final(self) -> tuple[str, Any]:
        while True:
            kind, value = await self.queue.get()
            if kind != "text":
                return kind, value


class _ClientGone(Exception):
    """The client disconnected before its answer was ready (nothing is sent; logged as 499)."""


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (the body was read already: ``receive`` waits for that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _result(service: Service, request: Request, job: Any, events: _Events, started: float) -> tuple[str, Any]:
    """The job's final event; cancels the job when the client disconnects or the deadline passes first."""
    timeout = service.settings.request_timeout_s
    remaining = max(0.0, started + timeout - time.monotonic()) if timeout > 0 else None
    final = asyncio.ensure_future(events.final())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({final, gone}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (final, gone):
            task.cancel()
    if final in done:
        return final.result()
    job.cancelled = True  # the worker drops it from the queue, or stops it at its next token
    if gone in done:
        raise _ClientGone
    raise ApiError(504, f"The request did not finish within {timeout:g} s (the server's request timeout); it "
                        "was cancelled. Retry later or ask for fewer max_tokens.", code="timeout",
                   type="server_error")


def create_app(service: Service, *, ui: bool = True) -> FastAPI:
    app = FastAPI(title="HealthGPT", description=RESEARCH_NOTICE, docs_url="/docs", redoc_url=None)
    app.state.service = service
    name = service.settings.model_name
    created = int(time.time())
    keys = ApiKeys(service.settings.api_keys)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return _error_response(err, getattr(request.state, "request_id", new_request_id()))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return _error_response(ApiError(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}",
                                        code="invalid_value", param=param),
                               getattr(request.state, "request_id", new_request_id()))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        rid = getattr(request.state, "request_id", new_request_id())
        log.error("request %s failed", rid, exc_info=err)
        return _server_error(rid)

    @app.exception_handler(_ClientGone)
    async def _client_gone(request: Request, err: _ClientGone) -> JSONResponse:
        rid = getattr(request.state, "request_id", new_request_id())
        return JSONResponse(error_body("the client disconnected", type="invalid_request_error", code="cancelled"),
                            status_code=499, headers={"x-request-id": rid})

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        w = service.worker
        s = service.settings
        return {"status": "ok", "model": name, "preset": service.model.preset, "context_length":
                service.context_length, "queued": w.queued(), "running": w.running, "max_queue": s.max_queue,
                "refused": w.refused, "cancelled": w.cancelled, "timed_out": service.timed_out,
                "batches_run": w.batches_run, "largest_batch": w.largest_batch, "auth": keys.enabled,
                "notice": RESEARCH_NOTICE}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "healthgpt"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await _chat_completion(service, body, request)

    @app.post("/v1/images/edits")
    async def images_edits(request: Request) -> Any:
        return await _image_edit(service, request, request.state.request_id)

    if ui:
        import gradio as gr

        from healthgpt.serving.ui import build_ui

        app = gr.mount_gradio_app(app, build_ui(service), path="/")
    app.add_middleware(RequestGuard, keys=keys, max_body_bytes=service.settings.max_request_bytes, ui=ui)
    return app


async def _chat_completion(service: Service, body: ChatCompletionRequest, request: Request) -> Any:
    rid: str = request.state.request_id
    started = time.monotonic()
    name = service.settings.model_name
    service.check_model(body.model)
    task = body.task or "comprehension"
    if task not in ("comprehension", "generation"):
        raise ApiError(400, f"task {task!r}: comprehension or generation", code="invalid_value", param="task")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    sampling = service.sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                stop=body.stop, seed=body.seed, n=body.n)
    # image decoding (and fetching, with --allow-remote-images) runs off the event loop
    turns, system, image = await run_in_threadpool(service.parse_messages, body.messages)
    events = _Events()
    if task == "generation":
        if body.stream:
            raise ApiError(400, "stream is not available for image generation", code="invalid_value",
                           param="stream")
        instruction = turns[-1]["value"].replace(IMAGE_PLACEHOLDER + "\n", "")
        job = service.image_job(rid, instruction, image, events.emit)
        return await _finish_image_chat(service, request, job, events, started, name)
    job = service.chat_job(rid, turns, system, image, sampling, events.emit,
                           explicit_max_tokens=max_tokens is not None)
    _submit(service, job)
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_stream(service, job, events, rid, name, include_usage, started),
                                 media_type="text/event-stream", headers={"x-request-id": rid, "cache-control": "no-cache"})
    kind, value = await _timed_result(service, request, job, events, started)
    if kind == "error":
        return _model_failure(value, rid)
    res: ChatResult = value
    return JSONResponse({
        "id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()), "model": name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                     "logprobs": None, "finish_reason": _finish(res.finish_reason)}],
        "usage": _usage(res.prompt_tokens, res.completion_tokens),
    }, headers={"x-request-id": rid})


async def _timed_result(service: Service, request: Request, job: Any, events: _Events,
                        started: float) -> tuple[str, Any]:
    try:
        return await _result(service, request, job, events, started)
    except ApiError as err:
        if err.status == 504:
            service.timed_out += 1
        raise


async def _image_edit(service: Service, request: Request, rid: str) -> Any:
    started = time.monotonic()
    limit = service.settings.max_image_bytes
    try:
        form = await request.form(max_files=4, max_part_size=limit + 2**20)
    except Exception as err:  # malformed multipart, or a part over the limit
        raise ApiError(400 if "size" not in str(err).lower() else 413,
                       f"the request is not a readable multipart form ({err})", code="invalid_request",
                       param="image") from err
    service.check_model(_form_str(form, "model"))
    _check_image_options(form)
    uploads = form.getlist("image") + form.getlist("image[]")
    if len(uploads) > 1:
        raise ApiError(400, "more than one image: HealthGPT converts one image per request",
                       code="too_many_images", param="image")
    image: Image.Image | None = None
    if uploads:
        upload = uploads[0]
        data = await upload.read() if hasattr(upload, "read") else str(upload).encode()
        image = await run_in_threadpool(decode_image_bytes, data, param="image", max_bytes=limit)
    events = _Events()
    job = service.image_job(rid, _form_str(form, "prompt") or "", image, events.emit)
    _submit(service, job)
    kind, value = await _timed_result(service, request, job, events, started)
    if kind == "error":
        return _model_failure(value, rid)
    res: ImageJobResult = value
    return JSONResponse({"created": int(time.time()), "output_format": "png", "size": _size(res),
                         "data": [{"b64_json": png_base64(Image.fromarray(res.image)),
                                   "revised_prompt": None}],
                         "usage": _usage(res.prompt_tokens, int(res.codes.size))},
                        headers={"x-request-id": rid})


def _submit(service: Service, job: Any) -> None:
    try:
        service.worker.submit(job)
    except QueueFull as err:
        raise ApiError(429, f"The server is busy: {err}. Retry after a second.", code="rate_limit_exceeded",
                       type="requests", headers={"retry-after": "1"}) from err
    except WorkerStopped as err:
        raise ApiError(503, "The server is shutting down; retry later.", code="unavailable",
                       type="server_error") from err


def _model_failure(err: Exception, rid: str) -> JSONResponse:
    if isinstance(err, WorkerStopped):
        return _server_error(rid, 503)
    if isinstance(err, JobCancelled):  # only a job whose client left or whose deadline passed is cancelled
        raise _ClientGone
    log.error("request %s: the model failed (%s: %s)", rid, type(err).__name__, err)
    return _server_error(rid)


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _size(res: ImageJobResult) -> str:
    return f"{res.image.shape[1]}x{res.image.shape[0]}"


def _form_str(form: Any, key: str) -> str | None:
    value = form.get(key)
    return value if isinstance(value, str) else None


def _check_image_options(form: Any) -> None:
    n = _form_str(form, "n")
    if n is not None and n.strip() != "1":
        raise ApiError(400, f"n={n}: this server returns one image per request", code="invalid_value", param="n")
    size = _form_str(form, "size")
    if size not in (None, "", "auto", "256x256"):
        raise ApiError(400, f"size={size}: HealthGPT generates 256x256 images", code="invalid_value", param="size")
    fmt = _form_str(form, "response_format")
    if fmt not in (None, "", "b64_json"):
        raise ApiError(400, f"response_format={fmt}: only b64_json is available (nothing is stored on the server)",
                       code="invalid_value", param="response_format")
    out = _form_str(form, "output_format")
    if out not in (None, "", "png"):
        raise ApiError(400, f"output_format={out}: only png", code="invalid_value", param="output_format")


async def _finish_image_chat(service: Service, request: Request, job: Any, events: _Events, started: float,
                             name: str) -> Any:
    rid: str = request.state.request_id
    _submit(service, job)
    kind, value = await _timed_result(service, request, job, events, started)
    if kind == "error":
        return _model_failure(value, rid)
    res: ImageJobResult = value
    message = {"role": "assistant", "content": f"Generated a {_size(res)} PNG image (in message.image). "
                                               "Research use only, not for clinical use.",
               "image": {"b64_json": png_base64(Image.fromarray(res.image)), "mime_type": "image/png"}}
    return JSONResponse({
        "id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()), "model": name,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
        "usage": _usage(res.prompt_tokens, int(res.codes.size)),
    }, headers={"x-request-id": rid})


async def _stream(service: Service, job: Any, events: _Events, rid: str, name: str, include_usage: bool,
                  started: float) -> AsyncIterator[str]:
    """The SSE chunks; Starlette cancels this generator when the client disconnects (``finally`` cancels the
    job). Past the deadline the stream ends with an error event."""
    created = int(time.time())
    timeout = service.settings.request_timeout_s

    def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": created,
                                "model": name, "choices": [] if usage else
                                [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            try:
                kind, value = await asyncio.wait_for(
                    events.queue.get(), None if timeout <= 0 else max(0.0, started + timeout - time.monotonic()))
            except TimeoutError:
                service.timed_out += 1
                msg = f"The request did not finish within {timeout:g} s (the server's request timeout); it was cancelled."
                yield f"data: {json.dumps(error_body(msg, type='server_error', code='timeout'))}\n\n"
                break
            if kind == "text":
                yield chunk({"content": value})
                continue
            if kind == "error":
                if isinstance(value, JobCancelled):
                    break
                if not isinstance(value, WorkerStopped):
                    log.error("request %s: the model failed while streaming (%s)", rid, type(value).__name__)
                msg = f"The server failed on this request (request id {rid}); the server log has the details."
                yield f"data: {json.dumps(error_body(msg, type='server_error', code='internal_error'))}\n\n"
                break
            res: ChatResult = value
            yield chunk({}, _finish(res.finish_reason))
            if include_usage:
                yield chunk({}, usage=_usage(res.prompt_tokens, res.completion_tokens))
            break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True
