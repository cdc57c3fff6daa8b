"""What an evaluated sample is, shared by the evaluator, the baselines and the report.

``benchmark_name(source)`` is a source's display name (``vqa_rad`` -> ``VQA-RAD``);
``target_modality(record)`` the modality a generation sample's target is in; ``spread_selection(items, n)``
the ``n`` samples a limited evaluation scores, spread over patients and over each patient's slices.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from vlhealth.schema import Record

__all__ = ["benchmark_name", "spread_selection", "target_modality"]

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


def spread_selection(items: Sequence[tuple[Hashable, str]], n: int) -> list[str]:
    """Keys of ``n`` of ``items`` (``(group, key)`` in stream order: a patient's or image's group, the sample's
    key), spread over the groups and, inside a group, evenly over its samples; returned in stream order.

    The groups take one sample each in turn (in the order they first appear) until ``n`` are taken, so
    ``n`` samples come from ``min(n, groups)`` patients instead of the first patient's first slices; a
    group's share is then spaced evenly through its samples (its middle one for a share of one). The
    first ``n`` samples of a SynthRAD cell are adjacent slices of one patient: a score on them, or an
    image swapped between them, says little about other patients."""
    if n <= 0:
        return []
    by_group: dict[Hashable, list[int]] = {}
    for i, (group, _) in enumerate(items):
        by_group.setdefault(group, []).append(i)
    members = list(by_group.values())
    share = [0] * len(members)
    left = min(n, len(items))
    while left:
        for j, m in enumerate(members):
            if left and share[j] < len(m):
                share[j] += 1
                left -= 1
    chosen = sorted(m[(2 * k + 1) * len(m) // (2 * q)] for m, q in zip(members, share, strict=True) if q
                    for k in range(q))
    return [items[i][1] for i in chosen]
