"""Open-loop load on the real tritonserver through MLPerf LoadGen (benchmarks/open_loop.py).

Short trials only (the capacity numbers come from `python -m mmrec.benchmarks.open_loop`):
every sample of a low-rate Server-scenario trial is answered with sane percentiles read from
LoadGen's log; a rate far above capacity fails a p99 SLO and the capacity search settles below
it within a small time budget; a failed request completes its sample as a counted error.
"""
from __future__ import annotations

import time

import pytest

from hard_dependencies import require

require("mlperf_loadgen")

from mmrec.benchmarks import open_loop  # noqa: E402
from mmrec.server import free_ports  # noqa: E402

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def payloads(sample_items):
    """Real captioned images (held-out Tux Paint stamps), one item per request."""
    return [open_loop.Payload(caption, image, category) for caption, image, category in sample_items[:12]]


@pytest.fixture(scope="module")
def target(triton_server, payloads):
    with open_loop.Target(triton_server.urls["grpc"], payloads) as prepared:
        prepared.warm_up(1)
        yield prepared


@pytest.mark.timeout(60)
def test_low_rate_every_sample_answered_with_sane_percentiles(target):
    result = open_loop.run_rate(target, None, qps=15, duration_s=3, slo_ms=2000, seed=1)
    lg = result["loadgen"]
    assert result["samples"] >= 20, result
    assert result["answered"] == result["ok"] == result["samples"], result
    assert result["errors"] == 0, result["first_error"]
    ms = result["latency_ms"]
    assert 0 < ms["min"] <= ms["p50"] <= ms["p90"] <= ms["p99"] <= ms["max"] < 2000, ms
    # Poisson arrivals at 15/s over ~3 s: the drawn schedule and the completions follow it
    assert 0.5 * 15 < result["scheduled_qps"] < 1.5 * 15, result
    assert 0.5 * 15 < result["achieved_qps"] < 1.5 * 15, result
    assert result["passed"] and result["p99_within_slo"]
    assert lg["latency_constraint_met"] is True and lg["min_duration_met"] is True
    assert isinstance(lg["early_stopping_met"], bool) and lg["early_stopping_result"]
    # open loop: issuing a sample only starts the call (well under the ~8 ms a request takes)
    assert result["issue_ms_per_call"] < 5, result["issue_ms_per_call"]


@pytest.mark.timeout(90)
def test_overload_fails_the_slo_and_the_search_stops_below_it(target):
    lines: list[str] = []
    began = time.perf_counter()
    result = open_loop.find_capacity(target, None, slo_ms=100, trials=1, start_qps=1000, growth=4,
                                     step_s=1, max_steps=3, timeout_s=1.0, progress=lines.append)
    elapsed = time.perf_counter() - began
    first = result["points"][0]
    assert first["offered_qps"] == 1000
    assert not first["passed"] and first["latency_ms"]["p99"] > 100, first
    assert first["loadgen"]["latency_constraint_met"] is False
    assert first["answered"] == first["samples"]  # overloaded, yet every sample came back
    assert first["wall_s"] < 1 + 1.0 + 5, first["wall_s"]  # duration + deadline + slack: bounded
    trial = result["trials"][0]
    assert trial["first_failing_qps"] <= 1000 and trial["capacity_qps"] < trial["first_failing_qps"], trial
    assert [p["offered_qps"] for p in result["points"]][:2] == [1000, 250]  # went down, not up
    # one progress line per rate tried, then the summary
    assert len(lines) == len(result["points"]) + 1 and len(result["points"]) <= 3
    assert all("offered" in line for line in lines[:-1]) and "capacity" in lines[-1]
    assert elapsed < 45, elapsed
    assert result["interval"]["n"] == 1 and result["median_qps"] == trial["capacity_qps"]


@pytest.mark.timeout(60)
def test_failed_requests_complete_as_counted_errors(triton_server, payloads):
    bad = [open_loop.Payload(p.text, b"this is not an image") if i % 2 else p for i, p in enumerate(payloads)]
    result = open_loop.run_rate(triton_server.urls["grpc"], bad, qps=20, duration_s=1.5, slo_ms=2000, seed=2)
    assert result["answered"] == result["samples"] > 0, result
    assert 0 < result["errors"] < result["samples"] and result["ok"] > 0, result
    assert result["first_error"] and result["timeouts"] == 0, result["first_error"]
    assert not result["passed"]  # p99 may be fine: a failed request still fails the rate

    (port,) = free_ports(1)  # nothing listens there: every call fails, none hangs
    began = time.perf_counter()
    dead = open_loop.run_rate(f"127.0.0.1:{port}", payloads, qps=20, duration_s=1, slo_ms=100, seed=3)
    assert dead["errors"] == dead["answered"] == dead["samples"] > 0 and dead["ok"] == 0, dead
    assert not dead["passed"]
    assert time.perf_counter() - began < 20


def test_median_interval_order_statistics():
    three = open_loop.median_interval([30.0, 10.0, 20.0])
    assert (three["low"], three["high"], three["coverage"]) == (10.0, 30.0, 0.75)
    nine = open_loop.median_interval(range(1, 10))
    assert nine["coverage"] >= 0.95 and (nine["low"], nine["high"]) == (2, 8)
    assert open_loop.median_interval([])["low"] is None
