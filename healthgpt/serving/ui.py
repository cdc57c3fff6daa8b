"""The web UI (Gradio Blocks, mounted at ``/`` of the API app): a chat tab and a generation tab.

Both tabs submit jobs to the same model worker as the HTTP API (same queue, same batching), so
the UI and API clients share the model fairly. Every page carries the research-use-only banner.

Each tab has clickable examples (:class:`UiContent`): held-out samples (test split, else val) of the
shard folders given with ``healthgpt serve --examples``, else a few synthetic phantom slices made at
start-up by the demo data's own generator (:mod:`vlhealth.demo.phantom`). Clicking one fills the
inputs and runs the model. Serving an export folder shows its model card's summary (preset, stages,
training data and their access, the research-use notice).
"""

from __future__ import annotations

import io
import json
import queue
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from healthgpt.serving.errors import ApiError, new_request_id
from healthgpt.serving.service import GENERATION_TASKS, RESEARCH_NOTICE, Service
from healthgpt.serving.worker import ChatResult, ImageJobResult, QueueFull

__all__ = ["UiContent", "build_ui", "model_card_summary"]

EXAMPLES_PER_TAB = 3
# (phantom kind, lesions, question) and (phantom kind, task, instruction) of the synthetic examples
_SYNTHETIC_CHAT = (("ct_head", 1, "Is there a lesion in this image?"),
                   ("xray_chest", 0, "Which organ system is shown in this image?"),
                   ("mr_head", 2, "How many lesions are visible?"))
_SYNTHETIC_GEN = (("ct_head", "CT to MRI"), ("mr_head", "MRI to CT"), ("ct_pelvis", "CT to MRI"))


@dataclass
class UiContent:
    """What the UI shows besides its controls: example rows per tab and the model card summary."""

    chat: list[list[Any]] = field(default_factory=list)  # [image path, question]
    generation: list[list[Any]] = field(default_factory=list)  # [image path, task, instruction]
    labels: dict[str, list[str]] = field(default_factory=dict)
    card: str | None = None  # markdown, for an export folder

    @classmethod
    def load(cls, checkpoint: str | Path | None, example_dirs: Sequence[str | Path] = ()) -> UiContent:
        """Examples from ``example_dirs`` (held-out samples) or synthetic ones; the card of an export folder."""
        from healthgpt.sharing.export import is_export_folder, read_export_info

        folder = Path(tempfile.mkdtemp(prefix="healthgpt-examples-"))
        content = _shard_examples(example_dirs, folder) if example_dirs else _synthetic_examples(folder)
        if checkpoint is not None and is_export_folder(checkpoint):
            content.card = model_card_summary(read_export_info(checkpoint))
        return content


def _instruction(rec: dict[str, Any]) -> str:
    first = next((t["value"] for t in rec.get("conversations", []) if t.get("from") == "human"), "")
    return first.replace("<image>\n", "").replace("<image>", "").strip()


def _shard_examples(dirs: Sequence[str | Path], folder: Path) -> UiContent:
    """Up to :data:`EXAMPLES_PER_TAB` held-out samples per task (test split first, then val), one per
    subtask where there are several, written as ``example-N.png`` (no sample key or patient id in a name)."""
    from vlhealth.shards import ShardError, iter_tar, list_shards

    content = UiContent(labels={"chat": [], "generation": []})
    for split in ("test", "val"):
        seen: set[tuple[str, str]] = set()
        for d in dirs:
            if not Path(d).is_dir():
                raise ValueError(f"--examples {Path(d).name}: not a shard folder")
            try:
                tars = list_shards(d)
            except (ShardError, OSError, ValueError) as err:
                raise ValueError(f"--examples {Path(d).name}: {err}") from err
            for tar in tars:
                for _key, members in iter_tar(tar):
                    if len(content.chat) >= EXAMPLES_PER_TAB and len(content.generation) >= EXAMPLES_PER_TAB:
                        break
                    try:
                        rec = json.loads(members.get("json", b"{}"))
                    except (UnicodeDecodeError, json.JSONDecodeError):
                        continue
                    image = members.get("input.png", members.get("input.jpg"))
                    task, sub = rec.get("task"), str(rec.get("subtask", ""))
                    if rec.get("split") != split or image is None or (task, sub) in seen:
                        continue
                    rows = content.chat if task == "comprehension" else content.generation
                    if len(rows) >= EXAMPLES_PER_TAB:
                        continue
                    text = _instruction(rec)
                    if not text:
                        continue
                    seen.add((task, sub))
                    path = folder / f"example-{len(content.chat) + len(content.generation) + 1}.png"
                    try:
                        with Image.open(io.BytesIO(image)) as im:
                            im.convert("RGB" if im.mode not in ("L", "RGB") else im.mode).save(path)
                    except OSError:
                        continue
                    label = f"{Path(d).name} ({split}, {sub or task})"
                    if task == "comprehension":
                        content.chat.append([str(path), text])
                        content.labels["chat"].append(label)
                    else:
                        task_name = next((k for k, v in GENERATION_TASKS.items() if v == text), next(iter(GENERATION_TASKS)))
                        content.generation.append([str(path), task_name, text])
                        content.labels["generation"].append(label)
        if content.chat and content.generation:
            break
    if not content.chat and not content.generation:
        raise ValueError("--examples: no held-out (test or val) sample with an image in "
                         + ", ".join(Path(d).name for d in dirs))
    return content


def _synthetic_examples(folder: Path) -> UiContent:
    """Phantom slices from the demo data's generator, with a seed no demo build uses (never trained on)."""
    import numpy as np

    from vlhealth.demo.phantom import scan_2d

    rng = np.random.default_rng(24_2502)
    content = UiContent(labels={"chat": [], "generation": []})
    for i, (kind, lesions, question) in enumerate(_SYNTHETIC_CHAT):
        path = folder / f"example-{i + 1}.png"
        Image.fromarray(scan_2d(rng, kind, lesions, (256, 256)).image).save(path)
        content.chat.append([str(path), question])
        content.labels["chat"].append(f"synthetic {kind.replace('_', ' ')}")
    for i, (kind, task) in enumerate(_SYNTHETIC_GEN):
        path = folder / f"example-{len(_SYNTHETIC_CHAT) + i + 1}.png"
        Image.fromarray(scan_2d(rng, kind, 0, (256, 256)).image).save(path)
        content.generation.append([str(path), task, GENERATION_TASKS[task]])
        content.labels["generation"].append(f"synthetic {kind.replace('_', ' ')}: {task}")
    return content


def model_card_summary(info: dict[str, Any]) -> str:
    """Markdown summary of an export folder's ``healthgpt_export.json``: preset, stages, data lineage, notice."""
    lines = [f"**Preset** `{info.get('preset')}` · exported from run `{info.get('source_run')}`"
             + (f" · base model {', '.join(map(str, info['base_model']))}" if info.get("base_model") else "")]
    stages = info.get("stages") or []
    if stages:
        lines += ["", "| stage | task | steps | data |", "| --- | --- | --- | --- |"]
        for st in stages:
            lines.append(f"| {st.get('stage', '?')} | {st.get('task', '?')} | {st.get('steps') or '?'} | "
                         f"{', '.join(map(str, st.get('shards') or [])) or 'unknown'} |")
    data = info.get("training_data") or []
    if data:
        lines += ["", "**Training data** (lineage): " + "; ".join(
            f"{d.get('name')} ({d.get('source') or 'unknown source'}, {d.get('access', 'unknown')} access"
            + (f", {d['license']}" if d.get("license") else "") + ")" for d in data)]
    report = info.get("eval")
    if isinstance(report, dict) and report.get("summary"):
        lines += ["", f"**Evaluation**: {report['summary']}"]
    lines += ["", f"**Research use only — not for clinical use.** {RESEARCH_NOTICE}"]
    return "\n".join(lines)

BANNER = f"""## HealthGPT

**Research use only — not for clinical use.** {RESEARCH_NOTICE}
"""


def _run(service: Service, make_job: Any) -> Iterator[tuple[str, Any]]:
    """Submit a job and yield its events as they come (this runs in one of Gradio's worker threads)."""
    events: queue.Queue[tuple[str, Any]] = queue.Queue()
    job = make_job(lambda kind, value: events.put((kind, value)))
    try:
        service.worker.submit(job)
    except QueueFull as err:
        raise gr.Error(f"The server is busy ({err}); try again in a moment.") from err
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
    content: UiContent = getattr(service, "ui_content", None) or UiContent.load(None)
    with gr.Blocks(title="HealthGPT (research use only)") as ui:
        gr.Markdown(BANNER, elem_id="research-banner")
        if content.card:
            with gr.Accordion("About this model (from its model card)", open=True, elem_id="model-card"):
                gr.Markdown(content.card)
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
            if content.chat:  # clicking one fills the image and question and asks the model
                gr.Examples(content.chat, [chat_image, question], answer,
                            fn=lambda im, q: (yield from _ask(service, im, q, min(64, service.settings.default_max_tokens))),
                            run_on_click=True, cache_examples=False, elem_id="chat-examples",
                            example_labels=content.labels.get("chat"), label="Examples (click one to ask)")
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
            if content.generation:
                gr.Examples(content.generation, [gen_input, task, instruction], [gen_output, download],
                            fn=lambda im, t, i: _generate(service, out_dir, im, t, i), run_on_click=True,
                            cache_examples=False, elem_id="gen-examples",
                            example_labels=content.labels.get("generation"),
                            label="Examples (click one to generate)")
    return ui
