"""PubMedVision layout: ``PubMedVision_Alignment_VQA.json``, ``PubMedVision_InstructionTuning_VQA.json``
and ``images/pmc_*.jpg``.

Rows are ``{"id", "image": [paths], "conversations", "modality", "body_part"}``: ``image`` is a
**list** (usually of one path). Quirks: a record with three images (the paper excludes
multi-image records), a record whose human turn lacks ``<image>``, and **the planted leak**: one
alignment image is an OmniMedVQA test image resized to 75% and recompressed (see ``_vl``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlhealth.demo._io import write_jpeg, write_json
from vlhealth.demo._vl import describe, figure_panel, leaked_copy_jpeg

NAME = "pubmedvision"
N_IMAGES = 7
LEAK_NAME = "images/pmc_leak_0001.jpg"
MODALITY = {"CT": "Computed Tomography", "MRI": "Magnetic Resonance Imaging", "X-ray": "Digital Photography"}
BODY = {"head": "Head", "pelvis": "Pelvic Cavity", "chest": "Chest"}


def write(root: Path, rng: np.random.Generator) -> None:
    align: list[dict[str, object]] = []
    instruct: list[dict[str, object]] = []
    names = []
    for i in range(N_IMAGES):
        name = f"images/pmc_{int(rng.integers(10**6, 10**7))}_{i}.jpg"
        names.append(name)
        page, scan = figure_panel(rng, (int(rng.integers(5, 8)) * 32, int(rng.integers(5, 8)) * 32))
        write_jpeg(root / name, page)
        meta = {"modality": MODALITY[scan.modality], "body_part": BODY[scan.region]}
        if i % 2 == 0:
            align.append({"id": f"align_{i}", "image": [name], "conversations": [
                {"from": "human", "value": "<image>\nPlease describe this medical image."},
                {"from": "gpt", "value": describe(scan)}], **meta})
        else:
            human = "What does the image show?" if i == 1 else "<image>\nWhat does the image show?"
            instruct.append({"id": f"instruct_{i}", "image": [name], "conversations": [
                {"from": "human", "value": human}, {"from": "gpt", "value": describe(scan)}], **meta})
    instruct.append({"id": "instruct_multi", "image": names[:3], "conversations": [
        {"from": "human", "value": "<image>\n<image>\n<image>\nCompare the three panels."},
        {"from": "gpt", "value": "The panels show different scans."}], "modality": "Computed Tomography",
        "body_part": "Head"})
    (root / LEAK_NAME).write_bytes(leaked_copy_jpeg())
    align.append({"id": "align_leak", "image": [LEAK_NAME], "conversations": [
        {"from": "human", "value": "<image>\nPlease describe this medical image."},
        {"from": "gpt", "value": "Axial CT of the brain with a small focal lesion."}],
        "modality": "Computed Tomography", "body_part": "Head"})
    write_json(root / "PubMedVision_Alignment_VQA.json", align)
    write_json(root / "PubMedVision_InstructionTuning_VQA.json", instruct)
