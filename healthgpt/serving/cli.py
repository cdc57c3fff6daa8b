"""``healthgpt serve``: load the model once, serve the OpenAI-compatible API and the web UI."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["SERVE_HELP", "serve_command"]

SERVE_HELP = (
    "Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/images/edits, "
    "/v1/models, /healthz) with a web UI at / (chat and image generation tabs).\n\n"
    "--checkpoint takes a training run, a checkpoint, or a folder written by `healthgpt export`, or such a "
    "folder on the Hub by id (hf://ORG/NAME[@REVISION]; HF_HUB_OFFLINE=1 uses the local cache only). "
    "One process loads the model once; requests queue and run one batch at a time (waiting chat "
    "requests are decoded together). Research use only, not for clinical use.\n\n"
    "Example:\n\n"
    "    healthgpt serve --preset tiny --checkpoint demo/runs/stage3 --port 8000\n\n"
    "    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' "
    "-d '{\"model\": \"healthgpt-tiny\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'"
)


def serve_command(
    preset: Annotated[str, typer.Option(help="tiny, smollm2-135m, m3, l14, xl32.")] = "tiny",
    checkpoint: Annotated[str | None, typer.Option(
        help="Training run / checkpoint / .safetensors, or a `healthgpt export` folder; or a Hub id "
             "hf://ORG/NAME[@REVISION].")] = None,
    released: Annotated[str | None, typer.Option(
        help="Folder with the released HealthGPT-M3 files, or their Hub id (hf://lintw/HealthGPT-M3).")] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    model_name: Annotated[str | None, typer.Option(
        help="Model id in /v1/models (default: the export folder's name, else healthgpt-<preset>).")] = None,
    vq: Annotated[str, typer.Option(help="VQGAN for decoding generated images: 'tiny' or a weights file.")] = "tiny",
    max_image_mb: Annotated[float, typer.Option(help="Largest accepted input image (MiB).")] = 10.0,
    allow_remote_images: Annotated[bool, typer.Option(help="Fetch http(s) image URLs (off: data: URLs only).")] = False,
    max_batch: Annotated[int, typer.Option(help="Chat requests decoded together at most.")] = 8,
    max_tokens: Annotated[int, typer.Option(help="Default answer length when a request gives none.")] = 256,
    free_images: Annotated[bool, typer.Option(
        help="Decode image tokens freely, as the released code (default: constrained to 1024 codes).")] = False,
    ui: Annotated[bool, typer.Option(help="Mount the web UI at /.")] = True,
    llm_path: Annotated[Path | None, typer.Option(help="Local LLM folder (real presets).")] = None,
    clip_path: Annotated[Path | None, typer.Option(help="Local CLIP ViT-L/14-336 folder.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for random (tiny) weights.")] = 0,
    threads: Annotated[int, typer.Option(help="CPU threads for torch (0: torch's default).")] = 0,
) -> None:
    console = Console(stderr=True)
    try:
        import uvicorn

        from healthgpt.serving.api import create_app
    except ImportError as err:
        console.print(f"[red]error:[/red] serving needs the serve extra ({err.name} is missing): "
                      "pip install -e '.[serve]'")
        raise typer.Exit(2) from err
    from healthgpt.model.presets import MissingWeightsError
    from healthgpt.model.weights import CheckpointError
    from healthgpt.serving.infer import VQUnavailableError, load_model, load_vq_decoder
    from healthgpt.serving.service import ServeSettings, Service
    from healthgpt.sharing.export import is_export_folder
    from healthgpt.sharing.hub import parse_hub_id, resolve_model

    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    overrides: dict[str, object] = {}
    if preset in ("tiny", "smollm2-135m"):
        overrides["seed"] = seed
    for key, value in (("llm_path", llm_path), ("clip_path", clip_path), ("dtype", dtype)):
        if value is not None:
            overrides[key] = value
    try:
        model = load_model(preset, checkpoint=checkpoint, released=released, device=device, **overrides)
        decoder = load_vq_decoder(vq, device=device)
    except (MissingWeightsError, CheckpointError, VQUnavailableError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    if model_name is None:
        hub = parse_hub_id(checkpoint)
        source = resolve_model(checkpoint)  # the folder load_model used (resolved once per process)
        model_name = ((hub.repo_id if hub else source.name) if source is not None and is_export_folder(source)
                      else f"healthgpt-{preset}")
    settings = ServeSettings(model_name=model_name, max_image_mb=max_image_mb, allow_remote_images=allow_remote_images,
                             default_max_tokens=max_tokens, max_batch=max_batch)
    service = Service(model, decoder, settings, constrained_images=not free_images)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    console.print(f"serving {model_name!r} on http://{host}:{port} (API under /v1, UI at /). "
                  "Research use only, not for clinical use.")
    try:
        uvicorn.run(create_app(service, ui=ui), host=host, port=port, log_level="info")
    finally:
        service.close()
