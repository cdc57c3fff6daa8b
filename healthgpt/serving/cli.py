"""``healthgpt serve``: load the model once, serve the OpenAI-compatible API and the web UI."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from healthgpt import RESEARCH_USE
from healthgpt.sharing.run_spec import MODEL_SET_HELP, SEED_HELP, VQ_HELP, VQ_MISMATCH_HELP, command_inputs
from vlhealth.cli_errors import print_error

__all__ = ["SERVE_HELP", "serve_command"]

SERVE_HELP = (
    "Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/images/edits, "
    "/v1/models, /healthz) with a web UI at / (chat and image generation tabs).\n\n"
    "--checkpoint takes a training run, a checkpoint, or a folder written by `healthgpt export`, or such a "
    "folder on the Hub by id (hf://ORG/NAME[@REVISION]; HF_HUB_OFFLINE=1 uses the local cache only). "
    "One process loads the model once; requests queue and run one batch at a time (waiting chat "
    f"requests are decoded together). {RESEARCH_USE}\n\n"
    "Beyond this machine (--host 0.0.0.0) the server needs an API key (--api-key, --api-key-file or "
    "HEALTHGPT_API_KEY): /v1/* then takes `Authorization: Bearer KEY` and the web UI asks for the key once. "
    "Request bodies over --max-request-mb are refused (413) before they are parsed; at most --max-queue "
    "requests wait (429 beyond); a client that disconnects has its job cancelled. The log has request ids, "
    "sizes, timings and status codes, never prompts or images.\n\n"
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
    vq: Annotated[str | None, typer.Option(help=VQ_HELP)] = None,
    vq_mismatch_ok: Annotated[bool, typer.Option(help=VQ_MISMATCH_HELP)] = False,
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
    seed: Annotated[int | None, typer.Option(help=SEED_HELP)] = None,
    threads: Annotated[int, typer.Option(help="CPU threads for torch (0: torch's default).")] = 0,
    api_key: Annotated[list[str] | None, typer.Option(
        "--api-key", help="A key clients must send as `Authorization: Bearer KEY` (repeatable; also "
                          "HEALTHGPT_API_KEY, comma-separated). Prefer --api-key-file: a command line is visible "
                          "to other users of the machine.")] = None,
    api_key_file: Annotated[Path | None, typer.Option(help="File with one API key per line (# comments).")] = None,
    insecure_no_auth: Annotated[bool, typer.Option(
        help="Serve a non-loopback --host without any API key (anyone who can reach the port can use it).")] = False,
    max_request_mb: Annotated[float | None, typer.Option(
        help="Largest request body (MiB), refused with 413 before parsing (default: one --max-image-mb "
             "image as base64 plus 1 MiB).")] = None,
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 1024,
    max_queue: Annotated[int, typer.Option(help="Requests waiting for the model at most; beyond: 429 with "
                                                "Retry-After (0: unbounded).")] = 64,
    request_timeout: Annotated[float, typer.Option(
        help="Per-request deadline in seconds, queueing included; then the job is cancelled and the answer "
             "is 504 (0: none).")] = 300.0,
    examples: Annotated[list[Path] | None, typer.Option(
        "--examples", help="Shard folder(s) whose held-out (test, else val) samples become the web UI's "
                           "clickable examples (default: a few synthetic phantom slices made at start-up).")] = None,
    model_set: Annotated[list[str] | None, typer.Option("--model-set", help=MODEL_SET_HELP)] = None,
) -> None:
    console = Console(stderr=True)
    keys = _checked_start(console, host, port, max_tokens, max_tokens_limit, api_key, api_key_file, insecure_no_auth)
    try:
        import uvicorn

        from healthgpt.serving.api import create_app
    except ImportError as err:
        print_error(f"serving needs the serve extra ({err.name} is missing): pip install -e '.[serve]'")
        raise typer.Exit(2) from err
    from healthgpt.model.presets import MissingWeightsError
    from healthgpt.model.weights import CheckpointError
    from healthgpt.serving.infer import VQUnavailableError, load_model, load_vq_decoder
    from healthgpt.serving.service import ServeSettings, Service
    from healthgpt.sharing.hub import resolve_model

    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    overrides, vq_spec, notes = command_inputs(preset, seed, llm_path, clip_path, dtype, model_set, checkpoint, vq,
                                               vq_mismatch_ok)
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    try:
        model = load_model(preset, checkpoint=checkpoint, released=released, device=device, **overrides)
        decoder = load_vq_decoder(vq_spec, device=device)
    except (MissingWeightsError, CheckpointError, VQUnavailableError, ValueError) as err:
        print_error(err)
        raise typer.Exit(2) from err
    if model_name is None:
        model_name = _default_model_name(checkpoint, preset)
    settings = ServeSettings(model_name=model_name, max_image_mb=max_image_mb, allow_remote_images=allow_remote_images,
                             default_max_tokens=max_tokens, max_batch=max_batch, max_tokens_limit=max_tokens_limit,
                             max_queue=max_queue, request_timeout_s=request_timeout, max_request_mb=max_request_mb,
                             api_keys=tuple(keys))
    service = Service(model, decoder, settings, constrained_images=not free_images)
    if ui:
        from healthgpt.serving.ui import UiContent

        try:
            service.ui_content = UiContent.load(resolve_model(checkpoint), list(examples or ()))
        except ValueError as err:
            print_error(str(err))
            raise typer.Exit(2) from err
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    console.print(f"serving {model_name!r} on http://{host}:{port} (API under /v1, UI at /; "
                  f"{f'{len(keys)} API key(s)' if keys else 'no API key'}). {RESEARCH_USE}")
    try:
        # our own access log (request id, route, status, sizes, timing; never a prompt or an image) replaces
        # uvicorn's; a restart under load waits at most 10 s for the requests in flight
        uvicorn.run(create_app(service, ui=ui), host=host, port=port, log_level="info", access_log=False,
                    timeout_graceful_shutdown=10)
    finally:
        service.close()


def _checked_start(console: Console, host: str, port: int, max_tokens: int, max_tokens_limit: int,
                   api_key: list[str] | None, api_key_file: Path | None, insecure_no_auth: bool) -> list[str]:
    """The checks before the model loads (a refused start costs nothing): the answer-length options, the API keys
    (returned), and a non-loopback --host without a key (refused, or a warning with --insecure-no-auth)."""
    import os

    from healthgpt.serving.guard import is_loopback, read_api_keys

    if max_tokens > max_tokens_limit:
        print_error(f"--max-tokens {max_tokens} is over --max-tokens-limit {max_tokens_limit}; give a smaller "
                    "--max-tokens or a larger --max-tokens-limit")
        raise typer.Exit(2)
    try:
        keys = read_api_keys(api_key or (), api_key_file, os.environ.get("HEALTHGPT_API_KEY"))
    except ValueError as err:
        print_error(str(err))  # our own message (it never shows a key)
        raise typer.Exit(2) from err
    if not keys and not is_loopback(host):
        if not insecure_no_auth:
            print_error(f"--host {host} makes the server reachable from other machines, and it has no API key: "
                        "give one with --api-key-file FILE, --api-key KEY or HEALTHGPT_API_KEY (or --insecure-no-auth "
                        "to serve without authentication, e.g. behind your own proxy)")
            raise typer.Exit(2)
        console.print(f"[bold yellow]warning:[/bold yellow] serving on {host} WITHOUT authentication "
                      f"(--insecure-no-auth): anyone who can reach port {port} can use the model and the UI",
                      soft_wrap=True)
    return list(keys)


def _default_model_name(checkpoint: str | None, preset: str) -> str:
    """The model id in /v1/models: an export's Hub id or folder name, else healthgpt-<preset>."""
    from healthgpt.sharing.export import is_export_folder
    from healthgpt.sharing.hub import parse_hub_id, resolve_model

    hub = parse_hub_id(checkpoint)
    source = resolve_model(checkpoint)  # the folder load_model used (resolved once per process)
    if source is not None and is_export_folder(source):
        return hub.repo_id if hub else source.name
    return f"healthgpt-{preset}"
