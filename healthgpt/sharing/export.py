"""``healthgpt export``: a trained run as a self-describing folder, ready for the Hub.

Layout of an export folder::

    README.md                     model card (Hub YAML front matter; stages, data, eval, notice)
    healthgpt_export.json         format, preset, template, adapter configs, vocabulary sizes, VQGAN
                                  description, base weights, training stages, training data (with
                                  each source's access level), sha256 of every file
    comprehension/, generation/   each task plugin in the PEFT adapter layout (adapter_config.json,
                                  adapter_model.safetensors, healthgpt_plugin.json) plus the task's
                                  visual adapter (visual_adapter.safetensors)
    token_rows.safetensors        the 8195 new token rows of the embedding and the LM head
    base_rows.safetensors         only when the run trained or carried the LLM's own weights (stage 2's
                                  embedding / head rows; every LLM weight of a text pre-training): those
    vqgan.safetensors             the VQGAN the run was trained with (not for the random tiny one)
    vision_tower/                 a small preset's pre-trained tower (--model-set vision_path), when the
                                  run used one
    eval/report.md, report.json   the run's evaluation report, when --eval is given

``load_export(model, folder)`` loads it back onto a freshly built preset; the result has exactly
the tensors of the run (tests check it), after checking every file against the manifest's SHA-256
(``verify_export``). ``serve``, ``infer``, ``eval`` and ``train --init`` accept such a folder wherever they
accept a run (``--checkpoint``, ``--init``), locally or by Hub id (``hf://ORG/NAME[@REVISION]``,
:mod:`healthgpt.sharing.hub`): ``is_export_folder`` tells them apart; ``export_lineage`` gives a run
started from it the stages it grew from.

Public API::

    export_run(run, out, *, data=(), earlier=(), eval_dir=None, vq=None, seed=None, overrides=None, model_set=(),
               vq_mismatch_ok=False) -> ExportSummary
    load_export(model, folder) -> list[str]
    is_export_folder(path) -> bool
    read_export_info(folder) -> dict;  verify_export(folder) -> dict;  export_lineage(folder) -> list[dict]
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from safetensors.torch import save_file

from healthgpt.sharing.run_spec import MODEL_SET_HELP, SEED_HELP, VQ_HELP, VQ_MISMATCH_HELP
from vlhealth.cli_errors import print_error
from vlhealth.shards import file_sha256

__all__ = ["EXPORT_HELP", "EXPORT_INFO", "ExportError", "ExportSummary", "export_lineage", "export_run",
           "is_export_folder", "load_export", "export_command", "read_export_info", "verify_export"]

from healthgpt.sharing.run_spec import EXPORT_INFO, path_fingerprint  # noqa: E402  (one name for the manifest)

EXPORT_FORMAT = "healthgpt-export/1"
TOKEN_ROWS = "token_rows.safetensors"
BASE_ROWS = "base_rows.safetensors"
VQ_FILE = "vqgan.safetensors"
# --model-set paths whose folder travels with the export (a small preset's tower; never an LLM or CLIP download)
COPIED_PATHS = {"vision_path": "vision_tower"}
BASE_MODELS = {
    "m3": ["microsoft/Phi-3-mini-4k-instruct", "openai/clip-vit-large-patch14-336"],
    "l14": ["microsoft/phi-4", "openai/clip-vit-large-patch14-336"],
    "xl32": ["Qwen/Qwen2.5-32B-Instruct", "openai/clip-vit-large-patch14-336"],
    "smollm2-135m": ["HuggingFaceTB/SmolLM2-135M-Instruct"],
}
RESEARCH_NOTICE = ("**Research use only.** This model is a research artefact. It is not a medical device and must "
                   "not be used for diagnosis, treatment or any other clinical decision.")


class ExportError(ValueError):
    """A run that cannot be exported, or a folder that is not a valid export."""


@dataclass
class ExportSummary:
    out: Path
    files: list[str]
    preset: str
    data: list[dict[str, Any]]


def is_export_folder(path: str | os.PathLike[str] | None) -> bool:
    return path is not None and (Path(path) / EXPORT_INFO).is_file()


def read_export_info(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / EXPORT_INFO
    try:
        info = json.loads(path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{Path(folder).name}/{EXPORT_INFO}: not readable ({err})") from err
    if info.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{Path(folder).name}/{EXPORT_INFO}: format {info.get('format')!r}, expected {EXPORT_FORMAT}")
    return info


def verify_export(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The export's info after checking every file its manifest lists: present, with the recorded SHA-256.
    A missing, truncated or altered file is refused by name (``load_export`` runs this first)."""
    folder = Path(folder)
    info = read_export_info(folder)
    listed = info.get("files") or {}
    if not listed:
        raise ExportError(f"{folder.name}/{EXPORT_INFO}: no file checksums (export it again)")
    missing = sorted(f for f in listed if not (folder / f).is_file())
    if missing:
        raise ExportError(f"{folder.name}: {len(missing)} file(s) of the export missing: {missing[:5]}")
    changed = sorted(f for f, digest in listed.items() if file_sha256(folder / f) != digest)
    if changed:
        raise ExportError(f"{folder.name}: {changed[:5]} changed since the export (sha256 differs from "
                          f"{EXPORT_INFO}); export or download it again")
    return info


def export_lineage(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The training stages recorded in an export, oldest first, as a trainer's lineage entries (``run``, ``stage``,
    ``task``, ``shards``): a run started from the export with ``train --init`` carries them on."""
    out = []
    for st in read_export_info(folder).get("stages") or []:
        shards = st.get("shards")
        unrecorded = shards is None or any(str(s).startswith("unrecorded data of") for s in shards)
        out.append({"run": st.get("run"), "stage": st.get("stage"), "task": st.get("task"),
                    "shards": None if unrecorded else list(shards)})
    return out


# ------------------------------------------------------------------------------------ run records


def _run_root(run: Path, weights: Path) -> Path:
    """The training --out folder of ``weights`` (``run/final/x`` or ``run/checkpoints/step-N/x``)."""
    for parent in weights.parents:
        if (parent / "checkpoints").is_dir() or (parent / "final").is_dir():
            return parent
        if parent == run:
            break
    return run


def _stage_record(run: Path) -> dict[str, Any]:
    """Stage, task, steps, trained groups, data folder names and losses of one training run."""
    from healthgpt.model.weights import resolve_trainable

    weights = resolve_trainable(run)
    root = _run_root(Path(run), weights)
    summary_path = root / "final" / "train_summary.json"
    summary = json.loads(summary_path.read_text("utf-8")) if summary_path.is_file() else {}
    states = sorted((root / "checkpoints").glob("step-*/trainer_state.json")) if (root / "checkpoints").is_dir() else []
    local_state = weights.parent / "trainer_state.json"
    state_path = local_state if local_state.is_file() else (states[-1] if states else None)
    state = json.loads(state_path.read_text("utf-8")) if state_path is not None else {}
    shards = [str(s).rsplit(":", 1)[0] if ":" in str(s) and not str(s).startswith(("http", "pipe")) else str(s)
              for s in summary.get("shards", state.get("shards", []))]
    return {
        "run": root.name, "stage": summary.get("stage", state.get("stage")), "task": summary.get("task", state.get("task")),
        "steps": summary.get("steps", state.get("step")), "trained_groups": summary.get("groups"),
        "shards": shards, "first_loss": summary.get("first_loss"), "last_loss": summary.get("last_loss"),
        "finished": bool(summary), "lineage": summary.get("lineage", []),
    }


def _training_stages(run: Path, earlier: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """The ``--earlier`` runs, then the stages the trainer recorded in the run's summary (its ``--init``
    chain, so no earlier data goes unseen without ``--earlier``), then the run itself."""
    stages = [_stage_record(Path(r)) for r in earlier]
    own = _stage_record(run)
    for st in stages:
        st.pop("lineage")
    for entry in own.pop("lineage"):
        if not any(st["run"] == entry.get("run") for st in stages) and entry.get("run") != own["run"]:
            stages.append(_lineage_record(entry))
    return stages + [own]


def _lineage_record(entry: dict[str, Any]) -> dict[str, Any]:
    """A recorded earlier stage as a stage record; data that was not recorded gets a placeholder name,
    which ``describe_data`` reports as unknown access."""
    shards = entry.get("shards")
    return {"run": entry.get("run"), "stage": entry.get("stage"), "task": entry.get("task"), "steps": None,
            "trained_groups": None, "first_loss": None, "last_loss": None, "finished": shards is not None,
            "shards": list(shards) if shards is not None else [f"unrecorded data of {entry.get('run')}"]}


def _manifest_access(name: str) -> dict[str, Any] | None:
    from vlhealth.manifests import ManifestError, load_manifest

    for candidate in dict.fromkeys([name, name.replace("-", "_"), name.removesuffix("_text"),
                                    name + "2023" if name == "synthrad" else name]):
        try:
            m = load_manifest(candidate)
        except (ManifestError, FileNotFoundError, OSError, ValueError):
            continue
        return {"source": m["name"], "access": m["access"], "license": m.get("license")}
    return None


def _find_build(name: str, data: Sequence[Path]) -> dict[str, Any] | None:
    for d in data:
        for folder in (d / name, d):
            if folder.name == name and (folder / "build.json").is_file():
                return json.loads((folder / "build.json").read_text("utf-8"))
    return None


def describe_data(names: Sequence[str], data: Sequence[Path]) -> list[dict[str, Any]]:
    """Per training-data folder: its source(s), access level and licence, from the folder's
    ``build.json`` (found under ``data``), else from the manifest of the same name; ``unknown``
    access when neither exists (publishing then needs --i-have-the-rights)."""
    out = []
    for name in dict.fromkeys(names):
        build = _find_build(name, data)
        if build is not None and build.get("source") == "mix":
            parts = [_manifest_access(s) or {"source": s, "access": "unknown", "license": None}
                     for s in sorted(build.get("counts", {}).get("by_source", {}))]
            levels = {p["access"] for p in parts}
            access = next((a for a in ("credentialed", "unknown", "registered") if a in levels), "open")
            out.append({"name": name, "source": "mix", "access": access, "license": "per source",
                        "from": parts, "evidence": "build.json"})
        elif build is not None:
            manifest = build.get("manifest", {})
            out.append({"name": name, "source": build.get("source"), "access": manifest.get("access", "unknown"),
                        "license": manifest.get("license"), "evidence": "build.json"})
        elif (m := _manifest_access(name)) is not None:
            out.append({"name": name, **m, "evidence": "manifest of the same name"})
        else:
            out.append({"name": name, "source": None, "access": "unknown", "license": None,
                        "evidence": "none (pass --data with the shard folders)"})
    return out


# ------------------------------------------------------------------------------------ export


def _tensor_names(model: Any, params: Sequence[Any]) -> list[str]:
    ids = {id(p) for p in params}
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in ids:
            seen.setdefault(id(p), name)
    return [seen[id(p)] for p in params if id(p) in seen]


def _save_rows(model: Any, groups: Sequence[str], path: Path, meta: dict[str, Any]) -> list[str]:
    params = dict(model.named_parameters(remove_duplicate=False))
    all_groups = model.parameter_groups()
    names = list(dict.fromkeys(n for g in groups for n in _tensor_names(model, all_groups[g])))
    save_file({n: params[n].detach().cpu().contiguous() for n in names}, str(path),
              metadata={"healthgpt": json.dumps({**meta, "groups": list(groups)})})
    return names


def export_run(
    run: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    data: Sequence[str | os.PathLike[str]] = (),
    earlier: Sequence[str | os.PathLike[str]] = (),
    eval_dir: str | os.PathLike[str] | None = None,
    vq: str | None = None,
    seed: int | None = None,
    overrides: dict[str, Any] | None = None,
    model_set: Sequence[str] = (),
    vq_mismatch_ok: bool = False,
) -> ExportSummary:
    """Export ``run`` (a training --out folder, checkpoint or .safetensors) to ``out``. The VQGAN, seed and
    ``--model-set`` values default to the run's own (:mod:`healthgpt.sharing.run_spec`)."""
    from healthgpt.model.presets import build_model
    from healthgpt.model.weights import load_trainable, read_metadata, resolve_trainable
    from healthgpt.sharing.run_spec import command_inputs, read_run_spec
    from vlhealth.vq import load_vq

    run, out = Path(run), Path(out)
    if is_export_folder(run):
        raise ExportError(f"{run.name}/ is already an export folder (serve, infer and eval take it as --checkpoint)")
    weights = resolve_trainable(run)
    meta = read_metadata(weights)
    preset = meta.get("preset")
    if not preset:
        raise ExportError(f"{weights.name}: no preset in the checkpoint metadata")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out.name}/ exists and is not empty; choose a new --out folder")
    ov, vq_spec, _notes = command_inputs(preset, seed, None, None, None, model_set, run, vq, vq_mismatch_ok)
    ov.update(overrides or {})
    spec, _root = read_run_spec(run)
    model, _ = build_model(preset, **ov)
    loaded = set(load_trainable(model, weights))
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_weights(model, meta, loaded, weights.name, tmp)

    stages = _training_stages(run, earlier)
    data_paths = [Path(d) for d in data]
    training_data = describe_data([s for st in stages for s in st["shards"]], data_paths)
    report = None
    if eval_dir is not None:
        report = _copy_eval(Path(eval_dir), tmp / "eval")
    vq_tok = load_vq(vq_spec)
    export_spec = _export_spec(spec, ov, vq_spec, vq_tok.describe(), tmp)
    info = {
        "format": EXPORT_FORMAT, "preset": preset, "template": meta.get("template"),
        "adapters": meta.get("adapters"), "vocab_first_new": meta.get("vocab_first_new"),
        "vocab_total": meta.get("vocab_total"), "groups": meta.get("groups"),
        "base_model": BASE_MODELS.get(preset, []), "base_seed": ov.get("seed"),
        "vqgan": vq_tok.describe(), "source_run": run.name, "source_weights": weights.name,
        "run_spec": export_spec, "stages": stages, "training_data": training_data, "eval": report,
        "research_use_only": True,
    }
    (tmp / "README.md").write_text(model_card(info, tmp), "utf-8")
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    info["files"] = {f: file_sha256(tmp / f) for f in files}
    (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", "utf-8")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return ExportSummary(out, sorted([*files, EXPORT_INFO]), preset, training_data)


def _write_weights(model: Any, meta: dict[str, Any], loaded: set[str], weights_name: str, tmp: Path) -> None:
    """The export's weights in ``tmp``: a PEFT adapter per task (plugin and its visual adapter), the new token
    rows, and the LLM weights the run trained or carried. A loaded tensor with no place among them is an
    error (``tmp`` is removed): the export would be another model."""
    from healthgpt.sharing.peft import export_peft_adapter

    covered: set[str] = set()
    groups = model.parameter_groups()
    for task in model.adapters:
        export_peft_adapter(model, task, tmp / task)
        covered.update(_tensor_names(model, groups[f"{task}_plugin"]))
        covered.update(_tensor_names(model, groups["abstract_adapter" if task == "comprehension" else
                                            "concrete_adapter"]))
    row_meta = {k: meta[k] for k in ("format_version", "preset", "template", "adapters", "vocab_first_new",
                                     "vocab_total") if k in meta}
    covered.update(_save_rows(model, ["new_token_rows"], tmp / TOKEN_ROWS, row_meta))
    # the LLM's own weights a run trained or carried (stage 2's embedding/head rows; every LLM weight of a
    # text pre-training such as the demo's text-lm) travel with the export: without them it is another model
    base_groups = [g for g in ("word_embeddings", "lm_head", "llm_base") if g in meta.get("groups", [])]
    if base_groups:
        covered.update(_save_rows(model, base_groups, tmp / BASE_ROWS, row_meta))
    lost = sorted(loaded - covered)
    if lost:
        shutil.rmtree(tmp)
        raise ExportError(f"{weights_name}: {len(lost)} trained tensor(s) have no place in the export, e.g. {lost[:3]}")


def _export_spec(spec: dict[str, Any] | None, overrides: dict[str, Any], vq_spec: str, vq_info: dict[str, Any],
                 tmp: Path) -> dict[str, Any]:
    """The export's own run_spec: its VQGAN and the pre-trained tower copied into the folder, the other
    --model-set values as the run recorded them; paths relative to the export folder."""
    vq = dict(vq_info)
    if not vq.get("random_weights"):
        shutil.copyfile(vq_spec, tmp / VQ_FILE)
        vq.update({"path": None, "at_run": VQ_FILE})
    model_set: dict[str, Any] = {}
    for key, rec in ((spec or {}).get("model_set") or {}).items():
        if isinstance(rec, dict) and "sha256" in rec:
            if key in COPIED_PATHS:
                src, dst = Path(overrides[key]), tmp / COPIED_PATHS[key]
                for f in sorted(x for x in src.rglob("*") if x.is_file()):
                    rel = f.relative_to(src).as_posix()
                    if rel.startswith(".") or rel.endswith((".log", ".jsonl", ".png")):
                        continue  # what the fingerprint leaves out: logs and curves
                    (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(f, dst / rel)
                model_set[key] = {"path": None, "at_run": COPIED_PATHS[key], "sha256": path_fingerprint(dst)}
            else:
                model_set[key] = {"path": rec.get("path"), "at_run": None, "sha256": rec["sha256"]}
        else:
            model_set[key] = rec
    return {"vq": vq, "model_set": model_set, "seed": overrides.get("seed")}


def _copy_eval(src: Path, dst: Path) -> dict[str, Any]:
    if not (src / "report.md").is_file():
        raise ExportError(f"{src.name}/: no report.md (pass the --out folder of `healthgpt eval`)")
    dst.mkdir(parents=True)
    copied = []
    for name in ("report.md", "report.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(f"eval/{name}")
    return {"folder": src.name, "files": copied}


def load_export(model: Any, folder: str | os.PathLike[str]) -> list[str]:
    """Load an export folder onto ``model`` (built from the same preset); returns the loaded tensor names."""
    from healthgpt.model.weights import CheckpointError, load_trainable
    from healthgpt.sharing.peft import import_peft_adapter

    folder = Path(folder)
    info = verify_export(folder)
    if info["preset"] != model.preset:
        raise CheckpointError(f"{folder.name}: exported from preset {info['preset']!r}, the model is "
                              f"{model.preset!r} (pass --preset {info['preset']})")
    ours = {t: c.to_dict() for t, c in model.adapters.items()}
    if info.get("adapters") and info["adapters"] != ours:
        raise CheckpointError(f"{folder.name}: adapter configuration {info['adapters']} differs from the model's {ours}")
    loaded: list[str] = []
    for task in model.adapters:
        if not (folder / task).is_dir():
            raise CheckpointError(f"{folder.name}: no {task}/ plugin folder")
        loaded += import_peft_adapter(model, task, folder / task)
    for rows in (TOKEN_ROWS, BASE_ROWS):
        if (folder / rows).is_file():
            loaded += load_trainable(model, folder / rows)
        elif rows == TOKEN_ROWS:
            raise CheckpointError(f"{folder.name}: no {TOKEN_ROWS}")
    return loaded


# ------------------------------------------------------------------------------------ model card


def _yaml_list(items: Sequence[str], indent: str = "") -> str:
    return "\n".join(f"{indent}- {json.dumps(i)}" for i in items)


def model_card(info: dict[str, Any], folder: Path) -> str:
    """The Hub model card: YAML front matter, then stages, data, evaluation and the notice."""
    preset = info["preset"]
    tiny = info.get("vqgan", {}).get("random_weights") or preset == "tiny"
    sources = sorted({str(d.get("source") or d["name"]) for d in info["training_data"]})
    front = ["---", "license: other", "library_name: peft", "pipeline_tag: image-text-to-text",
             "tags:", _yaml_list(["medical", "healthgpt", "h-lora", "vision-language", "research-only"])]
    if info["base_model"]:
        front += ["base_model:", _yaml_list(info["base_model"])]
    if sources:
        front += ["datasets:", _yaml_list(sources)]
    front.append("---")
    stage_rows = "\n".join(
        f"| {s['stage']} | {s['task']} | {s['steps'] if s['steps'] is not None else '-'} | {', '.join(s['trained_groups'] or []) or '-'} | "
        f"{', '.join(s['shards']) or '-'} | {_fmt(s['first_loss'])} → {_fmt(s['last_loss'])} |"
        for s in info["stages"])
    data_rows = "\n".join(f"| {d['name']} | {d.get('source') or '-'} | {d['access']} | {d.get('license') or '-'} |"
                          for d in info["training_data"]) or "| (not recorded by the run) | - | unknown | - |"
    report = ""
    if info.get("eval"):
        text = (folder / "eval" / "report.md").read_text("utf-8")
        report = "\n## Evaluation\n\nFrom `eval/report.md` (the run's `healthgpt eval` report):\n\n" + \
            text.replace("\n# ", "\n### ").removeprefix("# ") + "\n"
    warning = ("\n> **Note:** this export comes from the random `tiny` preset and/or a random `tiny` VQGAN. It "
               "exercises the pipeline; its outputs mean nothing.\n" if tiny else "")
    vq = info.get("vqgan", {})
    carried = "".join(line for present, line in (
        ((folder / VQ_FILE).is_file(), f"* `{VQ_FILE}`: the VQGAN the model was trained with (image tokens <-> pixels).\n"),
        ((folder / "vision_tower").is_dir(), "* `vision_tower/`: the pre-trained vision tower the model reads images with.\n"),
    ) if present)
    return "\n".join(front) + f"""

# HealthGPT ({preset}) — exported from `{info['source_run']}`

{RESEARCH_NOTICE}
{warning}
HealthGPT (Lin et al., 2025, arXiv 2502.09838) is a medical vision-language model that answers
questions about medical images and generates images (CT↔MRI, 4× MRI super-resolution,
reconstruction) through task-specific H-LoRA plugins on a shared LLM.

## Files

* `comprehension/`, `generation/`: each task's H-LoRA plugin in the PEFT adapter layout
  (`adapter_config.json`, `adapter_model.safetensors`; `healthgpt_plugin.json` explains the
  H-LoRA form, which peft itself cannot run) and the task's visual adapter
  (`visual_adapter.safetensors`).
* `{TOKEN_ROWS}`: the 8195 new token rows (`<start_index>`, 8192 `<idx_N>`, `<end_index>`,
  `<pixel_newline>`) of the embedding and the LM head.{f'''
* `{BASE_ROWS}`: the LLM's own weights this model changed (embedding/head rows trained in stage 2; every
  LLM weight when it grew from a text pre-training): they replace the base model's.''' if BASE_ROWS in
  [p.name for p in folder.iterdir()] else ''}
{carried}* `healthgpt_export.json`: preset `{preset}`, template `{info.get('template')}`, adapter
  configurations, VQGAN description, stages, data and file checksums.

Base weights: {', '.join(f'`{b}`' for b in info['base_model']) or f'the random `{preset}` preset (seed {info.get("base_seed")})'}.
VQGAN for image tokens: `{vq.get('name')}` (sha256 `{str(vq.get('sha256'))[:16]}…`{', random weights' if vq.get('random_weights') else ''}).

## Use

```bash
pip install -e '.[serve]'   # the vlhealth/healthgpt distribution
healthgpt serve --preset {preset} --checkpoint <this folder>
healthgpt infer --preset {preset} --checkpoint <this folder> --image scan.png --question "What modality is this?"
```

## Training

| stage | task | steps | trained | data | loss (first → last) |
| --- | --- | ---: | --- | --- | --- |
{stage_rows}

| data folder | source | access | licence |
| --- | --- | --- | --- |
{data_rows}
{report}
## Limitations

Trained on the data above only; answers can be wrong, incomplete or invented, and generated images
can show anatomy that is not there. {RESEARCH_NOTICE}
"""


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, int | float) else "-"


# ------------------------------------------------------------------------------------ CLI

EXPORT_HELP = (
    "Export a trained run as a self-describing folder: each task plugin in the PEFT adapter layout, the "
    "visual adapters and new token rows as safetensors, healthgpt_export.json (preset, template, VQGAN, "
    "stages, data) and a model card README.md (Hub YAML front matter, the eval report with --eval, the "
    "research-use-only notice). `serve`, `infer` and `eval` take the folder as --checkpoint.\n\n"
    "Example:\n\n"
    "    healthgpt export demo/runs/stage3 --out exports/tiny-stage3 --data demo/shards --data demo/mix "
    "--earlier demo/runs/stage1-comprehension --earlier demo/runs/stage2 --eval demo/eval"
)


def export_command(
    run: Annotated[Path, typer.Argument(help="Training --out folder, checkpoint folder or trainable .safetensors.")],
    out: Annotated[Path, typer.Option(help="New folder to write.")],
    data: Annotated[list[Path] | None, typer.Option(
        help="Shard folder(s), or their parent, used in training: their build.json gives source, access, licence.")] = None,
    earlier: Annotated[list[Path] | None, typer.Option(
        help="Earlier stages' runs, oldest first (listed in the model card).")] = None,
    eval_dir: Annotated[Path | None, typer.Option("--eval", help="`healthgpt eval` --out folder of this run.")] = None,
    vq: Annotated[str | None, typer.Option(help=VQ_HELP)] = None,
    vq_mismatch_ok: Annotated[bool, typer.Option(help=VQ_MISMATCH_HELP)] = False,
    seed: Annotated[int | None, typer.Option(help=SEED_HELP)] = None,
    model_set: Annotated[list[str] | None, typer.Option("--model-set", help=MODEL_SET_HELP)] = None,
    llm_path: Annotated[Path | None, typer.Option(help="Local LLM folder (real presets).")] = None,
    clip_path: Annotated[Path | None, typer.Option(help="Local CLIP ViT-L/14-336 folder.")] = None,
) -> None:
    from rich.console import Console

    from healthgpt.model.presets import MissingWeightsError
    from healthgpt.model.weights import CheckpointError

    console = Console(stderr=True)
    from healthgpt.sharing.run_spec import check_checkpoint

    check_checkpoint(run, "RUN")
    overrides = {k: v for k, v in (("llm_path", llm_path), ("clip_path", clip_path)) if v is not None}
    try:
        summary = export_run(run, out, data=data or [], earlier=earlier or [], eval_dir=eval_dir, vq=vq, seed=seed,
                             overrides=overrides, model_set=model_set or (), vq_mismatch_ok=vq_mismatch_ok)
    except (ExportError, CheckpointError, MissingWeightsError, FileNotFoundError) as err:
        print_error(err)
        raise typer.Exit(2) from err
    for d in summary.data:
        if d["access"] not in ("open", "registered"):
            console.print(f"[yellow]note:[/yellow] training data {d['name']}: access {d['access']} "
                          f"({d['evidence']}); `healthgpt publish` will refuse it")
    console.print(f"wrote {out.name}/ ({len(summary.files)} files, preset {summary.preset})")
