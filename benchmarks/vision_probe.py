"""Is the answer in the image features at all? A linear probe on the frozen vision features.

When a model answers an image-dependent question no better than the majority answer, there are two
very different causes: the vision tower's features do not carry the answer (nothing downstream can
fix that), or they do and the LLM has not learned to read them (more data, steps or capacity can).
This script tells them apart. For each question family it takes one label per image from the
*train* split (the reference answer), fits a multinomial logistic regression (torch, L2, full batch)
on the features the comprehension path reads, and reports its accuracy on the *test* split's images
(``--split validation``: the validation images that ``healthgpt eval --split validation`` reads, to
compare towers without touching test) beside the train split's majority answer scored on them (a test
answer never seen in train counts as wrong). Three feature views are probed (the tower is frozen; the adapter is the one ``--checkpoint``
trained, or the preset's random one):

* ``tower``   the CLIP patch tokens at the comprehension level, flattened (what the adapter sees);
* ``adapter`` the adapter's output, flattened (what the LLM sees);
* ``pooled``  the adapter's output averaged over patches.

A family whose probe beats the majority by a wide margin is readable from the pixels; one whose
probe stays at the majority is not, for this tower at this resolution.

Example (the demo's data; ``--checkpoint`` also loads a trained adapter)::

    python benchmarks/vision_probe.py --shards demo/shards/vqa_rad --checkpoint demo/runs/stage3 \\
        --family "organ=What organ system is shown?" --family "lesions=How many lesions"
    python benchmarks/vision_probe.py --shards demo/shards/vqa_rad --model-set image_size=64

Measured by ``make demo`` (step 9; VQA-RAD replica at ``--scale-source vqa_rad=40``: 278 train / 73 test
images; random tiny CLIP at 32 px; the stage-3 adapter): organ 100.0 / 97.3 / 98.6% (tower / adapter /
pooled) and modality 100.0 / 97.3 / 98.6% against a 52.1% and 50.7% majority, lesion count 60.3 / 63.0 /
54.8% against 50.7%: the frozen random tower barely encodes the small lesions.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import torch

DEFAULT_FAMILIES = ("organ=What organ system is shown?", "modality=What imaging modality was used?",
                    "lesions=How many lesions")


def _families(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not text:
            raise SystemExit(f"--family expects NAME=QUESTION TEXT, got {item!r}")
        out[name] = text
    return out


def collect(shards: list[str], families: dict[str, str], split: str = "test",
            ) -> dict[str, dict[str, list[tuple[bytes, str]]]]:
    """``{family: {"train"|"test": [(image bytes, answer), ...]}}``, one row per distinct image and family.
    ``split="validation"`` probes on the samples ``healthgpt eval --split validation`` reads instead of the
    test split (per folder and task its val split, else its held-out train groups), fitting on the train
    groups that training reads."""
    from healthgpt.training.data import held_out, validation_filter
    from vlhealth.shards import iter_samples

    def bucket(rec, key: str, keep) -> str | None:
        if split == "test":
            return rec.split if rec.split in ("train", "test") else None
        if keep({"split": rec.split, "group": rec.group, "task": rec.task}, key):
            return "test"
        return "train" if rec.split == "train" and not held_out({"group": rec.group, "key": key}) else None

    out: dict[str, dict[str, list[tuple[bytes, str]]]] = {f: {"train": [], "test": []} for f in families}
    seen: set[tuple[str, str]] = set()
    for folder in shards:
        keep = validation_filter(folder) if split == "validation" else None
        for s in iter_samples(folder):
            where = bucket(s.record, s.key, keep)
            if where is None or s.input_image is None or len(s.record.conversations) < 2:
                continue
            question, answer = s.record.conversations[0]["value"], s.record.conversations[1]["value"]
            for fam, text in families.items():
                if text.lower() in question.lower():
                    key = (fam, hashlib.sha256(s.input_image).hexdigest())
                    if key not in seen:
                        seen.add(key)
                        out[fam][where].append((s.input_image, answer.strip().lower()))
    return out


def features(model, images: list[bytes]) -> dict[str, torch.Tensor]:
    from PIL import Image

    pils = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    with torch.no_grad():
        pv = model.vision.preprocess(pils)
        tower = model.vision.patch_features(pv, "comprehension")
        adapted = model.vision.features(pv, "comprehension")
    return {"tower": tower.flatten(1), "adapter": adapted.flatten(1), "pooled": adapted.mean(1)}


def probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, n_classes: int,
          steps: int = 300, l2: float = 1e-3) -> torch.Tensor:
    """Predicted test classes of an L2 logistic regression fitted on standardised train features."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    xtr, xte = (x_train - mu) / sd, (x_test - mu) / sd
    w = torch.zeros(xtr.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ w + b, y_train) + l2 * w.pow(2).sum()
        loss.backward()
        opt.step()
    return (xte @ w + b).argmax(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", action="append", required=True, help="comprehension shard folder (repeatable)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--checkpoint", default=None, help="a training run (its adapter is probed too)")
    ap.add_argument("--model-set", action="append", default=[], help="preset override key=value")
    ap.add_argument("--family", action="append", default=[], help="NAME=QUESTION TEXT (substring; repeatable)")
    ap.add_argument("--split", choices=("test", "validation"), default="test",
                    help="probe on the test images, or on the validation ones (val split and held-out train groups; "
                         "compare towers on these, never on test)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    from healthgpt.serving.infer import load_model
    from healthgpt.training.train import _parse_sets

    model = load_model(args.preset, checkpoint=args.checkpoint, **_parse_sets(args.model_set, "--model-set"))
    families = _families(args.family or list(DEFAULT_FAMILIES))
    data = collect(args.shards, families, args.split)
    rows = []
    print(f"| family | train images | {args.split} images | classes | train-majority answer on {args.split} | tower | "
          "adapter | pooled |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for fam, split in data.items():
        if not split["train"] or not split["test"]:
            print(f"| {fam} | {len(split['train'])} | {len(split['test'])} | – | – | – | – | – |")
            continue
        classes = sorted({a for _, a in split["train"]})
        test = [(img, a) for img, a in split["test"] if a in classes]
        unseen = len(split["test"]) - len(test)  # test answers never seen in train: counted as wrong below
        if not test:
            print(f"| {fam} | {len(split['train'])} | 0 of {len(split['test'])} (no test answer occurs in train) "
                  "| – | – | – | – | – |")
            continue
        y_train = torch.tensor([classes.index(a) for _, a in split["train"]])
        y_test = torch.tensor([classes.index(a) for _, a in test])
        majority_answer = Counter(a for _, a in split["train"]).most_common(1)[0][0]  # the train split's, as the report's
        majority = sum(a == majority_answer for _, a in split["test"]) / len(split["test"])
        f_train, f_test = features(model, [b for b, _ in split["train"]]), features(model, [b for b, _ in test])
        accs = {view: float((probe(f_train[view], y_train, f_test[view], len(classes)) == y_test).float().sum())
                / len(split["test"]) for view in f_train}
        rows.append({"family": fam, "question": families[fam], "split": args.split, "train_images": len(split["train"]),
                     "test_images": len(split["test"]), "test_answers_unseen_in_train": unseen, "classes": classes,
                     "train_majority_answer": majority_answer, "majority_on_test": majority, **accs})
        print(f"| {fam} | {len(split['train'])} | {len(split['test'])} | {len(classes)} | {100 * majority:.1f}% | "
              + " | ".join(f"{100 * accs[v]:.1f}%" for v in ("tower", "adapter", "pooled")) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", "utf-8")


if __name__ == "__main__":
    main()
