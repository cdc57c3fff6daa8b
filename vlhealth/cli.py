"""The ``vlhealth`` command line: demo data, builds, statistics and shard maintenance."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import pkgutil
import sys
import typing
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

import vlhealth.builders as builders
from vlhealth.build import builder_hook
from vlhealth.cli_errors import ErrorGroup, print_error
from vlhealth.limits import Limits

console = Console(stderr=True)

app = typer.Typer(
    name="vlhealth",
    help=(
        "Curate VL-Health: read upstream medical datasets in their real layouts and write sharded "
        "WebDataset tars.\n\nExample:\n\n    vlhealth demo-data demo/raw && "
        "vlhealth build synthrad demo/raw/synthrad2023 --out demo/shards/synthrad && vlhealth stats demo/shards/*"
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


build_app = typer.Typer(
    help="Build shards from one upstream source.\n\nExample:\n\n    vlhealth build synthrad /data/SynthRAD2023 --out shards/synthrad",
    no_args_is_help=True,
)
app.add_typer(build_app, name="build")


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(help="Folder to write the replicas into (one sub-folder per source).")],
    source: Annotated[list[str] | None, typer.Option("--source", "-s", help="Only these sources (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives byte-identical files.")] = 0,
    scale: Annotated[int, typer.Option(help="Make SynthRAD2023, VQA-RAD and SLAKE about this many times larger "
                                            "(enough data for the demo's model to learn from).")] = 1,
    scale_source: Annotated[list[str] | None, typer.Option(
        "--scale-source", help="NAME=K: this source K times larger instead of --scale (repeatable; "
                               "synthrad2023, vqa_rad, slake).")] = None,
) -> None:
    """Write small, deterministic synthetic replicas of the upstream dataset layouts.

    Example:

        vlhealth demo-data demo/raw --source synthrad2023 --source ixi
        vlhealth demo-data demo/raw --scale 6 --scale-source vqa_rad=30
    """
    from vlhealth.demo import write_demo_data

    scales: dict[str, int] = {}
    for item in scale_source or []:
        name, sep, k = item.partition("=")
        try:
            if not sep:
                raise ValueError(item)
            scales[name.strip()] = int(k)
        except ValueError:
            raise typer.BadParameter(f"expected NAME=K (a whole number), got {item!r}",
                                     param_hint="--scale-source") from None
    try:
        written = write_demo_data(out, sources=source or None, seed=seed, scale=scale, scales=scales)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    for name, path in written.items():
        console.print(f"[green]wrote[/] {name}: {path}")


@app.command("stats")
def stats(
    shards: Annotated[list[Path], typer.Argument(help="Shard folders or .tar files.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Write bar charts to this PNG.")] = None,
) -> None:
    """Count samples by task, subtask, source, split, modality, body part and answer type.

    Example:

        vlhealth stats shards/synthrad shards/vqa_rad --plot stats.png
    """
    from vlhealth.shards import require_shards
    from vlhealth.stats import compute_stats, plot_stats, render_table

    require_shards(shards, "SHARDS")
    result = compute_stats(shards)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    else:
        render_table(result, Console())
    if plot is not None:
        plot_stats(result, plot)
        console.print(f"[green]wrote[/] {plot}")


@app.command("verify")
def verify(shards: Annotated[list[Path], typer.Argument(help="Shard folders.")]) -> None:
    """Check every tar against the sha256 in its folder's index.json and that all samples parse.

    Example:

        vlhealth verify shards/synthrad
    """
    from vlhealth.schema import SchemaError
    from vlhealth.shards import ShardError, iter_samples, require_shards, verify_shards

    require_shards(shards, "SHARDS")
    bad = 0
    for folder in shards:
        try:
            problems = verify_shards(folder)
            n = sum(1 for _ in iter_samples(folder)) if not problems else 0
        except (ShardError, SchemaError) as exc:
            problems = [str(exc)]
        for p in problems:
            console.print(f"[red]{folder.name}[/]: {p}")
        bad += len(problems)
        if not problems:
            console.print(f"[green]ok[/] {folder.name}: {n} samples")
    raise typer.Exit(1 if bad else 0)


@app.command("publish")
def publish_cmd(
    shards: Annotated[list[Path], typer.Argument(help="Shard folders written by `vlhealth build`.")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="Hub dataset repository, e.g. my-org/vl-health.")],
    public: Annotated[bool, typer.Option(help="Create the repository public (default private).")] = False,
    dry_run: Annotated[bool, typer.Option(help="Check and list what would be uploaded; upload nothing.")] = False,
) -> None:
    """Upload shard folders and a dataset card to the Hugging Face Hub (credentialed sources are refused).

    Example:

        vlhealth publish shards/synthrad shards/vqa_rad --repo-id my-org/vl-health --dry-run
    """
    from vlhealth.publish import PublishError, publish
    from vlhealth.shards import require_shards

    require_shards(shards, "SHARDS")
    try:
        plan = publish(shards, repo_id, private=not public, dry_run=dry_run)
    except PublishError as exc:
        print_error(f"refused: {exc}")
        raise typer.Exit(2) from exc
    size = sum(src.stat().st_size for src, _ in plan.files)
    verb = "would upload" if dry_run else "uploaded"
    console.print(f"{verb} {len(plan.files)} files ({size / 1e6:.1f} MB) + README.md to {repo_id}")
    if dry_run:
        for _src, dst in plan.files:
            console.print(f"  {dst}")


@app.command("merge-index")
def merge_index_cmd(
    folder: Annotated[Path, typer.Argument(help="Shard folder the partitions were built into.")],
    expect: Annotated[int | None, typer.Option(help="Number of partitions n that must all be present.")] = None,
    allow_partial: Annotated[bool, typer.Option(help="Merge even if some partitions are missing.")] = False,
) -> None:
    """Join the indexes of `vlhealth build --partition i/n` runs into one index.json (+ rejects, build.json).

    Example:

        vlhealth merge-index shards/synthrad --expect 8
    """
    from vlhealth.build import merge_partitions

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder; give the --out folder the partitions were built into")
    try:
        index = merge_partitions(folder, expect, allow_partial=allow_partial)
    except (ValueError, FileNotFoundError) as exc:
        print_error(exc)
        raise typer.Exit(2) from exc
    console.print(f"[green]merged[/] {len(index['partitions'])}/{index['of']} partitions: "
                  f"{len(index['shards'])} shards, {index['total_samples']} samples -> {folder / 'index.json'}")


@app.command("check-leaks")
def check_leaks_cmd(
    shards: Annotated[list[Path], typer.Argument(help="Shard folders or .tar files to check (all sources).")],
    test: Annotated[list[Path] | None, typer.Option(
        "--test", help="Take the test images from these shards instead (repeatable).")] = None,
    max_distance: Annotated[int, typer.Option(help="Largest pHash Hamming distance (of 64 bits) of a duplicate.")] = 8,
    min_similarity: Annotated[float, typer.Option(
        help="Smallest correlation of the 32x32 thumbnails of a duplicate (0 = hash only).")] = 0.98,
    report: Annotated[Path | None, typer.Option("--json", help="Write the full report to this JSON file.")] = None,
    fail: Annotated[bool, typer.Option(help="Exit 1 when any leak is found.")] = False,
) -> None:
    """Report train/val images that duplicate (or nearly duplicate) any test image, across all sources.

    Rebuild with `--drop-leaks TEST_SHARDS` to remove them.

    Example:

        vlhealth check-leaks shards/* --json leaks.json
    """
    from rich.table import Table

    from vlhealth.leaks import find_leaks
    from vlhealth.shards import require_shards

    require_shards(shards, "SHARDS")
    require_shards(test or [], "--test")
    leaks, counts = find_leaks(shards, test_sources=test or None, max_distance=max_distance,
                               min_similarity=min_similarity)
    if report is not None:
        report.write_text(json.dumps({"counts": counts, "max_distance": max_distance,
                                      "min_similarity": min_similarity,
                                      "leaks": [x.to_json() for x in leaks]}, indent=2) + "\n", "utf-8")
    table = Table(title=f"{counts['leaks']} leaked samples ({counts['leaked_images']} images) among "
                        f"{counts['checked']} train/val samples vs {counts['test_images']} test images")
    for col in ("train/val sample", "split", "test sample", "pHash dist", "similarity"):
        table.add_column(col)
    for x in leaks:
        table.add_row(x.key, x.split, x.test_key, str(x.distance), f"{x.similarity:.3f}")
    Console().print(table)
    if fail and leaks:
        raise typer.Exit(1)


@app.command("mix")
def mix_cmd(
    sources: Annotated[list[Path], typer.Option("--from", help="Stage-1 shard folders or tars (repeatable).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Shard folder to write the mix into.")],
    n: Annotated[int, typer.Option("--n", help="Samples in the mix (the paper's Mixed-47k: 47000).")] = 47000,
    ratio: Annotated[float, typer.Option(help="Fraction of comprehension samples (the rest generation).")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the sampling; same seed + same inputs = same mix.")] = 0,
    split: Annotated[str, typer.Option(help="Split to draw from.")] = "train",
    fill: Annotated[bool, typer.Option(help="Give one task's shortfall to the other (default: stay balanced).")] = False,
    shard_size: Annotated[int, typer.Option(help="Maximum samples per tar.")] = 1000,
) -> None:
    """Sample a balanced comprehension/generation mix (stage 2, "Mixed-47k") reproducibly from stage-1 shards.

    Example:

        vlhealth mix --from shards/synthrad --from shards/ixi --from shards/vqa_rad --n 47000 --out shards/mix47k
    """
    from vlhealth.mix import write_mix
    from vlhealth.shards import require_shards

    require_shards(sources, "--from")
    summary = write_mix(sources, out, n, seed=seed, ratio=ratio, split=split, fill=fill, max_count=shard_size)
    console.print(f"[bold]mix[/]: {summary.samples} samples {summary.by_task} in {summary.shards} shard(s) "
                  f"-> {summary.out}")
    for task, short in summary.shortfall.items():
        why = (f"only {summary.available[task]} available" if summary.available[task] < summary.by_task.get(task, 0) + short
               else "kept balanced with the other task; --fill gives it this task's share")
        console.print(f"  [yellow]short[/] {task}: {short} fewer than asked ({why})")


# -- builders -------------------------------------------------------------------------------------
def builder_modules() -> dict[str, Any]:
    """Command name -> builder module for every module in ``builders/`` that defines ``NAME``."""
    found = {}
    for info in sorted(pkgutil.iter_modules(builders.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"vlhealth.builders.{info.name}")
        if hasattr(module, "NAME") and hasattr(module, "process"):
            found[info.name.replace("_", "-")] = module
    return found


def _option_parameters(options_cls: type) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(options_cls)
    params = []
    for f in dataclasses.fields(options_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        decls = [flag] if hints[f.name] is not bool else [f"{flag}/--no-{f.name.replace('_', '-')}"]
        annotation = Annotated[hints[f.name], typer.Option(*decls, help=f.metadata.get("help", ""))]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return params


def _common_build_parameters(generates: bool) -> list[inspect.Parameter]:
    """The options every `vlhealth build <source>` command has (generation sources also get --vqgan/--device)."""
    common = [
        inspect.Parameter("root", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                          annotation=Annotated[Path, typer.Argument(help="The source's root folder, in its upstream layout.")]),
        inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY,
                          annotation=Annotated[Path, typer.Option("--out", "-o", help="Shard folder to write.")]),
        inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, default=0,
                          annotation=Annotated[int, typer.Option(help="Seed for splits and sampling.")]),
        inspect.Parameter("shard_size", inspect.Parameter.KEYWORD_ONLY, default=1000,
                          annotation=Annotated[int, typer.Option(help="Maximum samples per tar.")]),
        inspect.Parameter("shard_bytes", inspect.Parameter.KEYWORD_ONLY, default=512 * 1024 * 1024,
                          annotation=Annotated[int, typer.Option(help="Maximum payload bytes per tar.")]),
        inspect.Parameter("strict", inspect.Parameter.KEYWORD_ONLY, default=False,
                          annotation=Annotated[bool, typer.Option(help="Exit non-zero if any input was refused.")]),
        inspect.Parameter("workers", inspect.Parameter.KEYWORD_ONLY, default=1,
                          annotation=Annotated[int, typer.Option("--workers", "-j", help=(
                              "Worker processes (0 = one per CPU); the output is identical for any value."))]),
        inspect.Parameter("partition", inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation=Annotated[str | None, typer.Option(help=(
                              "Build only partition i/n (0-based, by patient/group), e.g. "
                              "--partition $SLURM_ARRAY_TASK_ID/8; join with `vlhealth merge-index`."))]),
        inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, default=False,
                          annotation=Annotated[bool, typer.Option(help=(
                              "Continue a killed build of the same command (finished tars are kept; "
                              "the result equals an uninterrupted build)."))]),
    ]

    defaults = Limits()
    common += [
        inspect.Parameter("max_image_pixels", inspect.Parameter.KEYWORD_ONLY, default=defaults.max_image_pixels,
                          annotation=Annotated[int, typer.Option(help=(
                              "Refuse images with more pixels (read from the header, before decoding)."))]),
        inspect.Parameter("max_file_bytes", inspect.Parameter.KEYWORD_ONLY, default=defaults.max_file_bytes,
                          annotation=Annotated[int, typer.Option(help="Refuse any single input file larger than this.")]),
        inspect.Parameter("max_text_chars", inspect.Parameter.KEYWORD_ONLY, default=defaults.max_text_chars,
                          annotation=Annotated[int, typer.Option(help=(
                              "Refuse questions, answers and conversation turns longer than this."))]),
    ]
    if generates:
        common += [
            inspect.Parameter("vqgan", inspect.Parameter.KEYWORD_ONLY, default="tiny",
                              annotation=Annotated[str, typer.Option(help="VQGAN weights (last.ckpt or .safetensors) or 'tiny'.")]),
            inspect.Parameter("device", inspect.Parameter.KEYWORD_ONLY, default="cpu",
                              annotation=Annotated[str, typer.Option(help="Device for VQ encoding (cpu, cuda).")]),
        ]
    return common


def make_build_command(name: str, module: Any):
    generates = bool(builder_hook(module, "GENERATES"))
    common = _common_build_parameters(generates)
    own = _option_parameters(module.Options)

    def command(**kwargs: Any) -> None:
        from vlhealth.build import run_build
        from vlhealth.progress import progress_bar
        from vlhealth.shards import require_shards

        root = kwargs["root"]
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such folder; give the root folder of {module.NAME} in its "
                                    "upstream layout (see `vlhealth build --help`)")
        require_shards(kwargs.get("drop_leaks") or [], "--drop-leaks")
        opts = module.Options(**{p.name: kwargs.pop(p.name) for p in own})
        vq = None
        if generates:
            from vlhealth.vq import load_vq

            vq = load_vq(kwargs.pop("vqgan"), device=kwargs.pop("device"))
        from vlhealth.build import ResumeError

        try:
            limits = Limits(max_image_pixels=kwargs["max_image_pixels"], max_file_bytes=kwargs["max_file_bytes"],
                            max_text_chars=kwargs["max_text_chars"])
            with progress_bar(f"build {name}", console=console) as bar:
                task = bar.add_task(name, total=None)
                summary = run_build(
                    module, kwargs["root"], kwargs["out"], options=opts, vq=vq, seed=kwargs["seed"],
                    max_count=kwargs["shard_size"], max_bytes=kwargs["shard_bytes"],
                    progress=lambda done, total: bar.update(task, completed=done, total=total),
                    workers=kwargs["workers"], partition=kwargs["partition"], resume=kwargs["resume"],
                    limits=limits,
                )
        except (ResumeError, ValueError) as exc:
            print_error(exc)
            raise typer.Exit(2) from exc
        except OSError as exc:  # e.g. a full disk: the finished tars and the journal are kept
            console.print(f"[red]error[/]: {exc.strerror or exc}; the finished tars are kept (no index.json until "
                          "the build completes): free space, then rerun the same command with --resume", soft_wrap=True)
            raise typer.Exit(2) from exc
        console.print(
            f"[bold]{module.NAME}[/]: {summary.samples} samples in {summary.shards} shard(s) from {summary.items} "
            f"items, {summary.rejects} rejected, {summary.seconds:.1f}s -> {summary.out}"
        )
        for reason, n in sorted(summary.reject_reasons.items()):
            console.print(f"  [yellow]rejected[/] {n} x {reason} (see rejects.jsonl)")
        if kwargs["strict"] and summary.rejects:
            raise typer.Exit(1)

    params = common + own
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    doc = (module.__doc__ or name).strip()
    example = builder_hook(module, "EXAMPLE") or f"vlhealth build {name} /data/{module.NAME} --out shards/{module.NAME}"
    command.__doc__ = f"{doc}\n\nExample:\n\n    {example}"
    command.__name__ = f"build_{name.replace('-', '_')}"
    return command


vq_app = typer.Typer(
    help="VQGAN image tokenizer (taming GumbelVQ f8, 8192 codes).\n\nExample:\n\n"
    "    vlhealth vq convert ckpt/last.ckpt weights/vqgan_f8_8192.safetensors",
    no_args_is_help=True,
)
app.add_typer(vq_app, name="vq")


@vq_app.command("convert")
def vq_convert(
    ckpt: Annotated[Path, typer.Argument(help="taming last.ckpt (Lightning) or a .safetensors file.")],
    out: Annotated[Path, typer.Argument(help="Output .safetensors (the config is also written beside it as JSON).")],
) -> None:
    """Convert released VQGAN weights to safetensors (training-only loss/discriminator keys dropped).

    Example:

        vlhealth vq convert ckpt/last.ckpt weights/vqgan_f8_8192.safetensors
    """
    from vlhealth.vq import convert_checkpoint

    summary = convert_checkpoint(ckpt, out)
    print(json.dumps(summary, indent=2))


@vq_app.command("encode")
def vq_encode(
    image: Annotated[Path, typer.Argument(help="An image file (resized to 256x256).")],
    vqgan: Annotated[str, typer.Option(help="VQGAN weights (last.ckpt or .safetensors) or 'tiny'.")] = "tiny",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Encode one image to its 1024 VQ codes and print a summary.

    Example:

        vlhealth vq encode scan.png --vqgan weights/vqgan_f8_8192.safetensors
    """
    import numpy as np
    from PIL import Image

    from vlhealth.vq import load_vq

    tok = load_vq(vqgan, device=device)
    with Image.open(image) as img:
        arr = np.asarray(img.convert("RGB").resize((tok.image_size, tok.image_size), Image.Resampling.LANCZOS))
    codes = tok.encode(arr)[0]
    print(json.dumps({"image": image.name, "tokens": int(codes.size), "distinct": int(np.unique(codes).size),
                      "first": codes[:16].tolist(), "vq": tok.describe()}, indent=2))


@vq_app.command("train")
def vq_train(
    shards: Annotated[list[Path], typer.Argument(help="Generation shard folders (their target images).")],
    out: Annotated[Path, typer.Option(help="Output folder: vqgan.safetensors + vqgan.json, report, checkpoint/.")],
    init: Annotated[Path | None, typer.Option(help="Fine-tune these weights (taming last.ckpt or converted "
                                                  ".safetensors) instead of training from scratch.")] = None,
    config: Annotated[Path | None, typer.Option(help="Architecture from scratch: a JSON VQConfig (or taming "
                                                    "model.yaml config). Default: the small demo config.")] = None,
    quantizer: Annotated[str | None, typer.Option(help="nearest | gumbel (default: nearest from scratch, "
                                                     "gumbel with --init).")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps in total (a resumed run continues to this).")] = 300,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 8,
    crop: Annotated[int | None, typer.Option(help="Train on random square crops of this size.")] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine decay to 10%).")] = 2e-3,
    disc_start: Annotated[int | None, typer.Option(help="Step at which the patch discriminator starts "
                                                      "(default: no discriminator).")] = None,
    disc_weight: Annotated[float, typer.Option(help="Scale of the adaptive GAN weight.")] = 0.5,
    lpips_weights: Annotated[list[Path] | None, typer.Option(help="Local LPIPS weights (AlexNet + linear heads): "
                                                                "adds the perceptual loss.")] = None,
    held_out_split: Annotated[str | None, typer.Option(help="Split reported on (default: test, else val).")] = None,
    max_images: Annotated[int, typer.Option(help="At most this many train images are loaded.")] = 4000,
    held_out_max: Annotated[int | None, typer.Option(min=1, help="Report on at most this many held-out images, "
                                                      "evenly spaced (default: all).")] = None,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: only at the end).")] = 100,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for initialisation and data order.")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Train a VQGAN tokenizer (or fine-tune one) on the target images of generation shards.

    Reconstruction L1 (+ LPIPS with local weights), the quantizer's loss, an optional patch
    discriminator; resumable; ends with a held-out report (SSIM/PSNR, codebook perplexity and usage).

    Example:

        vlhealth vq train shards/synthrad --out runs/vq-demo --steps 300 --crop 128
        vlhealth vq train shards/synthrad shards/ixi --out runs/vq-ctmr --init weights/vqgan_f8_8192.safetensors \
            --steps 20000 --batch-size 16 --lr 1e-5 --disc-start 5000 --device cuda
    """
    from vlhealth.shards import require_shards
    from vlhealth.vq import VQConfig
    from vlhealth.vq.train import VQTrainConfig, train_vq

    require_shards(shards, "SHARDS")

    arch = None
    if config is not None:
        text = config.read_text("utf-8")
        if config.suffix in (".yaml", ".yml"):
            import yaml

            arch = VQConfig.from_dict(yaml.safe_load(text))
        else:
            arch = VQConfig.from_dict(json.loads(text))
    result = train_vq(VQTrainConfig(
        shards=shards, out=out, config=arch, init=init, quantizer=quantizer, steps=steps, batch_size=batch_size,
        crop=crop, lr=lr, disc_start=disc_start, disc_weight=disc_weight, lpips_weights=lpips_weights or (),
        held_out_split=held_out_split, max_images=max_images, held_out_max=held_out_max, save_every=save_every, resume=resume, seed=seed,
        device=device))
    held = result.report["held_out"]
    rec = result.report["reconstruction_l1"]
    typer.echo(f"vq train: {result.steps} steps, reconstruction L1 {rec['first']:.4f} -> {rec['last']:.4f}; "
               f"report: {out.name}/vq_train_report.json, curve: {out.name}/loss.png", err=True)
    if held.get("n"):
        typer.echo(f"held-out {held['split']} ({held['n']} images): SSIM {held['ssim']:.3f}, PSNR {held['psnr']:.2f} dB, "
                   f"perplexity {held['perplexity']:.1f}, codes used {held['codes_used']}/"
                   f"{result.report['config']['n_embed']}; weights: {out.name}/{result.weights.name}", err=True)


for _name, _module in builder_modules().items():
    build_app.command(_name)(make_build_command(_name, _module))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
