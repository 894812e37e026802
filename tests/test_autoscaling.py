"""The chart's autoscaling, end to end without a cluster.

* The calibration tool (benchmarks/hpa_calibration.py) against the real tritonserver on
  127.0.0.1, as it runs against a remote replica: a short run whose signals must rise with load
  and whose recommended targets must lie between the idle and the loaded values, or which
  refuses, with no recommendation, for a reason its own numbers show.
* The HPA the chart renders (`helm template`: metrics, targets, behavior, min/max) driven by
  tests/hpa_sim.py, a model of the upstream controller, with each pod's signals taken from
  measured data: the committed calibration of one replica (signal at fractions of its
  capacity) scaled to the committed open-loop capacity of benchmarks/results/bench.json.
  A load step scales out within a bounded time and settles; steady noisy load around the
  tolerance band does not flap; falling load scales in only after the stabilization window, one
  policy step at a time. Both pools run on the CPU-measured curves: no GPU measurement exists, so
  the GPU chart (values.yaml) is checked for its metrics and behavior, not for GPU numbers.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from hard_dependencies import require, skip_unless
from hpa_sim import (RATE_WINDOW_S, SYNC_PERIOD_S, TOLERANCE, Controller, HPASpec, Policy, PodView, ReplicaModel,
                     Rules, Simulation, replicas_for_metric)
from hpa_sim import PodsMetric as HPAPodsMetric

from mmrec.benchmarks import hpa_calibration, hpa_signals
from mmrec.benchmarks.doc_blocks import BENCH_JSON, headroom, planning_capacity
from mmrec.benchmarks.machine import REPO_ROOT
from mmrec.benchmarks.open_loop import default_timeout_s

CHART = REPO_ROOT / "deploy" / "helm" / "mmrec"
ADAPTER_VALUES = REPO_ROOT / "deploy" / "prometheus-adapter" / "values.yaml"
# the chart's two pools, both driven by the CPU-measured replica (no GPU curve exists): values.yaml
# with its items/s target set to that replica's u·X, as an operator sets it after calibrating
VALUES = {"gpu-chart-cpu-curves": (), "cpu": (CHART / "values-cpu.yaml",)}
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
    assert rc in (0, hpa_calibration.EXIT_REFUSED)
    record = json.loads(out.read_text())
    u = headroom()
    assert record["replica"]["target"] == "portable"
    assert "item_encoder" in record["replica"]["models"]
    assert record["provenance"]["machine"]["cpu"]["model"] and "commit" in record["provenance"]["git"]
    assert record["capacity"]["source"] == "measured in this session"
    rows = {round(r["fraction"], 2): r for r in record["fractions"]}
    assert sorted(rows) == [0.3, round(u, 2), 1.0]
    # 0.3·X against 1·X with a margin (3 s holds are noisy; the load differs 3.3-fold)
    for name in (ITEMS, BUSY):
        assert rows[1.0]["signals"][name] > 1.5 * rows[0.3]["signals"][name], name
    recs = {r["name"]: r for r in record["recommendations"]}
    assert recs[BUSY]["opt_in"] and not recs[ITEMS]["opt_in"]  # busy: reported, not in the chart's HPA
    if rc == hpa_calibration.EXIT_REFUSED:
        # a refusal says why, and the run's own numbers show it; nothing is recommended
        assert record["refused"] == hpa_calibration.refusals(record)
        p99_at_u = rows[round(u, 2)]["latency_ms"].get("p99")
        assert (p99_at_u or math.inf) > record["slo_ms"] or not recs[ITEMS]["rising"]
        assert all(r["recommended"] is None for r in recs.values())
        return
    assert "refused" not in record and rows[round(u, 2)]["latency_ms"]["p99"] <= record["slo_ms"]
    x = record["capacity_qps"]
    assert recs[ITEMS]["rising"] and recs[ITEMS]["recommended_number"] == pytest.approx(u * x)
    assert 0 < recs[ITEMS]["recommended_number"] < x
    busy = recs[BUSY]
    if busy["rising"]:
        assert busy["idle"] < busy["recommended_number"] < busy["at_max_fraction"]
    else:
        assert busy["recommended"] is None and busy["why"] == hpa_calibration.FLAT_OPT_IN
    assert recs["triton_queue_compute_ratio"]["recommended_number"] >= hpa_calibration.BACKSTOP_FLOOR
    assert recs["triton_shed_per_second"]["recommended"] is None  # a policy: kept as the chart has it
    # the adapter's busy fraction never under-reads the executing time (statistics API, per batch)
    for r in record["fractions"]:
        for model, busy_of in r["busy_per_model"].items():
            if busy_of["exact"]:
                assert busy_of["adapter"] >= 0.95 * busy_of["exact"], (model, busy_of)


def _record(p99_at_u: float, items: list[float], busy: list[float], u: float = 0.8) -> dict:
    """A calibration record as `calibrate` assembles it, from chosen numbers."""
    fractions = [0.3, 0.5, u, 1.0]
    rows = [{"fraction": f, "latency_ms": {"p99": p99_at_u if f == u else 50.0},
             "signals": {ITEMS: i, BUSY: b, RATIO: 0.1 * f}} for f, i, b in zip(fractions, items, busy)]
    entries = [hpa_calibration.PodsMetric(ITEMS, ("item_encoder",), None),
               hpa_calibration.PodsMetric(RATIO, ("item_encoder",), "1"),
               hpa_calibration.PodsMetric(BUSY, ("item_encoder",), None, opt_in=True)]
    return {"headroom_u": u, "slo_ms": 100.0, "capacity_qps": 40.0, "fractions": rows,
            "recommendations": [hpa_calibration.recommend(e, 0.0, rows, 40.0, u) for e in entries]}


def test_calibration_refuses_numbers_that_do_not_describe_the_replica():
    """p99 at u·X above the bound (X is another run's, or the machine was busy) and a recommended
    load signal that stays flat up to X each refuse; an opt-in signal that is flat is only
    reported as unusable."""
    rising, flat = [12.0, 20.0, 32.0, 40.0], [0.9, 0.95, 0.95, 0.96]
    good = _record(80.0, rising, [0.3, 0.5, 0.8, 1.0])
    assert hpa_calibration.refusals(good) == []
    slow = _record(130.0, rising, [0.3, 0.5, 0.8, 1.0])
    (reason,) = hpa_calibration.refusals(slow)
    assert "130.0 ms" in reason and "100 ms" in reason
    stuck = _record(80.0, [12.0, 20.0, 20.0, 20.0], [0.3, 0.5, 0.8, 1.0])
    (reason,) = hpa_calibration.refusals(stuck)
    assert ITEMS in reason
    hpa_calibration.withhold(stuck, [reason])
    assert all(r["recommended"] is None and r["recommended_number"] is None for r in stuck["recommendations"])
    saturated = _record(80.0, rising, flat)  # the busy fraction of a batching GPU: flat long before X
    assert hpa_calibration.refusals(saturated) == []
    busy = next(r for r in saturated["recommendations"] if r["name"] == BUSY)
    assert busy["recommended"] is None and busy["why"] == hpa_calibration.FLAT_OPT_IN
    items = next(r for r in saturated["recommendations"] if r["name"] == ITEMS)
    assert items["recommended_number"] == pytest.approx(0.8 * 40.0)


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


def _rendered_hpa(values: tuple[Path, ...], target: str, sets: tuple[str, ...] = ()) -> dict:
    try:
        helm = hpa_calibration.find_helm()
    except hpa_calibration.CalibrationError as err:
        skip_unless(str(err))
    cmd = [helm, "template", "mmrec", str(CHART), "--set", "modelRepository.uri=s3://b/p",
           "--set", f"model.target={target}"]
    for v in values:
        cmd += ["-f", str(v)]
    for item in sets:
        cmd += ["--set", item]
    docs = yaml.safe_load_all(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return next(d for d in docs if d and d["kind"] == "HorizontalPodAutoscaler")


def _spec(pool: str, replica: "MeasuredReplica") -> HPASpec:
    """The chart's HPA (Pods metrics only: neither values file ships a Resource metric). The GPU
    chart's items/s target is this replica's u·X, as hpa_calibration prints it."""
    sets = (f"{hpa_calibration.ITEMS_TARGET_VALUE}={max(1, round(headroom() * replica.capacity))}",)
    hpa = _rendered_hpa(VALUES[pool], "portable", sets)
    assert all(m["type"] == "Pods" for m in hpa["spec"]["metrics"]), "a metric the sim has no measured curve for"
    return HPASpec.from_manifest(hpa, hpa_calibration.parse_quantity)


def test_sim_rate_window_is_the_adapter_rules():
    """hpa_sim averages a pod's signal over the adapter's rate window: both must be the same."""
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    windows = {w for r in rules for w in re.findall(r"\[(\d+)m\]", r["metricsQuery"])}
    assert windows == {str(int(RATE_WINDOW_S // 60))}, windows


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
        if all(model.signal(m.name, load / n, 0.0) <= m.target * (1 + TOLERANCE) for m in spec.metrics):
            return min(max(n, spec.min_replicas), spec.max_replicas)
    raise AssertionError("no replica count carries this load")


def _changes(timeline) -> list[tuple[float, int]]:
    """(time, +added / -removed) of every change of the replica count."""
    return [(b.t, b.replicas - a.replicas) for a, b in zip(timeline, timeline[1:]) if b.replicas != a.replicas]


@pytest.mark.parametrize("pool", sorted(VALUES))
def test_load_step_scales_out_within_bounded_time_and_settles(pool, replica):
    spec = _spec(pool, replica)
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
    bound = RATE_WINDOW_S + 2 * SYNC_PERIOD_S + math.ceil((needed - spec.min_replicas) / per_period) * (period + SYNC_PERIOD_S)
    reached = next(s.t for s in timeline if s.replicas >= needed)
    assert reached - step_at <= bound, f"{needed} replicas after {reached - step_at:.0f} s (bound {bound:.0f} s)"
    late = [s.replicas for s in timeline if s.t >= timeline[-1].t - 900]
    assert len(set(late)) == 1, f"not settled in the last 15 minutes: {sorted(set(late))}"
    assert needed <= late[0] <= needed + 1, f"settled at {late[0]}, {needed} carry the load"
    assert max(s.replicas for s in timeline) <= spec.max_replicas


# per-pod, per-scrape relative noise of the steady-load sweep (its docstring says why this much)
STEADY_NOISE = 0.10


def _items_target(spec: HPASpec) -> float:
    return next(m.target for m in spec.metrics if m.name == ITEMS)


@pytest.mark.parametrize("offset", [-0.12, -0.08, -0.04, 0.0, 0.04, 0.08, 0.12])
@pytest.mark.parametrize("pool", sorted(VALUES))
def test_steady_noisy_load_does_not_flap(pool, offset, replica):
    """Steady load at 4 x the items target x (1 + offset): inside and at both edges of the
    controller's ±10 % band, where noise flips the ratio across the edge from sync to sync.
    NOISE: each pod's share per 15 s scrape varies by 10 % (Poisson counting at these rates
    gives about 5 %; the rest is uneven connections). No reversal inside the stabilization
    window; at most one step out, corrected at most once, ending where the load needs."""
    spec = _spec(pool, replica)
    replicas = 4
    load = replicas * _items_target(spec) * (1 + offset)
    steady = _needed(spec, replica, load)
    sim = Simulation(spec, replica, lambda t: load, noise=STEADY_NOISE, seed=2, initial_replicas=steady)
    timeline = sim.run(3600)
    changes = _changes(timeline)
    reversals = [(a, b) for a, b in zip(changes, changes[1:])
                 if (a[1] > 0) != (b[1] > 0) and b[0] - a[0] <= spec.down.window_s]
    assert not reversals, f"scaled one way then the other within the stabilization window: {reversals}"
    assert len(changes) <= 2 and sum(d > 0 for _, d in changes) <= 1, f"steady load changed the count: {changes}"
    assert steady <= timeline[-1].replicas <= steady + 1, f"ended at {timeline[-1].replicas}, {steady} carry it"


@pytest.mark.parametrize("pool", sorted(VALUES))
def test_falling_load_scales_in_slowly(pool, replica):
    spec = _spec(pool, replica)
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
