"""Bootstrap 95 % intervals for the statistics the benchmarks and `mmrec tune` compare.

One module for every interval the project reports (tuning scores, benchmark speed-ups,
serving differences and ratios, photo latency ratios), so they are all computed the same way:
both arms resampled independently with replacement, the statistic recomputed per resample, the
2.5th and 97.5th percentiles of those values as the interval. Resamples are drawn in chunks so
arms of 10,000 latencies stay within a few MB of memory. Seeds are fixed: the same samples give
the same interval.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
_CHUNK_ELEMENTS = 4_000_000  # resampled values held at once per arm (~32 MB of float64)

Statistic = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (resamples x n_a, resamples x n_b) -> resamples


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval; `n` is the sample count of each arm."""

    point: float
    low: float
    high: float
    n: tuple[int, ...] = ()

    def to_dict(self, digits: int = 4) -> dict:
        return {"point": round(self.point, digits), "low": round(self.low, digits),
                "high": round(self.high, digits), "level": LEVEL, "samples": list(self.n)}

    def relation(self, threshold: float) -> str:
        """Where the interval lies relative to a threshold: 'above', 'below' or 'straddles'."""
        if self.low > threshold:
            return "above"
        if self.high < threshold:
            return "below"
        return "straddles"


def _median(x: np.ndarray) -> np.ndarray:
    return np.median(x, axis=-1)


def _mean(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=-1)


def bootstrap(a: Sequence[float], b: Sequence[float], statistic: Statistic,
              resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Interval of statistic(a, b), both arms resampled independently."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("bootstrap needs samples in both arms")
    point = float(statistic(a[None], b[None])[0])
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, _CHUNK_ELEMENTS // max(a.size, b.size)))
    values = []
    done = 0
    while done < resamples:
        k = min(chunk, resamples - done)
        values.append(statistic(a[rng.integers(0, a.size, (k, a.size))], b[rng.integers(0, b.size, (k, b.size))]))
        done += k
    low, high = np.percentile(np.concatenate(values), [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    return Interval(point, float(low), float(high), (int(a.size), int(b.size)))


def ratio_of_medians(a: Sequence[float], b: Sequence[float], seed: int = 0) -> Interval:
    """median(a) / median(b): a speed-up from latencies is ratio_of_medians(reference, candidate)."""
    return bootstrap(a, b, lambda x, y: _median(x) / _median(y), seed=seed)


def difference_of_medians(a: Sequence[float], b: Sequence[float], seed: int = 0) -> Interval:
    """median(a) - median(b), e.g. Triton p50 - in-process p50 in ms."""
    return bootstrap(a, b, lambda x, y: _median(x) - _median(y), seed=seed)


def ratio_of_means(a: Sequence[float], b: Sequence[float], seed: int = 0) -> Interval:
    """mean(a) / mean(b). In a closed loop at concurrency c, throughput = c / mean latency, so a
    throughput ratio X/Y is ratio_of_means(latencies of Y, latencies of X)."""
    return bootstrap(a, b, lambda x, y: _mean(x) / _mean(y), seed=seed)


def score_interval(candidate: list[list[float]], reference: list[list[float]],
                   samples: int = RESAMPLES) -> tuple[float, float, float]:
    """Geometric mean over cases of median(candidate)/median(reference), with a bootstrap 95 %
    interval (rounds resampled with replacement, per case and arm)."""
    rng = np.random.default_rng(1)
    point = float(np.exp(np.mean([np.log(np.median(c) / np.median(r)) for c, r in zip(candidate, reference)])))
    logs = np.zeros(samples)
    for c, r in zip(candidate, reference):
        c, r = np.asarray(c), np.asarray(r)
        c_med = np.median(c[rng.integers(0, len(c), (samples, len(c)))], axis=1)
        r_med = np.median(r[rng.integers(0, len(r), (samples, len(r)))], axis=1)
        logs += np.log(c_med / r_med)
    low, high = np.exp(np.percentile(logs / len(candidate), [2.5, 97.5]))
    return point, float(low), float(high)
