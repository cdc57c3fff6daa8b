"""A run's ``report.json`` as flat score metrics (the names experiment tables and claims use).

``report_metrics(report)`` gives ``comp/<benchmark>/<close|all|open|choice>`` (%), ``comp_avg`` (Table 1's
average), ``gen/<subtask>/<ssim|psnr|mse>`` and ``gen/<subtask>/<body part>/...`` (SSIM x100), the paper's
columns ``gen/mtrans|recon|sr/*`` (``FAMILIES``) and ``gen_avg``; see :mod:`healthgpt.experiment.results`.
It lives apart so that both the results and the learning gate (:mod:`healthgpt.experiment.learned`) read
it without importing each other.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["FAMILIES", "report_metrics"]

# generation subtasks -> the paper's columns (Table 4: RECOM, MTRANS, SR); gen_avg averages these
FAMILIES = {"ct2mri": "mtrans", "mri2ct": "mtrans", "recon": "recon", "sr4x": "sr", "report2cxr": "report2cxr"}


def _weighted(entries: Sequence[Mapping[str, Any]], key: str, scale: float = 1.0) -> float | None:
    pairs = [(e[key], e.get("n", 1)) for e in entries if e.get(key) is not None]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total * scale if total else None


def report_metrics(report: Mapping[str, Any]) -> dict[str, float | None]:
    """Flat metrics of a ``report.json`` (see the module docstring)."""
    from healthgpt.evaluation.report import table1_average

    out: dict[str, float | None] = {}
    comp = report.get("comprehension") or {}
    for bench, s in comp.items():
        for m in ("close", "all", "open", "choice"):
            out[f"comp/{bench}/{m}"] = s.get(m)
    if comp:
        out["comp_avg"] = table1_average(comp)
    gen = report.get("generation") or {}
    by_group: dict[str, list[dict[str, Any]]] = defaultdict(list)  # recon_ct, ct2mri, ...
    by_subtask: dict[str, list[dict[str, Any]]] = defaultdict(list)  # recon, ct2mri, ...
    for group, g in gen.items():
        prefix = group.split("/")[0]
        by_group[prefix].append(g)
        if g.get("subtask") and g["subtask"] != prefix:
            by_subtask[str(g["subtask"])].append(g)
        if g.get("body_part"):
            for m, scale in (("ssim", 100.0), ("psnr", 1.0), ("mse", 1.0)):
                out[f"gen/{prefix}/{g['body_part']}/{m}"] = None if g.get(m) is None else g[m] * scale
    by_family: dict[str, list[dict[str, Any]]] = defaultdict(list)  # the paper's columns: mtrans, recon, sr
    for g in gen.values():
        by_family[FAMILIES.get(str(g.get("subtask")), str(g.get("subtask")))].append(g)
    for name, entries in [*by_group.items(), *by_subtask.items(), *by_family.items()]:
        for m, scale in (("ssim", 100.0), ("psnr", 1.0), ("mse", 1.0)):
            out[f"gen/{name}/{m}"] = _weighted(entries, m, scale)
    ssims = [out[f"gen/{f}/ssim"] for f in sorted(by_family) if out.get(f"gen/{f}/ssim") is not None]
    if ssims:
        out["gen_avg"] = sum(ssims) / len(ssims)  # type: ignore[arg-type]
    return out
