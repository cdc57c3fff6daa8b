"""What an evaluated sample is, shared by the evaluator, the baselines and the report.

``benchmark_name(source)`` is a source's display name (``vqa_rad`` -> ``VQA-RAD``);
``target_modality(record)`` the modality a generation sample's target is in.
"""

from __future__ import annotations

from vlhealth.schema import Record

__all__ = ["benchmark_name", "target_modality"]

# Display names of known sources, in the paper's column order.
_BENCHMARKS = {
    "vqarad": "VQA-RAD", "slake": "SLAKE", "pathvqa": "PathVQA", "mmmu": "MMMU-Med", "mmmumed": "MMMU-Med",
    "omnimedvqa": "OMVQA", "omvqa": "OMVQA", "mimiccxrvqa": "MIMIC-CXR-VQA",
}


def benchmark_name(source: str) -> str:
    key = "".join(ch for ch in source.lower() if ch.isalnum())
    return _BENCHMARKS.get(key, source)


def target_modality(rec: Record) -> str | None:
    """The target's modality: ``provenance.target_modality``, else implied by the subtask."""
    tm = (rec.provenance or {}).get("target_modality")
    if tm:
        return str(tm)
    return {"mri2ct": "CT", "ct2mri": "MR"}.get(rec.subtask)
