"""The web UI (Gradio Blocks, mounted at ``/`` of the API app): a chat tab and a generation tab.

Both tabs submit jobs to the same model worker as the HTTP API (same queue, same batching), so
the UI and API clients share the model fairly. Every page carries the research-use-only banner.
"""

from __future__ import annotations

import queue
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from healthgpt.serving.errors import ApiError, new_request_id
from healthgpt.serving.service import GENERATION_TASKS, RESEARCH_NOTICE, Service
from healthgpt.serving.worker import ChatResult, ImageJobResult

__all__ = ["build_ui"]

BANNER = f"""## HealthGPT

**Research use only — not for clinical use.** {RESEARCH_NOTICE}
"""


def _run(service: Service, make_job: Any) -> Iterator[tuple[str, Any]]:
    """Submit a job and yield its events as they come (this runs in one of Gradio's worker threads)."""
    events: queue.Queue[tuple[str, Any]] = queue.Queue()
    job = make_job(lambda kind, value: events.put((kind, value)))
    service.worker.submit(job)
    try:
        while True:
            kind, value = events.get()
            yield kind, value
            if kind != "text":
                return
    finally:
        if hasattr(job, "cancelled"):
            job.cancelled = True


def _ask(service: Service, image: Image.Image | None, question: str, max_tokens: int) -> Iterator[str]:
    if not (question or "").strip():
        raise gr.Error("Type a question.")
    turns = [{"from": "human", "value": ("<image>\n" if image is not None else "") + question.strip()}]
    try:
        sampling = service.sampling(max_tokens=int(max_tokens), temperature=None, top_p=None, stop=None, seed=None,
                                    n=None)
        rid = new_request_id()
        answer = ""
        for kind, value in _run(service, lambda emit: service.chat_job(
                rid, turns, None, image.convert("RGB") if image is not None else None, sampling, emit,
                explicit_max_tokens=True)):
            if kind == "text":
                answer += value
                yield answer
            elif kind == "error":
                raise gr.Error(f"The model failed on this request (request id {rid}).")
            else:
                res: ChatResult = value
                yield res.text
    except ApiError as err:
        raise gr.Error(err.message) from err


def _generate(service: Service, out_dir: Path, image: Image.Image | None, task: str,
              instruction: str) -> tuple[str, str]:
    text = (instruction or "").strip() or GENERATION_TASKS.get(task, "")
    rid = new_request_id()
    try:
        for kind, value in _run(service, lambda emit: service.image_job(
                rid, text, image.convert("RGB") if image is not None else None, emit)):
            if kind == "error":
                raise gr.Error(f"The model failed on this request (request id {rid}).")
            if kind == "done":
                res: ImageJobResult = value
                out = out_dir / rid / f"healthgpt-{task.replace(' ', '_')}.png"
                out.parent.mkdir(parents=True)
                Image.fromarray(res.image).save(out)
                return str(out), str(out)
    except ApiError as err:
        raise gr.Error(err.message) from err
    raise gr.Error("no image was generated")


def build_ui(service: Service) -> gr.Blocks:
    out_dir = Path(tempfile.mkdtemp(prefix="healthgpt-ui-"))  # generated PNGs handed to the browser
    with gr.Blocks(title="HealthGPT (research use only)") as ui:
        gr.Markdown(BANNER, elem_id="research-banner")
        with gr.Tab("Ask about an image", id="chat"):
            with gr.Row():
                chat_image = gr.Image(type="pil", label="Medical image (PNG/JPEG)", elem_id="chat-image", height=320,
                                      sources=["upload"])
                with gr.Column():
                    question = gr.Textbox(label="Question", placeholder="Is there a pleural effusion?",
                                          elem_id="question")
                    max_tokens = gr.Slider(1, service.settings.default_max_tokens, value=min(
                        64, service.settings.default_max_tokens), step=1, label="Max answer tokens")
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    answer = gr.Textbox(label="Answer (research use only)", lines=6, interactive=False,
                                        elem_id="answer")
            # several UI users may wait on the model at once: the worker batches them with API requests
            for trigger in (ask.click, question.submit):
                trigger(lambda im, q, m: (yield from _ask(service, im, q, m)), [chat_image, question, max_tokens],
                        answer, concurrency_limit=service.settings.max_batch, concurrency_id="chat")
        with gr.Tab("Generate an image", id="generate"):
            with gr.Row():
                gen_input = gr.Image(type="pil", label="Input CT/MR slice", elem_id="gen-input", sources=["upload"], height=320)
                gen_output = gr.Image(type="filepath", label="Generated (256x256, research use only)",
                                      elem_id="gen-output", interactive=False, height=320)
            with gr.Row():
                task = gr.Dropdown(list(GENERATION_TASKS), value=next(iter(GENERATION_TASKS)), label="Task",
                                   elem_id="gen-task")
                instruction = gr.Textbox(label="Instruction (optional; the task's default otherwise)",
                                         elem_id="gen-instruction")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            download = gr.File(label="Download PNG", elem_id="gen-download", interactive=False)
            run.click(lambda im, t, i: _generate(service, out_dir, im, t, i), [gen_input, task, instruction],
                      [gen_output, download], concurrency_limit=service.settings.max_batch)
    return ui
