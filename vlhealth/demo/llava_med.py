"""LLaVA-Med layout: ``llava_med_alignment_500k.json``, ``llava_med_instruct_10k.json`` and the PMC
figure images under ``images/``.

Rows are ``{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}...]}`` (PMC figure
ids, ``<image>`` in the first human turn). Quirks of the releases: a row spelling the key
``conversatons``, multi-turn conversations, a row whose image was never downloaded, a row with an
empty gpt answer and a row that is not an object at all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlhealth.demo._io import write_jpeg, write_json
from vlhealth.demo._vl import describe, figure_panel

NAME = "llava_med"
N_ALIGN = 4
N_INSTRUCT = 4


def write(root: Path, rng: np.random.Generator) -> None:
    align: list[object] = []
    instruct: list[object] = []
    for i in range(N_ALIGN + N_INSTRUCT):
        pmc = int(rng.integers(2_000_000, 9_000_000))
        name = f"PMC{pmc}_fig{int(rng.integers(1, 6))}-{i}.jpg"
        page, scan = figure_panel(rng, (int(rng.integers(5, 8)) * 32, int(rng.integers(5, 8)) * 32))
        write_jpeg(root / "images" / name, page)
        caption = describe(scan)
        if i < N_ALIGN:
            align.append({"id": f"{pmc}-{i}", "image": name, "conversations": [
                {"from": "human", "value": "<image>\nDescribe the figure concisely."},
                {"from": "gpt", "value": caption}]})
        else:
            key = "conversatons" if i == N_ALIGN else "conversations"  # the releases' misspelling
            instruct.append({"id": f"{pmc}-{i}", "image": name, key: [
                {"from": "human", "value": "What modality is this image?\n<image>"},
                {"from": "gpt", "value": f"This is a {scan.modality} image."},
                {"from": "human", "value": "Describe the findings."},
                {"from": "gpt", "value": caption}]})
    instruct.append({"id": "missing-image", "image": "PMC0000000_fig1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A figure."}]})
    instruct.append({"id": "empty-answer", "image": align[0]["image"], "conversations": [  # type: ignore[index]
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "  "}]})
    instruct.append("not a record")
    write_json(root / "llava_med_alignment_500k.json", align)
    write_json(root / "llava_med_instruct_10k.json", instruct)
