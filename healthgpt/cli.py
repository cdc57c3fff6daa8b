"""The ``healthgpt`` command line (typer app ``app``).

Commands: ``infer`` (this module), ``train``, ``eval`` and the ``experiment`` group. The trainer and
evaluator add ``train`` and ``eval`` here:
define ``@app.command()`` functions in this file (or ``app.command()(fn)`` from their modules,
imported below the ``app`` definition); every command's help ends with an ``Example:`` block.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console

from healthgpt import RESEARCH_USE
from healthgpt.sharing.run_spec import MODEL_SET_HELP, SEED_HELP, VQ_HELP, VQ_MISMATCH_HELP, command_inputs
from vlhealth.cli_errors import ErrorGroup, print_error

console = Console(stderr=True)

app = typer.Typer(
    name="healthgpt",
    help=(
        "HealthGPT: a medical vision-language model with H-LoRA (comprehension and generation).\n\n"
        "Example:\n\n    healthgpt infer --preset tiny --image scan.png --question 'What modality is this?'"
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    cls=ErrorGroup,
)


@app.callback()
def _main(debug: Annotated[bool, typer.Option(
        "--debug", help="Show the full traceback of an error (also: HEALTHGPT_DEBUG=1).")] = False) -> None:
    """A wrong input prints one line `error: ...` and exits 2; --debug shows the traceback instead."""


@app.command(
    help=(
        "Answer a question about an image, or generate an image (--task generation).\n\n"
        "Comprehension streams the greedy answer to stdout. Generation decodes the model's 1024 VQ "
        "tokens (fewer with a smaller VQ grid: --model-set image_tokens=256) with the VQGAN and writes a PNG "
        "(plus the codes as <output>.vq.npy); malformed token sequences are repaired (padded/truncated) and "
        "reported on stderr.\n\n"
        "Real presets read their weights from local folders (--llm-path/--clip-path or the "
        "HEALTHGPT_*_DIR variables); --released loads a HealthGPT-M3 download "
        "(com_hlora_weights.bin, gen_hlora_weights.bin, fusion_layer_weights.bin).\n\n"
        "Example:\n\n"
        "    healthgpt infer --preset tiny --image scan.png --question 'What organ is shown?'\n\n"
        "    healthgpt infer --preset tiny --task generation --image ct.png "
        "--instruction 'Convert this CT to MRI' --output mri.png\n\n"
        "    healthgpt infer --preset tiny --checkpoint demo/runs/stage3 "
        "--image scan.png --question 'Is there a lesion?'\n\n"
        "    healthgpt infer --preset tiny --checkpoint hf://my-org/healthgpt-tiny@v1 --image scan.png "
        "--question 'What modality is this?'"
    ),
)
def infer(
    image: Annotated[Path | None, typer.Option(help="Input image (PNG/JPEG).")] = None,
    question: Annotated[str | None, typer.Option(help="Question (comprehension).")] = None,
    instruction: Annotated[str | None, typer.Option(help="Instruction (generation).")] = None,
    task: Annotated[str, typer.Option(help="comprehension or generation.")] = "comprehension",
    preset: Annotated[str, typer.Option(help="tiny, smollm2-135m, m3, l14, xl32.")] = "tiny",
    checkpoint: Annotated[str | None, typer.Option(
        help="Training run, checkpoint, trainable .safetensors, or a `healthgpt export` folder; or a Hub id "
             "hf://ORG/NAME[@REVISION].")] = None,
    released: Annotated[str | None, typer.Option(
        help="Folder with the released HealthGPT-M3 files, or their Hub id (hf://lintw/HealthGPT-M3).")] = None,
    llm_path: Annotated[Path | None, typer.Option(help="Local LLM folder (real presets).")] = None,
    clip_path: Annotated[Path | None, typer.Option(help="Local CLIP ViT-L/14-336 folder.")] = None,
    output: Annotated[Path, typer.Option(help="PNG written by --task generation.")] = Path("generated.png"),
    vq: Annotated[str | None, typer.Option(help=VQ_HELP)] = None,
    vq_mismatch_ok: Annotated[bool, typer.Option(help=VQ_MISMATCH_HELP)] = False,
    constrained: Annotated[bool, typer.Option(help="Force exactly 1024 index tokens + <end_index>.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length limit (comprehension).")] = 256,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16.")] = None,
    seed: Annotated[int | None, typer.Option(help=SEED_HELP)] = None,
    threads: Annotated[int, typer.Option(help="CPU threads for torch (0: torch's default).")] = 0,
    model_set: Annotated[list[str] | None, typer.Option("--model-set", help=MODEL_SET_HELP)] = None,
) -> None:
    from healthgpt.model.presets import MissingWeightsError
    from healthgpt.model.weights import CheckpointError
    from healthgpt.serving.infer import VQUnavailableError, answer, generate_image, load_model, load_vq_decoder

    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    if task not in ("comprehension", "generation"):
        raise typer.BadParameter(f"--task must be comprehension or generation, got {task!r}")
    if image is not None and not image.is_file():
        print_error(f"{image}: image not found; check the path")
        raise typer.Exit(2)
    text = question if task == "comprehension" else (instruction or question)
    if not text:
        raise typer.BadParameter("--question (comprehension) or --instruction (generation) is required")
    overrides, vq_spec, notes = command_inputs(preset, seed, llm_path, clip_path, dtype, model_set, checkpoint, vq,
                                                 vq_mismatch_ok)
    try:
        model = load_model(preset, checkpoint=checkpoint, released=released, device=device, **overrides)
    except (MissingWeightsError, CheckpointError, ValueError) as err:
        print_error(err)
        raise typer.Exit(2) from err

    typer.echo(RESEARCH_USE, err=True)  # once, before the answer or the image (stdout keeps only the answer)
    if task == "comprehension":
        answer(model, image, text, max_new_tokens=max_new_tokens,
               on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        sys.stdout.write("\n")
        return

    for note in notes:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    try:
        decoder = load_vq_decoder(vq_spec, device=device)
    except VQUnavailableError as err:
        console.print(f"[yellow]warning:[/yellow] {err}; writing the codes only")
        decoder = None
    result = generate_image(model, image, text, vq=decoder, constrained=constrained)
    codes_path = output.with_suffix(".vq.npy")
    output.parent.mkdir(parents=True, exist_ok=True)
    np.save(codes_path, result.codes.astype(np.int16))
    if not result.report.ok:
        console.print(f"[yellow]repaired image tokens:[/yellow] {'; '.join(result.report.notes)} "
                      f"({result.report.n_index_tokens} index tokens generated)")
    if result.image is None:
        console.print(f"wrote {codes_path.name} (no VQ decoder, no PNG)")
        raise typer.Exit(3)
    from PIL import Image

    Image.fromarray(result.image).save(output)
    console.print(f"wrote {output.name} and {codes_path.name}")


# `healthgpt eval` lives with the evaluator (healthgpt/evaluation/evaluate.py).
from healthgpt.evaluation.evaluate import EVAL_HELP, eval_command  # noqa: E402

app.command(name="eval", help=EVAL_HELP)(eval_command)

# `healthgpt eval-volumes` (3D SynthRAD2023 scoring) lives in healthgpt/evaluation/volume_eval.py.
from healthgpt.evaluation.volume_eval import EVAL_VOLUMES_HELP, eval_volumes_command  # noqa: E402

app.command(name="eval-volumes", help=EVAL_VOLUMES_HELP)(eval_volumes_command)

# `healthgpt train` lives with the trainer (healthgpt/training/train.py).
from healthgpt.training.train import train_command  # noqa: E402

app.command(name="train")(train_command)

# `healthgpt export` / `healthgpt publish` share a trained run (healthgpt/sharing/export.py, healthgpt/sharing/publish.py);
# `healthgpt serve` is the API + web UI (healthgpt/serving/, needs the `serve` extra only when run).
from healthgpt.serving.cli import SERVE_HELP, serve_command  # noqa: E402
from healthgpt.sharing.export import EXPORT_HELP, export_command  # noqa: E402
from healthgpt.sharing.publish import PUBLISH_HELP, publish_command  # noqa: E402

app.command(name="export", help=EXPORT_HELP)(export_command)
app.command(name="publish", help=PUBLISH_HELP)(publish_command)
app.command(name="serve", help=SERVE_HELP)(serve_command)

# `healthgpt pretrain-text`: brief text pre-training of a small preset's LLM (before stage 1).
from healthgpt.training.pretrain_text import pretrain_text_command  # noqa: E402

app.command(name="pretrain-text")(pretrain_text_command)

# `healthgpt pretrain-vision`: pre-train a small preset's vision tower (frozen afterwards, as CLIP is).
from healthgpt.training.pretrain_vision import pretrain_vision_command  # noqa: E402


@functools.wraps(pretrain_vision_command)
def _pretrain_vision(*args: object, **kwargs: object) -> None:
    """`healthgpt pretrain-vision`, its --shards checked first (one error line for a wrong one)."""
    from vlhealth.shards import require_shards

    require_shards(kwargs["shards"], "--shards")  # type: ignore[arg-type]
    pretrain_vision_command(*args, **kwargs)


app.command(name="pretrain-vision")(_pretrain_vision)

# `healthgpt plan`: size a run without a GPU (healthgpt/training/plan/).
from healthgpt.training.plan.cli import PLAN_HELP, plan_command  # noqa: E402

app.command(name="plan", help=PLAN_HELP)(plan_command)

# `healthgpt verdict`: one line per task, model vs best baseline, targets met or missed.
from healthgpt.evaluation.verdict import verdict_command  # noqa: E402


@functools.wraps(verdict_command)
def _verdict(*args: object, **kwargs: object) -> None:
    """`healthgpt verdict`, its folders checked first (one error line for a wrong one)."""
    eval_dir, runs = Path(str(kwargs["eval_dir"])), kwargs.get("runs")
    if not (eval_dir / "report.json").is_file():
        why = "no such folder" if not eval_dir.exists() else "no report.json in it"
        raise FileNotFoundError(f"--eval {kwargs['eval_dir']}: {why}; give the --out folder of `healthgpt eval`")
    if runs is not None and not Path(str(runs)).is_dir():
        raise FileNotFoundError(f"--runs {runs}: no such folder; give the folder holding the training runs")
    verdict_command(*args, **kwargs)


app.command(name="verdict")(_verdict)

# `healthgpt experiment run|collect|list` lives in healthgpt/experiment/.
from healthgpt.experiment.cli import experiment_app  # noqa: E402

app.add_typer(experiment_app, name="experiment")


if __name__ == "__main__":  # pragma: no cover
    app()
