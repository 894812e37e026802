"""The HPA's per-pod signals, computed from one replica's Triton counters as the adapter does.

deploy/prometheus-adapter/values.yaml turns Triton's Prometheus counters into the custom metrics
the chart's HPA reads; `SIGNALS` computes the same quantities from two scrapes of one replica's
/metrics (a window's counter deltas are what `rate(...[1m])` estimates), so the calibration tool
(`python -m mmrec.benchmarks.hpa_calibration`) reports each podsMetrics entry in the unit its
target is written in. Keep each function in step with its rule; the rule is what the HPA reads.

Why the busy fraction needs a correction: Triton charges `nv_inference_compute_infer_duration_us`
per *request*, so a batch of n requests that computed for t adds n·t (checked on tritonserver
2.51: 8 closed-loop clients on one python-model instance read 5.8 s of compute per second).
`nv_inference_exec_count` counts executions (batches) and `nv_inference_request_success`
requests, so compute · executions / requests is the request-weighted mean batch time times the
batches per second. That equals the time the model spent executing when batch times do not vary;
where a larger batch takes longer (CPU), it over-reads by the spread of batch sizes (1 + the
squared coefficient of variation of the per-request batch time): an early, never a late, scale-out.
`exact_busy` reads the true value from the statistics API (per-batch compute) to measure that.
"""
from __future__ import annotations

import math
import re
import time
import urllib.request
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

US_PER_S = 1e6
REJECTED = "REJECTED"  # nv_inference_request_failure's reason for requests an admission policy shed
# The counter families the adapter rules read (the live-server test proves Triton 2.51 exports them).
FAMILIES = ("nv_inference_count", "nv_inference_exec_count", "nv_inference_request_success",
            "nv_inference_request_failure", "nv_inference_queue_duration_us",
            "nv_inference_compute_infer_duration_us")
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Key = tuple[str, str, str]  # (family, model, reason or "")


class MetricsError(RuntimeError):
    """The replica's /metrics cannot be read or lacks what a signal needs."""


@dataclass(frozen=True)
class Snapshot:
    """Cumulative counters of one replica at one moment (monotonic seconds)."""

    at: float
    values: Mapping[Key, float]

    def models(self) -> set[str]:
        """Every model the server exports inference counters for (its loaded models)."""
        return {model for family, model, _ in self.values if family == "nv_inference_count"}

    def get(self, family: str, model: str, reason: str = "") -> float:
        return self.values.get((family, model, reason), 0.0)


def parse_metrics(text: str, families: Sequence[str] = FAMILIES) -> dict[Key, float]:
    """(family, model, reason) -> value for Triton's per-model counters in Prometheus text format,
    summed over the other labels (versions)."""
    wanted = set(families)
    out: dict[Key, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m or m.group("name") not in wanted:
            continue
        labels = dict(_LABEL.findall(m.group("labels") or ""))
        if "model" not in labels:
            continue
        key = (m.group("name"), labels["model"], labels.get("reason", ""))
        out[key] = out.get(key, 0.0) + float(m.group("value"))
    return out


def scrape(metrics_url: str, timeout_s: float = 10.0) -> Snapshot:
    """One read of a replica's /metrics (no proxy: the replica is addressed directly)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(metrics_url, timeout=timeout_s) as response:
            text = response.read().decode()
    except OSError as err:
        raise MetricsError(f"cannot read {metrics_url}: {err} (pass the replica's metrics port, "
                           f"e.g. --metrics-url http://HOST:8002/metrics)") from err
    at = time.monotonic()
    values = parse_metrics(text)
    if not values:
        raise MetricsError(f"{metrics_url} has no nv_inference_* counters: is it Triton's metrics endpoint?")
    return Snapshot(at, values)


def _delta(before: Snapshot, after: Snapshot, family: str, models: Sequence[str], reason: str = "") -> float:
    return sum(after.get(family, m, reason) - before.get(family, m, reason) for m in models)


def _seconds(before: Snapshot, after: Snapshot) -> float:
    seconds = after.at - before.at
    if seconds <= 0:
        raise ValueError("the second snapshot must be taken after the first")
    return seconds


def model_busy(before: Snapshot, after: Snapshot, model: str) -> float:
    """Seconds per second one model spent executing batches: its per-request compute time
    corrected by executions / requests (see the module docstring)."""
    requests = _delta(before, after, "nv_inference_request_success", [model])
    if requests <= 0:
        return 0.0
    compute_s = _delta(before, after, "nv_inference_compute_infer_duration_us", [model]) / US_PER_S
    executions = _delta(before, after, "nv_inference_exec_count", [model])
    return compute_s * executions / requests / _seconds(before, after)


def charged_ms_per_request(before: Snapshot, after: Snapshot, model: str) -> float | None:
    """Compute time Triton charged each request of the window (its whole batch's time), in ms:
    the unit the queue:compute ratio divides queue time by. None without requests."""
    requests = _delta(before, after, "nv_inference_request_success", [model])
    if requests <= 0:
        return None
    return _delta(before, after, "nv_inference_compute_infer_duration_us", [model]) / requests / 1e3


Signal = Callable[[Snapshot, Snapshot, Sequence[str]], float]
SIGNALS: dict[str, Signal] = {}


def signal(name: str) -> Callable[[Signal], Signal]:
    """Register the Python twin of the adapter rule whose metric is `name`."""
    def register(fn: Signal) -> Signal:
        if name in SIGNALS:
            raise ValueError(f"signal {name!r} registered twice")
        SIGNALS[name] = fn
        return fn
    return register


@signal("triton_items_per_second")
def items_per_second(before: Snapshot, after: Snapshot, models: Sequence[str]) -> float:
    """sum(rate(nv_inference_count)): items, not requests (a request carries 1..maxBatchSize)."""
    return _delta(before, after, "nv_inference_count", models) / _seconds(before, after)


@signal("triton_busy_fraction")
def busy_fraction(before: Snapshot, after: Snapshot, models: Sequence[str]) -> float:
    """max over the models of `model_busy`: how busy the busiest one is (instances it keeps busy)."""
    return max((model_busy(before, after, m) for m in models), default=0.0)


@signal("triton_queue_compute_ratio")
def queue_compute_ratio(before: Snapshot, after: Snapshot, models: Sequence[str]) -> float:
    """sum(rate(queue_us)) / clamp_min(sum(rate(compute_infer_us)), 1): both per request."""
    seconds = _seconds(before, after)
    queue = _delta(before, after, "nv_inference_queue_duration_us", models) / seconds
    compute = _delta(before, after, "nv_inference_compute_infer_duration_us", models) / seconds
    return queue / max(compute, 1.0)


@signal("triton_shed_per_second")
def shed_per_second(before: Snapshot, after: Snapshot, models: Sequence[str]) -> float:
    """sum(rate(nv_inference_request_failure{reason="REJECTED"})): what an admission policy shed."""
    return _delta(before, after, "nv_inference_request_failure", models, REJECTED) / _seconds(before, after)


def evaluate(name: str, before: Snapshot, after: Snapshot, models: Sequence[str]) -> float:
    try:
        fn = SIGNALS[name]
    except KeyError:
        raise KeyError(f"no Python twin for adapter metric {name!r}; known: {sorted(SIGNALS)}") from None
    value = fn(before, after, models)
    if not math.isfinite(value):
        raise MetricsError(f"{name} over {list(models)} is not finite ({value})")
    return value


def exact_busy(before: Mapping[str, dict], after: Mapping[str, dict], model: str, seconds: float) -> float | None:
    """The model's executing time per second from the statistics API (benchmarks/triton_stats
    snapshots), where each batch's compute is counted once: the truth `model_busy` estimates.
    None when the model has no statistics in either snapshot."""
    if model not in after:
        return None

    def batch_ns(stats: Mapping) -> int:
        return sum(int((b.get("compute_infer") or {}).get("ns", 0)) for b in stats.get("batch_stats", []))

    return (batch_ns(after[model]) - batch_ns(before.get(model, {}))) / 1e9 / seconds
