"""Intervals for every comparison the benchmarks and `mmrec tune` judge: one method, one module.

The method (why it is not a bootstrap over calls): consecutive calls of one arm share the
machine's state of that moment (frequency, cache, a neighbour's burst), so they are correlated,
and two runs of the same code differ by more than calls resampled as if independent suggest.
What repeats independently is the *round*: the arms run one after the other in many short rounds
(alternating order), each round gives one value per arm (the median latency of its calls, or its
throughput), and the comparison is taken **per round** — the ratio or difference of the two arms
in the same round, so drift that hits both arms alike cancels. The interval is a bootstrap over
those per-round values (rounds resampled, never calls). With the 10–20 rounds a benchmark can
afford, a plain percentile bootstrap is too narrow (it behaves like a z-interval with the
population sd), so the percentiles are expanded by the Student-t factor (Hesterberg's expanded
percentile bootstrap): 95 % coverage holds from ~5 rounds on. `tests/test_stats.py` simulates
between-round drift and checks the coverage.

Ratios are averaged on the log scale (the point is the geometric mean of the per-round ratios),
differences on the linear scale; point and interval always describe the same statistic. Every
section also carries an A/A arm (the reference against itself, interleaved the same way): if its
interval excludes "no difference", the section is unstable and its targets are not judged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Iterable, Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 4000
MIN_ROUNDS = 3  # fewer rounds give no interval (the verdict is then "not conclusive")
METHOD = "paired-by-round expanded-percentile bootstrap over rounds"

MET, MISSED, NOT_CONCLUSIVE = "met", "missed", "not conclusive"


@dataclass(frozen=True)
class Interval:
    """A point estimate and its interval over `rounds` paired rounds. `kind` is "ratio"
    (geometric mean of per-round ratios; no difference = 1) or "difference" (mean of per-round
    differences; no difference = 0). low/high are ±inf when there were too few rounds."""

    point: float
    low: float
    high: float
    rounds: int
    kind: str = "ratio"

    @property
    def null(self) -> float:
        return 1.0 if self.kind == "ratio" else 0.0

    @property
    def conclusive(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def to_dict(self, digits: int = 4) -> dict:
        def r(x: float) -> float | None:
            return round(x, digits) if math.isfinite(x) else None
        return {"point": r(self.point), "low": r(self.low), "high": r(self.high), "level": LEVEL,
                "rounds": self.rounds, "kind": self.kind, "method": METHOD}

    @classmethod
    def from_dict(cls, data: dict) -> "Interval":
        def f(x, default: float) -> float:
            return float(x) if x is not None else default
        return cls(f(data["point"], math.nan), f(data.get("low"), -math.inf), f(data.get("high"), math.inf),
                   int(data.get("rounds", 0)), data.get("kind", "ratio"))

    def relation(self, threshold: float) -> str:
        """Where the interval lies relative to a threshold: 'above', 'below' or 'straddles'."""
        if self.low > threshold:
            return "above"
        if self.high < threshold:
            return "below"
        return "straddles"

    def verdict(self, threshold: float, better: str) -> str:
        """met / missed / not conclusive against a threshold; `better` is the side that meets it
        ('above' or 'below'). Never "beyond doubt": a 95 % interval is wrong one time in twenty."""
        if better not in ("above", "below"):
            raise ValueError(f"better must be 'above' or 'below', not {better!r}")
        side = self.relation(threshold)
        if side == "straddles":
            return NOT_CONCLUSIVE
        return MET if side == better else MISSED

    def shows_difference(self) -> bool:
        """For an A/A arm: does the interval exclude "no difference" (then the method, or the
        machine, is not to be trusted for this section)?"""
        return self.relation(self.null) != "straddles"

    def overlaps(self, other: "Interval") -> bool:
        return self.low <= other.high and other.low <= self.high


def _expanded_percentiles(n: int) -> tuple[float, float]:
    """Percentile levels (in %) of the expanded percentile bootstrap for n rounds: the normal
    quantile is replaced by sqrt(n/(n-1)) x Student-t(n-1) quantile (Hesterberg 2015)."""
    from scipy.stats import t as student_t

    z = math.sqrt(n / (n - 1)) * float(student_t.ppf((1 + LEVEL) / 2, n - 1))
    tail = NormalDist().cdf(-z)
    return 100 * tail, 100 * (1 - tail)


def _bootstrap_mean(columns: Sequence[np.ndarray], resamples: int, seed: int) -> tuple[float, float, float, int]:
    """Point, low, high of the mean over columns of each column's mean, every column (a case's
    per-round values) resampled over its own rounds."""
    point = float(np.mean([c.mean() for c in columns]))
    n = min(c.size for c in columns)
    if n < MIN_ROUNDS:
        return point, -math.inf, math.inf, n
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for c in columns:
        total += c[rng.integers(0, c.size, (resamples, c.size))].mean(axis=1)
    total /= len(columns)
    low, high = np.percentile(total, _expanded_percentiles(n))
    return point, float(low), float(high), n


def _per_round(a: Sequence[float], b: Sequence[float], kind: str) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired rounds need one value per round in each arm (got {a.shape} and {b.shape})")
    if kind == "ratio":
        if (a <= 0).any() or (b <= 0).any():
            raise ValueError("a ratio needs positive per-round values")
        return np.log(a / b)
    return a - b


def paired_ratio(a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """a/b from per-round values of two arms (same length, round i of each taken together):
    geometric mean of the per-round ratios and its interval. A speed-up from latencies is
    paired_ratio(reference latencies, candidate latencies); a throughput ratio X/Y is
    paired_ratio(throughput of X, throughput of Y)."""
    point, low, high, n = _bootstrap_mean([_per_round(a, b, "ratio")], resamples, seed)
    return Interval(math.exp(point), math.exp(low), math.exp(high), n, "ratio")


def paired_difference(a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """a - b from per-round values of two arms: mean of the per-round differences and its interval."""
    point, low, high, n = _bootstrap_mean([_per_round(a, b, "difference")], resamples, seed)
    return Interval(point, low, high, n, "difference")


def pooled_ratio(cases: Iterable[tuple[Sequence[float], Sequence[float]]], resamples: int = RESAMPLES,
                 seed: int = 0) -> Interval:
    """Geometric mean over cases of each case's per-round a/b (tuning's score over batch sizes,
    a section's A/A over all its cases): each case's rounds resampled on their own."""
    columns = [_per_round(a, b, "ratio") for a, b in cases]
    if not columns:
        raise ValueError("pooled_ratio needs at least one case")
    point, low, high, n = _bootstrap_mean(columns, resamples, seed)
    return Interval(math.exp(point), math.exp(low), math.exp(high), n, "ratio")


def round_medians(rounds: Sequence[Sequence[float]]) -> list[float]:
    """One value per round: the median of the round's calls (robust to a single slow call)."""
    return [float(np.median(r)) for r in rounds]


def aa_check(interval: Interval | None) -> dict:
    """The A/A verdict a section records: stable unless the interval excludes no-difference."""
    if interval is None:
        return {"stable": None, "why": "no A/A arm in this section"}
    if not interval.conclusive:
        return {"stable": None, "interval": interval.to_dict(),
                "why": f"only {interval.rounds} rounds: too few for an interval"}
    unstable = interval.shows_difference()
    return {"stable": not unstable, "interval": interval.to_dict(),
            "why": (f"A/A interval [{interval.low:.3f}, {interval.high:.3f}] excludes {interval.null:g}: the same "
                    "code measured against itself differs, so this section's comparisons are not judged")
            if unstable else "A/A interval contains no-difference"}
