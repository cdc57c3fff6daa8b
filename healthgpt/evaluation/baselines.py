"""Baselines for every evaluation report: what a model has to beat to show it learned anything.

Each baseline is scored by the same metric code, in the same units and tables, as the model:

* generation
  - **identity**: the input image itself as the prediction (resized to the target's size,
    bicubic, the classic "do nothing" answer; for 4x super-resolution it is the bicubic upsampling);
  - **train mean**: the mean target image of the *train* split, per subtask / body part / target
    modality (the best constant prediction under MSE);
  - **blank**: one flat grey level everywhere, the most frequent grey level of those train targets
    (for most scans the background): what a model scores whose every token collapsed to the
    background code, so that such a collapse cannot pass for learning;
  - the **VQGAN ceiling** is computed by the evaluator itself (the target's own reconstruction);
* comprehension
  - **majority**: the most frequent train-split answer for the same question (normalised
    question text), falling back to the most frequent answer of that benchmark and answer type
    when the question never occurs in train;
  - **random choice**: for single-choice questions, the expected accuracy of picking an option
    uniformly at random (mean of ``1 / n_options``).

:func:`collect_train_reference` reads the train split of the evaluated shard folders once (json
members for the answers; target images for the means, at most ``max_images_per_group`` per group,
so a large source costs a bounded read).
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from healthgpt.evaluation.answer_metrics import VQAItem, normalize_for_scoring, summarize_vqa
from healthgpt.evaluation.samples import benchmark_name, target_modality
from vlhealth.image_metrics import image_metrics
from vlhealth.volumes import grey_levels

__all__ = [
    "BASELINE_NOTES",
    "TrainReference",
    "collect_train_reference",
    "comprehension_baselines",
    "baseline_predictions",
    "generation_baselines",
    "generation_group",
    "identity_prediction",
    "question_key",
]

BASELINE_NOTES = {
    "identity": "the input image as the prediction (bicubic-resized to the target size)",
    "train_mean": "the mean target image of the train split for the same subtask, body part and target modality",
    "blank": "a flat image at the most frequent grey level of the same train targets (the background, for most "
             "scans): the score of a model that outputs nothing but background",
    "vq_ceiling": "the target's own VQGAN reconstruction (a perfect token predictor)",
    "majority": "the most frequent train-split answer to the same (normalised) question, else to the "
                "benchmark's questions of that answer type",
    "random_choice": "expected accuracy of a uniformly random option (mean of 1/n_options), single-choice only",
}


def question_key(text: str) -> str:
    """A question's identity for the majority baseline: normalised, without the image placeholder."""
    return normalize_for_scoring(text.replace("<image>", " "))


def generation_group(subtask: str, body_part: str | None, target_modality: str | None) -> str:
    """The group a train mean is taken over (``ct2mri/brain``; reconstruction by target modality)."""
    name = subtask
    if subtask == "recon" and target_modality:
        name = f"recon_{target_modality.lower()}"
    return f"{name}/{body_part}" if body_part else name


@dataclass
class TrainReference:
    """What the baselines learn from the train split (answers and mean target images)."""

    by_question: dict[tuple[str, str, str], str] = field(default_factory=dict)
    by_type: dict[tuple[str, str], str] = field(default_factory=dict)
    mean_targets: dict[str, np.ndarray] = field(default_factory=dict)
    blank_levels: dict[str, int] = field(default_factory=dict)  # most frequent 8-bit grey level per group
    n_answers: int = 0
    n_images: dict[str, int] = field(default_factory=dict)

    def majority(self, benchmark: str, answer_type: str, question: str) -> str | None:
        """The majority answer for one test question, or None when train has nothing of its kind."""
        answer = self.by_question.get((benchmark, answer_type, question_key(question)))
        return answer if answer is not None else self.by_type.get((benchmark, answer_type))

    def describe(self) -> dict[str, Any]:
        return {"train_answers": self.n_answers, "train_mean_images": dict(sorted(self.n_images.items())),
                "blank_grey_levels": dict(sorted(self.blank_levels.items()))}


def _most_common(answers: Iterable[str]) -> str:
    """The most frequent answer by its normalised form; the raw text is its first spelling seen.
    Ties go to the normalised form first seen (deterministic for a fixed shard order)."""
    counts: Counter[str] = Counter()
    spelling: dict[str, str] = {}
    for a in answers:
        norm = normalize_for_scoring(a)
        counts[norm] += 1
        spelling.setdefault(norm, a)
    best = max(counts.values())
    return spelling[next(k for k in counts if counts[k] == best)]


def collect_train_reference(shards: Sequence[os.PathLike | str], *, split: str = "train",
                            max_images_per_group: int = 256, skip_held_out: bool = False) -> TrainReference:
    """Read the ``split`` samples of ``shards`` once: answers per question, mean target per group.
    ``skip_held_out`` leaves out the held-out train groups (``healthgpt.training.data.held_out``), for an
    evaluation of those very samples (``--split held-out`` / ``validation``): a baseline must not be fitted
    on the answers it is scored against."""
    from healthgpt.training.data import held_out
    from vlhealth.schema import decode_image
    from vlhealth.shards import iter_tar, list_shards

    per_question: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    per_type: dict[tuple[str, str], list[str]] = defaultdict(list)
    sums: dict[str, np.ndarray] = {}
    hists: dict[str, np.ndarray] = {}
    counts: dict[str, int] = defaultdict(int)
    for folder in shards:
        for tar in list_shards(folder):
            for key, members in iter_tar(tar):
                try:
                    rec = json.loads(members["json"])
                except (KeyError, UnicodeDecodeError, json.JSONDecodeError):
                    continue  # the evaluator reports unreadable samples of the evaluated split
                if rec.get("split") != split:
                    continue
                if skip_held_out and held_out(rec.get("group"), key):
                    continue
                if rec.get("task") == "comprehension" and rec.get("answer_type"):
                    conv = rec.get("conversations") or []
                    if len(conv) < 2:
                        continue
                    bench, kind = benchmark_name(str(rec.get("source", ""))), str(rec["answer_type"])
                    answer = str(conv[-1]["value"])
                    per_question[(bench, kind, question_key(str(conv[-2]["value"])))].append(answer)
                    per_type[(bench, kind)].append(answer)
                elif rec.get("task") == "generation":
                    _add_target(rec, members, sums, hists, counts, max_images_per_group, decode_image)
    ref = TrainReference(
        by_question={k: _most_common(v) for k, v in per_question.items()},
        by_type={k: _most_common(v) for k, v in per_type.items()},
        n_answers=sum(len(v) for v in per_type.values()),
    )
    for group, total in sums.items():
        ref.mean_targets[group] = np.clip(np.rint(total / counts[group]), 0, 255).astype(np.uint8)
        ref.n_images[group] = counts[group]
        ref.blank_levels[group] = int(np.argmax(hists[group]))  # ties: the darkest
    return ref


def _add_target(rec: Mapping[str, Any], members: Mapping[str, bytes], sums: dict[str, np.ndarray],
                hists: dict[str, np.ndarray], counts: dict[str, int], cap: int, decode: Any) -> None:
    from vlhealth.schema import Record

    target_name = next((m for m in ("target.png", "target.jpg") if m in members), None)
    if target_name is None:
        return
    group = generation_group(str(rec.get("subtask")), rec.get("body_part"), target_modality(Record.from_json(dict(rec))))
    if counts[group] >= cap:
        return
    img = grey_levels(decode(members[target_name]))
    if group in sums and sums[group].shape != img.shape:
        return  # a different size cannot be averaged in; the first size seen defines the group's mean
    sums[group] = sums.get(group, np.zeros_like(img)) + img
    levels = np.clip(np.rint(img), 0, 255).astype(np.int64).ravel()
    hists[group] = hists.get(group, np.zeros(256, np.int64)) + np.bincount(levels, minlength=256)
    counts[group] += 1


def identity_prediction(input_image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The input as a prediction: grey, bicubic-resized to the target's height and width."""
    from PIL import Image

    grey = np.clip(np.rint(grey_levels(input_image)), 0, 255).astype(np.uint8)
    if grey.shape[:2] == tuple(shape[:2]):
        return grey
    resized = Image.fromarray(grey).resize((shape[1], shape[0]), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def baseline_predictions(input_image: np.ndarray | None, target: np.ndarray, group: str,
                         ref: TrainReference | None) -> dict[str, np.ndarray]:
    """The identity, train-mean and blank predictions for one sample (those that exist), as images."""
    out: dict[str, np.ndarray] = {}
    if input_image is not None:
        out["identity"] = identity_prediction(input_image, target.shape)
    mean = ref.mean_targets.get(group) if ref is not None else None
    if mean is not None and mean.shape == target.shape[:2]:
        out["train_mean"] = mean
    level = ref.blank_levels.get(group) if ref is not None else None
    if level is not None:
        out["blank"] = np.full(target.shape[:2], level, dtype=np.uint8)
    return out


def generation_baselines(input_image: np.ndarray | None, target: np.ndarray, group: str,
                         ref: TrainReference | None) -> dict[str, dict[str, float]]:
    """Image metrics of the identity, train-mean and blank predictions for one sample (those that exist)."""
    return {k: image_metrics(p, target) for k, p in baseline_predictions(input_image, target, group, ref).items()}


def comprehension_baselines(records: Sequence[Mapping[str, Any]], ref: TrainReference | None
                            ) -> dict[str, dict[str, dict[str, Any]]]:
    """Per baseline, per benchmark: the same summary (``close``/``open``/``all``/``choice``) as the model's.

    ``records`` are the evaluator's comprehension predictions (``question``, ``reference``,
    ``answer_type``, ``options``, ``source``). Questions whose reference is not among their options
    are left out, as they are for the model.
    """

    majority: list[VQAItem] = []
    random_hits: dict[str, list[float]] = defaultdict(list)
    for r in records:
        bench = benchmark_name(str(r["source"]))
        common = {"key": r["key"], "benchmark": bench, "answer_type": r["answer_type"], "reference": r["reference"],
                  "options": r.get("options"), "modality": r.get("modality"), "subtask": r.get("subtask", "vqa")}
        guess = ref.majority(bench, r["answer_type"], r["question"]) if ref is not None else None
        item = VQAItem(prediction=guess if guess is not None else "", **common)
        try:
            item.score  # noqa: B018 - the same validity check as the model's items
        except ValueError:
            continue
        majority.append(item)
        if r["answer_type"] == "choice" and r.get("options"):
            random_hits[bench].append(1.0 / len(r["options"]))
    out: dict[str, dict[str, dict[str, Any]]] = {"majority": summarize_vqa(majority) if ref is not None else {}}
    out["random_choice"] = {b: {"n_choice": len(v), "choice": 100.0 * float(np.mean(v))}
                            for b, v in sorted(random_hits.items())}
    return out
