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
* ``pooled``  the adapter's output averaged over patches;
* ``answer state`` (with ``--checkpoint``) the LLM's last hidden state where it predicts the answer's first
  token, for the sample's own question: what the trained model answers from. When it reads no more than
  the tower, the LLM already uses what the tower gives it, and the tower is the limit.

With ``--checkpoint`` the run's own ``--model-set`` values (its pre-trained tower above all) are used
unless given, as ``healthgpt eval`` does.

A family whose probe beats the majority by a wide margin is readable from the pixels; one whose
probe stays at the majority is not, for this tower at this resolution.

Example (the demo's data; ``--checkpoint`` also loads a trained adapter)::

    python benchmarks/vision_probe.py --shards demo/shards/vqa_rad --checkpoint demo/runs/stage3 \\
        --family "organ=What organ system is shown?" --family "lesions=How many lesions"
    python benchmarks/vision_probe.py --shards demo/shards/vqa_rad --model-set image_size=64

Measured by ``make demo`` (step 9; VQA-RAD replica at ``--scale-source vqa_rad=40``: 278 train / 73 test
images; the demo's 64 px tower in 16-px patches, pre-trained by ``healthgpt pretrain-vision``; the stage-3
adapter), tower / adapter / pooled / answer state: organ 98.6 / 98.6 / 98.6 / 98.6% and modality
100.0 / 98.6 / 98.6 / 100.0% against a 52.1% and 50.7% majority, lesion count 71.2 / 64.4 / 68.5 / 49.3%
against 50.7%: the tower encodes the small lesions only partly, and the LLM's answer state keeps less.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
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


Row = tuple[bytes, str, str]  # (image bytes, normalised answer, the sample's question)


def collect(shards: list[str], families: dict[str, str], split: str = "test") -> dict[str, dict[str, list[Row]]]:
    """``{family: {"train"|"test": [(image bytes, answer, question), ...]}}``, one row per distinct image and family.
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
        return "train" if rec.split == "train" and not held_out(rec.group, key) else None

    out: dict[str, dict[str, list[Row]]] = {f: {"train": [], "test": []} for f in families}
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
                        out[fam][where].append((s.input_image, answer.strip().lower(), question))
    return out


def features(model, rows: list[Row], answer_state: bool = False) -> dict[str, torch.Tensor]:
    """The probed views of each row's image; with ``answer_state`` also the LLM's last hidden state at the
    position that predicts the answer's first token, for the row's own question (what the trained model
    answers from: a probe there at the tower's level means the LLM reads all the tower gives it)."""
    from PIL import Image

    pils = [Image.open(io.BytesIO(b)).convert("RGB") for b, _, _ in rows]
    with torch.no_grad():
        pv = model.vision.preprocess(pils)
        tower = model.vision.patch_features(pv, "comprehension")
        adapted = model.vision.features(pv, "comprehension")
        views = {"tower": tower.flatten(1), "adapter": adapted.flatten(1), "pooled": adapted.mean(1)}
        if answer_state:
            views["answer state"] = torch.stack([_answer_state(model, q, pv[i:i + 1]) for i, (_, _, q) in
                                                 enumerate(rows)])
    return views


def _answer_state(model, question: str, pixel_values: torch.Tensor) -> torch.Tensor:
    from healthgpt.model.conversation import encode_prompt
    from healthgpt.model.generation import decoder_of

    ids = torch.tensor([encode_prompt(model.tokenizer, question, template=model.template)])
    embeds, mask, _, pos = model.embed_multimodal(ids, torch.ones_like(ids), None, pixel_values, "comprehension")
    hidden = decoder_of(model.llm)(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                   use_cache=False).last_hidden_state
    return hidden[0, -1].float()


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
    from healthgpt.sharing.run_spec import command_inputs

    # a checkpoint's own --model-set values (its vision_path above all) unless given: a probe of a run on
    # another tower would measure that tower
    overrides, _, notes = command_inputs(args.preset, None, None, None, None, args.model_set, args.checkpoint)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    model = load_model(args.preset, checkpoint=args.checkpoint, **overrides)
    model.eval()
    views = ["tower", "adapter", "pooled"] + (["answer state"] if args.checkpoint else [])
    families = _families(args.family or list(DEFAULT_FAMILIES))
    data = collect(args.shards, families, args.split)
    rows = []
    dashes = " | ".join("–" for _ in views)
    print(f"| family | train images | {args.split} images | classes | train-majority answer on {args.split} | "
          + " | ".join(views) + " |")
    print("| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in views) + " |")
    for fam, split in data.items():
        if not split["train"] or not split["test"]:
            print(f"| {fam} | {len(split['train'])} | {len(split['test'])} | – | – | {dashes} |")
            continue
        classes = sorted({a for _, a, _ in split["train"]})
        test = [row for row in split["test"] if row[1] in classes]
        unseen = len(split["test"]) - len(test)  # test answers never seen in train: counted as wrong below
        if not test:
            print(f"| {fam} | {len(split['train'])} | 0 of {len(split['test'])} (no {args.split} answer occurs in train) "
                  f"| – | – | {dashes} |")
            continue
        y_train = torch.tensor([classes.index(a) for _, a, _ in split["train"]])
        y_test = torch.tensor([classes.index(a) for _, a, _ in test])
        majority_answer = Counter(a for _, a, _ in split["train"]).most_common(1)[0][0]  # the train split's, as the report's
        majority = sum(a == majority_answer for _, a, _ in split["test"]) / len(split["test"])
        f_train = features(model, split["train"], bool(args.checkpoint))
        f_test = features(model, test, bool(args.checkpoint))
        accs = {view: float((probe(f_train[view], y_train, f_test[view], len(classes)) == y_test).float().sum())
                / len(split["test"]) for view in f_train}
        rows.append({"family": fam, "question": families[fam], "split": args.split, "train_images": len(split["train"]),
                     "scored_images": len(split["test"]), "scored_answers_unseen_in_train": unseen, "classes": classes,
                     "train_majority_answer": majority_answer, "train_majority_on_scored": majority, **accs})
        print(f"| {fam} | {len(split['train'])} | {len(split['test'])} | {len(classes)} | {100 * majority:.1f}% | "
              + " | ".join(f"{100 * accs[v]:.1f}%" for v in views) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", "utf-8")


if __name__ == "__main__":
    main()
