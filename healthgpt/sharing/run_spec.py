"""What a run needs besides its weights to be rebuilt: its VQGAN and its ``--model-set`` overrides.

A training run records a ``run_spec`` (in ``final/train_summary.json``, in every checkpoint's
``trainer_state.json`` and in an export's ``healthgpt_export.json``):

* ``vq``: the VQGAN its generation shards were tokenized with, read from their ``build.json``
  (name, config, sha256, ``random_weights``, and ``path``: the ``--vqgan`` file as typed at build time),
  plus ``at_run``: where that file lies relative to the run's ``--out`` folder. A run without generation
  data takes the VQGAN of its ``--init`` runs.
* ``model_set``: the ``--model-set`` overrides, which define the model but are not in its weights
  (``vision_path``, ``image_tokens``, ``new_rows_noise``, ``variant``, ...). A path-valued one
  (``*_path``) is recorded as ``{"path": as typed, "at_run": relative to the run, "sha256": ...}``.
* ``seed``: the seed of the preset's random parts (small presets).

:func:`resolve_run_inputs` turns a ``--checkpoint`` and the user's ``--vq`` / ``--model-set`` into what
``infer``, ``eval``, ``eval-volumes``, ``serve`` and ``export`` load: the recorded values by default, a
matching explicit value as given, and a conflicting one refused (``RunSpecError`` names both). An
explicit ``--vq`` whose sha256 differs needs ``--vq-mismatch-ok``.

Public API::

    make_run_spec(shards, inits, model_set, seed, out) -> dict
    read_run_spec(checkpoint) -> (spec | None, run root | None)
    resolve_run_inputs(checkpoint, *, model_set, vq=None, vq_mismatch_ok=False, seed=None) -> RunInputs
    path_fingerprint(path) -> str
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlhealth.shards import file_sha256

__all__ = ["EXPORT_INFO", "MODEL_SET_HELP", "SEED_HELP", "VQ_HELP", "VQ_MISMATCH_HELP", "check_checkpoint", "command_inputs", "parse_sets", "RunInputs", "RunSpecError", "make_run_spec", "path_fingerprint", "read_run_spec",
           "resolve_run_inputs"]

SPEC_KEY = "run_spec"
EXPORT_INFO = "healthgpt_export.json"  # the manifest of a `healthgpt export` folder
_BIG = 256 * 1024 * 1024  # files above this size enter a folder's fingerprint by name and size only


class RunSpecError(ValueError):
    """A --vq or --model-set value that conflicts with what the run was trained with, or a recorded file that
    cannot be found."""


def path_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, or of a folder's files (relative name and content; files over 256 MiB, such as an
    LLM's weight shards, by name and size only, so that a real model folder is not read through)."""
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        rel = f.relative_to(p).as_posix()
        if rel.startswith(".") or rel.endswith((".log", ".jsonl", ".png")):
            continue  # logs and curves beside the weights do not define the model
        size = f.stat().st_size
        h.update(f"{rel}\0{size}\0{file_sha256(f) if size <= _BIG else ''}\n".encode())
    return h.hexdigest()


def _shown(path: str | os.PathLike[str]) -> str:
    """A path as a record or message may keep it (:func:`vlhealth.cli_errors.shown_path`)."""
    from vlhealth.cli_errors import shown_path

    return shown_path(path)


def _relative_to(path: Path, root: Path) -> str | None:
    try:
        return os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    except ValueError:  # another drive
        return None


# ------------------------------------------------------------------------------------ recording


def _vq_of_shards(shards: Sequence[str | os.PathLike[str]]) -> tuple[dict[str, Any] | None, list[Path]]:
    """The one VQGAN the (local) generation shard folders were tokenized with (from their build.json), and where
    the build recorded the file to lie (its ``at_shards``, from the shard folder)."""
    found: dict[str, tuple[str, dict[str, Any], Path]] = {}
    for folder in shards:
        build = Path(folder) / "build.json"
        if not build.is_file():
            continue
        try:
            vq = json.loads(build.read_text("utf-8")).get("vq")
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(vq, dict) and vq.get("sha256"):
            found.setdefault(vq["sha256"], (Path(folder).name, vq, Path(folder)))
    if len(found) > 1:
        names = "; ".join(f"{n}: {v.get('name')} (sha256 {sha[:12]}…)" for sha, (n, v, _) in found.items())
        raise RunSpecError(f"the generation shards were tokenized with different VQGANs ({names}); their codes "
                           "mean different images: rebuild them with one --vqgan")
    if not found:
        return None, []
    _, vq, folder = next(iter(found.values()))
    vq = dict(vq)
    at_shards = vq.pop("at_shards", None)  # the build's own record of where the file lies from the shard folder
    return vq, ([folder / at_shards] if at_shards else [])


def make_run_spec(shards: Sequence[str | os.PathLike[str]], inits: Sequence[str | os.PathLike[str]], model_set: Mapping[str, Any],
                  seed: int | None, out: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``run_spec`` of a training run writing to ``out`` (see the module docstring); ``shards``: its local
    shard folders."""
    out = Path(out)
    vq, recorded_at = _vq_of_shards(shards)
    if vq is not None:
        candidates = ([Path(vq["path"])] if vq.get("path") else []) + recorded_at
        for given in candidates:
            if not vq.get("random_weights") and given.is_file() and file_sha256(given) == vq["sha256"]:
                vq["at_run"] = _relative_to(given, out)
                break
    else:
        for init in inits:
            spec, _ = read_run_spec(init)
            if spec and spec.get("vq"):
                vq = dict(spec["vq"])
                root = _run_root_of(init)
                if vq.get("at_run") and root is not None:  # re-anchor on this run's folder
                    vq["at_run"] = _relative_to(root / vq["at_run"], out)
                break
    recorded: dict[str, Any] = {}
    for key, value in model_set.items():
        if key.endswith("_path") and value is not None:
            p = Path(os.fspath(value))
            if not p.exists():
                raise RunSpecError(f"--model-set {key}={_shown(p)}: no such file or folder")
            recorded[key] = {"path": _shown(p), "at_run": _relative_to(p, out), "sha256": path_fingerprint(p)}
        else:
            recorded[key] = json.loads(json.dumps(value, default=str))
    return {"vq": vq, "model_set": recorded, "seed": seed}


# ------------------------------------------------------------------------------------ reading


def _run_root_of(checkpoint: str | os.PathLike[str]) -> Path | None:
    """The folder relative paths of a run are anchored on: the training --out folder, or an export folder."""
    p = Path(checkpoint)
    if (p / EXPORT_INFO).is_file():
        return p
    from healthgpt.model.weights import CheckpointError, resolve_trainable

    try:
        weights = resolve_trainable(p)
    except CheckpointError:
        return None
    folder = weights.parent
    if folder.name == "final" or folder.parent.name == "checkpoints":
        return folder.parent if folder.name == "final" else folder.parent.parent
    return folder


def read_run_spec(checkpoint: str | os.PathLike[str] | None) -> tuple[dict[str, Any] | None, Path | None]:
    """The recorded ``run_spec`` of a run folder, checkpoint, trainable file (its folder's summary or trainer
    state) or export folder, and the folder its relative paths are anchored on; ``(None, None)`` without one."""
    if checkpoint is None:
        return None, None
    p = Path(checkpoint)
    root = _run_root_of(p)
    if root is None:
        return None, None
    candidates = [p / EXPORT_INFO] if (p / EXPORT_INFO).is_file() else []
    if not candidates:
        from healthgpt.model.weights import resolve_trainable

        folder = resolve_trainable(p).parent
        candidates = [folder / "train_summary.json", folder / "trainer_state.json"]
    for c in candidates:
        if c.is_file():
            try:
                spec = json.loads(c.read_text("utf-8")).get(SPEC_KEY)
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(spec, dict):
                return spec, root
    return None, root


@dataclass
class RunInputs:
    """What to build the model and the VQGAN from."""

    overrides: dict[str, Any]
    vq: str  # "tiny" or a weights file, for vlhealth.vq.load_vq
    vq_record: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)  # to print when images are generated


def _short(sha: Any) -> str:
    return f"{str(sha)[:12]}…"


def _locate(entry: Mapping[str, Any], root: Path | None) -> tuple[Path | None, Path | None]:
    """(a recorded file or folder whose fingerprint matches, the first one found that does not)."""
    stale = None
    for cand in (entry.get("path"), (root / entry["at_run"]) if root is not None and entry.get("at_run") else None):
        if not cand:
            continue
        c = Path(cand)
        if c.exists():
            if path_fingerprint(c) == entry.get("sha256"):
                return c, None
            stale = stale or c
    return None, stale


def _find_recorded(rec: Mapping[str, Any], root: Path | None, trained_with: str, give: str) -> Path:
    """The recorded file or folder ``rec`` (:func:`_locate`), or a ``RunSpecError``: ``trained_with`` names what the
    run was trained with, ``give`` how to pass it."""
    found, stale = _locate(rec, root)
    if found is None:
        why = (f"{stale.as_posix()} has changed since" if stale is not None else "it is not where it was when")
        raise RunSpecError(f"{trained_with}, but {why} the run was trained; {give}")
    return found


def _resolve_model_set(spec: Mapping[str, Any], root: Path | None, given: dict[str, Any], run: str) -> dict[str, Any]:
    out = dict(given)
    for key, rec in (spec.get("model_set") or {}).items():
        if isinstance(rec, dict) and "sha256" in rec:  # a path
            if key in given and given[key] is not None:
                have = Path(os.fspath(given[key]))
                if not have.exists():
                    raise RunSpecError(f"--model-set {key}={_shown(have)}: no such file or folder")
                if path_fingerprint(have) != rec["sha256"]:
                    raise RunSpecError(
                        f"--model-set {key}={given[key]} differs from the {key} {run} was trained with "
                        f"({rec.get('path')}, sha256 {_short(rec['sha256'])}); drop the option to use the run's")
                continue
            out[key] = _find_recorded(
                rec, root, f"{run} was trained with --model-set {key}={rec.get('path')} (sha256 {_short(rec['sha256'])})",
                f"pass --model-set {key}=PATH to that {key}")
        else:
            if key in given and given[key] != rec:
                raise RunSpecError(f"--model-set {key}={given[key]} conflicts with {run}, trained with {key}={rec}; "
                                   "drop the option to use the run's value")
            out[key] = rec
    extra = sorted(k for k in given if k not in (spec.get("model_set") or {}))
    if extra:
        raise RunSpecError(f"--model-set {extra[0]}={given[extra[0]]} conflicts with {run}, trained without it (the "
                           f"preset's default); drop the option")
    return out


def _resolve_vq(spec: Mapping[str, Any] | None, root: Path | None, vq: str | None, mismatch_ok: bool,
                run: str) -> tuple[str, list[str]]:
    rec = (spec or {}).get("vq")
    notes: list[str] = []
    if rec is None:
        if vq is None:
            if spec is not None or root is not None:
                notes.append(f"{run} records no VQGAN (no generation data): decoding with the random tiny VQGAN, "
                             "whose images are not meaningful; pass --vq")
            return "tiny", notes
        return vq, notes
    tiny = bool(rec.get("random_weights"))
    if vq is None:
        if tiny:
            notes.append(f"{run} was trained on the random tiny VQGAN: its images are not meaningful image tokens")
            return "tiny", notes
        found = _find_recorded(rec, root, f"{run} was trained with the VQGAN {rec.get('path') or rec.get('name')} "
                               f"(sha256 {_short(rec.get('sha256'))})", "pass --vq with that file")
        return os.fspath(found), notes
    if vq == "tiny":
        same = tiny
        have = "the random tiny VQGAN"
    else:
        p = Path(vq)
        if not p.is_file():
            raise RunSpecError(f"--vq {_shown(vq)}: no such file; pass the VQGAN weights file (or 'tiny')")
        same = not tiny and file_sha256(p) == rec.get("sha256")
        have = f"{vq}"
    if not same:
        trained = "the random tiny VQGAN" if tiny else f"{rec.get('path') or rec.get('name')} (sha256 {_short(rec.get('sha256'))})"
        if not mismatch_ok:
            raise RunSpecError(f"--vq {have} is not the VQGAN {run} was trained with ({trained}); its codes would "
                               "decode to other images: drop --vq to use the run's, or add --vq-mismatch-ok")
        notes.append(f"--vq {have} is not the VQGAN {run} was trained with ({trained}) (--vq-mismatch-ok)")
    elif tiny:
        notes.append(f"{run} was trained on the random tiny VQGAN: its images are not meaningful image tokens")
    return vq, notes


def resolve_run_inputs(checkpoint: str | os.PathLike[str] | None, *, model_set: Mapping[str, Any] | None = None,
                       vq: str | None = None, vq_mismatch_ok: bool = False, seed: int | None = None,
                       small_preset: bool = True) -> RunInputs:
    """The model overrides and the VQGAN for ``checkpoint`` (see the module docstring). ``model_set``: the
    user's ``--model-set`` values; ``seed``: the user's ``--seed`` (None: the run's, else 0)."""
    from healthgpt.sharing.hub import display_name, resolve_model

    run = display_name(checkpoint) if checkpoint is not None else "the model"
    checkpoint = resolve_model(checkpoint)  # a Hub id: its local copy (an export folder)
    spec, root = read_run_spec(checkpoint)
    given = dict(model_set or {})
    overrides = _resolve_model_set(spec, root, given, run) if spec else given
    if small_preset:
        overrides["seed"] = seed if seed is not None else int((spec or {}).get("seed") or 0)
    vq_spec, notes = _resolve_vq(spec, root, vq, vq_mismatch_ok, run) if checkpoint is not None else (vq or "tiny", [])
    return RunInputs(overrides, vq_spec, (spec or {}).get("vq"), notes)


def parse_sets(items: Sequence[str], option: str = "--set") -> dict[str, Any]:
    """``key=value`` items (values read as YAML: ``4`` is a number, ``true`` a flag)."""
    import typer
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"{option} expects key=value, got {item!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def check_checkpoint(checkpoint: str | os.PathLike[str] | None, option: str = "--checkpoint") -> None:
    """Refuse a --checkpoint that cannot be a run before anything is built (missing, an empty folder, a file
    that is not safetensors)."""
    from healthgpt.sharing.hub import parse_hub_id

    if checkpoint is None or parse_hub_id(checkpoint) is not None:
        return  # a Hub id: checked when it is resolved
    p = Path(checkpoint)
    what = "give a training --out folder, a checkpoint folder, a trainable .safetensors or an export folder"
    if not p.exists():
        raise RunSpecError(f"{option} {_shown(checkpoint)}: no such file or folder; {what}")
    if p.is_file() and p.suffix != ".safetensors":
        raise RunSpecError(f"{option} {_shown(checkpoint)}: not a .safetensors file; {what}")
    if p.is_dir() and not (p / EXPORT_INFO).is_file():
        from healthgpt.model.weights import CheckpointError, resolve_trainable

        try:
            resolve_trainable(p)
        except CheckpointError as err:
            raise RunSpecError(f"{option} {_shown(checkpoint)}: {str(err).split(': ', 1)[-1]}") from None


def command_inputs(preset: str, seed: int | None, llm_path: Any, clip_path: Any, dtype: str | None,
                   model_set: Sequence[str] | None, checkpoint: Any = None, vq: str | None = None,
                   vq_mismatch_ok: bool = False) -> tuple[dict[str, Any], str, list[str]]:
    """``build_model`` overrides, the VQGAN to decode with and notes, for a command that loads ``checkpoint``:
    the run's recorded --model-set values, seed and VQGAN by default (:mod:`healthgpt.sharing.run_spec`)."""
    check_checkpoint(checkpoint)
    inputs = resolve_run_inputs(checkpoint, model_set=parse_sets(model_set or [], "--model-set"), vq=vq,
                                vq_mismatch_ok=vq_mismatch_ok, seed=seed,
                                small_preset=preset not in ("m3", "l14", "xl32"))
    overrides: dict[str, Any] = dict(inputs.overrides)
    for name, value in (("llm_path", llm_path), ("clip_path", clip_path), ("dtype", dtype)):
        if value is not None:
            overrides[name] = value
    return overrides, inputs.vq, inputs.notes


VQ_HELP = ("VQGAN for decoding: 'tiny' or a weights file (default: the one the run was trained with, from its "
           "train_summary.json; a different one is refused without --vq-mismatch-ok).")
VQ_MISMATCH_HELP = "Allow a --vq other than the VQGAN the run was trained with."
SEED_HELP = "Seed of the random (small preset) weights (default: the run's, else 0)."
MODEL_SET_HELP = ("Model preset override key=value (default: the run's own --model-set values, e.g. vision_path, "
                  "image_tokens; a conflicting value is an error).")
