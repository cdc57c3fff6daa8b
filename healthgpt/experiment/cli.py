"""``healthgpt experiment run|collect|list``: the paper's ablations as grids of training runs."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from vlhealth.cli_errors import print_error

__all__ = ["experiment_app"]

console = Console(stderr=True)

experiment_app = typer.Typer(
    name="experiment",
    help=(
        "Reproduce the paper's ablations (Tables 4, 5, 10, Figures 2, 6): grids of `healthgpt train` + "
        "`healthgpt eval` runs, tables with the paper's numbers beside ours, verdicts per claim, loss curves.\n\n"
        "Example:\n\n    healthgpt experiment run experts peft-variants --out runs/exp\n\n"
        "    healthgpt experiment collect runs/exp"
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)


def _parse_vars(items: list[str] | None) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"--var expects NAME=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


@experiment_app.command(
    help=(
        "Run experiments (shipped names or YAML files) into OUT/<name>/runs/<cell>__s<seed>/, then collect "
        "OUT/results.md, OUT/results.json and OUT/<name>/loss_curves.png.\n\n"
        "Each run is one `healthgpt train` process per pipeline step plus one `healthgpt eval`; the exact "
        "commands are saved as command.sh in its folder. Rerunning the same command skips finished runs and "
        "continues unfinished ones (the trainer's --resume). --run i/n (0-based) takes a contiguous share of "
        "the runs, for SLURM arrays or several machines writing into one shared OUT; then run "
        "`healthgpt experiment collect OUT`. Runs execute seed by seed with the cells interleaved, so time "
        "ratios compare variants measured side by side. A run equal to a finished run of another experiment "
        "under OUT is copied, not retrained (experts holds peft-variants' small runs: give experts first).\n\n"
        "Example:\n\n"
        "    healthgpt experiment run experts peft-variants --out runs/exp\n\n"
        "    healthgpt experiment run peft-variants --out runs/exp --var shards=demo/shards\n\n"
        "    healthgpt experiment run peft-variants --form full --out runs/exp-m3 "
        "--run $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT --report-to wandb"
    ),
)
def run(
    experiments: Annotated[list[str], typer.Argument(help="Shipped experiment names (see `list`) or YAML files.")],
    out: Annotated[Path, typer.Option(help="Output folder (reuse it to resume).")],
    form: Annotated[str, typer.Option(help="small (CPU, demo shards) or full (M3 on GPUs).")] = "small",
    run_share: Annotated[str | None, typer.Option("--run", help="Take share i of n (0-based): i/n.")] = None,
    var: Annotated[list[str] | None, typer.Option("--var", help="Override a path/variable of the YAML: NAME=VALUE.")] = None,
    demo_dir: Annotated[Path | None, typer.Option(help="Where the demo's pre-trained parts are (text-lm/, vq/, "
                                                  "vision/; `make demo` writes them to demo/): sets --var demo.")] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="Start the small forms from the "
                                             "demo's pre-trained parts (the YAML's pretrained:), or from random "
                                             "weights.")] = True,
    dry_run: Annotated[bool, typer.Option(help="Print the runs and their commands; run nothing.")] = False,
    collect_after: Annotated[bool, typer.Option("--collect/--no-collect", help="Collect results afterwards.")] = True,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    report_to: Annotated[list[str] | None, typer.Option(help="Trackers every training step logs to, as `healthgpt "
                                                        "train --report-to` (csv, tensorboard, wandb, mlflow); each "
                                                        "step's tracker run is named <experiment>/<run>/<step>.")] = None,
) -> None:
    from healthgpt.experiment.collect import collect
    from healthgpt.experiment.runner import missing_parts, plan, program, run_experiments, tracker_argv
    from healthgpt.experiment.spec import ExperimentError, load_experiment, partition_runs
    from healthgpt.training.trackers import check_available, parse_report_to
    from vlhealth.build import parse_partition

    try:
        share = parse_partition(run_share)
    except ValueError as err:
        raise typer.BadParameter(f"--run: {err}") from None
    try:
        trackers = parse_report_to(report_to)
        check_available(trackers)  # before the first run, not in each run's log
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    try:
        exps = [load_experiment(e) for e in experiments]
        names = [e.name for e in exps]
        if len(set(names)) != len(names):
            raise ExperimentError(f"the same experiment twice: {names}")
        variables = _parse_vars(var)
        if demo_dir is not None:
            variables["demo"] = str(demo_dir)
        if dry_run:
            everything = plan(exps, form, out, variables, pretrained=pretrained)
            mine = {id(r) for r in partition_runs([r for _, r in everything], share)}
            for exp, r in everything:
                if id(r) in mine:
                    typer.echo(f"# {exp.name} #{r.index}: {r.cell}, seed {r.seed} -> {r.dir}")
                    for s in r.steps:
                        typer.echo(shlex.join([*program(r, "train"), *s.argv, *tracker_argv(r, s, trackers)]))
                    typer.echo(shlex.join([*program(r, "eval"), *r.eval_argv]))
            console.print(f"{len(mine)} of {len(everything)} runs (dry run: nothing was run)")
            problem = missing_parts([r for _, r in everything])
            if problem:
                console.print(f"[yellow]note:[/yellow] {problem}")
            return
        outcomes = run_experiments(exps, form, out, share=share, variables=variables, console=console,
                                   progress=progress, pretrained=pretrained, report_to=trackers)
        if collect_after:
            results = collect(out)
            console.print(f"wrote {out.name}/results.md, results.json and "
                          f"{', '.join(f'{r.exp.name}/loss_curves.png' for r in results)}")
    except ExperimentError as err:
        print_error(err)
        raise typer.Exit(2) from None
    failed = [o.run_id for o in outcomes if o.status != "finished"]
    if failed:
        console.print(f"[red]{len(failed)} run(s) failed:[/red] {', '.join(failed)}; rerun the same command to retry")
        raise typer.Exit(1)


@experiment_app.command(
    help=(
        "Assemble results.md, results.json and the loss-curve PNGs from the runs finished so far under OUT "
        "(partial results are fine: missing runs are listed and their cells show fewer seeds).\n\n"
        "Example:\n\n    healthgpt experiment collect runs/exp"
    ),
)
def collect(
    out: Annotated[Path, typer.Argument(help="The --out folder of `experiment run`.")],
    plots: Annotated[bool, typer.Option(help="Also draw the loss curves.")] = True,
) -> None:
    from healthgpt.experiment.collect import collect as do_collect
    from healthgpt.experiment.spec import ExperimentError

    try:
        results = do_collect(out, plots=plots)
    except ExperimentError as err:
        print_error(err)
        raise typer.Exit(2) from None
    for r in results:
        c = r.counts()
        console.print(f"{r.exp.name}: {c['finished']}/{c['runs']} runs finished")
    typer.echo((out / "results.md").read_text("utf-8"))


@experiment_app.command(
    name="list",
    help="List the experiments shipped with the package.\n\nExample:\n\n    healthgpt experiment list",
)
def list_experiments() -> None:
    from rich.table import Table

    from healthgpt.experiment.spec import load_experiment, shipped_experiments

    table = Table(title="shipped experiments (healthgpt/experiment/experiments/*.yaml)")
    for col in ("name", "title", "cells", "seeds", "forms"):
        table.add_column(col)
    for name in shipped_experiments():
        exp = load_experiment(name)
        table.add_row(name, exp.title, str(len(exp.cells)), str(len(exp.seeds)), ", ".join(exp.forms))
    Console().print(table)
