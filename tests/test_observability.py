"""Alerts, the Grafana dashboard and the prometheus-adapter rules, evaluated by promtool on
metric series recorded from the real tritonserver.

One module fixture starts tritonserver with the chart's flags (portable target, as
tests/test_deploy.py does), scrapes /metrics every REAL_PERIOD_S while the mmrec client sends
real traffic in phases (idle, load, load with corrupt images that fail with INVALID_ARGUMENT,
then the server stopped), and keeps the scrapes as the series Prometheus would hold: the
ServiceMonitor's target labels, `up`, stale markers, and kube-state-metrics' replica counts
derived from Triton's readiness. Every check then runs `promtool test rules` (Prometheus'
own PromQL engine) on those series: the chart's PrometheusRule, every panel query of the
shipped dashboard, and every rule of deploy/prometheus-adapter/values.yaml rendered the way
the adapter fills its templates for a pods query.
"""
from __future__ import annotations

import copy
import json
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import pytest
import yaml

from prom_series import Recording, series_selector
from promtool_runner import check_rules, require_promtool, run_unit_tests
from test_deploy import (ADAPTER_VALUES, CHART, CPU_VALUES, LIVE_SERVER_SETS, NAMESPACE, RELEASE,
                         _server_config, helm)  # noqa: F401  (helm: the session fixture)

from mmrec.benchmarks import hpa_signals

pytestmark = pytest.mark.server

# `helm template` renders Prometheus Operator objects only when told the cluster serves them
OPERATOR_APIS = ("monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PrometheusRule")
CHART_SETS = LIVE_SERVER_SETS["none"]  # portable target, every model loaded: what the server runs
DASHBOARDS = CHART / "files" / "dashboards"
REAL_PERIOD_S = 2.0  # real seconds between scrapes; each lands one scrape interval apart
PHASES = (("idle", 4), ("load", 8), ("failing", 6), ("down", 2))  # scrapes per phase
BATCH = 4  # items per score() call
PACE_S = 0.1  # pause between calls: a steady load that leaves CPU to the server
FAIL_EVERY = 4  # in the failing phase every 4th call carries one corrupt image
SCORED_MODEL = "interest_scorer"  # the ensemble score() calls: one count per item sent
# alert timing that fits the recording (a few minutes of promtool time); thresholds stay default
TIMING_SETS = ("monitoring.prometheusRule.rateWindow=1m",
               *(f"monitoring.prometheusRule.alerts.{a}.for=30s"
                 for a in ("inferenceFailures", "queueComputeRatio", "latencyP99")),
               *(f"monitoring.prometheusRule.alerts.{a}.for=15s" for a in ("replicasUnavailable", "targetDown")),
               # a few real requests per second are a fraction of that per promtool second
               "monitoring.prometheusRule.alerts.inferenceFailures.minRequestsPerSecond:=0.01")
# thresholds any served request crosses
SENSITIVE_SETS = TIMING_SETS + ("monitoring.prometheusRule.alerts.latencyP99.sloUs=1",
                                f"monitoring.prometheusRule.alerts.latencyP99.models={{{SCORED_MODEL}}}",
                                "monitoring.prometheusRule.alerts.queueComputeRatio.threshold:=0.000001")
GRAFANA_BUILTINS = {"__rate_interval": None, "__interval": None, "__range": None}
GPU_FAMILY_PREFIX = "nv_gpu_"  # exported only by a server with a GPU: none here


# ---- rendering -----------------------------------------------------------------------------------

def render_chart(helm: str, sets: tuple[str, ...] = ()) -> list[dict]:
    cmd = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", str(CPU_VALUES)]
    for api in OPERATOR_APIS:
        cmd += ["--api-versions", api]
    for item in CHART_SETS + sets:  # KEY:=JSON for numbers that are not integers (--set makes them strings)
        key, typed, value = item.partition(":=")
        cmd += ["--set-json", f"{key}={value}"] if typed else ["--set", item]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        pytest.fail(f"helm template failed:\n{result.stderr}")
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def _one(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def _seconds(duration: str) -> int:
    """Seconds of a Prometheus duration made of one unit (15s, 1m, 2h)."""
    units = {"s": 1, "m": 60, "h": 3600}
    if len(duration) < 2 or duration[-1] not in units or not duration[:-1].isdigit():
        raise ValueError(f"unsupported duration {duration!r}")
    return int(duration[:-1]) * units[duration[-1]]


def rule_groups(docs: list[dict], annotations: bool = True) -> list[dict]:
    """The PrometheusRule's spec.groups (a Prometheus rule file); without annotations for unit
    tests, whose exp_alerts would otherwise have to spell out every rendered description."""
    groups = copy.deepcopy(_one(docs, "PrometheusRule")["spec"]["groups"])
    if not annotations:
        for group in groups:
            for rule in group["rules"]:
                rule.pop("annotations", None)
    return groups


# ---- the recording -------------------------------------------------------------------------------

@dataclass
class ScoreLoad:
    """Calls score() at a steady pace from a thread; `mode` switches between idle, load, failing."""

    client: object
    user: object
    items: list[tuple[str, bytes]]
    bad_item: tuple[str, bytes]
    mode: str = "idle"
    done: list[tuple[float, int, int]] = field(default_factory=list)  # (completed at, items ok, rejected)
    errors: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        from mmrec.client import InvalidRequestError

        calls = 0
        while not self._stop.is_set():
            if self.mode == "idle":
                self._stop.wait(0.05)
                continue
            calls += 1
            try:
                if self.mode == "failing" and calls % FAIL_EVERY == 0:
                    try:
                        self.client.score(self.user, [self.bad_item])
                        self.errors.append(AssertionError("a corrupt image was scored"))
                    except InvalidRequestError:
                        self.done.append((time.monotonic(), 0, 1))
                else:
                    start = (calls * BATCH) % len(self.items)
                    batch = (self.items * 2)[start:start + BATCH]
                    self.client.score(self.user, batch)
                    self.done.append((time.monotonic(), BATCH, 0))
            except BaseException as exc:  # reported by the fixture, not lost in the thread
                self.errors.append(exc)
                return
            self._stop.wait(PACE_S)


@dataclass
class Recorded:
    recording: Recording
    phases: dict[str, range]
    items_ok: list[int]  # items scored in the interval ending at each scrape
    rejected: list[int]  # corrupt-image calls rejected in that interval
    namespace: str
    service: str
    deployment: str
    pod: str

    def last(self, phase: str) -> int:
        return self.phases[phase][-1]

    def time(self, index: int) -> str:
        return f"{self.recording.time_s(index)}s"


def _get(url: str) -> tuple[int, str] | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return None


def _corrupt(png: bytes) -> bytes:
    """A PNG header followed by garbage: passes the client's checks, fails decoding in the server."""
    return png[:40] + b"\x00garbage" * 16


@pytest.fixture(scope="module")
def recorded(helm, exported_repository, sample_items, tmp_path_factory) -> Recorded:
    from mmrec.client import MMRecClient
    from mmrec.server import TritonServer

    docs = render_chart(helm)
    service = next(d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") != "None")
    monitor = _one(docs, "ServiceMonitor")
    deployment = _one(docs, "Deployment")
    (endpoint,) = monitor["spec"]["endpoints"]
    name = deployment["metadata"]["name"]
    pod = f"{name}-5f7d8c9b6-x2x4q"  # <deployment>-<replicaset hash>-<suffix>, as the Deployment names them
    workdir = tmp_path_factory.mktemp("observability")
    config = _server_config(docs, exported_repository, workdir)
    # what a scrape through the ServiceMonitor adds (the operator's job label is the Service's name)
    target = {"job": service["metadata"]["name"], "namespace": NAMESPACE, "service": service["metadata"]["name"],
              "pod": pod, "container": deployment["spec"]["template"]["spec"]["containers"][0]["name"],
              "endpoint": endpoint["port"], "instance": f"127.0.0.1:{config.metrics_port}"}
    ksm = {"job": "kube-state-metrics", "namespace": NAMESPACE, "deployment": name}
    hpa = {"job": "kube-state-metrics", "namespace": NAMESPACE, "horizontalpodautoscaler": name}
    recording = Recording(_seconds(endpoint["interval"]), target)
    schedule = [phase for phase, count in PHASES for _ in range(count)]
    items = [(caption, png) for caption, png, _ in sample_items[:16]]
    log = workdir / "tritonserver.log"
    scrape_times: list[float] = []
    with TritonServer(config, log_path=log, ready_timeout_s=180) as server:
        metrics_url = f"http://{server.urls['metrics']}/metrics"
        ready_url = f"http://{server.urls['http']}/v2/health/ready"
        with MMRecClient(server.urls["grpc"]) as client:
            load = ScoreLoad(client, client.user_vector(items[:4]), items, ("a corrupt image", _corrupt(items[0][1])))
            time.sleep(REAL_PERIOD_S)  # the user_vector call falls into no recorded interval's rate
            load.start()
            begin = time.monotonic()
            try:
                for index, phase in enumerate(schedule):
                    time.sleep(max(0.0, begin + index * REAL_PERIOD_S - time.monotonic()))
                    page = _get(metrics_url)
                    scrape_times.append(time.monotonic())
                    recording.add_scrape(page[1] if page and page[0] == 200 else None)
                    ready = _get(ready_url)
                    recording.add_sample("kube_deployment_spec_replicas", ksm, 1)
                    recording.add_sample("kube_deployment_status_replicas_available", ksm,
                                         1 if ready and ready[0] == 200 else 0)
                    recording.add_sample("kube_deployment_status_replicas_updated", ksm, 1)  # no rollout
                    for hpa_series in ("desired", "current"):
                        recording.add_sample(f"kube_horizontalpodautoscaler_status_{hpa_series}_replicas", hpa, 1)
                    following = schedule[index + 1] if index + 1 < len(schedule) else "down"
                    if following == "down" and phase != "down":
                        load.stop()
                        server.stop()
                    else:
                        load.mode = following
            finally:
                load.stop()
    assert not load.errors, f"the load failed: {load.errors[0]!r}"
    items_ok, rejected = [0] * len(schedule), [0] * len(schedule)
    for completed, ok, bad in load.done:
        index = next((i for i, t in enumerate(scrape_times) if t >= completed), None)
        if index is not None:
            items_ok[index] += ok
            rejected[index] += bad
    phases, start = {}, 0
    for phase, count in PHASES:
        phases[phase] = range(start, start + count)
        start += count
    assert sum(rejected) >= 3 and sum(items_ok) > 0, "the recording must hold traffic and failures"
    return Recorded(recording, phases, items_ok, rejected, NAMESPACE, target["service"], name, pod)


# a binary lookup: cheap to do twice, so the export-free tests may run before the session export is
# ready (tests/session_export.py)
SPLIT_SAFE_FIXTURES = ("promtool",)


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_promtool()


def _unit(recorded: Recorded, alert_tests: list[dict] = (), expr_tests: list[dict] = ()) -> list[dict]:
    return [{"interval": f"{recorded.recording.interval_s}s", "input_series": recorded.recording.input_series(),
             "alert_rule_test": list(alert_tests), "promql_expr_test": list(expr_tests)}]


def _assert_passes(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"promtool:\n{result.stdout}\n{result.stderr}"


# ---- alerts -------------------------------------------------------------------------------------

def _alerts(groups: list[dict]) -> dict[str, dict]:
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def _exp(rule: dict, **labels: str) -> dict:
    return {"exp_labels": {**rule.get("labels", {}), **labels}}


def test_rendered_rules_pass_promtool_check(helm, promtool, tmp_path):
    """Every expression parses and every annotation template is valid, defaults and overrides,
    and with the annotation scrape path (no `service` label: the pod-name prefix scopes it)."""
    renders = (("default", ()), ("sensitive", SENSITIVE_SETS), ("annotations", ("prometheus.scrape=annotations",)))
    for name, sets in renders:
        groups = rule_groups(render_chart(helm, sets))
        assert set(_alerts(groups)) >= {"MMRecReplicasUnavailable", "MMRecTargetDown", "MMRecInferenceFailures",
                                        "MMRecQueueComputeRatioHigh", "MMRecLatencyP99AboveSLO"}
        _assert_passes(check_rules(promtool, groups, tmp_path, name))


def test_prometheus_rule_is_selected_and_optional(helm):
    docs = render_chart(helm)
    rule = _one(docs, "PrometheusRule")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["monitoring"]["prometheusRule"]["labels"].items() <= rule["metadata"]["labels"].items()
    assert not [d for d in render_chart(helm, ("monitoring.prometheusRule.enabled=false",))
                if d["kind"] == "PrometheusRule"]
    # the p99 alert reads the summaries; without them it is left out rather than never firing
    off = rule_groups(render_chart(helm, ("triton.metrics.summaryLatencies=false",)))
    assert "MMRecLatencyP99AboveSLO" not in _alerts(off)


def test_nothing_fires_while_idle(helm, promtool, recorded, tmp_path):
    idle = recorded.time(recorded.last("idle"))
    for name, sets in (("default", TIMING_SETS), ("sensitive", SENSITIVE_SETS)):
        groups = rule_groups(render_chart(helm, sets), annotations=False)
        tests = [{"eval_time": idle, "alertname": a, "exp_alerts": []} for a in _alerts(groups)]
        _assert_passes(run_unit_tests(promtool, groups, _unit(recorded, tests), tmp_path, name,
                                      f"{recorded.recording.interval_s}s"))


def test_failure_alert_fires_in_the_window_with_failures(helm, promtool, recorded, tmp_path):
    groups = rule_groups(render_chart(helm, TIMING_SETS), annotations=False)
    rule = _alerts(groups)["MMRecInferenceFailures"]
    firing = [_exp(rule, namespace=recorded.namespace, service=recorded.service, model=SCORED_MODEL)]
    tests = [{"eval_time": recorded.time(recorded.last("load")), "alertname": rule["alert"], "exp_alerts": []},
             {"eval_time": recorded.time(recorded.last("failing")), "alertname": rule["alert"], "exp_alerts": firing}]
    _assert_passes(run_unit_tests(promtool, groups, _unit(recorded, tests), tmp_path, "failures",
                                  f"{recorded.recording.interval_s}s"))


def test_failure_alert_stays_silent_below_the_request_rate_floor(helm, promtool, recorded, tmp_path):
    """The same failures at a floor above the recorded traffic: too few requests to page."""
    groups = rule_groups(render_chart(helm, TIMING_SETS + (
        "monitoring.prometheusRule.alerts.inferenceFailures.minRequestsPerSecond:=1000",)), annotations=False)
    tests = [{"eval_time": recorded.time(recorded.last("failing")), "alertname": a, "exp_alerts": []}
             for a in ("MMRecInferenceFailures", "MMRecRequestsShed")]
    _assert_passes(run_unit_tests(promtool, groups, _unit(recorded, tests), tmp_path, "floor",
                                  f"{recorded.recording.interval_s}s"))


def test_latency_and_queue_alerts_follow_their_thresholds(helm, promtool, recorded, tmp_path):
    """Under load: silent at the chart's SLO and threshold, firing at ones any request crosses."""
    at_load = recorded.time(recorded.last("load"))
    interval = f"{recorded.recording.interval_s}s"
    default = rule_groups(render_chart(helm, TIMING_SETS), annotations=False)
    tests = [{"eval_time": at_load, "alertname": a, "exp_alerts": []}
             for a in ("MMRecLatencyP99AboveSLO", "MMRecQueueComputeRatioHigh")]
    _assert_passes(run_unit_tests(promtool, default, _unit(recorded, tests), tmp_path, "default", interval))
    sensitive = rule_groups(render_chart(helm, SENSITIVE_SETS), annotations=False)
    p99, queue = _alerts(sensitive)["MMRecLatencyP99AboveSLO"], _alerts(sensitive)["MMRecQueueComputeRatioHigh"]
    scope = {"namespace": recorded.namespace, "service": recorded.service}
    tests = [{"eval_time": at_load, "alertname": p99["alert"],
              "exp_alerts": [_exp(p99, **scope, pod=recorded.pod, model=SCORED_MODEL)]},
             {"eval_time": at_load, "alertname": queue["alert"], "exp_alerts": [_exp(queue, **scope)]}]
    _assert_passes(run_unit_tests(promtool, sensitive, _unit(recorded, tests), tmp_path, "sensitive", interval))


def test_down_pod_fires_target_and_replica_alerts(helm, promtool, recorded, tmp_path):
    groups = rule_groups(render_chart(helm, TIMING_SETS), annotations=False)
    alerts = _alerts(groups)
    down, replicas = alerts["MMRecTargetDown"], alerts["MMRecReplicasUnavailable"]
    tests = []
    for index, firing in ((recorded.last("failing"), False), (recorded.last("down"), True)):
        tests += [{"eval_time": recorded.time(index), "alertname": down["alert"],
                   "exp_alerts": [_exp(down, namespace=recorded.namespace, service=recorded.service,
                                       pod=recorded.pod)] if firing else []},
                  {"eval_time": recorded.time(index), "alertname": replicas["alert"],
                   "exp_alerts": [_exp(replicas, namespace=recorded.namespace,
                                       deployment=recorded.deployment)] if firing else []}]
    _assert_passes(run_unit_tests(promtool, groups, _unit(recorded, tests), tmp_path, "down",
                                  f"{recorded.recording.interval_s}s"))


# ---- alerts on synthesized series: rollouts, slow starts, shedding -------------------------------
# Minutes of cluster life no single tritonserver run shows, as kube-state-metrics and Prometheus
# would record them; the rules are the chart's defaults (for, windows, thresholds).

SYNTHETIC_INTERVAL = "1m"


def _per_minute(*segments: tuple[float, int]) -> str:
    """promtool values, one a minute: (value, minutes) segments in order."""
    return " ".join(f"{value:g}" for value, minutes in segments for _ in range(minutes))


def _synthetic(series: dict[str, str], alert_tests: list[dict]) -> list[dict]:
    return [{"interval": SYNTHETIC_INTERVAL, "input_series": [{"series": k, "values": v} for k, v in series.items()],
             "alert_rule_test": alert_tests}]


def _rollout_step_minutes(docs: list[dict]) -> int:
    """A rollout step at its slowest as the rendered pods allow it: an old pod's grace period,
    then a new pod using its whole startup probe budget."""
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    startup = pod["containers"][0]["startupProbe"]
    seconds = pod["terminationGracePeriodSeconds"] + startup["periodSeconds"] * startup["failureThreshold"]
    return -(-seconds // 60)


def test_replicas_alert_waits_out_a_rollout_and_fires_when_stuck(helm, promtool, tmp_path):
    """maxUnavailable 1 on 3 replicas: available stays at 2 for the whole rollout, far past the
    alert's `for`, while each step (as slow as the pods may start) moves the updated count: no
    alert. The same shortfall with the updated count frozen (a new pod that never becomes
    ready, a scale-out left Pending) fires."""
    docs = render_chart(helm)
    groups = rule_groups(docs, annotations=False)
    rule = _alerts(groups)["MMRecReplicasUnavailable"]
    step, replicas, start = _rollout_step_minutes(docs), 3, 5
    end = start + replicas * step  # the last new pod ready
    total = end + 60
    name = _one(docs, "Deployment")["metadata"]["name"]
    ksm = {"job": "kube-state-metrics", "namespace": NAMESPACE}
    rollout, stuck = {**ksm, "deployment": name}, {**ksm, "deployment": f"{name}-stuck"}
    series = {}
    for labels, updated in ((rollout, [(replicas, start)] + [(k, step) for k in range(1, replicas + 1)]),
                            (stuck, [(replicas, start), (1, total - start)])):
        series[series_selector("kube_deployment_spec_replicas", labels)] = _per_minute((replicas, total))
        available = [(replicas, start), (replicas - 1, (end if labels is rollout else total) - start)]
        series[series_selector("kube_deployment_status_replicas_available", labels)] = _per_minute(
            *available, *([(replicas, total - end)] if labels is rollout else []))
        series[series_selector("kube_deployment_status_replicas_updated", labels)] = _per_minute(
            *updated, *([(replicas, total - end)] if labels is rollout else []))
    # the stuck Deployment is not this release's: the rule selects by name, so retarget it
    stuck_groups = rule_groups(render_chart(helm, (f"fullnameOverride={name}-stuck",)), annotations=False)
    minutes = range(start, total, 5)
    tests = [{"eval_time": f"{m}m", "alertname": rule["alert"], "exp_alerts": []} for m in minutes]
    _assert_passes(run_unit_tests(promtool, groups, _synthetic(series, tests), tmp_path, "rollout", SYNTHETIC_INTERVAL))
    firing = [_exp(rule, namespace=NAMESPACE, deployment=f"{name}-stuck")]
    tests = [{"eval_time": f"{start + 2}m", "alertname": rule["alert"], "exp_alerts": []},
             {"eval_time": f"{total - 1}m", "alertname": rule["alert"], "exp_alerts": firing}]
    _assert_passes(run_unit_tests(promtool, stuck_groups, _synthetic(series, tests), tmp_path, "stuck",
                                  SYNTHETIC_INTERVAL))
    assert end - start > 2 * _seconds(rule["for"]) // 60, "the rollout must outlast the alert's `for`"


def test_target_alert_spares_starting_pods_and_fires_for_a_pod_that_went_down(helm, promtool, tmp_path):
    """Triton opens its metrics port only once its models loaded: a pod that starts for longer
    than the alert's `for` is down all that time, and must not alert. A pod that was up and
    then stopped answering fires."""
    docs = render_chart(helm)
    groups = rule_groups(docs, annotations=False)
    rule = _alerts(groups)["MMRecTargetDown"]
    name = _one(docs, "Deployment")["metadata"]["name"]
    service = next(d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") != "None")
    target = {"job": service["metadata"]["name"], "namespace": NAMESPACE, "service": service["metadata"]["name"]}
    slow, fell = f"{name}-6c9f7d8b5-s10w1", f"{name}-6c9f7d8b5-d0wn2"
    start_minutes = _rollout_step_minutes(docs)  # as long as the startup probe lets a pod start
    up_for, down_for = 10, 20
    series = {series_selector("up", {**target, "pod": slow}): _per_minute((0, start_minutes), (1, 20)),
              series_selector("up", {**target, "pod": fell}): _per_minute((1, up_for), (0, down_for))}
    tests = [{"eval_time": f"{m}m", "alertname": rule["alert"], "exp_alerts": []}
             for m in range(1, up_for + _seconds(rule["for"]) // 60)]
    tests.append({"eval_time": f"{up_for + down_for - 1}m", "alertname": rule["alert"],
                  "exp_alerts": [_exp(rule, namespace=NAMESPACE, service=target["service"], pod=fell)]})
    assert start_minutes > _seconds(rule["for"]) // 60, "the start must outlast the alert's `for`"
    _assert_passes(run_unit_tests(promtool, groups, _synthetic(series, tests), tmp_path, "starts", SYNTHETIC_INTERVAL))


def test_shedding_is_its_own_warning_and_low_traffic_failures_do_not_page(helm, promtool, tmp_path):
    """Requests Triton rejected (queue policy) raise MMRecRequestsShed, a warning, not the
    failure alert; a model failing half of a trickle of requests stays below the rate floor;
    the same share at real traffic fires MMRecInferenceFailures."""
    docs = render_chart(helm)
    groups = rule_groups(docs, annotations=False)
    alerts = _alerts(groups)
    failures, shed = alerts["MMRecInferenceFailures"], alerts["MMRecRequestsShed"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())["monitoring"]["prometheusRule"]["alerts"]
    floor_per_minute = values["inferenceFailures"]["minRequestsPerSecond"] * 60
    service = next(d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") != "None")
    scope = {"namespace": NAMESPACE, "service": service["metadata"]["name"]}
    minutes, series = 40, {}
    # per minute: (successes, failures by reason); counters grow linearly
    traffic = {"interest_scorer": (600, {"REJECTED": 60, "BACKEND": 0}),  # shedding under overload
               "scorer": (floor_per_minute / 4, {"REJECTED": 0, "BACKEND": floor_per_minute / 4}),  # a trickle
               "tokenizer": (600, {"REJECTED": 0, "BACKEND": 120})}  # failing at traffic
    for model, (ok, failed) in traffic.items():
        series[series_selector("nv_inference_request_success", {**scope, "model": model})] = f"0+{ok:g}x{minutes}"
        for reason, count in failed.items():
            series[series_selector("nv_inference_request_failure", {**scope, "model": model, "reason": reason})] = \
                f"0+{count:g}x{minutes}"
    at = f"{minutes - 1}m"
    tests = [{"eval_time": at, "alertname": shed["alert"], "exp_alerts": [_exp(shed, **scope, model="interest_scorer")]},
             {"eval_time": at, "alertname": failures["alert"],
              "exp_alerts": [_exp(failures, **scope, model="tokenizer")]}]
    assert shed["labels"]["severity"] == "warning"
    _assert_passes(run_unit_tests(promtool, groups, _synthetic(series, tests), tmp_path, "shed", SYNTHETIC_INTERVAL))


# ---- prometheus-adapter rules ------------------------------------------------------------------

ADAPTER_RULES = {r["name"]["as"]: r for r in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]}
# models an HPA would select for a rule whose value the test knows: each scored item once
RULE_MODELS = {"triton_items_per_second": (SCORED_MODEL,), "triton_request_p99_us": (SCORED_MODEL,)}
ADAPTER_FIELDS = ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>")


def render_adapter_query(template: str, series: str, matchers: str, group_by: str) -> str:
    """A metricsQuery as prometheus-adapter fills it for a pods query (its Go template fields)."""
    query = template
    for placeholder, value in zip(ADAPTER_FIELDS, (series, matchers, group_by)):
        query = query.replace(placeholder, value)
    if "<<" in query:
        raise ValueError(f"metricsQuery uses a template field this test does not fill: {template!r}")
    return query


def _window_s(query: str) -> int:
    """The one range of the query's range selectors, in seconds."""
    windows = {_seconds(w) for w in re.findall(r"\[(\d+[smh])\]", query)}
    if len(windows) != 1:
        raise ValueError(f"expected one rate window in {query!r}, found {sorted(windows)}")
    return windows.pop()


def _traffic_models(recorded: Recorded) -> tuple[str, ...]:
    rec, last = recorded.recording, recorded.last("failing")
    return tuple(sorted(m for m in rec.label_values("nv_inference_request_success", "model")
                        if (rec.value("nv_inference_request_success", last, model=m) or 0) > 0))


@pytest.mark.parametrize("metric", sorted(ADAPTER_RULES))
def test_adapter_rule_evaluates_on_recorded_series(promtool, recorded, tmp_path, metric):
    """Each rule's seriesQuery finds the recorded series and its metricsQuery, filled in as the
    adapter fills it, gives one finite value per pod; rules whose value the traffic fixes are
    checked against it (items sent, queueing rising from idle, the recorded p99, nothing shed)."""
    rule = ADAPTER_RULES[metric]
    series = rule["seriesQuery"].partition("{")[0]
    assert re.fullmatch(rule["name"]["matches"], series), f"{metric}: name.matches does not match {series}"
    models = RULE_MODELS.get(metric, _traffic_models(recorded))
    matchers = f'namespace="{recorded.namespace}",pod=~"{recorded.pod}",model=~"{"|".join(models)}"'
    query = render_adapter_query(rule["metricsQuery"], series, matchers, "pod")
    pod = series_selector("", {"pod": recorded.pod})
    idle, load, failing = (recorded.time(recorded.last(p)) for p in ("idle", "load", "failing"))
    tests = [{"expr": f"count({rule['seriesQuery']}) > bool 0", "eval_time": failing,
              "exp_samples": [{"labels": "{}", "value": 1}]},
             {"expr": f"(({query}) == ({query})) * 0 + 1", "eval_time": failing,
              "exp_samples": [{"labels": pod, "value": 1}]}]
    if metric == "triton_items_per_second":
        window = _window_s(query)
        k, last = window // recorded.recording.interval_s, recorded.last("load")
        sent = sum(recorded.items_ok[last - k + 1:last + 1])
        assert sent > 0
        tolerance = 2 * BATCH  # a call completing around a scrape may land in the next interval
        tests += [{"expr": query, "eval_time": idle, "exp_samples": [{"labels": pod, "value": 0}]},
                  {"expr": f"abs(({query}) * {window} - {sent}) <= bool {tolerance}", "eval_time": load,
                   "exp_samples": [{"labels": pod, "value": 1}]}]
    elif metric in ("triton_queue_compute_ratio", "triton_busy_fraction"):  # 0 idle, rising under load
        tests += [{"expr": query, "eval_time": idle, "exp_samples": [{"labels": pod, "value": 0}]},
                  {"expr": f"({query}) > bool 0", "eval_time": load, "exp_samples": [{"labels": pod, "value": 1}]}]
    elif metric == "triton_request_p99_us":
        p99 = recorded.recording.value("nv_inference_request_summary_us", recorded.last("load"),
                                       model=SCORED_MODEL, quantile="0.99")
        assert p99 is not None and p99 > 0
        tests.append({"expr": query, "eval_time": load, "exp_samples": [{"labels": pod, "value": p99}]})
    elif metric == "triton_shed_per_second":  # no admission policy ran: nothing was shed
        tests.append({"expr": query, "eval_time": failing, "exp_samples": [{"labels": pod, "value": 0}]})
    _assert_passes(run_unit_tests(promtool, [], _unit(recorded, expr_tests=tests), tmp_path, metric,
                                  f"{recorded.recording.interval_s}s"))


def _promtool_ranges_are_left_open(promtool: str) -> bool:
    """Prometheus 3 made range selectors left-open ((t - w, t]); 2.x includes the sample at t - w."""
    done = subprocess.run([promtool, "--version"], capture_output=True, text=True)
    found = re.search(r"version (\d+)\.", done.stdout + done.stderr)
    if not found:
        raise RuntimeError(f"cannot read promtool's version: {done.stdout!r} {done.stderr!r}")
    return int(found.group(1)) >= 3


def _snapshot(recording: Recording, index: int) -> hpa_signals.Snapshot:
    """hpa_signals' view of scrape `index`: the families its twins read, per model (and reason)."""
    values = {}
    for family in hpa_signals.FAMILIES:
        reasons = recording.label_values(family, "reason") or {""}
        for model in recording.label_values(family, "model"):
            for reason in reasons:
                value = recording.value(family, index, model=model, **({"reason": reason} if reason else {}))
                if value is not None:
                    values[(family, model, reason)] = value
    return hpa_signals.Snapshot(float(recording.time_s(index)), values)


TWIN_RELATIVE_TOLERANCE = 1e-6  # float formatting of the series; the arithmetic is the same


@pytest.mark.parametrize("metric", sorted(set(ADAPTER_RULES) & {"triton_items_per_second", "triton_busy_fraction",
                                                                "triton_queue_compute_ratio", "triton_shed_per_second"}))
def test_adapter_rule_equals_its_python_twin(promtool, recorded, tmp_path, metric):
    """benchmarks/hpa_signals.py computes each rule's value for the calibration tool: on the
    recorded series, promtool's value of the rule (as the adapter fills it) equals the twin's on
    the same scrapes. rate() over a window whose first sample sits on its start (or one scrape
    in, extrapolated to it) is the counter's delta over the sampled span, as the twin takes it."""
    assert set(hpa_signals.SIGNALS) <= set(ADAPTER_RULES), "a Python twin without an adapter rule"
    rule = ADAPTER_RULES[metric]
    series = rule["seriesQuery"].partition("{")[0]
    models = RULE_MODELS.get(metric, _traffic_models(recorded))
    matchers = f'namespace="{recorded.namespace}",pod=~"{recorded.pod}",model=~"{"|".join(models)}"'
    query = render_adapter_query(rule["metricsQuery"], series, matchers, "pod")
    pod = series_selector("", {"pod": recorded.pod})
    k = _window_s(query) // recorded.recording.interval_s
    first = 1 if _promtool_ranges_are_left_open(promtool) else 0
    tests, seen = [], []
    for phase in ("load", "failing"):
        last = recorded.last(phase)
        assert last - k >= 0, f"the {phase} phase ends before one full rate window"
        twin = hpa_signals.evaluate(metric, _snapshot(recorded.recording, last - k + first),
                        _snapshot(recorded.recording, last), models)
        seen.append(twin)
        bound = TWIN_RELATIVE_TOLERANCE * abs(twin) + 1e-9
        tests.append({"expr": f"abs(({query}) - {twin!r}) <= bool {bound!r}", "eval_time": recorded.time(last),
                      "exp_samples": [{"labels": pod, "value": 1}]})
    if metric != "triton_shed_per_second":  # nothing was shed: 0 is the twin's value there
        assert seen[0] > 0, f"{metric}'s twin reads 0 under load: the comparison would be vacuous"
    _assert_passes(run_unit_tests(promtool, [], _unit(recorded, expr_tests=tests), tmp_path, f"twin-{metric}",
                                  f"{recorded.recording.interval_s}s"))


# ---- the Grafana dashboard ----------------------------------------------------------------------

def _dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def _targets(dashboard: dict) -> list[tuple[dict, dict]]:
    return [(panel, target) for panel in dashboard["panels"] if panel["type"] != "row"
            for target in panel["targets"]]


def _variables(dashboard: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def test_dashboards_are_valid_and_shipped_with_the_sidecar_label(helm):
    dashboards = _dashboards()
    assert dashboards, f"no dashboard in {DASHBOARDS}"
    configmap = next(d for d in render_chart(helm)
                     if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboards"))
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert {name: json.loads(text) for name, text in configmap["data"].items()} == dashboards
    assert len({d["uid"] for d in dashboards.values()}) == len(dashboards)
    for name, dashboard in dashboards.items():
        assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int), name
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: panel ids repeat"
        variables = _variables(dashboard)
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        for panel in dashboard["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
            if panel["type"] == "row":
                continue
            assert panel["title"] and panel["targets"], f"{name}: panel {panel['id']} has no title or targets"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert len(ref_ids) == len(set(ref_ids)) and all(t["expr"].strip() for t in panel["targets"])
        for panel, target in _targets(dashboard):
            used = set(re.findall(r"\$\{?(\w+)", target["expr"]))
            unknown = used - set(variables) - set(GRAFANA_BUILTINS)
            assert not unknown, f"{name}/{panel['title']}: undefined variables {sorted(unknown)}"


def _substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variable interpolation for the names the dashboards use."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    if "$" in expr:
        raise ValueError(f"unsubstituted variable left in {expr!r}")
    return expr


def test_dashboard_queries_return_data_on_recorded_series(promtool, recorded, tmp_path):
    """Every panel query parses (promtool check rules) and, with the variables at this release's
    values and the model variable at All, returns finite samples while traffic and failures flow.
    GPU families are the exception: the recorded server has no GPU, so they only need to parse."""
    rate_interval = f"{4 * recorded.recording.interval_s}s"  # Grafana: max(4 x scrape interval, ...)
    values = {"namespace": recorded.namespace, "service": recorded.service, "model": ".*",
              "__rate_interval": rate_interval}
    at = recorded.time(recorded.last("failing"))
    for name, dashboard in _dashboards().items():
        exprs = {f"p{panel['id']}_{target['refId']}": (panel["title"], _substitute(target["expr"], values))
                 for panel, target in _targets(dashboard)}
        records = [{"record": f"mmrec_dashboard:{key}", "expr": expr} for key, (_, expr) in exprs.items()]
        _assert_passes(check_rules(promtool, [{"name": "dashboard", "rules": records}], tmp_path, name))
        tests = [{"expr": f"count(({expr}) == ({expr})) > bool 0", "eval_time": at,
                  "exp_samples": [{"labels": "{}", "value": 1}]}
                 for title, expr in exprs.values() if GPU_FAMILY_PREFIX not in expr]
        # the variables' own queries resolve to this release (label_values(selector, label), its
        # values through the variable's regex capture as Grafana applies it)
        expected = {"namespace": [recorded.namespace], "service": [recorded.service],
                    "model": sorted(recorded.recording.label_values("nv_inference_count", "model"))}
        for variable in _variables(dashboard).values():
            if variable["type"] != "query":
                continue
            query = variable["query"]["query"]
            selector, _, label = query.removeprefix("label_values(").removesuffix(")").rpartition(",")
            regex = variable.get("regex", "").removeprefix("/").removesuffix("/") or "(.*)"
            series = f'label_replace({_substitute(selector, values)}, "value", "$1", "{label.strip()}", "{regex}")'
            tests.append({"expr": f"count by (value) ({series}) > bool 0", "eval_time": at,
                          "exp_samples": [{"labels": series_selector("", {"value": v}), "value": 1}
                                          for v in expected[variable["name"]]]})
        _assert_passes(run_unit_tests(promtool, [], _unit(recorded, expr_tests=tests), tmp_path,
                                      name.removesuffix(".json"), f"{recorded.recording.interval_s}s"))
        # prometheus.scrape=annotations: the same series without the ServiceMonitor's `service`
        unit = _unit(recorded, expr_tests=tests)
        service = f'service="{recorded.service}"'
        for series in unit[0]["input_series"]:
            series["series"] = series["series"].replace(f",{service}", "").replace(f"{service},", "")
        assert not any(service in series["series"] for series in unit[0]["input_series"])
        _assert_passes(run_unit_tests(promtool, [], unit, tmp_path, name.removesuffix(".json") + "-annotations",
                                      f"{recorded.recording.interval_s}s"))
