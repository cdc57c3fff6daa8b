"""LLaVA-Pretrain (LCS-558K) layout: ``blip_laion_cc_sbu_558k.json`` + ``images/<nnnnn>/<id>.jpg``.

Rows are ``{"id": "004539375", "image": "00453/004539375.jpg", "conversations": [human
"<image>\\n<short caption request>" / gpt "<caption>"]}`` as in the release; images.zip extracts
to ``<nnnnn>/<id>.jpg`` folders, kept here under ``images/``. Quirks: a row whose image is
missing, a corrupt JPEG, and a greyscale JPEG (the generation builder converts it to RGB).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlhealth.demo._io import write_jpeg, write_json
from vlhealth.demo._vl import natural_image

NAME = "llava_pretrain"
N_IMAGES = 10
REQUESTS = ("Give a brief description of the image.", "Describe the image concisely.",
            "Provide a one-sentence caption for the provided image.")
CAPTIONS = ("a colourful abstract shape on a soft background", "bright blobs over a smooth gradient",
            "a few geometric shapes in vivid colours", "an out-of-focus photo with coloured patches")


def write(root: Path, rng: np.random.Generator) -> None:
    rows: list[dict[str, object]] = []
    for i in range(N_IMAGES):
        ident = f"{int(rng.integers(0, 10**9)):09d}"
        rel = f"{ident[:5]}/{ident}.jpg"
        size = (int(rng.integers(5, 11)) * 32, int(rng.integers(5, 11)) * 32)
        image = natural_image(rng, size)
        if i == 3:
            image = np.rint(image.mean(axis=-1)).astype(np.uint8)  # a greyscale JPEG
        if i != 7:  # quirk: row 7's image is missing
            write_jpeg(root / "images" / rel, image)
        request = REQUESTS[int(rng.integers(0, len(REQUESTS)))]
        rows.append({"id": ident, "image": rel, "conversations": [
            {"from": "human", "value": f"<image>\n{request}" if i % 2 else f"{request}\n<image>"},
            {"from": "gpt", "value": CAPTIONS[int(rng.integers(0, len(CAPTIONS)))]}]})
    corrupt = rows[5]["image"]
    (root / "images" / str(corrupt)).write_bytes(b"\xff\xd8\xff\xe0" + bytes(32))  # quirk: corrupt JPEG
    write_json(root / "blip_laion_cc_sbu_558k.json", rows, indent=None)
