"""Calibrate the chart's HPA targets on ONE running replica of any target (portable,
onnxruntime, tensorrt; CPU or GPU), reached over the network: nothing is started here.

1. Asks the replica what it serves (its /metrics lists the loaded models; `item_encoder`'s and
   `text_encoder`'s configs tell the repository target) and renders the chart's HPA for that
   target with the real `helm` (the podsMetrics entries and their model selectors).
2. Finds X, the open-loop capacity at the p99 bound, in this same session with the benchmark's
   own machinery (benchmarks/open_loop.py: `find_capacity` over `payload_sets`, MLPerf LoadGen
   Server scenario), and plans on the low end of its interval over trials (the median with
   one). An X measured before (`--capacity-qps`, `--capacity-from` a bench.json) is an explicit
   override, recorded as such: it describes this replica only if nothing changed since.
3. Holds Poisson load at a few fractions of X (by default 0.3, 0.5, u and 1.0) and computes,
   from two scrapes of /metrics inside each hold, every adapter signal the HPA reads
   (benchmarks/hpa_signals.py), the opt-in busy fraction included, plus the idle value.
4. Refuses (exit 3, no recommendation) when the numbers do not describe this replica: p99 at
   u·X above the bound, or a recommended load signal that does not rise over the fractions
   up to X. Otherwise prints the chart values to set, each with the numbers it came from.
   Either way it writes the JSON results file (machine, commit, model list, refusals).

Run it from a pod inside the cluster against one replica's pod IP: through `kubectl
port-forward` it measures the tunnel, not the replica.

    python -m mmrec.benchmarks.hpa_calibration --url HOST:8001 --metrics-url http://HOST:8002/metrics \\
        --repository LOCAL_COPY_OF_THE_EXPORT [--values deploy/helm/mmrec/values-cpu.yaml] \\
        --output hpa_calibration.json

`--repository` is read only for the request payloads (captions tokenized by the export's own
tokenizer); the replica may run anywhere. `--serve` starts a local pip tritonserver over it
instead of `--url`, for a quick look on a laptop. How each target follows from the numbers:
docs/deployment.md, "Autoscaling".
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import yaml

from mmrec import schema
from mmrec.machine import tool_path

from . import doc_blocks, hpa_signals, open_loop, triton_stats
from .doc_blocks import headroom
from .machine import REPO_ROOT, RunStart, write_results
from .settings import DEFAULT_SLO_MS

CHART = REPO_ROOT / "deploy" / "helm" / "mmrec"
GPU_VALUES = CHART / "values.yaml"
DEFAULT_FRACTIONS = (0.3, 0.5, 1.0)  # u is added: the p99 check and the busy report read u·X itself
BACKSTOP_FLOOR = 1.0  # queue:compute past 1: requests wait longer than a batch computes (overload)
HPA_TOLERANCE = 0.1  # the controller acts only past ±10 % of a target (kube-controller-manager default)
ITEMS = "triton_items_per_second"
BUSY = "triton_busy_fraction"
ITEMS_TARGET_VALUE = "autoscaling.itemsPerSecondPerPod"  # the chart's items/s target where the entry has none
EXIT_REFUSED = 3  # measured, but the numbers do not describe this replica: no recommendation
UNUSED_URI = "s3://calibration/unused"  # the chart needs a repository URI to render; not used here
UNUSED_GPU = "calibration-unused"  # nor a GPU model for model.target=tensorrt
# The committed reference run: one portable-target replica on the bench machine (which variants it
# serves is recorded: `replica.served_variants`). docs/deployment.md's calibration table and
# tests/test_autoscaling.py's replica model read it.
REFERENCE_JSON = doc_blocks.HPA_CALIBRATION_JSON
REFERENCE_COMMAND = doc_blocks.RESULTS_FILES[REFERENCE_JSON]


class CalibrationError(RuntimeError):
    """The replica or the chart cannot give what a calibration needs; the message says what to fix."""


# ------------------------------------------------------------------------------ the replica


def served_target(url: str) -> str:
    """portable / onnxruntime / tensorrt from the replica's configs (the model-config API, which
    the chart leaves open): item_encoder is one python model on portable, an ensemble elsewhere,
    and text_encoder is a TensorRT plan on tensorrt."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url)
    try:
        item = client.get_model_config(schema.ITEM_ENCODER).config
        if item.platform != "ensemble":
            return "portable"
        try:
            text = client.get_model_config(schema.TEXT_ENCODER).config
        except InferenceServerException:
            return "onnxruntime"
        return "tensorrt" if text.platform == "tensorrt_plan" else "onnxruntime"
    except InferenceServerException as err:
        raise CalibrationError(f"{url}: cannot read {schema.ITEM_ENCODER}'s config ({err.message()}); "
                               "is it an mmrec replica with item_encoder loaded?") from err
    finally:
        client.close()


# -------------------------------------------------------------------------------- the chart


def find_helm() -> str:
    helm = tool_path("helm", "MMREC_HELM")
    if not helm:
        raise CalibrationError("helm not found: python deploy/tools/install_helm.py (or set MMREC_HELM)")
    return helm


@dataclass(frozen=True)
class PodsMetric:
    """One podsMetrics entry as the rendered HPA has it."""

    name: str
    models: tuple[str, ...]
    average_value: str | None  # None: not set in the chart (items/s on GPU before calibrating)
    opt_in: bool = False  # reported for the operator to add, not in the rendered HPA


def _helm_template(values: Sequence[Path], sets: Sequence[str], target: str, chart: Path) -> subprocess.CompletedProcess:
    cmd = [find_helm(), "template", "mmrec", str(chart), "--set", f"modelRepository.uri={UNUSED_URI}",
           "--set", f"model.target={target}"]
    if target == "tensorrt":  # the chart pins TensorRT pods to a GPU model; which one does not change the HPA
        cmd += ["--set", f"gpu.products={{{UNUSED_GPU}}}"]
    for v in values:
        cmd += ["-f", str(v)]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True)


def render_hpa(values: Sequence[Path], sets: Sequence[str], target: str, chart: Path = CHART) -> list[PodsMetric]:
    """The Pods metrics of the chart's HPA for `target`, rendered by helm (selectors resolved).
    A GPU chart without its items/s target (what this tool measures) renders with a stand-in
    for it, and that entry's value reads None."""
    done = _helm_template(values, sets, target, chart)
    unset_items = done.returncode != 0 and ITEMS_TARGET_VALUE in done.stderr
    if unset_items:
        done = _helm_template(values, [*sets, f"{ITEMS_TARGET_VALUE}=1"], target, chart)
    if done.returncode != 0:
        raise CalibrationError(f"helm template failed: {done.stderr.strip()}")
    hpa = next((d for d in yaml.safe_load_all(done.stdout) if d and d["kind"] == "HorizontalPodAutoscaler"), None)
    if hpa is None:
        raise CalibrationError("the rendered chart has no HPA (autoscaling.enabled=false?)")
    out = []
    for m in hpa["spec"]["metrics"]:
        if m["type"] != "Pods":
            continue
        exprs = m["pods"]["metric"].get("selector", {}).get("matchExpressions", [])
        models = tuple(v for e in exprs if e["key"] == "model" for v in e["values"])
        name = m["pods"]["metric"]["name"]
        value = None if unset_items and name == ITEMS else str(m["pods"]["target"]["averageValue"])
        out.append(PodsMetric(name, models, value))
    return out


def with_opt_in(entries: list[PodsMetric], target: str) -> list[PodsMetric]:
    """The chart's entries plus the busy fraction when the chart leaves it out: reported so an
    operator can judge it on this replica, never a default (docs/deployment.md, "Autoscaling")."""
    if any(e.name == BUSY for e in entries):
        return entries
    from .hpa_selectors import executing

    return [*entries, PodsMetric(BUSY, executing(target), None, opt_in=True)]


def parse_quantity(text: str) -> float:
    """A Kubernetes quantity as the HPA reads averageValue ("800m", "1", "32", "1.5k")."""
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
    text = str(text).strip()
    if text and text[-1] in suffixes:
        return float(text[:-1]) * suffixes[text[-1]]
    return float(text)


def quantity(value: float) -> str:
    """A target as a quantity: whole units from 10 up, milli-units below (the HPA's precision)."""
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"a target must be a finite non-negative number, got {value}")
    if value >= 10 or abs(value - round(value)) < 1e-9:
        return str(round(value))
    return f"{max(1, round(value * 1000))}m"


# ------------------------------------------------------------------------------- measuring


@dataclass
class Window:
    """Counters of one replica at both ends of a window, from /metrics and (where the API is
    open) the statistics API."""

    before: hpa_signals.Snapshot
    after: hpa_signals.Snapshot
    stats_before: dict | None
    stats_after: dict | None

    def signals(self, entries: Sequence[PodsMetric]) -> dict[str, float]:
        return {e.name: hpa_signals.evaluate(e.name, self.before, self.after, e.models)
                for e in entries if e.name in hpa_signals.SIGNALS}

    def busy_per_model(self, models: Sequence[str]) -> dict[str, dict]:
        seconds = self.after.at - self.before.at
        out = {}
        for m in models:
            exact = (hpa_signals.exact_busy(self.stats_before, self.stats_after, m, seconds)
                     if self.stats_after is not None else None)
            charged = hpa_signals.charged_ms_per_request(self.before, self.after, m)
            out[m] = {"adapter": round(hpa_signals.model_busy(self.before, self.after, m), 4),
                      "exact": None if exact is None else round(exact, 4),
                      "charged_ms_per_request": None if charged is None else round(charged, 3)}
        return out


def _statistics(url: str) -> dict | None:
    try:
        return triton_stats.snapshot(url)
    except Exception:  # noqa: BLE001 - a restricted statistics API only costs the exact column
        return None


def measure_window(url: str, metrics_url: str, seconds: float) -> Window:
    before, stats_before = hpa_signals.scrape(metrics_url), _statistics(url)
    time.sleep(seconds)
    after, stats_after = hpa_signals.scrape(metrics_url), _statistics(url)
    return Window(before, after, stats_before, stats_after)


def hold(target: open_loop.Target, metrics_url: str, qps: float, warm_s: float, hold_s: float,
         slo_ms: float, seed: int) -> tuple[Window, dict]:
    """Poisson load at `qps` (LoadGen, in a thread) for warm_s + hold_s; the window is the
    hold_s in steady state after the warm-up. Returns it with the LoadGen record of the run."""
    result: dict = {}

    def run() -> None:
        result.update(open_loop.run_rate(target, None, qps, warm_s + hold_s + 1.0, slo_ms, seed=seed, drain=False))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(warm_s)
    window = measure_window(target.url, metrics_url, hold_s)
    thread.join()
    target.drain()
    return window, result


# ------------------------------------------------------------------------- recommendations


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float:
    """Piecewise-linear value at x through (x, y) points (held flat beyond the ends)."""
    pts = sorted(points)
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return pts[-1][1]


@dataclass(frozen=True)
class Curve:
    """One signal over the held fractions of X, with what a target is derived from."""

    points: list[tuple[float, float]]  # (fraction of X, signal)
    capacity: float  # X, items/s
    u: float

    @property
    def at_u(self) -> float:
        return interpolate(self.points, self.u)

    @property
    def largest(self) -> tuple[float, float]:
        return max(self.points)


Recommender = Callable[[Curve], tuple[float, str]]
RECOMMENDERS: dict[str, Recommender] = {
    ITEMS: lambda c: (c.u * c.capacity, f"u · X = {c.u:.2f} × {c.capacity:.1f} items/s (the HPA acts past "
                                        f"{1 + HPA_TOLERANCE:g} × it)"),
    BUSY: lambda c: (c.at_u, f"the busiest selected model's busy fraction at u · X (u = {c.u:.2f})"),
    "triton_queue_compute_ratio": lambda c: (
        max(BACKSTOP_FLOOR, (1 + HPA_TOLERANCE) * c.largest[1]),
        f"backstop: max({BACKSTOP_FLOOR:g}, (1 + tolerance) × its value at {c.largest[0]:g}·X): never acts "
        "below capacity, acts once queues outgrow a batch"),
}
# Signals whose target is read off their curve: one that does not rise with load up to X cannot
# tell load levels apart (the queue backstop is a threshold, not a curve).
LOAD_SIGNALS = (ITEMS, BUSY)
NOT_CALIBRATED = "not calibrated here (a policy, not a load signal): keep the chart's value"
FLAT_OPT_IN = "opt-in, and flat on this replica up to X: it cannot tell load levels apart here, do not add it"


def rising(points: Sequence[tuple[float, float]]) -> bool:
    """Strictly rising over the held fractions up to X (at least two of them)."""
    ordered = sorted(p for p in points if p[0] <= 1.0)
    return len(ordered) >= 2 and all(b[1] > a[1] for a, b in zip(ordered, ordered[1:]))


def recommend(entry: PodsMetric, idle: float, rows: list[dict], capacity: float, u: float) -> dict:
    """The averageValue to set for one podsMetrics entry (RECOMMENDERS; others keep the chart's), and why."""
    points = [(r["fraction"], r["signals"][entry.name]) for r in rows if entry.name in r["signals"]]
    curve = Curve(points, capacity, u) if points else None
    rule = RECOMMENDERS.get(entry.name)
    value, why = rule(curve) if rule and curve else (None, NOT_CALIBRATED)
    up = rising(points)
    if entry.opt_in and entry.name in LOAD_SIGNALS and not up:
        value, why = None, FLAT_OPT_IN
    return {"name": entry.name, "models": list(entry.models), "chart_value": entry.average_value,
            "chart_value_number": None if entry.average_value is None else parse_quantity(entry.average_value),
            "opt_in": entry.opt_in,
            "recommended": None if value is None else quantity(value), "recommended_number": value, "why": why,
            "idle": idle, "at_u": curve.at_u if curve else None, "at_max_fraction": curve.largest[1] if curve else None,
            "rising": up}


def refusals(record: dict) -> list[str]:
    """Why the numbers do not describe this replica (empty: they do). p99 at u·X above the
    bound: X is not this replica's capacity now (another run's X, or a contended machine). A
    recommended load signal that does not rise up to X: its target cannot separate loads."""
    out = []
    u, slo = record["headroom_u"], record["slo_ms"]
    at_u = next((r for r in record["fractions"] if abs(r["fraction"] - u) < 1e-3), None)
    p99 = None if at_u is None else (at_u.get("latency_ms") or {}).get("p99")
    if p99 is None:
        out.append(f"no p99 was measured at u·X = {u:.2f}·X")
    elif p99 > slo:
        out.append(f"p99 at u·X ({u:.2f} × {record['capacity_qps']:.1f} items/s) was {p99:.1f} ms, above the "
                   f"{slo:g} ms bound X was measured at: X does not describe this replica now (measure it in this "
                   "session, without --capacity-from/--capacity-qps, on an otherwise idle replica)")
    for r in record["recommendations"]:
        if r["name"] in LOAD_SIGNALS and not r["opt_in"] and not r["rising"]:
            out.append(f"{r['name']} over {r['models']} does not rise over the held fractions up to X: a target "
                       "on it cannot tell load levels apart on this replica")
    return out


def withhold(record: dict, reasons: list[str]) -> None:
    """Keep the measurements, drop every recommendation: a refused run must not be copied into a chart."""
    record["refused"] = reasons
    for r in record["recommendations"]:
        r["recommended"], r["recommended_number"], r["why"] = None, None, "refused: " + "; ".join(reasons)


def committed_capacity(path: Path, payload_set: str) -> tuple[float, dict]:
    """X from a committed `mmrec bench` run (its open-loop capacity section): the same low end
    of the interval the capacity model plans on, measured on a quiet machine."""
    planned = doc_blocks.planning_capacity(json.loads(Path(path).read_text()), payload_set)
    if planned is None:
        raise CalibrationError(f"{path} has no open-loop capacity for {payload_set}")
    x, result = planned
    return x, {"from": str(path), "planned_qps": x, "capacity_qps": result["capacity_qps"],
               "interval": result.get("interval"), "slo_ms": result.get("slo_ms")}


def planned_capacity(result: dict) -> float:
    """X: the low end of the interval over trials, the median with one trial."""
    low = (result.get("interval") or {}).get("low")
    x = low if low is not None and (result.get("interval") or {}).get("n", 0) > 1 else result.get("median_qps")
    if not x:
        raise CalibrationError("no rate passed the p99 bound: the replica cannot serve this SLO at any rate tried "
                               "(raise --slo-ms, or check the replica)")
    return float(x)


# ------------------------------------------------------------------------------------ CLI


def served_variants(repository: Path) -> dict[str, str]:
    """What each member of the export copy runs (its manifest: fp32, int8, openvino-bf16, ...):
    X, and every target read from it, is a property of that choice as much as of the hardware."""
    from mmrec.layout import RepositoryLayout

    manifest = RepositoryLayout(Path(repository)).load_manifest(required=False)
    return dict(sorted(manifest.served_variants().items())) if manifest is not None else {}


def calibrate(opts: argparse.Namespace, url: str, metrics_url: str, say=print) -> dict:
    target_name = opts.target or served_target(url)
    entries = with_opt_in(render_hpa(opts.values, opts.set, target_name), target_name)
    idle_snapshot = hpa_signals.scrape(metrics_url)
    served = sorted(idle_snapshot.models())
    say(f"replica {url}: target {target_name}; models {served}")
    say("HPA podsMetrics: " + "; ".join(f"{e.name} over {list(e.models)} = {e.average_value or 'unset'}"
                                        + (" (opt-in, reported only)" if e.opt_in else "") for e in entries))
    u = opts.headroom if opts.headroom is not None else headroom()
    payloads = open_loop.payload_sets(opts.repository)[opts.payload_set]
    with open_loop.Target(url, payloads) as target:
        target.warm_up(1)
        idle = measure_window(url, metrics_url, opts.idle_s)
        if opts.capacity_qps:
            capacity_record = {"source": "override", "given_qps": opts.capacity_qps}
            capacity = float(opts.capacity_qps)
        elif opts.capacity_from:
            capacity, capacity_record = committed_capacity(opts.capacity_from, opts.payload_set)
            capacity_record["source"] = "override"
        else:
            capacity_record = open_loop.find_capacity(
                target, None, opts.slo_ms, opts.trials, step_s=opts.step_s, max_steps=opts.max_steps,
                progress=lambda line: say("  " + line))
            capacity_record["source"] = "measured in this session"
            capacity = planned_capacity(capacity_record)
        say(f"X = {capacity:.1f} items/s at p99 <= {opts.slo_ms:g} ms; u = {u:.2f}")
        fractions = sorted(set(opts.fractions) | {round(u, 4)})
        rows = []
        busy_models = sorted({m for e in entries if e.name == BUSY for m in e.models})
        for i, f in enumerate(fractions):
            window, run = hold(target, metrics_url, f * capacity, opts.warm_s, opts.hold_s, opts.slo_ms, seed=100 + i)
            row = {"fraction": f, "offered_qps": f * capacity, "signals": window.signals(entries),
                   "busy_per_model": window.busy_per_model(busy_models),
                   "achieved_qps": run.get("achieved_qps"), "latency_ms": run.get("latency_ms"),
                   "errors": run.get("errors"), "window_s": round(window.after.at - window.before.at, 3)}
            rows.append(row)
            say(f"  {f:.2f}·X = {f * capacity:6.1f}/s  p99 {row['latency_ms'].get('p99', float('nan')):7.1f} ms  "
                + "  ".join(f"{k} {v:.3f}" for k, v in row["signals"].items()))
    idle_signals = idle.signals(entries)
    recommendations = [recommend(e, idle_signals.get(e.name, 0.0), rows, capacity, u) for e in entries]
    record = {"replica": {"url": url, "metrics_url": metrics_url, "target": target_name, "models": served,
                          "served_variants": served_variants(opts.repository)},
            "chart": {"values": [str(v) for v in opts.values], "set": list(opts.set)},
            "slo_ms": opts.slo_ms, "payload_set": opts.payload_set, "headroom_u": u,
            "capacity_qps": capacity, "capacity": capacity_record,
            "idle": {"signals": idle_signals, "busy_per_model": idle.busy_per_model(busy_models)},
            "fractions": rows, "recommendations": recommendations}
    reasons = refusals(record)
    if reasons:
        withhold(record, reasons)
    return record


def chart_values_text(record: dict) -> str:
    """What to put in autoscaling.podsMetrics, with the numbers each value came from."""
    lines = [f"# autoscaling.podsMetrics for model.target={record['replica']['target']}: X = "
             f"{record['capacity_qps']:.1f} items/s at p99 <= {record['slo_ms']:g} ms, u = {record['headroom_u']:.2f}",
             "podsMetrics:"]
    for r in record["recommendations"]:
        if r["opt_in"]:
            continue
        value = r["recommended"] or r["chart_value"]
        at_u = "n/a" if r["at_u"] is None else f"{r['at_u']:.3f}"
        at_max = "n/a" if r["at_max_fraction"] is None else f"{r['at_max_fraction']:.3f}"
        lines += [f"  # {r['why']}; idle {r['idle']:.3f}, at u·X {at_u}, at the largest fraction {at_max}"
                  f" (chart now: {r['chart_value']})",
                  f"  - name: {r['name']}", f"    models: [{', '.join(r['models'])}]", f'    averageValue: "{value}"']
    items = next((r for r in record["recommendations"] if r["name"] == ITEMS and r["recommended"]), None)
    if items:
        lines.append(f"# or, with values.yaml's items entry as shipped: {ITEMS_TARGET_VALUE}={items['recommended']}")
    for r in record["recommendations"]:
        if r["opt_in"]:
            lines.append(f"# opt-in {r['name']} over [{', '.join(r['models'])}]: "
                         + (f"{r['recommended']} ({r['why']})" if r["recommended"] else r["why"]))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="the replica's gRPC endpoint, HOST:PORT (Triton's 8001)")
    where.add_argument("--serve", action="store_true", help="start a local pip tritonserver over --repository instead")
    p.add_argument("--metrics-url", help="the same replica's http://HOST:8002/metrics (required with --url)")
    p.add_argument("--repository", type=Path, required=True,
                   help="a local copy of the export the replica serves (read for the payloads only)")
    p.add_argument("--values", type=Path, nargs="*", default=[GPU_VALUES], help="chart values files (helm -f)")
    p.add_argument("--set", nargs="*", default=[], help="chart values (helm --set)")
    p.add_argument("--target", choices=("portable", "onnxruntime", "tensorrt"), help="default: asked from the replica")
    p.add_argument("--slo-ms", type=float, default=DEFAULT_SLO_MS, help="the p99 bound of capacity")
    p.add_argument("--payload-set", default=open_loop.PAYLOAD_SETS[0], choices=open_loop.PAYLOAD_SETS)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--step-s", type=float, default=5.0, help="seconds of load per rate the capacity search tries")
    p.add_argument("--max-steps", type=int, default=12)
    given = p.add_mutually_exclusive_group()
    given.add_argument("--capacity-qps", type=float,
                       help="override: X measured before (items/s) instead of this session's search (recorded)")
    given.add_argument("--capacity-from", type=Path,
                       help="override: X from a committed `mmrec bench` run (bench.json's capacity section) "
                            "instead of this session's search (recorded)")
    p.add_argument("--fractions", type=float, nargs="+", default=list(DEFAULT_FRACTIONS),
                   help="fractions of X to hold (u is always added)")
    p.add_argument("--headroom", type=float, help="u (default: the capacity model's, docs/deployment.md)")
    p.add_argument("--warm-s", type=float, default=10.0, help="load before each window (queues reach steady state)")
    p.add_argument("--hold-s", type=float, default=60.0, help="window per fraction (the adapter's rate window)")
    p.add_argument("--idle-s", type=float, default=5.0, help="idle window before any load")
    p.add_argument("--output", type=Path, help="write the results JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    opts = parser.parse_args(argv)
    if opts.url and not opts.metrics_url:
        parser.error("--url needs --metrics-url (the same replica's metrics endpoint)")
    if not all(0 < f <= 2 for f in opts.fractions):
        parser.error("--fractions must lie in (0, 2]")
    start = RunStart.now()
    with ExitStack() as stack:
        url, metrics_url = opts.url, opts.metrics_url
        if opts.serve:
            from .serving import running_server

            log = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hpa_calibration_"))) / "tritonserver.log"
            began = time.monotonic()
            server = stack.enter_context(running_server(opts.repository, log))
            ready_s = time.monotonic() - began  # T_load of the capacity model: start -> models loaded
            url, metrics_url = server.urls["grpc"], f"http://{server.urls['metrics']}/metrics"
        try:
            record = calibrate(opts, url, metrics_url)
            if opts.serve:
                record["replica"]["started_here"] = {"repository": str(opts.repository), "ready_s": round(ready_s, 2)}
        except (CalibrationError, hpa_signals.MetricsError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if opts.output:
        out = write_results(opts.output, json.loads(json.dumps(record, default=str)), start)
        print(f"\nwrote {out} (provenance: commit, machine, load before and after)")
    if record.get("refused"):
        print("\nrefused, no recommendation:\n" + "\n".join(f"  - {r}" for r in record["refused"]), file=sys.stderr)
        return EXIT_REFUSED
    print()
    print(chart_values_text(record))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
