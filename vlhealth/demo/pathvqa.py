"""PathVQA layout: ``pvqa/images/{train,val,test}/<split>_<nnnn>.jpg`` and
``pvqa/qas/{split}/{split}_qa.pkl``.

Each pickle is a plain list of dicts ``{"image": "<split>_<nnnn>" (no extension), "question",
"answer"}`` — only builtin types, so a restricted unpickler admitting builtins loads it. As in the
release, yes/no answers are the closed questions, the rest are open; answers are lower case.
Images are H&E-like RGB tiles whose content (nuclei, a pale necrotic area) matches the answers.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from vlhealth.demo import phantom
from vlhealth.demo._io import write_jpeg

NAME = "pathvqa"
SPLITS = {"train": 4, "val": 2, "test": 3}


def _questions(necrosis: bool, dense: bool) -> list[tuple[str, str]]:
    return [
        ("is there necrosis?", "yes" if necrosis else "no"),
        ("does this image show coagulative necrosis?", "yes" if necrosis else "no"),
        ("what is present?", "necrosis" if necrosis else "nuclei"),
        ("are the nuclei densely packed?", "yes" if dense else "no"),
        ("how are the nuclei stained?", "purple"),
    ]


def write(root: Path, rng: np.random.Generator) -> None:
    for split, count in SPLITS.items():
        qa: list[dict[str, str]] = []
        for i in range(count):
            name = f"{split}_{i:04d}"
            necrosis = bool((i + len(split)) % 2)
            dense = bool(rng.integers(0, 2))
            size = (int(rng.integers(5, 8)) * 32, int(rng.integers(5, 8)) * 32)
            nuclei = int(rng.integers(110, 160)) if dense else int(rng.integers(25, 50))
            tile = phantom.histology_tile(rng, size, nuclei, necrosis)
            write_jpeg(root / "pvqa" / "images" / split / f"{name}.jpg", tile)
            qa.extend({"image": name, "question": q, "answer": a} for q, a in _questions(necrosis, dense))
        out = root / "pvqa" / "qas" / split / f"{split}_qa.pkl"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(pickle.dumps(qa, protocol=4))
