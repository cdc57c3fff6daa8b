"""SLAKE 1.0 layout: ``imgs/xmlab<N>/{source.jpg,mask.png,detection.json,question.json}``,
``train.json``, ``validate.json``, ``test.json`` and ``mask.txt``.

Split files are lists of records with the release's fields: ``img_id`` (int), ``img_name``
(``"xmlab<N>/source.jpg"``, relative to ``imgs/``), ``question``, ``answer`` (always a string,
also for counts), ``q_lang`` (``en``/``zh``), ``location``, ``modality`` (CT/MRI/X-Ray),
``answer_type`` (OPEN/CLOSED), ``base_type`` (``vqa``, or ``kvqa`` for knowledge questions),
``content_type``, ``triple`` and ``qid`` (unique across splits). Every image has English and
Chinese questions. ``mask.png`` is an organ label map whose values ``mask.txt`` names;
``detection.json`` lists ``{organ: [x, y, w, h]}`` boxes. The ``KG/`` folder is not reproduced.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlhealth.demo import phantom
from vlhealth.demo._io import write_jpeg, write_json, write_png

NAME = "slake"

# (scan kind, lesion count, split)
IMAGES = (
    ("ct_head", 1, "train"), ("mr_head", 0, "train"), ("xray_chest", 1, "train"),
    ("ct_pelvis", 1, "train"), ("xray_chest", 0, "train"),
    ("mr_head", 1, "validate"), ("ct_pelvis", 0, "validate"),
    ("ct_head", 0, "test"), ("xray_chest", 2, "test"),
)
SPLITS = ("train", "validate", "test")
LOCATION = {"head": "Brain", "pelvis": "Pelvic Cavity", "chest": "Lung"}
LOCATION_ZH = {"head": "脑部", "pelvis": "盆腔", "chest": "肺部"}
MODALITY = {"CT": "CT", "MRI": "MRI", "X-ray": "X-Ray"}
MODALITY_ZH = {"CT": "CT", "MRI": "核磁共振", "X-ray": "X光"}
# Organ classes painted into mask.png (value -> name), written to mask.txt.
MASK_CLASSES = {1: "Brain", 2: "Skull", 3: "Bladder", 4: "Bone", 5: "Lung", 6: "Lesion"}
_LABEL_TO_MASK = {
    "head": {phantom.GM: 1, phantom.WM: 1, phantom.CSF: 1, phantom.BONE: 2},
    "pelvis": {phantom.FLUID: 3, phantom.BONE: 4},
    "chest": {phantom.LUNG: 5},
}


def _mask_and_boxes(scan: phantom.Scan2D) -> tuple[np.ndarray, list[dict[str, list[int]]]]:
    """An organ label map from the display image's own geometry (thresholds on the rendering)."""
    img = scan.image.astype(np.int32)
    mask = np.zeros(img.shape, dtype=np.uint8)
    if scan.region == "head":
        mask[img > 235] = 2 if scan.modality == "CT" else 0
        mask[(img > 40) & (img <= 235) & (mask == 0)] = 1
    elif scan.region == "pelvis":
        mask[img > 200] = 4
        mask[(img > 20) & (img < 60)] = 3
    else:
        mask[(img > 20) & (img < 150)] = 5
    boxes: list[dict[str, list[int]]] = []
    for value in sorted(set(np.unique(mask).tolist()) - {0}):
        ys, xs = np.nonzero(mask == value)
        boxes.append({MASK_CLASSES[value]: [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                            int(ys.max() - ys.min() + 1)]})
    return mask, boxes


def _questions(scan: phantom.Scan2D) -> list[dict[str, object]]:
    n = len(scan.lesions)
    loc, mod = LOCATION[scan.region], MODALITY[scan.modality]
    q: list[dict[str, object]] = [
        {"question": "What modality is used to take this image?", "answer": mod, "q_lang": "en",
         "answer_type": "OPEN", "base_type": "vqa", "content_type": "Modality",
         "triple": ["vhead", "_", "_"]},
        {"question": "这张图片的成像方式是什么?", "answer": MODALITY_ZH[scan.modality], "q_lang": "zh",
         "answer_type": "OPEN", "base_type": "vqa", "content_type": "Modality",
         "triple": ["vhead", "_", "_"]},
        {"question": "Which part of the body does this image belong to?", "answer": loc, "q_lang": "en",
         "answer_type": "OPEN", "base_type": "vqa", "content_type": "Position",
         "triple": ["vhead", "_", "_"]},
        {"question": "Does the picture contain a lesion?", "answer": "Yes" if n else "No", "q_lang": "en",
         "answer_type": "CLOSED", "base_type": "vqa", "content_type": "Abnormality",
         "triple": ["vhead", "_", "_"]},
        {"question": "图中有病灶吗?", "answer": "是" if n else "否", "q_lang": "zh",
         "answer_type": "CLOSED", "base_type": "vqa", "content_type": "Abnormality",
         "triple": ["vhead", "_", "_"]},
        {"question": "这张图片属于身体的哪个部位?", "answer": LOCATION_ZH[scan.region], "q_lang": "zh",
         "answer_type": "OPEN", "base_type": "vqa", "content_type": "Position",
         "triple": ["vhead", "_", "_"]},
        {"question": "How many lesions are in this image?", "answer": str(n), "q_lang": "en",
         "answer_type": "OPEN", "base_type": "vqa", "content_type": "Quantity",
         "triple": ["vhead", "_", "_"]},
    ]
    if n == 1:
        side = scan.lesions[0].side.capitalize()
        q.append({"question": "Where is the lesion located?", "answer": side, "q_lang": "en",
                  "answer_type": "OPEN", "base_type": "vqa", "content_type": "Position",
                  "triple": ["vhead", "_", "_"]})
    if scan.plane == "axial":
        q.append({"question": "What scanning plane does this image belong to?", "answer": "Transverse Plane",
                  "q_lang": "en", "answer_type": "OPEN", "base_type": "vqa", "content_type": "Plane",
                  "triple": ["vhead", "_", "_"]})
    if scan.region == "head":
        q.append({"question": "What is the main function of the organ shown in this image?",
                  "answer": "Control body activity", "q_lang": "en", "answer_type": "OPEN",
                  "base_type": "kvqa", "content_type": "KG", "triple": ["Brain", "Function", "vtail"]})
    return q


def _appearance_questions(scan: phantom.Scan2D, rng: np.random.Generator) -> list[dict[str, object]]:
    """Closed modality/organ questions (SLAKE asks "Is this a CT image?", "Does the picture contain
    lung?"); asked of the scaled-up images, about one of several possibilities so both answers occur."""
    modality = str(rng.choice(["CT", "MRI", "X-Ray"]))
    organ = str(rng.choice(["Brain", "Lung", "Bladder"]))
    shown_organ = {"head": "Brain", "chest": "Lung", "pelvis": "Bladder"}[scan.region]
    common = {"q_lang": "en", "answer_type": "CLOSED", "base_type": "vqa", "triple": ["vhead", "_", "_"]}
    return [
        {"question": f"Is this {'an' if modality[0] in 'MX' else 'a'} {modality} image?",
         "answer": "Yes" if modality == MODALITY[scan.modality] else "No", "content_type": "Modality", **common},
        {"question": f"Does the picture contain {organ.lower()}?", "answer": "Yes" if organ == shown_organ else "No",
         "content_type": "Organ", **common},
    ]


def _extra_images(count: int) -> list[tuple[str, int, str]]:
    """Scaled-up image list: every scan kind with and without a lesion in turn; 70/10/20 train/validate/test."""
    splits = ("train", "train", "test", "train", "train", "validate", "train", "train", "test", "train")
    return [(phantom.SCAN_KINDS[i % len(phantom.SCAN_KINDS)], (i // len(phantom.SCAN_KINDS)) % 2, splits[i % 10])
            for i in range(count)]


def write(root: Path, rng: np.random.Generator, scale: int = 1) -> None:
    per_split: dict[str, list[dict[str, object]]] = {s: [] for s in SPLITS}
    qid = _write_images(root, rng, IMAGES, per_split, img_id=0, qid=0, appearance=False)
    if scale > 1:  # drawn after the fixed images, from a generator of its own: those stay byte-identical
        extra = np.random.default_rng(int(rng.integers(2**62)))
        _write_images(root, extra, _extra_images((scale - 1) * len(IMAGES)), per_split, img_id=len(IMAGES), qid=qid,
                      appearance=True)
    for split in SPLITS:
        write_json(root / f"{split}.json", per_split[split])
    (root / "mask.txt").write_text("".join(f"{v}:{name}\n" for v, name in MASK_CLASSES.items()),
                                   encoding="utf-8")


def _write_images(root: Path, rng: np.random.Generator, images: tuple | list,
                  per_split: dict[str, list[dict[str, object]]], img_id: int, qid: int, appearance: bool) -> int:
    """Write the images and their question.json; append the records to ``per_split``; returns the next qid."""
    for offset, (kind, n_lesions, split) in enumerate(images):
        size = (int(rng.integers(6, 9)) * 32, int(rng.integers(6, 9)) * 32)
        scan = phantom.scan_2d(rng, kind, n_lesions, size)
        img_id_here = img_id + offset
        folder = root / "imgs" / f"xmlab{img_id_here}"
        write_jpeg(folder / "source.jpg", scan.image)
        mask, boxes = _mask_and_boxes(scan)
        write_png(folder / "mask.png", mask)
        write_json(folder / "detection.json", boxes, indent=None)
        records = []
        for q in _questions(scan) + (_appearance_questions(scan, rng) if appearance else []):
            records.append({
                "img_id": img_id_here,
                "img_name": f"xmlab{img_id_here}/source.jpg",
                "question": q["question"],
                "answer": q["answer"],
                "q_lang": q["q_lang"],
                "location": LOCATION[scan.region],
                "modality": MODALITY[scan.modality],
                "answer_type": q["answer_type"],
                "base_type": q["base_type"],
                "content_type": q["content_type"],
                "triple": q["triple"],
                "qid": qid,
            })
            qid += 1
        write_json(folder / "question.json", records)
        per_split[split].extend(records)
    return qid
