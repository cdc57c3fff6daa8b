"""Canonical vocabularies: one spelling per imaging modality and per body part, across every source.

Sources spell the same thing differently ("MR", "MRI", "Magnetic Resonance Imaging"; "Head",
"brain"; "Pelvic Cavity", "pelvis"). The build runner maps every sample's ``modality`` and
``body_part`` through the tables below (:func:`canonicalise_record`), so ``vlhealth stats`` counts
one value per modality and per body part; the spelling the source used is kept in
``provenance.modality_upstream`` / ``provenance.body_part_upstream`` when it differs.

The modality set follows the paper's 11 modalities (the OmniMedVQA/PubMedVision families): CT, MRI,
X-ray, PET, ultrasound, microscopy (pathology slides included), OCT, fundus, endoscopy, dermoscopy
and photograph (digital photography, natural images). A spelling not in the tables passes through
with its whitespace collapsed (modality) or lower-cased (body part).
"""

from __future__ import annotations

import re
from typing import Any

MODALITIES = ("CT", "MRI", "X-ray", "PET", "ultrasound", "microscopy", "OCT", "fundus", "endoscopy",
              "dermoscopy", "photograph")

# lower-cased spelling -> canonical modality
MODALITY_NAMES: dict[str, str] = {
    **dict.fromkeys(("ct", "computed tomography", "ct(computed tomography)", "cta", "ct angiography"), "CT"),
    **dict.fromkeys(("mri", "mr", "magnetic resonance imaging", "mr (mag-netic resonance imaging)",
                     "magnetic resonance", "t1", "t2", "pd", "flair", "mra"), "MRI"),
    **dict.fromkeys(("x-ray", "xray", "x ray", "x-rays", "digital radiography", "radiograph", "radiography",
                     "cxr", "chest x-ray", "mammography", "dr", "cr", "dx"), "X-ray"),
    **dict.fromkeys(("pet", "positron emission tomography", "pet-ct", "pet/ct"), "PET"),
    **dict.fromkeys(("ultrasound", "us", "ultrasonography", "sonography", "ultrasound imaging"), "ultrasound"),
    **dict.fromkeys(("microscopy", "microscopy images", "pathology", "histopathology", "histology",
                     "light microscopy", "microscopy image"), "microscopy"),
    **dict.fromkeys(("oct", "optical coherence tomography"), "OCT"),
    **dict.fromkeys(("fundus", "fundus photography", "fundus photograph", "retinal photography"), "fundus"),
    **dict.fromkeys(("endoscopy", "endoscopic", "colonoscopy"), "endoscopy"),
    **dict.fromkeys(("dermoscopy", "dermatoscopy"), "dermoscopy"),
    **dict.fromkeys(("photo", "photograph", "digital photography", "photography", "natural image"), "photograph"),
}

# lower-cased spelling -> canonical body part
BODY_PARTS: dict[str, str] = {
    **dict.fromkeys(("brain", "head", "skull", "cranium", "head and neck"), "brain"),
    **dict.fromkeys(("pelvis", "pelvic cavity", "pelvic", "bladder", "prostate"), "pelvis"),
    **dict.fromkeys(("chest", "lung", "lungs", "thorax", "thoracic", "chest wall", "mediastinum"), "chest"),
    **dict.fromkeys(("abdomen", "abd", "abdominal", "abdominal cavity", "liver", "kidney"), "abdomen"),
    **dict.fromkeys(("neck",), "neck"),
    **dict.fromkeys(("spine", "spinal cord", "vertebra"), "spine"),
    **dict.fromkeys(("heart", "cardiac"), "heart"),
    **dict.fromkeys(("breast",), "breast"),
    **dict.fromkeys(("eye", "retina", "ocular"), "eye"),
    **dict.fromkeys(("skin",), "skin"),
    **dict.fromkeys(("upper limb", "arm", "hand", "wrist", "elbow", "shoulder"), "upper limb"),
    **dict.fromkeys(("lower limb", "leg", "knee", "foot", "ankle", "hip"), "lower limb"),
}


def _clean(value: str) -> str:
    return re.sub(r"\s+", " ", value).strip()


def canonical_modality(value: str | None) -> str | None:
    """The canonical name of a modality spelling; ``"NAME (expansion)"`` forms (OmniMedVQA's
    ``OCT (Optical Coherence Tomography)``) are looked up whole, then by the name, then the expansion."""
    if not value:
        return None
    text = _clean(value)
    m = re.fullmatch(r"([^()]+?) ?\(([^()]+)\)", text)
    for candidate in (text, *(m.groups() if m else ())):
        name = MODALITY_NAMES.get(candidate.strip().lower())
        if name is not None:
            return name
    return text or None


def canonical_body_part(value: str | None) -> str | None:
    """The canonical name of a body-part spelling (lower case)."""
    if not value:
        return None
    text = _clean(value).lower()
    return BODY_PARTS.get(text, text) or None


def canonicalise_record(record: Any) -> None:
    """Map ``record.modality`` / ``record.body_part`` to their canonical names in place, keeping a
    differing source spelling in ``provenance`` (``modality_upstream``, ``body_part_upstream``)."""
    for name, canonical in (("modality", canonical_modality), ("body_part", canonical_body_part)):
        raw = getattr(record, name)
        value = canonical(raw)
        if value != raw:
            setattr(record, name, value)
            if raw and _clean(raw):
                record.provenance.setdefault(f"{name}_upstream", raw)
