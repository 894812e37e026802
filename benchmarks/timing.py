"""Time-bounded repetition, latency percentiles and peak resident memory."""
from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .settings import Budget

PERCENTILES = (50, 95, 99)
P99_MIN_SAMPLES = 1000  # below this the 99th percentile is (near) the maximum: not reported
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def percentiles(latencies_ms: list[float] | np.ndarray) -> dict[str, float | int | None]:
    """p50/p95/p99/mean/min of latencies in ms (linear interpolation, numpy's default) and the
    sample count. p99 is None (JSON null, "–" in tables) unless P99_MIN_SAMPLES back it: from
    fewer samples it is a maximum, not a tail estimate."""
    values = np.asarray(latencies_ms, dtype=np.float64)
    if values.size == 0:
        return ({f"p{p}": float("nan") for p in PERCENTILES} | {"mean": float("nan"), "min": float("nan"),
                                                                  "samples": 0})
    out: dict[str, float | int | None] = {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}
    if values.size < P99_MIN_SAMPLES:
        out["p99"] = None
    out["mean"] = float(values.mean())
    out["min"] = float(values.min())
    out["samples"] = int(values.size)
    return out


@dataclass
class Timing:
    """Latencies of repeated calls that each process `items` items."""

    latencies_ms: list[float]
    items: int
    wall_s: float
    warmup_reps: int

    @property
    def reps(self) -> int:
        return len(self.latencies_ms)

    @property
    def throughput(self) -> float:
        """Items per second over the measured window (calls run back to back)."""
        return self.items * self.reps / self.wall_s if self.wall_s > 0 else float("nan")

    def summary(self) -> dict:
        return {"latency_ms": percentiles(self.latencies_ms), "throughput_items_s": self.throughput,
                "reps": self.reps, "warmup_reps": self.warmup_reps, "measured_s": self.wall_s}


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Long-lived objects (loaded models, sessions) moved out of the cyclic collector's reach
    for the block (`gc.freeze`), so the full `gc.collect()` before each timed arm walks only
    what was made since: with PyTorch and transformers loaded one collection took 225 ms, 52 s
    of the 78 s quick offline section (cProfile, this repository's default export). Cyclic
    garbage among the frozen objects is collected when the block ends."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.collect()


def enough_samples(reps: int, elapsed_s: float, budget: Budget) -> bool:
    """The stopping rule of a timed case (see Budget): `min_reps` samples over at least
    `measure_s`, or `max_s` of measurement once `floor_reps` samples are in, or `max_reps`."""
    return (reps >= budget.max_reps or (reps >= budget.min_reps and elapsed_s >= budget.measure_s)
            or (reps >= budget.floor_reps and elapsed_s >= budget.max_s))


def time_calls(fn: Callable[[], object], items: int, budget: Budget, warmed_up_s: float = 0.0) -> Timing:
    """Warm up, then call `fn` back to back within the budget (see Budget).

    `warmed_up_s`: time already spent calling `fn` untimed (e.g. the output check), counted
    towards the warm-up so a slow engine is not warmed up twice."""
    clock = time.perf_counter
    start = clock() - warmed_up_s
    warm = 0
    while warm < budget.min_warmup_reps or clock() - start < budget.warmup_s:
        fn()
        warm += 1
    gc.collect()
    latencies: list[float] = []
    begin = clock()
    while True:
        t0 = clock()
        fn()
        latencies.append((clock() - t0) * 1e3)
        if enough_samples(len(latencies), clock() - begin, budget):
            break
    return Timing(latencies, items, clock() - begin, warm)


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else None


class PeakRSS:
    """Peak resident memory of this process over a block, and its rise above the start.

    Linux lets a process reset its own high-water mark (`echo 5 > /proc/self/clear_refs`),
    so each engine's peak is measured without a subprocess per engine. Where that is not
    possible the process-lifetime peak is reported and `reset` is False.
    """

    def __init__(self) -> None:
        self.start_mb: float | None = None
        self.peak_mb: float | None = None
        self.reset = False

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        try:
            _CLEAR_REFS.write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.start_mb = rss_mb()
        return self

    def __exit__(self, *exc) -> None:
        kb = _status_kb("VmHWM")
        self.peak_mb = kb / 1024 if kb is not None else None

    def to_dict(self) -> dict:
        delta = (self.peak_mb - self.start_mb) if self.peak_mb is not None and self.start_mb is not None else None
        return {"peak_rss_mb": self.peak_mb, "rss_before_mb": self.start_mb, "rss_rise_mb": delta,
                "hwm_reset": self.reset}


def interleaved_rounds(arms: dict[str, Callable[[], object]], rounds: int, per_round: int,
                       after_round: Callable[[int], None] = lambda _: None) -> dict[str, list[list[float]]]:
    """Latencies (ms) of every arm, `per_round` calls per arm per round, the arms in alternating
    order (A B C, then C B A, ...) so drift hits every arm alike; one list per round and arm, for
    the per-round intervals of mmrec.stats."""
    samples: dict[str, list[list[float]]] = {name: [] for name in arms}
    order = list(arms.items())
    for r in range(rounds):
        for name, call in (order if r % 2 == 0 else order[::-1]):
            timed = []
            for _ in range(per_round):
                t0 = time.perf_counter()
                call()
                timed.append(1000 * (time.perf_counter() - t0))
            samples[name].append(timed)
        after_round(1)
    return samples
