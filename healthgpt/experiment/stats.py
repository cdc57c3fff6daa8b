"""Seeds' statistics, the stated tests and the verdict rule of every claim.

A cell's metric over its seeds is reported as ``mean ± std`` (sample standard deviation, ddof = 1).
Every verdict comes from a stated test at level ``ALPHA`` = 0.05 and goes through three gates, in
this order:

1. **seeds**: every cell of the claim needs at least ``MIN_SEEDS`` = 3 finished seeds, else
   **no data** (partial results; rerun or wait);
2. **learning**: when the claim's metric has baselines (a score: the majority / random-choice
   answers of comprehension, the identity / train-mean / blank images of generation, all in each
   run's own ``eval/report.json``; a training loss: its own start), every run of every cell of the
   claim must beat them (``margin:<metric>`` > 0, see :mod:`healthgpt.experiment.learned`), else
   **no evidence: the runs did not learn**; time metrics have no baseline and no such gate;
3. **the test** of the claim's kind:

``{kind: compare, a: H-LoRA, b: LoRA, metric: comp_avg, better: higher}``
    a is better than b. Welch's two-sample t-test (unequal variances), two-sided: p < α with the
    difference in the claimed direction -> **reproduced**; p < α against it -> **not reproduced**;
    p >= α -> **not significant**.
``{kind: near, a: H-LoRA, metric: time_ratio, target: 1.0, tolerance: 0.10}`` (or ``b: LoRA``)
    a's mean lies within tolerance x |target| of target (or of b's mean). Equivalence by two
    one-sided t-tests (TOST; one-sample t, or Welch's t for a - b), each at α: both reject ->
    **reproduced**; the mean outside the band and the two-sided t-test against the nearer edge
    rejecting -> **not reproduced**; else **not significant**.
``{kind: bound, a: H-LoRA, metric: time_ratio, target: 0.67, better: lower}``
    a's mean lies below (``better: lower``) or above target: one-sample t-test against target,
    two-sided, with the same three outcomes as ``compare``.
``{kind: trend, cells: [MoELoRA/k=2, MoELoRA/k=4, ...], metric: time_ratio, direction: increasing,
mode: consecutive | ends}``
    ``consecutive`` (default): Welch's test on every neighbouring pair; all reproduced ->
    reproduced; any not reproduced -> not reproduced; else not significant. ``ends``: the first and
    the last cell only.
``{kind: equal, a: MoELoRA, b: H-LoRA, metric: comp_avg, tolerance: 0.01}``
    a correctness check, not a statistical test: the runs of a and b of the same seed agree to
    within ``tolerance`` (absolute) at every common seed -> **reproduced**, else **not reproduced**.

Every claim also has ``id``, ``text`` (the paper's statement) and optionally ``paper`` (the
paper's numbers behind it, as text) and ``digits``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ALPHA",
    "MARGIN",
    "MIN_SEEDS",
    "NO_DATA",
    "NO_EVIDENCE",
    "NOT_REPRODUCED",
    "REPRODUCED",
    "WITHIN_NOISE",
    "ClaimResult",
    "Summary",
    "TTest",
    "check_claim_spec",
    "compare",
    "evaluate_claim",
    "mean_std",
    "one_sample_t",
    "welch_t",
]

ALPHA = 0.05
MIN_SEEDS = 3
MARGIN = "margin:"  # per-run metric: the run's score minus its best baseline's (> 0: the run beat its baselines)

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
WITHIN_NOISE = "not significant"  # the test found no difference at ALPHA (the name is kept for importers)
NO_DATA = "no data"
NO_EVIDENCE = "no evidence: the runs did not learn"
TEST_LEVEL = f"two-sided, α = {ALPHA:g}"


@dataclass(frozen=True)
class Summary:
    """Mean ± sample std over the seeds (``std`` is None below 2 values); ``seeds`` in the order of
    ``values`` when known."""

    mean: float | None
    std: float | None
    n: int
    values: tuple[float, ...] = ()
    seeds: tuple[int, ...] = ()

    def format(self, digits: int = 2, suffix: str = "") -> str:
        if self.mean is None:
            return "–"
        if self.std is None:
            return f"{self.mean:.{digits}f}{suffix} (n={self.n})"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}{suffix}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mean": self.mean, "std": self.std, "n": self.n, "values": list(self.values)}
        if self.seeds:
            out["seeds"] = list(self.seeds)
        return out


_EMPTY = Summary(None, None, 0)


def mean_std(values: Iterable[float | None], seeds: Iterable[int] | None = None) -> Summary:
    """Mean and sample standard deviation (ddof = 1) of the finite values (``seeds`` pairs with ``values``)."""
    pairs = list(zip(values, seeds, strict=True)) if seeds is not None else [(v, None) for v in values]
    kept = [(float(v), s) for v, s in pairs if v is not None and math.isfinite(float(v))]
    vals = tuple(v for v, _ in kept)
    tags = tuple(int(s) for _, s in kept if s is not None) if seeds is not None else ()
    if not vals:
        return _EMPTY
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return Summary(mean, None, len(vals), vals, tags)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return Summary(mean, math.sqrt(var), len(vals), vals, tags)


# ------------------------------------------------------------------------------------------ t-tests


@dataclass(frozen=True)
class TTest:
    """A t statistic: ``estimate`` (a difference of means, or a mean minus its reference), its standard
    error, the degrees of freedom, the statistic and its two-sided p-value."""

    estimate: float
    se: float
    df: float
    t: float
    p: float

    def p_beyond(self, bound: float, above: bool) -> float:
        """One-sided p-value of "the estimate lies above (below) ``bound``"."""
        from scipy.stats import t as student

        if self.se == 0:
            return 0.0 if (self.estimate > bound if above else self.estimate < bound) else 1.0
        stat = (self.estimate - bound) / self.se
        return float(student.sf(stat, self.df) if above else student.cdf(stat, self.df))


def _ttest(estimate: float, se: float, df: float) -> TTest:
    from scipy.stats import t as student

    if se == 0:
        t = 0.0 if estimate == 0 else math.copysign(math.inf, estimate)
        return TTest(estimate, se, df, t, 1.0 if estimate == 0 else 0.0)
    t = estimate / se
    return TTest(estimate, se, df, t, float(2 * student.sf(abs(t), df)))


def welch_t(a: Sequence[float], b: Sequence[float]) -> TTest:
    """Welch's t-test of mean(a) - mean(b): t = d / sqrt(s_a²/n_a + s_b²/n_b), Welch-Satterthwaite df,
    two-sided p from Student's t (both samples need >= 2 values)."""
    sa, sb = mean_std(a), mean_std(b)
    if sa.std is None or sb.std is None or sa.mean is None or sb.mean is None:
        raise ValueError("Welch's t-test needs at least 2 values per sample")
    va, vb = sa.std ** 2 / sa.n, sb.std ** 2 / sb.n
    se = math.sqrt(va + vb)
    denom = (va ** 2 / (sa.n - 1) if va else 0.0) + (vb ** 2 / (sb.n - 1) if vb else 0.0)
    df = (va + vb) ** 2 / denom if denom else float(sa.n + sb.n - 2)
    return _ttest(sa.mean - sb.mean, se, df)


def one_sample_t(a: Sequence[float], target: float) -> TTest:
    """One-sample t-test of mean(a) - target (df = n - 1, two-sided p)."""
    s = mean_std(a)
    if s.std is None or s.mean is None:
        raise ValueError("a one-sample t-test needs at least 2 values")
    return _ttest(s.mean - target, s.std / math.sqrt(s.n), float(s.n - 1))


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _welch_text(t: TTest) -> str:
    return f"Welch t = {t.t:.2f}, df = {t.df:.1f}, {_p(t.p)}"


def _directional(t: TTest, higher: bool) -> str:
    """The verdict of a two-sided test on "the estimate is above (higher) / below zero"."""
    if t.p >= ALPHA:
        return WITHIN_NOISE
    return REPRODUCED if (t.estimate > 0) == higher else NOT_REPRODUCED


def compare(a: Summary, b: Summary, better: str = "higher") -> str:
    """The verdict of Welch's test on "a is better than b" (seeds gate only; see :func:`evaluate_claim`)."""
    return _compare(a, b, better)[0]


def _compare(a: Summary, b: Summary, better: str) -> tuple[str, str]:
    if not _enough(a, b):
        return NO_DATA, "–"
    t = welch_t(a.values, b.values)
    return _directional(t, better == "higher"), _welch_text(t)


def _enough(*summaries: Summary) -> bool:
    return all(s.mean is not None and s.n >= MIN_SEEDS for s in summaries)


# ------------------------------------------------------------------------------------------ claims


@dataclass
class ClaimResult:
    id: str
    text: str
    verdict: str
    ours: str
    paper: str
    metric: str
    test: str = "–"  # the test, its statistic and p-value (or the check and its numbers)
    learned: str = "–"  # how many runs beat their baselines on the metric

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


_KINDS = {"compare": ("a", "b", "metric"), "near": ("a", "metric"), "trend": ("cells", "metric"),
          "bound": ("a", "metric", "target"), "equal": ("a", "b", "metric")}


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


Getter = Callable[[str], Summary]


def _near(claim: Mapping[str, Any], get: Getter, digits: int) -> tuple[str, str, str]:
    a, tol = get(claim["a"]), float(claim.get("tolerance", 0.10))
    if "b" in claim:
        b = get(claim["b"])
        ours = f"{claim['a']} {a.format(digits)} vs {claim['b']} {b.format(digits)} (±{tol:.0%})"
        if not _enough(a, b):
            return NO_DATA, ours, "–"
        t, half, name = welch_t(a.values, b.values), tol * abs(float(b.mean or 0.0)), "TOST (Welch)"
    else:
        target = float(claim["target"])
        ours = f"{claim['a']} {a.format(digits)} vs {target:g} (±{tol:.0%})"
        if not _enough(a):
            return NO_DATA, ours, "–"
        t, half, name = one_sample_t(a.values, target), tol * abs(target), "TOST (one-sample t)"
    p_equiv = max(t.p_beyond(-half, above=True), t.p_beyond(half, above=False))
    text = f"{name} within ±{half:.{digits}g}: {_p(p_equiv)}"
    if p_equiv < ALPHA:
        return REPRODUCED, ours, text
    edge = half if t.estimate > 0 else -half
    p_out = 2 * t.p_beyond(edge, above=t.estimate > 0)
    if abs(t.estimate) > half and p_out < ALPHA:
        return NOT_REPRODUCED, ours, f"{text}; outside: {_p(min(p_out, 1.0))}"
    return WITHIN_NOISE, ours, text


def _bound(claim: Mapping[str, Any], get: Getter, digits: int) -> tuple[str, str, str]:
    a, target = get(claim["a"]), float(claim["target"])
    side = "<" if claim.get("better", "lower") == "lower" else ">"
    ours = f"{claim['a']} {a.format(digits)} vs {side} {target:g}"
    if not _enough(a):
        return NO_DATA, ours, "–"
    t = one_sample_t(a.values, target)
    text = f"one-sample t vs {target:g} = {t.t:.2f}, df = {t.df:.0f}, {_p(t.p)}"
    return _directional(t, side == ">"), ours, text


def _trend(claim: Mapping[str, Any], get: Getter, digits: int) -> tuple[str, str, str]:
    cells = list(claim["cells"])
    if claim.get("mode", "consecutive") == "ends":
        cells = [cells[0], cells[-1]]
    better = "higher" if claim.get("direction", "increasing") == "increasing" else "lower"
    steps = [_compare(get(hi), get(lo), better) for lo, hi in zip(cells, cells[1:], strict=False)]
    verdicts = [v for v, _ in steps]
    if NO_DATA in verdicts:
        verdict = NO_DATA
    elif NOT_REPRODUCED in verdicts:
        verdict = NOT_REPRODUCED
    elif all(v == REPRODUCED for v in verdicts):
        verdict = REPRODUCED
    else:
        verdict = WITHIN_NOISE
    ours = " → ".join(get(c).format(digits) for c in claim["cells"])
    return verdict, ours, "; ".join(text for _, text in steps)


def _equal(claim: Mapping[str, Any], get: Getter, digits: int) -> tuple[str, str, str]:
    a, b, tol = get(claim["a"]), get(claim["b"]), float(claim.get("tolerance", 0.01))
    ours = f"{claim['a']} {a.format(digits)} vs {claim['b']} {b.format(digits)}"
    by_seed_b = dict(zip(b.seeds, b.values, strict=True))
    diffs = [abs(v - by_seed_b[s]) for s, v in zip(a.seeds, a.values, strict=True) if s in by_seed_b]
    if len(diffs) < MIN_SEEDS:
        return NO_DATA, ours, "–"
    text = f"largest |{claim['a']} - {claim['b']}| of one seed: {max(diffs):.{digits + 2}f} (tolerance {tol:g})"
    return (REPRODUCED if max(diffs) <= tol else NOT_REPRODUCED), ours, text


_EVALUATORS = {"compare": None, "near": _near, "bound": _bound, "trend": _trend, "equal": _equal}


def _learned(cells: Sequence[str], stats: Mapping[str, Mapping[str, Summary]], metric: str) -> tuple[bool, str]:
    """Did every run of ``cells`` beat its baselines on ``metric``? (True, "n/a ...") without baselines."""
    margins = [stats.get(c, {}).get(MARGIN + metric) for c in cells]
    if all(m is None for m in margins):
        return True, "n/a (no baseline)"
    runs = [stats.get(c, {}).get(metric, _EMPTY).n for c in cells]
    beat = sum(sum(v > 0 for v in m.values) for m in margins if m is not None)
    total = sum(runs)
    return beat == total and total > 0, f"{beat} of {total} runs beat their baselines"


def evaluate_claim(claim: Mapping[str, Any], stats: Mapping[str, Mapping[str, Summary]]) -> ClaimResult:
    """Verdict of one claim from per-cell summaries ``stats[cell][metric]`` (see the module docstring)."""
    metric = str(claim["metric"])
    digits = int(claim.get("digits", 2))

    def get(cell: str) -> Summary:
        return stats.get(cell, {}).get(metric, _EMPTY)

    kind = claim["kind"]
    if kind == "compare":
        a, b = get(claim["a"]), get(claim["b"])
        verdict, test = _compare(a, b, claim.get("better", "higher"))
        ours = f"{claim['a']} {a.format(digits)} vs {claim['b']} {b.format(digits)}"
    else:
        verdict, ours, test = _EVALUATORS[kind](claim, get, digits)  # type: ignore[misc]
    cells = list(claim.get("cells") or [claim[k] for k in ("a", "b") if k in claim])
    learned, learned_text = _learned(cells, stats, metric)
    if verdict != NO_DATA and not learned:
        verdict = NO_EVIDENCE
    if verdict != NO_DATA and test != "–" and kind not in ("equal", "near"):
        test += f" ({TEST_LEVEL})"
    elif kind == "near" and test != "–":
        test += f" (α = {ALPHA:g} each side)"
    return ClaimResult(id=str(claim["id"]), text=str(claim["text"]), verdict=verdict, ours=ours,
                       paper=str(claim.get("paper", "")), metric=metric, test=test, learned=learned_text)
