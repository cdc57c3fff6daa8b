"""Seeds' statistics and the verdict rule of every claim.

A cell's metric over its seeds is reported as ``mean ± std`` (sample standard deviation, ddof = 1;
at least 2 values are needed for a spread). The **seeds' spread** of a comparison is the larger of
the two cells' standard deviations. The rule (one rule for every claim):

* a difference whose size is at most the seeds' spread is **within noise**;
* a larger difference in the claimed direction is **reproduced**;
* a larger difference against it is **not reproduced**;
* a cell with fewer than 2 finished seeds gives **no data** (partial results; rerun or wait).

Claim kinds (YAML ``claims:`` entries; ``metric`` is a run metric, see ``results.run_metrics``)::

    {kind: compare, a: H-LoRA, b: LoRA, metric: comp_avg, better: higher}
        a is better than b.
    {kind: near, a: H-LoRA, metric: time_ratio, target: 1.0, tolerance: 0.10}
    {kind: near, a: H-LoRA, b: LoRA, metric: step_time_s, tolerance: 0.10}
        a's mean lies within tolerance x |target| of target (or of b's mean). Outside it, but by no
        more than the spread: within noise; further out: not reproduced.
    {kind: trend, cells: [MoELoRA/k=2, MoELoRA/k=4, ...], metric: time_ratio, direction: increasing,
     mode: consecutive | ends}
        ``consecutive`` (default): every neighbouring pair moves in ``direction`` beyond noise ->
        reproduced; any pair moving against it beyond noise -> not reproduced; else within noise.
        ``ends``: the first and the last cell only.

Every claim also has ``id``, ``text`` (the paper's statement) and optionally ``paper`` (the
paper's numbers behind it, as text).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "NO_DATA",
    "NOT_REPRODUCED",
    "REPRODUCED",
    "WITHIN_NOISE",
    "ClaimResult",
    "Summary",
    "check_claim_spec",
    "compare",
    "evaluate_claim",
    "mean_std",
]

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
WITHIN_NOISE = "within noise"
NO_DATA = "no data"


@dataclass(frozen=True)
class Summary:
    """Mean ± sample std over the seeds (``std`` is None below 2 values)."""

    mean: float | None
    std: float | None
    n: int
    values: tuple[float, ...] = ()

    def format(self, digits: int = 2, suffix: str = "") -> str:
        if self.mean is None:
            return "–"
        if self.std is None:
            return f"{self.mean:.{digits}f}{suffix} (n={self.n})"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}{suffix}"

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": list(self.values)}


def mean_std(values: Iterable[float | None]) -> Summary:
    """Mean and sample standard deviation (ddof = 1) of the finite values."""
    vals = tuple(float(v) for v in values if v is not None and math.isfinite(float(v)))
    if not vals:
        return Summary(None, None, 0)
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return Summary(mean, None, len(vals), vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return Summary(mean, math.sqrt(var), len(vals), vals)


def _spread(*summaries: Summary) -> float:
    return max(s.std for s in summaries if s.std is not None)


def _ready(*summaries: Summary) -> bool:
    return all(s.mean is not None and s.std is not None for s in summaries)


def compare(a: Summary, b: Summary, better: str = "higher") -> str:
    """The verdict on "a is better than b" (see the module docstring)."""
    if not _ready(a, b):
        return NO_DATA
    assert a.mean is not None and b.mean is not None
    diff = a.mean - b.mean
    if abs(diff) <= _spread(a, b):
        return WITHIN_NOISE
    return REPRODUCED if (diff > 0) == (better == "higher") else NOT_REPRODUCED


def _near(a: Summary, target: float, tolerance: float, spread: float) -> str:
    assert a.mean is not None
    dev = abs(a.mean - target)
    allowed = tolerance * abs(target)
    if dev <= allowed:
        return REPRODUCED
    if dev - spread <= allowed:
        return WITHIN_NOISE
    return NOT_REPRODUCED


@dataclass
class ClaimResult:
    id: str
    text: str
    verdict: str
    ours: str
    paper: str
    metric: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


_KINDS = {"compare": ("a", "b", "metric"), "near": ("a", "metric"), "trend": ("cells", "metric")}


def check_claim_spec(claim: Any, cells: Iterable[str]) -> str | None:
    """What is wrong with a claim entry (None when it is usable)."""
    keys = set(cells)
    if not isinstance(claim, dict):
        return f"a claim is a mapping, got {claim!r}"
    kind = claim.get("kind")
    if kind not in _KINDS:
        return f"kind must be one of {sorted(_KINDS)}, got {kind!r}"
    for k in ("id", "text", *_KINDS[kind]):
        if k not in claim:
            return f"{kind} claim needs {k!r}"
    named = [claim[k] for k in ("a", "b") if k in claim] + list(claim.get("cells") or [])
    unknown = [c for c in named if c not in keys]
    if unknown:
        return f"unknown cell(s) {unknown} (cells: {sorted(keys)})"
    if kind == "near" and "b" not in claim and "target" not in claim:
        return "near claim needs b (a cell) or target (a number)"
    if kind == "trend" and len(claim["cells"]) < 2:
        return "trend claim needs at least 2 cells"
    if claim.get("better", "higher") not in ("higher", "lower"):
        return "better must be higher or lower"
    if claim.get("direction", "increasing") not in ("increasing", "decreasing"):
        return "direction must be increasing or decreasing"
    if claim.get("mode", "consecutive") not in ("consecutive", "ends"):
        return "mode must be consecutive or ends"
    return None


def evaluate_claim(claim: Mapping[str, Any], stats: Mapping[str, Mapping[str, Summary]]) -> ClaimResult:
    """Verdict of one claim from per-cell summaries ``stats[cell][metric]``."""
    metric = str(claim["metric"])
    digits = int(claim.get("digits", 2))

    def get(cell: str) -> Summary:
        return stats.get(cell, {}).get(metric, Summary(None, None, 0))

    kind = claim["kind"]
    if kind == "compare":
        a, b = get(claim["a"]), get(claim["b"])
        verdict = compare(a, b, claim.get("better", "higher"))
        ours = f"{claim['a']} {a.format(digits)} vs {claim['b']} {b.format(digits)}"
    elif kind == "near":
        a = get(claim["a"])
        tol = float(claim.get("tolerance", 0.10))
        if "b" in claim:
            b = get(claim["b"])
            ready = _ready(a, b)
            target, spread = (b.mean, _spread(a, b)) if ready else (None, 0.0)
            ours = f"{claim['a']} {a.format(digits)} vs {claim['b']} {b.format(digits)} (±{tol:.0%})"
        else:
            ready = _ready(a)
            target, spread = float(claim["target"]), (a.std or 0.0)
            ours = f"{claim['a']} {a.format(digits)} vs {target:g} (±{tol:.0%})"
        verdict = _near(a, float(target), tol, spread) if ready and target is not None else NO_DATA
    else:
        cells = list(claim["cells"])
        if claim.get("mode", "consecutive") == "ends":
            cells = [cells[0], cells[-1]]
        better = "higher" if claim.get("direction", "increasing") == "increasing" else "lower"
        steps = [compare(get(hi), get(lo), better) for lo, hi in zip(cells, cells[1:], strict=False)]
        if NO_DATA in steps:
            verdict = NO_DATA
        elif NOT_REPRODUCED in steps:
            verdict = NOT_REPRODUCED
        elif all(s == REPRODUCED for s in steps):
            verdict = REPRODUCED
        else:
            verdict = WITHIN_NOISE
        ours = " → ".join(get(c).format(digits) for c in claim["cells"])
    return ClaimResult(id=str(claim["id"]), text=str(claim["text"]), verdict=verdict, ours=ours,
                       paper=str(claim.get("paper", "")), metric=metric)
