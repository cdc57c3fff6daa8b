"""OmniMedVQA layout: ``QA_information/{Open-access,Restricted-access}/<Dataset>.json`` and
``Images/<Dataset>/...`` (paths with spaces, PNG and JPEG).

Rows carry ``dataset``, ``question_id``, ``question_type``, ``question``, ``gt_answer`` (the correct
option's text), ``image_path`` (relative to the root), ``option_A`` ... ``option_D`` (some items only
A-B) and ``modality_type`` — the Restricted-access files say ``modality`` instead. Quirks: a
gt_answer that is none of the options, a truncated (unreadable) image. One test image is **the
planted leak** that PubMedVision copies (see ``_vl``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlhealth.demo import phantom
from vlhealth.demo._io import write_jpeg, write_json, write_png
from vlhealth.demo._vl import MODALITY_WORD, REGION_WORD, leak_image

NAME = "omnimedvqa"
DATASETS = (("Open-access", "Head CT Scans", "ct_head", 3), ("Open-access", "Chest X-Ray PA", "xray_chest", 2),
            ("Restricted-access", "Pelvis CT Atlas", "ct_pelvis", 2))
MODALITY = {"CT": "CT(Computed Tomography)", "MRI": "MR (Mag-netic Resonance Imaging)", "X-ray": "X-Ray"}


def _rows(dataset: str, image: str, scan_mod: str, region: str, n_lesions: int, base: int) -> list[dict[str, str]]:
    return [
        {"question_id": f"{dataset}_{base:04d}", "question_type": "Modality Recognition",
         "question": "What imaging modality is used for this image?", "gt_answer": MODALITY_WORD[scan_mod],
         "image_path": image, "option_A": "MRI" if scan_mod != "MRI" else "CT", "option_B": MODALITY_WORD[scan_mod],
         "option_C": "Ultrasound", "option_D": "PET"},
        {"question_id": f"{dataset}_{base + 1:04d}", "question_type": "Anatomy Identification",
         "question": "Which part of the body is shown?", "gt_answer": REGION_WORD[region], "image_path": image,
         "option_A": REGION_WORD[region], "option_B": "knee"},
        {"question_id": f"{dataset}_{base + 2:04d}", "question_type": "Lesion Grading",
         "question": "How many lesions are visible?", "gt_answer": str(n_lesions), "image_path": image,
         "option_A": "0", "option_B": "1", "option_C": "2", "option_D": "3"},
    ]


def write(root: Path, rng: np.random.Generator) -> None:
    per_file: dict[tuple[str, str], list[dict[str, str]]] = {}
    for part, dataset, kind, n_images in DATASETS:
        rows = per_file.setdefault((part, dataset), [])
        for i in range(n_images):
            if part == "Open-access" and kind == "ct_head" and i == 0:
                img, mod, region, n = leak_image(), "CT", "head", 1  # the planted leak's original
            else:
                scan = phantom.scan_2d(rng, kind, int(rng.integers(0, 3)), (224, 224))
                img, mod, region, n = scan.image, scan.modality, scan.region, len(scan.lesions)
            ext = "png" if part == "Restricted-access" else "jpg"
            rel = f"Images/{dataset}/test/case {i:03d} ({int(rng.integers(1, 9))}).{ext}"
            (write_png if ext == "png" else write_jpeg)(root / rel, img)
            for row in _rows(dataset, rel, mod, region, n, 3 * i):
                row = {"dataset": dataset, **row}
                if part == "Restricted-access":
                    row["modality"] = MODALITY[mod]
                else:
                    row["modality_type"] = MODALITY[mod]
                rows.append(row)
    head = per_file[("Open-access", "Head CT Scans")]
    head.append({**head[0], "question_id": "Head CT Scans_9990", "gt_answer": "Endoscopy"})  # none of the options
    truncated = "Images/Chest X-Ray PA/test/truncated.jpg"
    write_jpeg(root / truncated, phantom.scan_2d(rng, "xray_chest", 0, (224, 224)).image)
    data = (root / truncated).read_bytes()
    (root / truncated).write_bytes(data[: len(data) // 3])
    per_file[("Open-access", "Chest X-Ray PA")].append(
        {**per_file[("Open-access", "Chest X-Ray PA")][0], "question_id": "Chest X-Ray PA_9990", "image_path": truncated})
    for (part, dataset), rows in per_file.items():
        write_json(root / "QA_information" / part / f"{dataset}.json", rows)
