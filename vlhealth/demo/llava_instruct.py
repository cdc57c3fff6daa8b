"""LLaVA-v1.5 mix-665k layout: ``llava_v1_5_mix665k.json`` and the image folders it points to
(``coco/train2017/``, ``gqa/images/``, ``ocr_vqa/images/``, ``textvqa/train_images/``, ``vg/VG_100K/``).

Rows are ``{"id", "image"?, "conversations"}`` with multi-turn conversations; ``<image>`` sits
before or after the first question. Quirks: text-only records (no ``image`` key, as the ShareGPT
part), a row whose conversation ends with an unanswered human turn, a row with a missing image and
a row without conversations. The LCS-558K layout is ``vlhealth/demo/llava_pretrain.py`` (the
generation half), which ``vlhealth build llava-instruct`` reads as well.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlhealth.demo._io import write_jpeg, write_json
from vlhealth.demo._vl import natural_image

NAME = "llava_instruct"
FOLDERS = (("coco", "coco/train2017/{:012d}.jpg"), ("gqa", "gqa/images/{}.jpg"),
           ("ocr_vqa", "ocr_vqa/images/{}.jpg"), ("textvqa", "textvqa/train_images/{:016x}.jpg"),
           ("vg", "vg/VG_100K/{}.jpg"))


def write(root: Path, rng: np.random.Generator) -> None:
    rows: list[object] = []
    for i, (prefix, pattern) in enumerate(FOLDERS):
        rel = pattern.format(int(rng.integers(1, 10**9)))
        write_jpeg(root / rel, natural_image(rng, (int(rng.integers(4, 7)) * 32, int(rng.integers(4, 7)) * 32)))
        first = "<image>\nWhat is in the picture?" if i % 2 else "What is in the picture?\n<image>"
        rows.append({"id": f"{prefix}_{i:06d}", "image": rel, "conversations": [
            {"from": "human", "value": first}, {"from": "gpt", "value": "Some coloured shapes."},
            {"from": "human", "value": "How many shapes are there? Answer with a number."},
            {"from": "gpt", "value": str(int(rng.integers(2, 5)))}]})
    rows.append({"id": "sharegpt_0001", "conversations": [
        {"from": "human", "value": "What is a radiograph?"},
        {"from": "gpt", "value": "An image made with X-rays."}]})
    rows.append({"id": "sharegpt_0002", "conversations": [
        {"from": "human", "value": "Name a medical imaging modality."}, {"from": "gpt", "value": "MRI."},
        {"from": "human", "value": "And another?"}]})  # dangling question: dropped, the rest kept
    rows.append({"id": "coco_missing", "image": "coco/train2017/000000000001.jpg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A picture."}]})
    rows.append({"id": "broken_0001", "image": "coco/train2017/000000000002.jpg"})
    write_json(root / "llava_v1_5_mix665k.json", rows)
