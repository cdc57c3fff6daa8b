"""``healthgpt plan``: size a training run without a GPU (tables, or ``--json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from healthgpt.training.plan.core import GIB, GPUS, PlanConfig, make_plan
from healthgpt.training.plan.trace import KINDS
from vlhealth.cli_errors import print_error

__all__ = ["PLAN_HELP", "plan_command", "render"]

PLAN_HELP = (
    "Size a training stage without a GPU: per-GPU peak memory by kind, FLOPs per step, seconds per step "
    "and hours for the stage, which GPU sizes it fits, and the largest micro-batch that fits.\n\n"
    "It traces one real training step (forward, backward, AdamW step) of the preset's HealthGPT built from "
    "its architecture files with no weights, on fake tensors on the CPU, and prints a closed-form estimate "
    "beside it. Samples per stage come from --shards (build.json / index.json counts) or the paper's "
    "dataset sizes; time assumes --mfu (default 0.25, the LLaVA-1.5 anchor; see README 'Planning a run').\n\n"
    "--json prints one object instead of tables: schema, config, model (params), workload (assumed "
    "lengths), memory (per_gpu, traced_step, closed_form_step: bytes by kind + peak), flops "
    "(per_micro_batch per task: model/hardware, traced/closed form; per_step_per_gpu_model/_hardware), "
    "time (mfu, seconds_per_step, steps, hours, samples), fits (24GB/40GB/80GB/141GB), max_micro_batch, notes.\n\n"
    "Example:\n\n"
    "    healthgpt plan --preset m3 --stage 3 --task mixed --global-batch 128 --micro-batch 4 --gpus 8 "
    "--gpu a100-40gb --gradient-checkpointing\n\n"
    "    healthgpt plan --preset l14 --stage 3 --task comprehension --gpu h100-80gb --json"
)


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f}"


def _memory_table(plan: dict[str, Any]) -> Any:
    from rich.table import Table

    mem = plan["memory"]
    t = Table(title="Peak memory per GPU (GiB)")
    for col in ("kind", "per GPU", "traced step", "closed form"):
        t.add_column(col, justify="right" if col != "kind" else "left")
    for kind in (*KINDS, "peak"):
        t.add_row(kind.replace("_", " "), _gib(mem["per_gpu"][kind]), _gib(mem["traced_step"][kind]),
                  _gib(mem["closed_form_step"][kind]))
    return t


def _flops_table(plan: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title="FLOPs per micro-batch (forward + backward, TFLOP)")
    for col in ("task", "model (trace)", "model (formula)", "hardware (trace)", "hardware (formula)"):
        t.add_column(col, justify="right" if col != "task" else "left")
    for task, f in plan["flops"]["per_micro_batch"].items():
        t.add_row(task, *(f"{f[k] / 1e12:,.2f}" for k in ("model_traced", "model_closed_form", "hardware_traced",
                                                            "hardware_closed_form")))
    return t


def _summary_table(plan: dict[str, Any]) -> Any:
    from rich.table import Table

    cfg, tm, f = plan["config"], plan["time"], plan["flops"]
    mm = plan["max_micro_batch"]
    t = Table(title="Run", show_header=False)
    t.add_column("what")
    t.add_column("value")
    rows = [
        ("run", f"{cfg['preset']} stage {cfg['stage']} {cfg['task']} | {cfg['gpus']} x {cfg['gpu']} | "
                f"{cfg['precision']}{' +grad-ckpt' if cfg['gradient_checkpointing'] else ''}"
                f"{' +fsdp' if cfg['fsdp'] else ''}"),
        ("batch", f"global {cfg['global_batch']} = micro {cfg['micro_batch']} x {cfg['gpus']} GPUs x "
                  f"{cfg['grad_accum']} accumulation"),
        ("params", f"{plan['model']['trainable_params']:,} trainable / {plan['model']['total_params']:,}"),
        ("sequence", ", ".join(f"{w['task']}: {w['seq_len']} ({w['image_tokens']} image + {w['prompt_tokens']} "
                               f"prompt + {w['labelled_tokens']} labelled)" for w in plan["workload"])),
        ("model FLOPs / step / GPU", f"{f['per_step_per_gpu_model'] / 1e12:,.1f} TFLOP "
                                    f"(hardware {f['per_step_per_gpu_hardware'] / 1e12:,.1f})"),
        ("time / step", f"{tm['seconds_per_step']:.2f} s at MFU {tm['mfu']:.2f} of {tm['peak_tflops_per_gpu']:.0f} "
                        f"TFLOP/s (HFU {tm['hfu']:.2f})"),
        ("stage", f"{tm['samples']:,} samples x {tm['epochs']} epoch = {tm['steps']:,} steps = "
                  f"{tm['hours']:.1f} h ({tm['samples_source']})"),
        ("fits", "  ".join(f"{k}: {'yes' if v else 'no'}" for k, v in plan["fits"].items())),
        (f"max micro-batch on {mm['gpu']}", f"{mm['with_checkpointing']} with checkpointing, "
                                            f"{mm['without_checkpointing']} without"),
    ]
    for row in rows:
        t.add_row(*row)
    return t


def render(plan: dict[str, Any], console: Any) -> None:
    console.print(_summary_table(plan))
    console.print(_memory_table(plan))
    console.print(_flops_table(plan))
    for note in plan["notes"]:
        console.print(f"[dim]note: {note}[/dim]")


def plan_command(
    preset: Annotated[str, typer.Option(help="tiny, smollm2-135m, m3, l14, xl32.")] = "m3",
    stage: Annotated[int, typer.Option(help="Training stage: 1, 2 or 3.")] = 3,
    task: Annotated[str, typer.Option(help="comprehension, generation or mixed.")] = "mixed",
    global_batch: Annotated[int | None, typer.Option(help="Samples per optimizer step (default: Table 7).")] = None,
    micro_batch: Annotated[int | None, typer.Option(help="Samples per forward per GPU (default: config).")] = None,
    gpus: Annotated[int, typer.Option(help="Data-parallel GPUs.")] = 8,
    gpu: Annotated[str, typer.Option(help=f"GPU model: {', '.join(GPUS)}.")] = "a100-80gb",
    gradient_checkpointing: Annotated[bool, typer.Option(help="Gradient checkpointing (the trainer's CUDA default).")] = True,
    fsdp: Annotated[bool, typer.Option(help="FSDP as the trainer wraps it (one unit).")] = False,
    precision: Annotated[str, typer.Option(help="bf16 (autocast, the trainer's CUDA default) or fp32.")] = "bf16",
    shards: Annotated[list[Path] | None, typer.Option(help="Shard folders: sample counts (else the paper's).")] = None,
    mfu: Annotated[float | None, typer.Option(help="Model FLOPs utilisation for the time estimate (default 0.25).")] = None,
    prompt_tokens: Annotated[int | None, typer.Option(help="Assumed prompt tokens (default 64).")] = None,
    answer_tokens: Annotated[int | None, typer.Option(help="Assumed answer tokens, comprehension (default 128).")] = None,
    search: Annotated[bool, typer.Option(help="Search the largest micro-batch that fits (a few more traces).")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the plan as one JSON object.")] = False,
) -> None:
    from rich.console import Console

    from vlhealth.shards import require_shards

    # a folder with build.json gives its counts without the tars (a plan made before they are copied over)
    require_shards([s for s in shards or [] if not (Path(s) / "build.json").is_file()], "--shards")
    if precision not in ("bf16", "fp32"):
        raise typer.BadParameter("--precision must be bf16 or fp32")
    cfg = PlanConfig(preset=preset, stage=stage, task=task, global_batch=global_batch, micro_batch=micro_batch,
                     gpus=gpus, gpu=gpu, precision=precision, gradient_checkpointing=gradient_checkpointing,
                     fsdp=fsdp, mfu=mfu, shards=[str(s) for s in shards or []], prompt_tokens=prompt_tokens,
                     answer_tokens=answer_tokens, search_micro_batch=search)
    try:
        plan = make_plan(cfg)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print_error(err)
        raise typer.Exit(2) from err
    if json_out:
        typer.echo(json.dumps(plan, indent=1))
        return
    render(plan, Console())
