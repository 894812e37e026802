"""The chart's autoscaling, end to end without a cluster.

* The calibration tool (benchmarks/hpa_calibration.py) against the real tritonserver on
  127.0.0.1, as it runs against a remote replica: a short run whose signals must rise with load
  and whose recommended targets must lie between the idle and the loaded values.
* The HPA the chart renders (`helm template`: metrics, targets, behavior, min/max) driven by
  tests/hpa_sim.py, a model of the upstream controller, with each pod's signals taken from
  measured data: the committed calibration of one replica (signal at fractions of its
  capacity) scaled to the committed open-loop capacity of benchmarks/results/bench.json.
  A load step scales out within a bounded time and settles; steady noisy load does not flap;
  falling load scales in only after the stabilization window, one policy step at a time.
"""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import yaml

from hard_dependencies import require, skip_unless
from hpa_sim import (SYNC_PERIOD_S, Controller, HPASpec, Policy, PodView, ReplicaModel, Rules, Simulation,
                     replicas_for_metric)
from hpa_sim import PodsMetric as HPAPodsMetric

from mmrec.benchmarks import hpa_calibration, hpa_signals
from mmrec.benchmarks.doc_blocks import BENCH_JSON, headroom, planning_capacity
from mmrec.benchmarks.machine import REPO_ROOT
from mmrec.benchmarks.open_loop import default_timeout_s

CHART = REPO_ROOT / "deploy" / "helm" / "mmrec"
VALUES = {"gpu": (), "cpu": (CHART / "values-cpu.yaml",)}
CALIBRATION_JSON = REPO_ROOT / hpa_calibration.REFERENCE_JSON
ITEMS = "triton_items_per_second"
BUSY = "triton_busy_fraction"
RATIO = "triton_queue_compute_ratio"


# ------------------------------------------------------------------- the calibration tool


@pytest.mark.server
@pytest.mark.timeout(120)
def test_calibration_tool_reads_rising_signals_from_a_running_replica(triton_server, exported_repository, tmp_path):
    """Remote mode against the fixture's server (nothing started by the tool), reduced: one
    trial, short steps and windows."""
    require("mlperf_loadgen")
    out = tmp_path / "calibration.json"
    rc = hpa_calibration.main([
        "--url", triton_server.urls["grpc"], "--metrics-url", f"http://{triton_server.urls['metrics']}/metrics",
        "--repository", str(exported_repository), "--values", str(CHART / "values-cpu.yaml"),
        "--trials", "1", "--step-s", "2", "--max-steps", "4", "--fractions", "0.3", "1.0",
        "--warm-s", "1", "--hold-s", "3", "--idle-s", "1", "--output", str(out)])
    assert rc == 0
    record = json.loads(out.read_text())
    u = headroom()
    assert record["replica"]["target"] == "portable"
    assert "item_encoder" in record["replica"]["models"]
    assert record["provenance"]["machine"]["cpu"]["model"] and "commit" in record["provenance"]["git"]
    rows = {round(r["fraction"], 2): r for r in record["fractions"]}
    assert sorted(rows) == [0.3, round(u, 2), 1.0]
    for name in (ITEMS, BUSY):
        assert rows[round(u, 2)]["signals"][name] > rows[0.3]["signals"][name], name
    recs = {r["name"]: r for r in record["recommendations"]}
    x = record["capacity_qps"]
    assert recs[ITEMS]["recommended_number"] == pytest.approx(u * x)
    assert 0 < recs[ITEMS]["recommended_number"] < x
    busy = recs[BUSY]
    assert busy["idle"] < busy["recommended_number"] < busy["at_max_fraction"]
    assert recs["triton_queue_compute_ratio"]["recommended_number"] >= hpa_calibration.BACKSTOP_FLOOR
    assert recs["triton_shed_per_second"]["recommended"] is None  # a policy: kept as the chart has it
    # the adapter's busy fraction never under-reads the executing time (statistics API, per batch)
    for r in record["fractions"]:
        for model, busy_of in r["busy_per_model"].items():
            if busy_of["exact"]:
                assert busy_of["adapter"] >= 0.95 * busy_of["exact"], (model, busy_of)


def test_calibration_tool_refuses_a_missing_metrics_url():
    with pytest.raises(SystemExit):
        hpa_calibration.main(["--url", "127.0.0.1:1", "--repository", "."])


def test_busy_fraction_corrects_the_per_request_compute_charge():
    """Two batches of 4 requests that computed 50 ms each over 1 s: Triton's counter holds 8 x
    50 ms; the model was busy 100 ms."""
    before = hpa_signals.Snapshot(0.0, {})
    after = hpa_signals.Snapshot(1.0, {("nv_inference_request_success", "m", ""): 8,
                                       ("nv_inference_exec_count", "m", ""): 2,
                                       ("nv_inference_compute_infer_duration_us", "m", ""): 8 * 50_000})
    assert hpa_signals.evaluate(BUSY, before, after, ["m", "idle"]) == pytest.approx(0.1)
    assert hpa_signals.evaluate(BUSY, before, before, ["m"]) == 0.0


# ------------------------------------------------------------------------ the HPA simulation


def test_replica_calculation_follows_upstream_for_pending_and_missing_pods():
    """calcPlainMetricReplicas' cases (replica_calculator.go)."""
    ready = [PodView(f"p{i}", False) for i in range(3)]
    assert replicas_for_metric(3, ready, {"p0": 105, "p1": 104, "p2": 106}, 100) == 3  # within the tolerance
    assert replicas_for_metric(3, ready, {"p0": 150, "p1": 150, "p2": 150}, 100) == 5  # ceil(1.5 * 3)
    # a pending pod counts as 0 on a scale-up: (150 + 150 + 0) / 3 = target -> no change
    pods = ready[:2] + [PodView("p9", True)]
    assert replicas_for_metric(3, pods, {"p0": 150, "p1": 150}, 100) == 3
    # a ready pod without a metric counts as the target on a scale-down: (50 + 50 + 100) / 3
    assert replicas_for_metric(3, ready, {"p0": 50, "p1": 50}, 100) == math.ceil(200 / 3 / 100 * 3)
    # ... and as 0 on a scale-up: (300 + 300 + 0) / 3 = 2x
    assert replicas_for_metric(3, ready, {"p0": 300, "p1": 300}, 100) == 6
    assert replicas_for_metric(3, pods[2:], {}, 100) is None  # no metric at all: the metric is invalid


def test_behavior_stabilizes_down_and_rate_limits_up():
    spec = HPASpec(2, 10, (HPAPodsMetric("m", 1.0),), Rules(0, (Policy("Pods", 2, 60),)),
                   Rules(300, (Policy("Pods", 1, 120),)))
    pods = [PodView(f"p{i}", False) for i in range(2)]
    c = Controller(spec)
    assert c.reconcile(0, 2, pods, {"m": {"p0": 5.0, "p1": 5.0}}) == 4  # wants 10, 2 pods per 60 s
    assert c.reconcile(15, 4, pods, {"m": {"p0": 5.0, "p1": 5.0}}) == 4  # the period's 2 are spent
    assert c.reconcile(75, 4, pods, {"m": {"p0": 5.0, "p1": 5.0}}) == 6  # a new period
    low = {"m": {"p0": 0.1, "p1": 0.1}}
    assert c.reconcile(90, 6, pods, low) == 6  # the high recommendations are inside the 300 s window
    assert c.reconcile(390, 6, pods, low) == 5  # past it: one pod per 120 s
    assert c.reconcile(405, 5, pods, low) == 5


def _rendered_hpa(values: tuple[Path, ...], target: str) -> dict:
    try:
        helm = hpa_calibration.find_helm()
    except hpa_calibration.CalibrationError as err:
        skip_unless(str(err))
    cmd = [helm, "template", "mmrec", str(CHART), "--set", "modelRepository.uri=s3://b/p",
           "--set", f"model.target={target}"]
    for v in values:
        cmd += ["-f", str(v)]
    docs = yaml.safe_load_all(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return next(d for d in docs if d and d["kind"] == "HorizontalPodAutoscaler")


def _spec(values: tuple[Path, ...]) -> HPASpec:
    """The chart's HPA with its Pods metrics. A Resource metric (values-cpu.yaml's cpu 70 %) is
    left out, named here: the sim has no measured CPU-utilization curve for it."""
    hpa = _rendered_hpa(values, "portable")
    hpa["spec"]["metrics"] = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    return HPASpec.from_manifest(hpa, hpa_calibration.parse_quantity)


class MeasuredReplica(ReplicaModel):
    """One replica's signals vs. the items/s it is offered: the calibration's curves (signal at
    fractions f of its X, idle at 0) at f = load / X, X = bench.json's open-loop capacity, held at
    their last measured value beyond it. It completes at most what it served in the calibration;
    a backlog (open-loop overload) adds its wait to the queue:compute ratio, per the compute time
    Triton charged each request at the largest load measured. Requests wait at most the
    benchmark client's deadline."""

    def __init__(self, calibration: dict, capacity: float) -> None:
        self.capacity = capacity
        rows = sorted(calibration["fractions"], key=lambda r: r["fraction"])
        idle = calibration["idle"]["signals"]
        self.curves = {name: [(0.0, idle[name])] + [(r["fraction"], r["signals"][name]) for r in rows]
                       for name in idle}
        served = max((r.get("achieved_qps") or 0.0) / calibration["capacity_qps"] for r in rows)
        self.max_items_s = capacity * max(1.0, served)
        charged = [m["charged_ms_per_request"] for m in rows[-1]["busy_per_model"].values()
                   if m.get("charged_ms_per_request")]
        self.charged_s = max(charged) / 1e3
        self.max_wait_s = default_timeout_s(calibration["slo_ms"])

    def signal(self, name: str, load: float, backlog_s: float) -> float:
        if name == ITEMS:
            return min(load, self.max_items_s)
        value = hpa_calibration.interpolate(self.curves[name], min(load, self.max_items_s) / self.capacity)
        return value + backlog_s / self.charged_s if name == RATIO else value


@pytest.fixture(scope="module")
def replica() -> MeasuredReplica:
    if not CALIBRATION_JSON.is_file():
        pytest.fail(f"{CALIBRATION_JSON.relative_to(REPO_ROOT)} not committed: {hpa_calibration.REFERENCE_COMMAND}")
    planned = planning_capacity(json.loads((REPO_ROOT / BENCH_JSON).read_text()))
    assert planned is not None, f"{BENCH_JSON} has no open-loop capacity section"
    return MeasuredReplica(json.loads(CALIBRATION_JSON.read_text()), planned[0])


def _needed(spec: HPASpec, model: ReplicaModel, load: float) -> int:
    """The fewest replicas at which every metric is within the tolerance above its target."""
    for n in range(1, 10 * spec.max_replicas):
        if all(model.signal(m.name, load / n, 0.0) <= m.target * 1.1 for m in spec.metrics):
            return min(max(n, spec.min_replicas), spec.max_replicas)
    raise AssertionError("no replica count carries this load")


def _changes(timeline) -> list[tuple[float, int]]:
    """(time, +added / -removed) of every change of the replica count."""
    return [(b.t, b.replicas - a.replicas) for a, b in zip(timeline, timeline[1:]) if b.replicas != a.replicas]


@pytest.mark.parametrize("pool", sorted(VALUES))
def test_load_step_scales_out_within_bounded_time_and_settles(pool, replica):
    spec = _spec(VALUES[pool])
    base = spec.min_replicas * headroom() * replica.capacity * 0.9  # two pods just under u·X each
    step_at, high = 600.0, 3 * base
    sim = Simulation(spec, replica, lambda t: base if t < step_at else high, noise=0.05, seed=1)
    timeline = sim.run(step_at + 2700)
    assert all(s.replicas == spec.min_replicas for s in timeline if s.t < step_at), "scaled before the step"
    needed = _needed(spec, replica, high)
    assert needed > spec.min_replicas
    # bound: the metric shows the step within one rate window plus a sync; then each scale-up
    # period adds its policy's pods (rendered behavior), one sync to act on each
    per_period = max(p.value for p in spec.up.policies if p.kind == "Pods")
    period = max(p.period_s for p in spec.up.policies)
    bound = 60 + 2 * SYNC_PERIOD_S + math.ceil((needed - spec.min_replicas) / per_period) * (period + SYNC_PERIOD_S)
    reached = next(s.t for s in timeline if s.replicas >= needed)
    assert reached - step_at <= bound, f"{needed} replicas after {reached - step_at:.0f} s (bound {bound:.0f} s)"
    late = [s.replicas for s in timeline if s.t >= timeline[-1].t - 900]
    assert len(set(late)) == 1, f"not settled in the last 15 minutes: {sorted(set(late))}"
    assert needed <= late[0] <= needed + 1, f"settled at {late[0]}, {needed} carry the load"
    assert max(s.replicas for s in timeline) <= spec.max_replicas


@pytest.mark.parametrize("pool", sorted(VALUES))
def test_steady_noisy_load_does_not_flap(pool, replica):
    spec = _spec(VALUES[pool])
    replicas = 4
    load = replicas * headroom() * replica.capacity * 0.85
    steady = _needed(spec, replica, load)
    sim = Simulation(spec, replica, lambda t: load, noise=0.15, seed=2, initial_replicas=steady)
    timeline = sim.run(3600)
    changes = _changes(timeline)
    reversals = [(a, b) for a, b in zip(changes, changes[1:])
                 if (a[1] > 0) != (b[1] > 0) and b[0] - a[0] <= spec.down.window_s]
    assert not reversals, f"scaled one way then the other within the stabilization window: {reversals}"
    assert len(changes) <= 1, f"steady load changed the replica count {len(changes)} times: {changes}"


@pytest.mark.parametrize("pool", sorted(VALUES))
def test_falling_load_scales_in_slowly(pool, replica):
    spec = _spec(VALUES[pool])
    high = 6 * headroom() * replica.capacity * 0.9
    low = spec.min_replicas * headroom() * replica.capacity * 0.5
    drop_at = 900.0
    start = _needed(spec, replica, high)
    sim = Simulation(spec, replica, lambda t: high if t < drop_at else low, noise=0.05, seed=3, initial_replicas=start)
    timeline = sim.run(drop_at + 3600)
    changes = _changes(timeline)
    assert all(t >= drop_at for t, _ in changes), f"changed before the drop: {changes}"
    downs = [(t, d) for t, d in changes if d < 0]
    assert downs and not [c for c in changes if c[1] > 0]
    # the last high recommendation is the sync before the drop: none may go before it leaves the window
    assert downs[0][0] - (drop_at - SYNC_PERIOD_S) >= spec.down.window_s, "scaled in inside the stabilization window"
    pods = min(p.value for p in spec.down.policies if p.kind == "Pods")
    period = max(p.period_s for p in spec.down.policies)
    for (t0, d0), (t1, _) in zip(downs, downs[1:]):
        assert -d0 <= pods and t1 - t0 >= period - SYNC_PERIOD_S, f"faster than the policy: {downs}"
    assert timeline[-1].replicas == max(spec.min_replicas, _needed(spec, replica, low))
