"""The evaluation runner behind ``healthgpt eval``: batched greedy decoding, resumable, sharded.

Flow (one process, or one per GPU under ``torchrun``):

1. Samples are read in shard order from one or more shard folders, filtered by ``split``
   (default ``test``) and cut at ``limit`` samples per shard folder. Sample *i* of that stream belongs to rank
   ``i % world_size``.
2. Each rank groups its samples by task into fixed batches (comprehension and generation are never
   mixed: the task picks the H-LoRA plugin and the visual features). Batch boundaries count the
   samples already finished, so a resumed run decodes exactly the batches an uninterrupted one
   would (same padding, same numbers). Samples are streamed: at most one pending batch per task
   is held in memory.
3. Comprehension: the prompt is the first human turn (for a multi-turn conversation: all turns
   before the last answer) in the model's chat template; the answer is
   greedy (KV cache) up to a stop token or ``max_new_tokens``. Generation: the prompt ends with
   ``<start_index>``; the 1024 image tokens are parsed (malformed sequences are repaired and
   counted), decoded by the VQGAN and scored against the 8-bit target (SSIM/PSNR/MSE, LPIPS when
   weights are given, SynthRAD HU metrics for CT targets that carry their 16-bit reference), and
   against the VQGAN's own reconstruction of the target (the tokenizer's ceiling).
4. Every finished sample is appended, as one JSON line, to ``OUT/predictions/part-rNNN.jsonl``
   (flushed and fsynced per batch). A rerun with the same ``OUT`` skips every key found in any part
   file (a torn last line from a killed run is discarded), so an interrupted eval continues where
   it stopped, even with a different number of ranks.
   Generation records also carry ``loss``: the teacher-forced cross-entropy of the true target's VQ
   codes given prompt + input image, as training computes it (:mod:`healthgpt.evaluation.reliance`).
   With ``shuffled_images`` (on by default) each rank then makes a second pass, every input image
   swapped for another evaluated sample's of the same task (a seeded derangement; ``shuffled_limit``
   bounds its generation samples), into ``OUT/predictions_shuffled/part-rNNN.jsonl``, resumable the
   same way (a record is reused only when it was made with the same donor image).
5. When all ranks are done (a ``torch.distributed`` barrier under ``torchrun``), rank 0 merges the
   parts into ``OUT/predictions.jsonl`` (and ``OUT/predictions_shuffled.jsonl``), sorted by key, and writes the report
   (:mod:`healthgpt.evaluation.report`): ``report.json``, ``report.md`` and ``grids/*.png``.

``OUT/eval_config.json`` records what the predictions were made with; resuming with a different
model, checkpoint, VQGAN or decoding setting is refused (use a new ``--out``).

Public API::

    EvalConfig(shards, out, preset="tiny", checkpoint=None, ...)
    run_evaluation(config, *, model=None, vq=None, lpips=None) -> EvalResult
    read_predictions(out_dir) -> dict[key, record]
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer

from healthgpt.evaluation.baselines import baseline_predictions, collect_train_reference, generation_group
from healthgpt.evaluation.reliance import (
    ShuffleEntry,
    load_members_image,
    plan_donors,
    shuffled_selection,
    teacher_forced_loss,
    with_image,
)
from healthgpt.evaluation.samples import spread_selection, target_modality
from healthgpt.sharing.run_spec import MODEL_SET_HELP, SEED_HELP, VQ_HELP, VQ_MISMATCH_HELP, command_inputs
from healthgpt.training.dist import Dist, device_for, world_info
from vlhealth.cli_errors import print_error
from vlhealth.image_metrics import image_metrics, synthrad_metrics, to_hu
from vlhealth.schema import IMAGE_TOKEN, Record, Sample, decode_image
from vlhealth.shards import ShardError, TarReader, iter_tar, list_shards, verify_tars, write_atomic
from vlhealth.volumes import grey_levels

__all__ = [
    "CONFIG_NAME",
    "PREDICTIONS_NAME",
    "EvalConfig",
    "EvalError",
    "EvalResult",
    "hu_reference",
    "read_predictions",
    "resolve_checkpoint",
    "eval_command",
    "run_evaluation",
    "target_modality",
]

log = logging.getLogger(__name__)

PREDICTIONS_DIR = "predictions"
PREDICTIONS_NAME = "predictions.jsonl"
SHUFFLED_DIR = "predictions_shuffled"
SHUFFLED_NAME = "predictions_shuffled.jsonl"
CONFIG_NAME = "eval_config.json"
RUN_NAME = "run.json"
# Fields of eval_config.json that must match for a run to resume another's predictions.
_RESUME_FIELDS = ("preset", "checkpoint", "released", "vq", "split", "max_new_tokens", "max_image_tokens",
                  "constrained_images", "template", "overrides")


class EvalError(RuntimeError):
    """An evaluation that cannot run (bad shards, incompatible resume, nothing to evaluate)."""


@dataclass
class EvalConfig:
    """What to evaluate and how. Paths may be relative; nothing absolute reaches the outputs."""

    shards: Sequence[os.PathLike | str]
    out: os.PathLike | str
    preset: str = "tiny"
    checkpoint: os.PathLike | str | None = None
    released: os.PathLike | str | None = None
    vq: str = "tiny"
    split: str | None = "test"
    limit: int | None = None
    generation_limit: int | None = None  # per subtask/body part and shard folder: 1024 decoding steps per sample
    batch_size: int = 8
    max_new_tokens: int = 128
    max_image_tokens: int | None = None  # None: 1024 codes + end token (+ slack when unconstrained)
    constrained_images: bool = False
    lpips_weights: Sequence[os.PathLike | str] = ()
    grids_per_task: int = 4
    device: str = "auto"
    overrides: dict[str, Any] = field(default_factory=dict)
    max_batches: int | None = None  # stop this run after N batches (tests; a resumable partial run)
    progress: bool = False
    verify: bool = True  # compare each tar's sha256 with index.json before reading it
    baselines: bool = True  # identity / train-mean / majority / random-choice rows (reads the train split)
    shuffled_images: bool = True  # score again with each input image swapped for another sample's (reliance.py)
    shuffle_seed: int = 0  # seed of that derangement
    shuffled_limit: int | None = None  # generation samples of the shuffled pass per subtask/body part and folder;
    # None: as generation_limit


@dataclass
class EvalResult:
    out: Path
    complete: bool
    n_new: int
    n_total: int
    report: dict[str, Any] | None = None
    seconds: float = 0.0
    n_shuffled_new: int = 0  # new predictions of the shuffled-image pass


# -------------------------------------------------------------------------------- predictions


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as fh:
        data = fh.read()
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:  # a torn last line from a killed run: that sample is redone
                log.warning("%s: dropping an incomplete last line", path.name)
                return
            raise EvalError(f"{path.name} line {i + 1}: not valid JSON ({exc})") from exc


def read_predictions(out_dir: os.PathLike | str) -> dict[str, dict[str, Any]]:
    """Every finished prediction of ``out_dir`` by key (from the part files; first one wins)."""
    out: dict[str, dict[str, Any]] = {}
    pdir = Path(out_dir) / PREDICTIONS_DIR
    for part in sorted(pdir.glob("part-r*.jsonl")) if pdir.is_dir() else []:
        for rec in _read_jsonl(part):
            out.setdefault(rec["key"], rec)
    return out


class _PartWriter:
    """Append-only JSONL of one rank; repairs a torn last line before appending."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                with open(path, "r+b") as fh:
                    fh.truncate(keep)
        self.fh = open(path, "a", encoding="utf-8")

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        for rec in records:
            self.fh.write(json.dumps(rec, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n")
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()


# -------------------------------------------------------------------------------- samples


def _record_json(members: dict[str, bytes]) -> dict[str, Any] | None:
    raw = members.get("json")
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


SPLIT_CHOICES = ("train", "val", "test", "held-out", "validation", "all")
HELD_OUT_SPLITS = ("held-out", "validation")  # splits that read held-out train groups
SPLIT_HELP = ("Split to evaluate: train, val, test, all; 'held-out' (the 1 in 20 train groups that no training step "
              "reads), or 'validation' (per folder and task its val split, else its held-out train groups: the pool "
              "the trainer's validation batches are drawn from; compare recipes on it, never on test).")


def _split_filter(folder: os.PathLike | str, split: str | None) -> Callable[[dict, str], bool]:
    """Which (record, key) of ``folder`` a ``--split`` takes (``None``: every record)."""
    from healthgpt.training.data import is_validation, validation_filter

    if split is None:
        return lambda rec, key: True
    if split == "validation":
        return validation_filter(folder)
    if split == "held-out":
        return lambda rec, key: is_validation(rec, key, lent=True)
    return lambda rec, key: rec.get("split") == split


def _iter_members(shards: Sequence[os.PathLike | str], split: str | None, limit: int | None = None,
                  verify: bool = True, generation_limit: int | None = None
                  ) -> Iterator[tuple[str, dict[str, bytes], dict, Path]]:
    """(key, members, record json, tar path) of the wanted split, in shard order; at most ``limit`` per shard
    folder (so a quick run still covers every benchmark given) and at most ``generation_limit`` generation
    samples per subtask and body part of a folder (so every conversion direction and anatomy is covered),
    spread over its patients and their slices (:func:`spread_selection`; a first pass reads the records).
    With ``verify`` every tar's sha256 is compared with its index.json first."""
    tars = list_shards(list(shards))
    if not tars:
        raise EvalError(f"no shards found in {', '.join(Path(s).name for s in shards)}")
    if verify:
        try:
            verify_tars(tars)
        except ShardError as exc:
            raise EvalError(str(exc)) from exc
    for folder in shards:
        taken = 0
        wanted = _split_filter(folder, split)
        chosen = None if generation_limit is None else _generation_selection(folder, wanted, generation_limit)
        for tar in list_shards(folder):
            for key, members in iter_tar(tar):
                if limit is not None and taken >= limit:
                    break
                rec = _record_json(members)
                if rec is None:
                    raise EvalError(f"{tar.name}: sample {key!r} has no readable json member")
                if not wanted(rec, key):
                    continue
                if chosen is not None and rec.get("task") == "generation" and key not in chosen:
                    continue
                taken += 1
                yield key, members, rec, tar
        if not taken and split in HELD_OUT_SPLITS:
            log.warning("%s: no %s samples (no val split, and no train samples to hold out); it is not evaluated",
                        Path(folder).name, split)


def _generation_selection(folder: os.PathLike | str, wanted: Callable[[dict, str], bool],
                          n: int) -> set[str]:
    """Keys of the ``n`` generation samples per subtask and body part of one shard folder that a limited
    evaluation scores: spread over the patients and their slices (:func:`spread_selection`)."""
    cells: dict[tuple[Any, Any], list[tuple[str, str]]] = {}
    reader = TarReader()  # the records only: the images are read once, by the pass that yields them
    try:
        for tar in list_shards(folder):
            for key in reader.index(tar).keys:
                rec = _record_json(reader.read(tar, key, ("json",)))
                if rec is None or rec.get("task") != "generation" or not wanted(rec, key):
                    continue  # an unreadable record is refused by the pass that yields it
                cells.setdefault((rec.get("subtask"), rec.get("body_part")), []).append((_patient(rec, key), key))
    finally:
        reader.close()
    return {key for items in cells.values() for key in spread_selection(items, n)}


def _patient(rec: dict[str, Any], key: str) -> str:
    """A sample's patient / image group (its key when it has none): what limited selections spread over and
    what a shuffled image must not come from."""
    return str(rec.get("group") or key)


Batch = list[tuple[str, dict[str, bytes], Path]]  # (key, members, tar path)


def _stream_batches(config: EvalConfig, rank: int, world: int, done: set[str] | Any, all_keys: list[str], *,
                    entries: list[ShuffleEntry] | None = None, select: set[str] | None = None) -> Iterator[Batch]:
    """This rank's unfinished samples in fixed batches, streamed (at most one batch per task in memory).

    Batch boundaries count finished samples too, so a resumed run decodes the same batches as an
    uninterrupted one. ``all_keys`` receives every evaluated key of every rank, in stream order, and
    ``entries`` (when given) what the shuffled-image pass needs of each. ``select``: only these keys
    take part (the shuffled pass); ranks take every n-th of them.
    """
    pending: dict[str, Batch] = {"comprehension": [], "generation": []}
    slots = dict.fromkeys(pending, 0)
    seen: set[str] = set()
    j = -1
    for key, members, rec, tar in _iter_members(config.shards, config.split, config.limit, config.verify,
                                                config.generation_limit):
        if key in seen:
            raise EvalError(f"sample key {key!r} occurs twice in the evaluated shards")
        seen.add(key)
        all_keys.append(key)
        task = rec.get("task")
        if task not in pending:
            raise EvalError(f"{tar.name}: sample {key!r}: unknown task {task!r}")
        if entries is not None:
            entries.append(_shuffle_entry(key, members, rec, tar))
        if select is not None and key not in select:
            continue
        j += 1
        if j % world != rank:
            continue
        slots[task] += 1
        if key not in done:
            pending[task].append((key, members, tar))
        if slots[task] == config.batch_size:
            if pending[task]:
                yield pending[task]
            pending[task], slots[task] = [], 0
    for task in pending:
        if pending[task]:
            yield pending[task]


def _shuffle_entry(key: str, members: dict[str, bytes], rec: dict[str, Any], tar: Path) -> ShuffleEntry:
    """What the derangement needs of one sample: its task, kind, whether its prompt shows an image."""
    conv = rec.get("conversations") or [{}]
    has_image = load_members_image(members) is not None and IMAGE_TOKEN in str(conv[0].get("value", ""))
    if rec.get("task") == "generation":
        try:
            tm = target_modality(Record.from_json(dict(rec)))
        except (ValueError, TypeError, KeyError):
            tm = None
        kind = generation_group(str(rec.get("subtask")), rec.get("body_part"), tm)
    else:
        kind = str(rec.get("source"))
    return ShuffleEntry(key, str(rec.get("task")), kind, has_image, tar,
                        (str(tar.parent), rec.get("subtask"), rec.get("body_part")), _patient(rec, key))


def _sample(key: str, members: dict[str, bytes], tar: Path | str) -> Sample:
    """The validated sample; a broken one (e.g. a corrupt ``target.vq.npy``) is an error naming tar and sample."""
    tar = Path(tar).name
    try:
        return Sample.from_members(key, members)
    except (ValueError, OSError, EOFError) as exc:
        text = str(exc)
        raise EvalError(f"{tar}: {text}" if text.startswith("sample ") else f"{tar}: sample {key!r}: {text}") from exc


# -------------------------------------------------------------------------------- references


def _image_array(data: bytes | np.ndarray) -> np.ndarray:
    return data if isinstance(data, np.ndarray) else decode_image(data)


def _json_member(sample: Sample, *names: str) -> dict[str, Any] | None:
    for name in names:
        if name in sample.extras:
            try:
                return json.loads(sample.extras[name])
            except (UnicodeDecodeError, json.JSONDecodeError):
                return None
    return None


def hu_reference(sample: Sample) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float]] | None:
    """(reference in HU, body mask or None, the target's window) of a CT target, else None.

    Eval splits of the SynthRAD2023 builder keep the target slice at 16 bits as ``reference.png``
    (``provenance.reference.member``), made by ``vlhealth.volumes.apply_window`` with the window in
    ``provenance.target_window``, and the body mask as ``mask.png`` (``mask_member``); the window's
    own ``decode`` maps it back to HU.
    """
    from vlhealth.volumes import Window

    ex = sample.extras
    prov = sample.record.provenance or {}
    ref_info = prov.get("reference") if isinstance(prov.get("reference"), dict) else {}
    ref_name = ref_info.get("member") or "reference.png"
    if ref_name not in ex:
        return None
    window = prov.get("target_window") or prov.get("window")
    if isinstance(window, dict):
        window = (window.get("lo"), window.get("hi"))
    if not window or len(window) != 2 or any(w is None for w in window):
        raise EvalError(f"sample {sample.key!r}: {ref_name} has no window (lo, hi) to map it to HU")
    lo, hi = float(window[0]), float(window[1])
    raw = np.asarray(decode_image(ex[ref_name]))
    if raw.dtype != np.uint16:
        raise EvalError(f"sample {sample.key!r}: {ref_name} is {raw.dtype}, expected a 16-bit reference")
    hu = Window(lo, hi, "ct_hu").decode(raw)
    mask_name = ref_info.get("mask_member") or "mask.png"
    mask = np.asarray(decode_image(ex[mask_name])) > 0 if mask_name in ex else None
    return hu, mask, (lo, hi)


# -------------------------------------------------------------------------------- runner


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _metrics_json(m: dict[str, float]) -> dict[str, float | None]:
    return {k: _finite(v) for k, v in m.items()}


def _fingerprint(path: os.PathLike | str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file())
        return {"name": p.name, "files": {f.name: f.stat().st_size for f in files}}
    if not p.is_file():
        raise EvalError(f"{p.name}: checkpoint not found")
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return {"name": p.name, "sha256": h.hexdigest()}


class _Runner:
    def __init__(self, config: EvalConfig, model: Any, vq: Any, lpips: Any, train_ref: Any = None) -> None:
        self.config = config
        self.train_ref = train_ref  # baselines.TrainReference: train-split means for the generation baselines
        self.model = model
        self.vq = vq
        self.lpips = lpips
        from healthgpt.model.conversation import encode_prompt
        from healthgpt.model.core import stop_token_ids_for

        self._encode_prompt = encode_prompt
        self.stops = stop_token_ids_for(model)

    def _prompt(self, sample: Sample, task: str) -> tuple[list[int], str]:
        """Prompt ids for the last gpt turn: the first human turn, or for a multi-turn conversation
        every turn before the last answer (earlier answers are given as context)."""
        conv = sample.record.conversations
        question = conv[0]["value"]
        if len(conv) <= 2 or task != "comprehension":
            ids = self._encode_prompt(self.model.tokenizer, question, template=self.model.template,
                                      image=sample.input_image is not None and IMAGE_TOKEN in question, task=task)
            return ids, question
        from healthgpt.model.conversation import encode_conversation, get_template

        tok = self.model.tokenizer
        context = encode_conversation(tok, conv[:-1], template=self.model.template, max_len=1 << 30)
        tail = tok(get_template(self.model.template).assistant, add_special_tokens=False)["input_ids"]
        return context["input_ids"].tolist() + list(tail), conv[-2]["value"]

    def _batch_inputs(self, samples: list[Sample], task: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[str]]:
        prompts = [self._prompt(s, task) for s in samples]
        n = max(len(p) for p, _ in prompts)
        pad = self.model.pad_token_id
        ids = torch.full((len(samples), n), pad, dtype=torch.long)
        mask = torch.zeros((len(samples), n), dtype=torch.long)
        for i, (p, _) in enumerate(prompts):  # left padding: every prompt ends at the last column
            ids[i, n - len(p):] = torch.tensor(p)
            mask[i, n - len(p):] = 1
        images = [_image_array(s.input_image) for s in samples if s.input_image is not None
                  and IMAGE_TOKEN in s.record.conversations[0]["value"]]
        pixel_values = self.model.vision.preprocess(images).to(self.model.device) if images else None
        return ids, mask, pixel_values, [q for _, q in prompts]

    def comprehension(self, samples: list[Sample]) -> list[dict[str, Any]]:
        ids, mask, pixel_values, questions = self._batch_inputs(samples, "comprehension")
        out = self.model.generate(ids, mask, pixel_values, task="comprehension",
                                  max_new_tokens=self.config.max_new_tokens, stop_token_ids=self.stops)
        stops = set(self.stops)
        records = []
        for sample, row, question in zip(samples, out.tolist(), questions, strict=True):
            cut = next((i for i, t in enumerate(row) if t in stops), None)
            answer_ids = row if cut is None else row[:cut]
            text = self.model.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
            rec = sample.record
            records.append({
                "key": sample.key, "task": rec.task, "subtask": rec.subtask, "source": rec.source,
                "split": rec.split, "answer_type": rec.answer_type, "options": rec.options,
                "modality": rec.modality, "body_part": rec.body_part,
                "question": question.replace(IMAGE_TOKEN, "").strip(),
                "reference": rec.conversations[-1]["value"], "prediction": text,
                "n_tokens": len(answer_ids), "hit_max_new_tokens": cut is None,
            })
        return records

    def main(self, batch: Batch) -> list[dict[str, Any]]:
        """The true-image pass over one batch of (key, members, tar)."""
        samples = [_sample(key, members, tar) for key, members, tar in batch]
        return self.comprehension(samples) if samples[0].record.task == "comprehension" else self.generation(samples)

    def _n_codes(self) -> int | None:
        """The eval VQGAN's codebook size when it is smaller than the 8192 image-token rows."""
        cfg = getattr(self.vq, "config", None)
        return int(cfg.n_embed) if cfg is not None and int(cfg.n_embed) < 8192 else None

    def _decode_images(self, samples: list[Sample]) -> tuple[Any, Any, Any, list[str]]:
        """Greedy image tokens, their repair reports and decoded images, and the questions."""
        ids, mask, pixel_values, questions = self._batch_inputs(samples, "generation")
        kwargs: dict[str, Any] = {"constrained": self.config.constrained_images}
        if getattr(self.vq, "config", None) is not None:  # a smaller codebook than the 8192 token rows
            kwargs["n_codes"] = int(self.vq.config.n_embed)
        if self.config.max_image_tokens is not None:
            kwargs["max_new_tokens"] = self.config.max_image_tokens
        codes, reports = self.model.generate_image_tokens(ids, mask, pixel_values, **kwargs)
        return codes, reports, self.vq.decode(codes), questions

    def _targets(self, samples: list[Sample]) -> tuple[list[np.ndarray], dict[int, np.ndarray]]:
        """The 8-bit targets and the VQGAN's reconstruction of each target's codes (by row)."""
        targets = [s.target for s in samples]
        vq_rows = [i for i, s in enumerate(samples) if s.target_vq is not None]
        recon = self.vq.decode(np.stack([samples[i].target_vq for i in vq_rows])) if vq_rows else None
        recon_of = {i: recon[j] for j, i in enumerate(vq_rows)} if recon is not None else {}
        for i, t in enumerate(targets):
            if t is None:  # a target known only by its codes: score against their decoding
                targets[i] = recon_of[i]
        return targets, recon_of

    def _hu(self, sample: Sample, pred: np.ndarray) -> dict[str, float]:
        """SynthRAD2023's HU metrics of a prediction of a CT target (empty for other targets)."""
        if target_modality(sample.record) != "CT":
            return {}
        ref = hu_reference(sample)
        if ref is None:
            return {}
        gt_hu, body, window = ref
        pred_hu = to_hu(pred, window)
        if pred_hu.shape != gt_hu.shape:
            raise EvalError(f"sample {sample.key!r}: HU reference {gt_hu.shape} does not match "
                            f"the {pred_hu.shape} prediction")
        return synthrad_metrics(gt_hu, pred_hu, body)

    def _scores(self, sample: Sample, pred: np.ndarray, target: np.ndarray) -> dict[str, Any]:
        """Image metrics (+ LPIPS, + HU metrics of CT targets) and the true target's teacher-forced loss."""
        metrics = image_metrics(pred, target)
        if self.lpips is not None:
            metrics["lpips"] = self.lpips.distance_uint8(pred, target)
        hu = self._hu(sample, pred)
        out: dict[str, Any] = {"metrics": _metrics_json(metrics), "hu_metrics": _metrics_json(hu) if hu else None,
                               "pred_std": float(np.std(grey_levels(pred)))}
        try:
            scored = teacher_forced_loss(self.model, sample, sample.input_image, self._n_codes())
        except ValueError as exc:  # e.g. target codes beyond the eval VQGAN's codebook
            scored, out["loss_error"] = None, str(exc)
        out["loss"], out["n_loss_tokens"] = (_finite(scored[0]), scored[1]) if scored else (None, None)
        return out

    def generation(self, samples: list[Sample]) -> list[dict[str, Any]]:
        codes, reports, preds, questions = self._decode_images(samples)
        targets, recon_of = self._targets(samples)
        records = []
        for i, sample in enumerate(samples):
            rec = sample.record
            target = targets[i]
            ceiling = None
            if i in recon_of and sample.target is not None:
                ceiling = _metrics_json(image_metrics(recon_of[i], sample.target))
            rep = reports[i]
            group = generation_group(rec.subtask, rec.body_part, target_modality(rec))
            inp = _image_array(sample.input_image) if sample.input_image is not None else None
            baselines = baseline_predictions(inp, target, group, self.train_ref)
            baselines_hu = {k: _metrics_json(h) for k, p in baselines.items() if (h := self._hu(sample, p))}
            records.append({
                "key": sample.key, "task": rec.task, "subtask": rec.subtask, "source": rec.source,
                "split": rec.split, "modality": rec.modality, "body_part": rec.body_part,
                "target_modality": target_modality(rec),
                "question": questions[i].replace(IMAGE_TOKEN, "").strip(),
                "codes": [int(c) for c in codes[i]],
                "tokens_ok": bool(rep.ok), "token_notes": list(rep.notes),
                **self._scores(sample, preds[i], target),
                "vq_ceiling": ceiling,
                "baselines": {k: _metrics_json(image_metrics(p, target)) for k, p in baselines.items()},
                "baselines_hu": baselines_hu or None,
            })
        return records

    def shuffled_generation(self, samples: list[Sample]) -> list[dict[str, Any]]:
        """The shuffled-image pass: ``samples`` carry another sample's input image; scored against their
        own (true) targets, and the true target's loss given the swapped image."""
        codes, reports, preds, _ = self._decode_images(samples)
        targets, _ = self._targets(samples)
        records = []
        for i, sample in enumerate(samples):
            rec = sample.record
            records.append({
                "key": sample.key, "task": rec.task, "subtask": rec.subtask, "source": rec.source,
                "body_part": rec.body_part, "target_modality": target_modality(rec),
                "n_distinct_codes": len(np.unique(np.asarray(codes[i]))), "tokens_ok": bool(reports[i].ok),
                **self._scores(sample, preds[i], targets[i]),
            })
        return records


def resolve_checkpoint(path: os.PathLike | str | None) -> Path | None:
    """The trainable-weights file of ``--checkpoint`` (see :func:`healthgpt.model.weights.resolve_trainable`)."""
    if path is None:
        return None
    from healthgpt.model.weights import CheckpointError, resolve_trainable
    from healthgpt.sharing.export import is_export_folder
    from healthgpt.sharing.hub import resolve_model

    path = resolve_model(path)  # a Hub id: its folder in the local Hugging Face cache

    if is_export_folder(path):  # a `healthgpt export` folder: loaded as a whole by load_model
        return Path(path)
    try:
        return resolve_trainable(path)
    except CheckpointError as exc:
        raise EvalError(str(exc)) from exc


def _resolve_released(path: os.PathLike | str | None) -> Path | None:
    from healthgpt.sharing.hub import resolve_model

    return resolve_model(path, kind="released")


def _load_components(config: EvalConfig, device: str, model: Any, vq: Any, lpips: Any) -> tuple[Any, Any, Any]:
    if model is None:
        from healthgpt.serving.infer import load_model

        model = load_model(config.preset, checkpoint=resolve_checkpoint(config.checkpoint), released=config.released,
                           device=device, **config.overrides)
    model.eval()
    if vq is None:
        from vlhealth.vq import load_vq

        vq = load_vq(config.vq, device=device)
    if lpips is None and config.lpips_weights:
        from vlhealth.image_metrics import load_lpips

        lpips = load_lpips(config.lpips_weights, device=device)
    return model, vq, lpips


def _config_record(config: EvalConfig, model: Any, vq: Any, lpips: Any) -> dict[str, Any]:
    return {
        "format": "healthgpt-eval-config/1",
        "shards": [Path(s).name for s in config.shards],
        "preset": config.preset,
        "checkpoint": _fingerprint(resolve_checkpoint(config.checkpoint)),
        "released": _fingerprint(_resolve_released(config.released)),
        "template": getattr(model, "template", None),
        "vq": vq.describe() if hasattr(vq, "describe") else str(config.vq),
        "split": config.split,
        "limit": config.limit,
        "generation_limit": config.generation_limit,
        "batch_size": config.batch_size,
        "max_new_tokens": config.max_new_tokens,
        "max_image_tokens": config.max_image_tokens,
        "constrained_images": config.constrained_images,
        "shuffled_images": config.shuffled_images,
        "shuffle_seed": config.shuffle_seed if config.shuffled_images else None,
        "shuffled_limit": config.shuffled_limit,
        "lpips": [Path(p).name for p in config.lpips_weights] if lpips is not None else None,
        "overrides": {k: str(v) if isinstance(v, os.PathLike) else v for k, v in config.overrides.items()
                      if k not in ("llm_path", "clip_path")},
    }


def _check_resume(out: Path, current: dict[str, Any]) -> None:
    path = out / CONFIG_NAME
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise EvalError(f"{CONFIG_NAME} in the output folder is not valid JSON ({exc})") from exc
    for name in _RESUME_FIELDS:
        if previous.get(name) != current.get(name):
            raise EvalError(
                f"the predictions in {out.name}/ were made with a different {name!r} "
                f"({previous.get(name)!r} vs now {current.get(name)!r}); use a new --out folder")


def _decode_pass(batches: Iterator[Batch], handle: Any, writer: _PartWriter, progress: Any,
                 budget: list[int | None]) -> tuple[int, bool]:
    """Decode ``batches`` with ``handle(batch) -> records`` and append them; ``budget[0]`` counts down the
    batches this run may still decode (``max_batches``). Returns (new predictions, stopped early)."""
    n_new = 0
    for batch in batches:
        if budget[0] is not None:
            if budget[0] <= 0:
                return n_new, True
            budget[0] -= 1
        with torch.inference_mode():
            records = handle(batch)
        writer.write(records)
        n_new += len(records)
        progress(len(records))
    return n_new, False


class _ShuffledPass:
    """The shuffled-image pass of one rank (:mod:`healthgpt.evaluation.reliance`): which image each sample
    gets, which samples are scored, and the batches of those still to do."""

    def __init__(self, config: EvalConfig, entries: list[ShuffleEntry], out: Path) -> None:
        self.config = config
        self.entries = {e.key: e for e in entries}
        self.donors, self.notes = plan_donors(entries, config.shuffle_seed)
        limit = config.shuffled_limit if config.shuffled_limit is not None else config.generation_limit
        self.keys = shuffled_selection(entries, self.donors, limit)
        self.out = out
        self.reader = TarReader()

    def done(self) -> dict[str, dict[str, Any]]:
        """Finished shuffled predictions made with the current donors (a record made with another
        derangement, e.g. under other limits, is redone)."""
        found: dict[str, dict[str, Any]] = {}
        pdir = self.out / SHUFFLED_DIR
        for part in sorted(pdir.glob("part-r*.jsonl")) if pdir.is_dir() else []:
            for rec in _read_jsonl(part):
                if rec.get("donor") == self.donors.get(rec["key"]):
                    found.setdefault(rec["key"], rec)
        return found

    def batches(self, rank: int, world: int) -> Iterator[Batch]:
        return _stream_batches(self.config, rank, world, set(self.done()), [], select=set(self.keys))

    def handle(self, runner: _Runner, batch: Batch) -> list[dict[str, Any]]:
        samples = []
        for key, members, tar in batch:
            donor = self.entries[self.donors[key]]
            image = load_members_image(self.reader.read(donor.tar, donor.key, ("input.png", "input.jpg")))
            if image is None:
                raise EvalError(f"{donor.tar.name}: sample {donor.key!r} lost its input image")
            samples.append(_sample(key, with_image(members, image), tar))
        task = samples[0].record.task
        records = runner.comprehension(samples) if task == "comprehension" else runner.shuffled_generation(samples)
        for r in records:
            donor = self.donors[r["key"]]
            r["donor"] = donor
            r["donor_same_kind"] = self.entries[donor].kind == self.entries[r["key"]].kind
        return records

    def info(self) -> dict[str, Any]:
        return {"status": "computed", "seed": self.config.shuffle_seed, "notes": self.notes,
                "shuffled_limit": self.config.shuffled_limit, "n_scored": len(self.keys)}

    def close(self) -> None:
        self.reader.close()


def _setup(config: EvalConfig, model: Any, vq: Any, lpips: Any) -> tuple[Dist, Path, str, Any, Any, Any, dict]:
    # gloo: the evaluator only needs barriers; ranks finish decoding at very different times, so
    # the barrier must outwait the slowest one
    dd = Dist(backend="gloo", timeout=timedelta(hours=24))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = device_for(config.device, dd.local_rank)
    model, vq, lpips = _load_components(config, device, model, vq, lpips)
    cfg_record = _config_record(config, model, vq, lpips)
    _check_resume(out, cfg_record)
    dd.barrier()
    if dd.rank == 0:
        from vlhealth.shards import write_json_atomic

        write_json_atomic(out / CONFIG_NAME, cfg_record)
    return dd, out, device, model, vq, lpips, cfg_record


def run_evaluation(config: EvalConfig, *, model: Any = None, vq: Any = None, lpips: Any = None) -> EvalResult:
    """Evaluate (or resume evaluating) ``config.shards``; rank 0 writes the report when all is done.

    ``model``/``vq``/``lpips`` may be passed pre-built (tests, notebooks); otherwise they are built
    from ``config`` on this rank's device. With ``shuffled_images`` the shuffled-image pass follows
    the true-image one (``OUT/predictions_shuffled/``, resumable the same way).
    """
    t0 = time.perf_counter()
    dd, out, device, model, vq, lpips, cfg_record = _setup(config, model, vq, lpips)
    rank, world = dd.rank, dd.world
    done = set(read_predictions(out))
    all_keys: list[str] = []
    entries: list[ShuffleEntry] = []
    train_ref = (collect_train_reference(config.shards, skip_held_out=config.split in HELD_OUT_SPLITS)
                 if config.baselines else None)
    runner = _Runner(config, model, vq, lpips, train_ref)
    progress = _prediction_counter(config.progress and rank == 0)
    budget: list[int | None] = [config.max_batches]
    shuffled: _ShuffledPass | None = None
    n_shuffled = 0
    try:
        writer = _PartWriter(out / PREDICTIONS_DIR / f"part-r{rank:03d}.jsonl")
        try:
            n_new, stopped = _decode_pass(_stream_batches(config, rank, world, done, all_keys, entries=entries),
                                          runner.main, writer, progress, budget)
        finally:
            writer.close()
        if config.shuffled_images and not stopped and all_keys:
            shuffled = _ShuffledPass(config, entries, out)
            writer = _PartWriter(out / SHUFFLED_DIR / f"part-r{rank:03d}.jsonl")
            try:
                n_shuffled, stopped = _decode_pass(shuffled.batches(rank, world),
                                                   lambda b: shuffled.handle(runner, b), writer, progress, budget)
            finally:
                writer.close()
                shuffled.close()
    finally:
        progress(None)
    n_total = len(all_keys)
    if n_total == 0:
        raise EvalError(f"no samples of split {config.split!r} in the given shards")
    dd.barrier()
    result = EvalResult(out=out, complete=False, n_new=n_new, n_total=n_total, n_shuffled_new=n_shuffled)
    if rank != 0:
        result.seconds = time.perf_counter() - t0
        return result
    return _finish(config, result, all_keys, stopped, shuffled, cfg_record, vq, lpips, train_ref, t0,
                   {"world_size": world, "device": device})


def _finish(config: EvalConfig, result: EvalResult, all_keys: list[str], stopped: bool,
            shuffled: _ShuffledPass | None, cfg_record: dict[str, Any], vq: Any, lpips: Any, train_ref: Any,
            t0: float, where: dict[str, Any]) -> EvalResult:
    """Rank 0, when every rank is done: merge the predictions and write the report (or report partial)."""
    out = result.out
    predictions = read_predictions(out)
    missing = [k for k in all_keys if k not in predictions]
    shuffled_done = shuffled.done() if shuffled is not None else {}
    missing += [k for k in (shuffled.keys if shuffled is not None else []) if k not in shuffled_done]
    if missing or stopped:
        result.seconds = time.perf_counter() - t0
        log.info("evaluation partial: %d predictions to go; rerun to continue", len(missing))
        return result
    ordered = [predictions[k] for k in sorted(all_keys)]
    write_atomic(out / PREDICTIONS_NAME, _jsonl(ordered))
    shuffled_records = None
    reliance_info: dict[str, Any] = {"status": "not computed (--no-shuffled-images)"}
    if shuffled is not None:
        shuffled_records = [shuffled_done[k] for k in sorted(shuffled.keys)]
        write_atomic(out / SHUFFLED_NAME, _jsonl(shuffled_records))
        reliance_info = shuffled.info()
    from healthgpt.evaluation.report import write_report

    result.report = write_report(out, ordered, cfg_record, shards=config.shards, vq=vq,
                                 grids_per_task=config.grids_per_task,
                                 lpips_status=_lpips_status(config, lpips), train_ref=train_ref,
                                 shuffled=shuffled_records, reliance=reliance_info)
    result.complete = True
    result.seconds = time.perf_counter() - t0
    from vlhealth.shards import write_json_atomic

    write_json_atomic(out / RUN_NAME, {"seconds_this_run": round(result.seconds, 3), "new_predictions": result.n_new,
                                       "new_shuffled_predictions": result.n_shuffled_new,
                                       "total_predictions": result.n_total, **where,
                                       "config": {k: v for k, v in asdict(config).items()
                                                  if k in ("batch_size", "limit", "max_batches", "device")}})
    return result


def _jsonl(records: Sequence[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _lpips_status(config: EvalConfig, lpips: Any) -> str:
    if lpips is None:
        return "not computed: no --lpips-weights given (LPIPS needs local AlexNet and lpips v0.1 weights)"
    names = ", ".join(Path(p).name for p in config.lpips_weights) or "weights given in code"
    return f"computed: AlexNet LPIPS v0.1 from {names}"


def _prediction_counter(enabled: bool) -> Any:
    """``step(n)`` advances the eval progress bar by ``n`` predictions; ``step(None)`` closes it."""
    if not enabled:
        return lambda n: None
    from vlhealth.progress import progress_bar

    bar = progress_bar("eval (rank 0)", "predictions")
    bar.start()
    task = bar.add_task("eval", total=None)

    def step(n: int | None) -> None:
        if n is None:
            bar.stop()
        else:
            bar.advance(task, n)

    return step


# -------------------------------------------------------------------------------- command line

EVAL_HELP = (
    "Evaluate a checkpoint on shard folders: VQA accuracy/recall (LLaVA-Med protocol), single-choice "
    "accuracy per modality, SSIM/PSNR/MSE (+ LPIPS, + SynthRAD2023 HU metrics) for generation.\n\n"
    "Writes OUT/report.json, OUT/report.md (the paper's table layouts), OUT/predictions.jsonl and "
    "OUT/grids/*.png (input | prediction | target). Interrupted runs resume: rerun the same command. "
    "Under torchrun every rank takes every n-th sample and rank 0 writes the report.\n\n"
    "Image reliance (on by default, --no-shuffled-images skips it): every sample is scored again with another evaluated "
    "sample's image of the same task (a seeded derangement, --shuffle-seed; --shuffled-limit bounds its generation "
    "samples), reported as the row 'model, shuffled images' (OUT/predictions_shuffled.jsonl); generation rows also "
    "give the true target's teacher-forced loss.\n\n"
    "Example:\n\n"
    "    healthgpt eval --shards demo/shards/vqa_rad --shards demo/shards/synthrad --checkpoint demo/runs/stage3 "
    "--preset tiny --out reports/tiny\n\n"
    "    torchrun --nproc-per-node 4 --no-python healthgpt eval --shards shards/slake --preset m3 "
    "--released weights/HealthGPT-M3 --llm-path weights/Phi-3-mini-4k-instruct --clip-path weights/clip-336 "
    "--out reports/m3"
)


def eval_command(
    shards: Annotated[list[Path], typer.Option("--shards", help="Shard folder or .tar (repeatable).")],
    out: Annotated[Path, typer.Option("--out", help="Report folder (reused to resume).")],
    checkpoint: Annotated[str | None, typer.Option(
        help="Training run, checkpoint, trainable .safetensors, or a `healthgpt export` folder; or a Hub id "
             "hf://ORG/NAME[@REVISION].")] = None,
    released: Annotated[str | None, typer.Option(
        help="Folder with the released HealthGPT-M3 weights, or their Hub id (hf://lintw/HealthGPT-M3).")] = None,
    preset: Annotated[str, typer.Option(help="tiny, smollm2-135m, m3, l14, xl32.")] = "tiny",
    vq: Annotated[str | None, typer.Option(help=VQ_HELP)] = None,
    vq_mismatch_ok: Annotated[bool, typer.Option(help=VQ_MISMATCH_HELP)] = False,
    split: Annotated[str, typer.Option(help=SPLIT_HELP)] = "test",
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N samples of each --shards folder.")] = None,
    generation_limit: Annotated[int | None, typer.Option(help="At most N generation samples per subtask and body "
                                                         "part of each --shards folder, spread over its patients "
                                                         "and their slices.")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples decoded together (per rank).")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length limit (comprehension).")] = 128,
    max_image_tokens: Annotated[int | None, typer.Option(help="Image token limit (default 1024 + slack).")] = None,
    constrained_images: Annotated[bool, typer.Option(help="Force exactly 1024 index tokens + <end_index>.")] = False,
    lpips_weights: Annotated[list[Path] | None, typer.Option(
        "--lpips-weights", help="Local LPIPS files: torchvision AlexNet weights and lpips' alex.pth (repeatable).")] = None,
    grids: Annotated[int, typer.Option(help="Example grids per generation subtask.")] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
    llm_path: Annotated[Path | None, typer.Option(help="Local LLM folder (real presets).")] = None,
    clip_path: Annotated[Path | None, typer.Option(help="Local CLIP ViT-L/14-336 folder.")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16.")] = None,
    seed: Annotated[int | None, typer.Option(help=SEED_HELP)] = None,
    verify: Annotated[bool, typer.Option(help=(
        "Compare each tar's sha256 with its folder's index.json before reading it (--no-verify skips it)."))] = True,
    model_set: Annotated[list[str] | None, typer.Option("--model-set", help=MODEL_SET_HELP)] = None,
    shuffled_images: Annotated[bool, typer.Option(
        "--shuffled-images/--no-shuffled-images", help=(
            "Image reliance: score the model again with each input image swapped for another evaluated sample's image "
            "of the same task (a seeded derangement), reported as the row 'model, shuffled images'."))] = True,
    shuffle_seed: Annotated[int, typer.Option(min=0, help="Seed of the shuffled-image derangement.")] = 0,
    shuffled_limit: Annotated[int | None, typer.Option(min=1, help=(
        "At most N generation samples per subtask and body part of each --shards folder in the shuffled-image "
        "pass (it decodes each one again; default: as --generation-limit)."))] = None,
) -> None:
    from rich.console import Console

    from vlhealth.image_metrics import LPIPSWeightsError

    console = Console(stderr=True)
    from vlhealth.shards import require_shards

    require_shards(shards, "--shards")
    if split not in SPLIT_CHOICES:
        raise typer.BadParameter(f"{split!r} is not a split: {', '.join(SPLIT_CHOICES)}", param_hint="--split")
    overrides, vq_spec, notes = command_inputs(preset, seed, llm_path, clip_path, dtype, model_set, checkpoint, vq,
                                               vq_mismatch_ok)
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    config = EvalConfig(
        shards=shards, out=out, preset=preset, checkpoint=checkpoint, released=released, vq=vq_spec,
        split=None if split == "all" else split, limit=limit, generation_limit=generation_limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
        max_image_tokens=max_image_tokens, constrained_images=constrained_images,
        lpips_weights=lpips_weights or [], grids_per_task=grids, device=device, overrides=overrides, progress=True,
        verify=verify, shuffled_images=shuffled_images, shuffle_seed=shuffle_seed, shuffled_limit=shuffled_limit,
    )
    try:
        result = run_evaluation(config)
    except (EvalError, LPIPSWeightsError, FileNotFoundError, ValueError, TypeError) as err:
        print_error(err)
        raise typer.Exit(2) from err
    if not result.complete:
        if world_info()[0] == 0:
            console.print(f"partial: {result.n_new} new predictions; rerun the same command to continue")
        return
    console.print(f"{result.n_total} samples ({result.n_new} new, {result.n_shuffled_new} new with shuffled images) "
                  f"in {result.seconds:.1f} s; wrote {out.name}/report.md, report.json, predictions.jsonl")
    sys.stdout.write((out / "report.md").read_text("utf-8").split("## Notes")[0])
