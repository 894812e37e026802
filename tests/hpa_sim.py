"""The Kubernetes HPA v2 controller for `type: Pods` metrics, modelled to test the chart's HPA offline.

Follows upstream's algorithm: kubernetes.io "Horizontal Pod Autoscaling", section "Algorithm
details", and its code in kubernetes/kubernetes pkg/controller/podautoscaler:

* replica_calculator.go `calcPlainMetricReplicas` + `groupPods` (Pods metrics, AverageValue):
  pods with a deletion timestamp or Failed are dropped; Pending pods are set aside ("ignored");
  Running pods without a metric are "missing"; usageRatio = mean(metric of the others) / target.
  With nothing set aside or missing: within the tolerance (|ratio - 1| <= 0.1) keep the current
  count, else ceil(ratio * readyPodCount). Otherwise missing pods count as the target on a
  scale-down and as 0 on a scale-up, set-aside pods as 0 on a scale-up, the ratio is computed
  again, and the count stays if it is now within the tolerance or the direction flipped;
  else ceil(newRatio * pods counted).
* horizontal.go `computeReplicasForMetrics`: the largest proposal over the metrics; when every
  metric lacks values, or some do and the rest would scale down, the sync changes nothing.
* horizontal.go `reconcileAutoscaler`: current above maxReplicas -> max, below minReplicas ->
  min; otherwise `normalizeDesiredReplicasWithBehaviors`: `stabilizeRecommendationWithBehaviors`
  (the new count is bounded below by the smallest recommendation within the scale-up
  stabilization window and above by the largest within the scale-down window, the unstabilized
  recommendation being recorded every sync) then `convertDesiredReplicasWithBehaviorRate` with
  `calculateScaleUpLimitWithScalingRules` / `calculateScaleDownLimitWithBehaviors` (each policy
  allows `periodStartReplicas ± value` (Pods) or `× (1 ± value/100)` (Percent) where
  periodStartReplicas = current - added + removed within its periodSeconds; selectPolicy Max
  takes the most permissive, Min the least, Disabled none), and min/max replicas.
* The controller runs every `--horizontal-pod-autoscaler-sync-period` (15 s by default).
  Defaults for a behavior field the chart leaves out are upstream's (`DefaultHPAScalingRules`):
  scale-up window 0 s, policies 100 % or 4 pods per 15 s, Max; scale-down window 300 s, 100 % per 15 s.

Around it, a small cluster: a new pod is Pending while its node is found and its image is
pulled (set aside by the controller), then Running without metrics while Triton loads
the models (tritonserver opens its metrics port once loading is done: "missing"), then ready; a
ready pod has a metric once the adapter's `rate(...[2m])` has two scrapes of it,
the Service spreads the offered load evenly over ready pods (open loop: what a pod cannot
complete queues up, a request waiting at most its client's deadline), and scale-down removes
pending pods first, then the newest. What each pod's signal is at a given load is the caller's
`ReplicaModel` (tests/test_autoscaling.py builds it from measured results).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

TOLERANCE = 0.1  # --horizontal-pod-autoscaler-tolerance
SYNC_PERIOD_S = 15.0  # --horizontal-pod-autoscaler-sync-period
SCRAPE_INTERVAL_S = 15.0  # the chart's ServiceMonitor interval
RATE_WINDOW_S = 120.0  # the adapter rules' rate(...[2m]) (tests/test_autoscaling.py checks they agree)


# --------------------------------------------------------------------------- the HPA object


@dataclass(frozen=True)
class Policy:
    kind: str  # "Pods" | "Percent"
    value: int
    period_s: float


@dataclass(frozen=True)
class Rules:
    """One direction of spec.behavior (HPAScalingRules)."""

    window_s: float
    policies: tuple[Policy, ...]
    select: str = "Max"  # Max | Min | Disabled

    @classmethod
    def from_spec(cls, spec: Mapping | None, default: "Rules") -> "Rules":
        spec = spec or {}
        policies = tuple(Policy(p["type"], int(p["value"]), float(p["periodSeconds"]))
                         for p in spec.get("policies", ())) or default.policies
        return cls(float(spec.get("stabilizationWindowSeconds", default.window_s)), policies,
                   spec.get("selectPolicy", default.select))

    @property
    def longest_period_s(self) -> float:
        return max(p.period_s for p in self.policies)


DEFAULT_UP = Rules(0.0, (Policy("Percent", 100, 15.0), Policy("Pods", 4, 15.0)), "Max")
DEFAULT_DOWN = Rules(300.0, (Policy("Percent", 100, 15.0),), "Max")


@dataclass(frozen=True)
class PodsMetric:
    name: str
    target: float  # averageValue


@dataclass(frozen=True)
class HPASpec:
    min_replicas: int
    max_replicas: int
    metrics: tuple[PodsMetric, ...]
    up: Rules
    down: Rules

    @classmethod
    def from_manifest(cls, hpa: Mapping, quantity: Callable[[str], float]) -> "HPASpec":
        """From a rendered HorizontalPodAutoscaler (autoscaling/v2). Only Pods metrics are
        modelled: any other kind is an error, so a test cannot drop one silently."""
        spec = hpa["spec"]
        metrics = []
        for m in spec["metrics"]:
            if m["type"] != "Pods" or m["pods"]["target"]["type"] != "AverageValue":
                raise ValueError(f"only Pods/AverageValue metrics are modelled, got {m['type']}")
            metrics.append(PodsMetric(m["pods"]["metric"]["name"], quantity(m["pods"]["target"]["averageValue"])))
        behavior = spec.get("behavior") or {}
        return cls(int(spec.get("minReplicas", 1)), int(spec["maxReplicas"]), tuple(metrics),
                   Rules.from_spec(behavior.get("scaleUp"), DEFAULT_UP),
                   Rules.from_spec(behavior.get("scaleDown"), DEFAULT_DOWN))


# --------------------------------------------------------------------------- the controller


@dataclass(frozen=True)
class PodView:
    """What the controller sees of a pod: its name, phase and whether the metric has a value."""

    name: str
    pending: bool


def replicas_for_metric(current: int, pods: Sequence[PodView], values: Mapping[str, float], target: float,
                        tolerance: float = TOLERANCE) -> int | None:
    """calcPlainMetricReplicas; None where no counted pod has a metric (upstream: an error,
    which leaves this metric out of the max)."""
    ignored = {p.name for p in pods if p.pending}
    missing = {p.name for p in pods if not p.pending and p.name not in values}
    metrics = {p.name: values[p.name] for p in pods if not p.pending and p.name in values}
    ready = len(metrics)
    if not metrics:
        return None
    ratio = sum(metrics.values()) / len(metrics) / target
    rebalance_ignored = bool(ignored) and ratio > 1.0
    if not rebalance_ignored and not missing:
        if abs(1.0 - ratio) <= tolerance:
            return current
        return math.ceil(ratio * ready)
    if missing:
        fill = target if ratio < 1.0 else 0.0
        metrics.update({name: fill for name in missing})
    if rebalance_ignored:
        metrics.update({name: 0.0 for name in ignored})
    new_ratio = sum(metrics.values()) / len(metrics) / target
    if abs(1.0 - new_ratio) <= tolerance or (ratio < 1.0 < new_ratio) or (ratio > 1.0 > new_ratio):
        return current
    return math.ceil(new_ratio * len(metrics))


@dataclass
class Controller:
    """One HPA's controller state: recorded recommendations and scale events (horizontal.go)."""

    spec: HPASpec
    tolerance: float = TOLERANCE
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    up_events: list[tuple[float, int]] = field(default_factory=list)
    down_events: list[tuple[float, int]] = field(default_factory=list)

    def reconcile(self, now: float, current: int, pods: Sequence[PodView],
                  metrics: Mapping[str, Mapping[str, float]]) -> int:
        """The replica count this sync sets (records a scale event when it changes)."""
        s = self.spec
        if current > s.max_replicas:
            desired = s.max_replicas
        elif current < s.min_replicas:
            desired = s.min_replicas
        else:
            proposals = [replicas_for_metric(current, pods, metrics.get(m.name, {}), m.target, self.tolerance)
                         for m in s.metrics]
            valid = [p for p in proposals if p is not None]
            # computeReplicasForMetrics: with every metric invalid, or some invalid and the others
            # asking for fewer pods, the sync errors out and nothing changes (nothing recorded)
            if not valid or (len(valid) < len(proposals) and max(valid) < current):
                return current
            desired = self._rate_limited(now, current, self._stabilized(now, current, max(valid)))
        if desired > current:
            self.up_events.append((now, desired - current))
        elif desired < current:
            self.down_events.append((now, current - desired))
        return desired

    def _stabilized(self, now: float, current: int, desired: int) -> int:
        up_cut, down_cut = now - self.spec.up.window_s, now - self.spec.down.window_s
        up, down = desired, desired
        for t, rec in self.recommendations:
            if t > up_cut:
                up = min(up, rec)
            if t > down_cut:
                down = max(down, rec)
        self.recommendations = [(t, r) for t, r in self.recommendations if t > min(up_cut, down_cut)]
        self.recommendations.append((now, desired))
        return min(max(current, up), down)

    @staticmethod
    def _changed(events: Sequence[tuple[float, int]], now: float, period_s: float) -> int:
        return sum(change for t, change in events if t > now - period_s)

    def _limit(self, now: float, current: int, rules: Rules, up: bool) -> int:
        if rules.select == "Disabled":
            return current
        limits = []
        for p in rules.policies:
            start = current - self._changed(self.up_events, now, p.period_s) + \
                self._changed(self.down_events, now, p.period_s)
            if up:
                limits.append(start + p.value if p.kind == "Pods" else math.ceil(start * (1 + p.value / 100)))
            else:
                limits.append(start - p.value if p.kind == "Pods" else int(start * (1 - p.value / 100)))
        most = max if up else min  # Max: the most permissive change
        return (most if rules.select == "Max" else (min if up else max))(limits)

    def _rate_limited(self, now: float, current: int, desired: int) -> int:
        s = self.spec
        if desired > current:
            allowed = min(s.max_replicas, max(current, self._limit(now, current, s.up, up=True)))
            return min(desired, allowed)
        if desired < current:
            allowed = max(s.min_replicas, min(current, self._limit(now, current, s.down, up=False)))
            return max(desired, allowed)
        return desired


# --------------------------------------------------------------------------- the cluster


class ReplicaModel:
    """A pod's signals as functions of the items/s it is offered and of the seconds its backlog
    adds to a request's wait (`signal(name, load, backlog_s)`); `max_items_s`: the most it completes."""

    max_items_s: float
    max_wait_s: float  # a client deadline: a request waits no longer (it is abandoned)

    def signal(self, name: str, load: float, backlog_s: float) -> float:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class Pod:
    name: str
    running_at: float  # Pending before (pull, init container)
    ready_at: float  # Running without metrics before (models loading)
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    backlog: float = 0.0  # items queued beyond what the pod completes (open-loop overload)

    def pending(self, now: float) -> bool:
        return now < self.running_at

    def ready(self, now: float) -> bool:
        return now >= self.ready_at

    def metric(self, name: str, now: float) -> float | None:
        """The adapter's rate over its window: the mean of the per-scrape-interval values
        in the window; none until two scrapes of the ready pod exist."""
        recent = [values[name] for t, values in self.samples if t > now - RATE_WINDOW_S]
        return sum(recent) / len(recent) if len(self.samples) >= 2 and recent else None


@dataclass
class Step:
    t: float
    load: float
    replicas: int
    ready: int
    metrics: dict[str, float]  # the mean over pods with a value, per metric


@dataclass
class Simulation:
    """Offered load -> pods' signals -> the controller -> pods, every 15 s."""

    spec: HPASpec
    model: ReplicaModel
    load: Callable[[float], float]  # items/s offered to the Service at time t
    # image pull onto a node with room (cached layers; the image carries the python deps). A pod
    # that needs a new GPU node waits for its provisioning too, minutes more: pass pending_s.
    pending_s: float = 90.0
    loading_s: float = 60.0  # repository copy + model load until the readiness probe passes
    noise: float = 0.0  # relative std. dev. of each pod's share of the load per scrape
    seed: int = 0
    initial_replicas: int | None = None
    timeline: list[Step] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.controller = Controller(self.spec)
        self._next = 0
        self.pods = [self._new_pod(-3600.0) for _ in range(self.initial_replicas or self.spec.min_replicas)]

    def _new_pod(self, now: float) -> Pod:
        self._next += 1
        return Pod(f"pod-{self._next}", now + self.pending_s, now + self.pending_s + self.loading_s)

    def _scrape(self, now: float) -> None:
        ready = [p for p in self.pods if p.ready(now)]
        mu = self.model.max_items_s
        for pod in ready:
            share = self.load(now) / len(ready) * max(0.0, 1 + self.rng.gauss(0, self.noise))
            # open loop: arrivals beyond what the pod completes queue up, up to the clients' deadline
            pod.backlog = min(max(0.0, pod.backlog + (share - mu) * SCRAPE_INTERVAL_S), mu * self.model.max_wait_s)
            pod.samples.append((now, {m.name: self.model.signal(m.name, share, pod.backlog / mu)
                                      for m in self.spec.metrics}))
            pod.samples = pod.samples[-math.ceil(RATE_WINDOW_S / SCRAPE_INTERVAL_S) - 1:]

    def run(self, seconds: float) -> list[Step]:
        now = self.timeline[-1].t + SYNC_PERIOD_S if self.timeline else 0.0
        end = now + seconds
        while now < end:
            self._scrape(now)
            views = [PodView(p.name, p.pending(now)) for p in self.pods]
            metrics = {m.name: {p.name: v for p in self.pods if p.ready(now)
                                for v in [p.metric(m.name, now)] if v is not None} for m in self.spec.metrics}
            desired = self.controller.reconcile(now, len(self.pods), views, metrics)
            if desired > len(self.pods):
                self.pods += [self._new_pod(now) for _ in range(desired - len(self.pods))]
            elif desired < len(self.pods):
                # ReplicaSet victims: pending before ready, then the newest
                order = sorted(self.pods, key=lambda p: (not p.pending(now), p.ready(now), -p.ready_at))
                gone = {p.name for p in order[:len(self.pods) - desired]}
                self.pods = [p for p in self.pods if p.name not in gone]
            self.timeline.append(Step(now, self.load(now), len(self.pods),
                                      sum(p.ready(now) for p in self.pods),
                                      {k: sum(v.values()) / len(v) for k, v in metrics.items() if v}))
            now += SYNC_PERIOD_S
        return self.timeline
