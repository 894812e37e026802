"""Overload: what the admission policy (mmrec.admission) buys when more is offered than one
replica holds.

Given the open-loop capacity `C` at the SLO (the capacity section, measured without admission),
the section serves a shadow of the repository (every file a symlink, config.pbtxt files rewritten
with the policy derived from `C`, the idle latency and the SLO) and offers `factor x C` Poisson
arrivals through MLPerf LoadGen's Server scenario, in several short rounds per factor. Every
sample is timed from when LoadGen issued it (its scheduled time) to its answer, and sorted by
outcome: answered (admitted), shed (Triton's queue-full or queue-timeout rejection), other error.
Per round: the admitted requests' p99, goodput (answers within the SLO per second) and the shed
answers' p99; intervals over rounds (mmrec.stats, against the fixed bound, so the ratio's
interval is the round-to-round spread). After the last round of the highest factor the load drops
to half of `C` at once: recovery is the time until every later request is answered within the
SLO. RSS of the server's process tree before and after the overload catches growth.
"""
from __future__ import annotations

import os
import shutil
import threading
from dataclasses import asdict
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mmrec import stats
from mmrec.admission import MANIFEST_KEY, QueuePolicy, derive, is_shed_message
from mmrec.export.admission import apply_to_repository
from mmrec.layout import CONFIG_FILE
from mmrec.export.manifest import MANIFEST_FILE

from .open_loop import Target, run_rate
from .server_overlap import OverlappedServers

Progress = Callable[[str], None]
SHED_ANSWER_MS = 5.0  # a shed request must learn it at once (no waiting in a queue it never leaves)
GOODPUT_SHARE = 0.9  # goodput at overload >= this share of capacity
RECOVERY_S = 2.0  # p99 back under the SLO within this long after the overload stops
RECOVERY_LOAD = 0.5  # the load after the overload, as a share of capacity
SOAK_GROWTH = 0.02  # RSS of the server's process tree may grow at most this share over the soak
SOAK_SAMPLE_S = 5.0  # RSS sampling period during the soak


class Recording:
    """Mixed into a Target: times each sample from its issue and sorts it (ok, shed or error)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self.records: list[tuple[float, float, str]] = []  # (issued at, latency ms, outcome)

    def outcome(self, error: BaseException | None) -> str:
        """Triton's own shed words (tritonclient raises them as they come)."""
        return "ok" if error is None else ("shed" if is_shed_message(str(error)) else "error")

    def send(self, index: int, callback, timeout_s: float) -> None:
        issued = time.perf_counter()

        def done(result=None, error=None) -> None:
            latency = (time.perf_counter() - issued) * 1e3
            with self._lock:
                self.records.append((issued, latency, self.outcome(error)))
            callback(result=result, error=error)

        super().send(index, done, timeout_s)

    def take(self) -> list[tuple[float, float, str]]:
        with self._lock:
            records, self.records = self.records, []
        return records


class RecordingTarget(Recording, Target):
    """The tritonclient Target, recording."""


def shadow_repository(root: Path, dest: Path) -> Path:
    """A copy of an exported repository whose files are symlinks to the original, except the
    configs and the manifest (real copies, so admission can rewrite them without touching it)."""
    root, dest = Path(root).resolve(), Path(dest)
    if dest.exists():
        shutil.rmtree(dest)

    def link_or_copy(src: str, dst: str) -> None:
        if Path(src).name in (CONFIG_FILE, MANIFEST_FILE):
            shutil.copyfile(src, dst)
        else:
            os.symlink(src, dst)

    shutil.copytree(root, dest, copy_function=link_or_copy)
    return dest


def summarize(records: Sequence[tuple[float, float, str]], slo_ms: float, duration_s: float) -> dict:
    """One round: counts by outcome, admitted and shed percentiles, goodput (answers within the
    SLO per second of the round's issuing, `duration_s`)."""
    ok = np.array([r[1] for r in records if r[2] == "ok"])
    shed = np.array([r[1] for r in records if r[2] == "shed"])
    errors = sum(r[2] == "error" for r in records)

    def pct(values: np.ndarray) -> dict:
        return {f"p{q}": float(np.percentile(values, q)) for q in (50, 99)} if values.size else {}

    return {"requests": len(records), "ok": int(ok.size), "shed": int(shed.size), "errors": int(errors),
            "admitted_ms": pct(ok), "shed_ms": pct(shed),
            "goodput_rps": float((ok <= slo_ms).sum() / duration_s) if duration_s > 0 else 0.0,
            "shed_share": float(shed.size / len(records)) if records else 0.0}


def recovery_time(records: Sequence[tuple[float, float, str]], start: float, slo_ms: float) -> float | None:
    """Seconds from `start` to the issue time after which every request was answered within the
    SLO (None: the last one was still late or failed)."""
    ordered = sorted(records)
    late = [issued for issued, latency, outcome in ordered if outcome != "ok" or latency > slo_ms]
    if not ordered:
        return None
    if not late:
        return 0.0
    if late[-1] == ordered[-1][0]:
        return None
    return max(0.0, late[-1] - start)


FAILURE_METRIC = "nv_inference_request_failure"


def failures_by_reason(metrics_url: str) -> dict[str, float]:
    """Triton's `nv_inference_request_failure` summed per `reason` label over models, from its
    Prometheus endpoint (REJECTED: shed by the queue policy)."""
    import re
    import urllib.request

    text = urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=5).read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(FAILURE_METRIC + "{"):
            continue
        labels, value = line.rsplit(" ", 1)
        reason = re.search(r'reason="([^"]*)"', labels)
        key = reason.group(1) if reason else "unlabelled"
        totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def process_tree_rss_mb(pid: int) -> float | None:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with openvino
        return None
    try:
        parent = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)]) / 2 ** 20
    except psutil.Error:
        return None


def run_overload(url: str, payloads, capacity_rps: float, slo_ms: float, *, factors: Sequence[float],
                 rounds: int, round_s: float, recovery_s: float, soak_s: float = 0.0, server_pid: int | None = None,
                 progress: Progress = print) -> dict:
    """`rounds` LoadGen trials of `round_s` at each factor x capacity against an admitted server
    at `url`, then the recovery run, then the soak; per-round summaries, intervals and RSS."""
    target = RecordingTarget(url, payloads)
    try:
        warm_up(target)
        rss_before = process_tree_rss_mb(server_pid) if server_pid else None
        out: dict = {"capacity_rps": capacity_rps, "slo_ms": slo_ms, "factors": {}, "rounds": rounds,
                     "round_s": round_s}
        for i, factor in enumerate(factors):
            qps = factor * capacity_rps
            per_round = []
            for r in range(rounds):
                target.take()
                last = i == len(factors) - 1 and r == rounds - 1
                run_rate(target, None, qps, round_s, slo_ms, seed=100 * i + r, max_error_rate=1.0,
                         drain=not last)
                records = target.take()
                issued = [rec[0] for rec in records]
                # per second of issuing (not of waiting for the last answers after it)
                span = max(issued) - min(issued) if len(issued) > 1 else round_s
                summary = summarize(records, slo_ms, span or round_s)
                summary["offered_rps"] = qps
                per_round.append(summary)
                progress(f"{factor:g}x capacity ({qps:.1f}/s) round {r + 1}/{rounds}: {summary['ok']} answered "
                         f"(p99 {summary['admitted_ms'].get('p99', float('nan')):.1f} ms), {summary['shed']} shed "
                         f"(p99 {summary['shed_ms'].get('p99', float('nan')):.1f} ms), goodput "
                         f"{summary['goodput_rps']:.1f}/s")
            out["factors"][f"{factor:g}"] = {"offered_rps": qps, "rounds": per_round,
                                             **judge(per_round, capacity_rps, slo_ms)}
        # LoadGen returns once every sample is answered, so the clock starts at the overload's
        # last issue, not when the next run begins
        overload_stopped = max(issued) if issued else time.perf_counter()
        run_rate(target, None, RECOVERY_LOAD * capacity_rps, recovery_s, slo_ms, seed=999, max_error_rate=1.0,
                 drain=True)
        recovered = recovery_time(target.take(), overload_stopped, slo_ms)
        out["recovery"] = {"load_rps": RECOVERY_LOAD * capacity_rps, "observed_s": recovery_s,
                           "recovery_s": recovered, "bound_s": RECOVERY_S}
        progress(f"recovery at {RECOVERY_LOAD:g}x capacity: "
                 + (f"{recovered:.2f} s" if recovered is not None else f"not within {recovery_s:g} s"))
        if soak_s > 0:
            out["soak"] = soak(target, max(factors) * capacity_rps, soak_s, slo_ms, server_pid, progress)
        rss_after = process_tree_rss_mb(server_pid) if server_pid else None
        out["rss_mb"] = {"before": rss_before, "after": rss_after}
        return out
    finally:
        target.close()


def soak(target: Target, qps: float, seconds: float, slo_ms: float, server_pid: int | None,
         progress: Progress) -> dict:
    """`seconds` of overload at `qps` in one LoadGen run, the server's process-tree RSS sampled
    every SOAK_SAMPLE_S: growth from the soak's start (the server already through the rounds
    above, so warm-up growth is behind it) to its end, and the answers' summary."""
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    start = time.perf_counter()

    def sample() -> None:
        while True:
            rss = process_tree_rss_mb(server_pid) if server_pid else None
            if rss is not None:
                samples.append((round(time.perf_counter() - start, 2), round(rss, 1)))
            if stop.wait(SOAK_SAMPLE_S):
                return

    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    sampler.start()
    target.take()
    try:
        run_rate(target, None, qps, seconds, slo_ms, seed=777, max_error_rate=1.0, drain=True)
    finally:
        stop.set()
        sampler.join()
    end = process_tree_rss_mb(server_pid) if server_pid else None
    if end is not None:
        samples.append((round(time.perf_counter() - start, 2), round(end, 1)))
    summary = summarize(target.take(), slo_ms, seconds)
    first, last = (samples[0][1], samples[-1][1]) if samples else (None, None)
    growth = (last - first) / first if first else None
    progress(f"soak {seconds:g} s at {qps:.1f}/s: RSS {first} -> {last} MB, goodput {summary['goodput_rps']:.1f}/s")
    return {"offered_rps": qps, "seconds": seconds, "rss_mb": {"start": first, "end": last, "series": samples},
            "growth": growth, "bound": SOAK_GROWTH, "summary": summary}


def warm_up(target: Target, attempts: int = 20) -> None:
    """Every payload once, sequentially. A fresh server's first calls can outlast a tight queue
    budget (the policy sheds them: that is its job), so a shed call is tried again."""
    for i in range(len(target.requests)):
        for attempt in range(attempts):
            try:
                target.infer(i)
                break
            except Exception as err:  # noqa: BLE001 - only a shed is expected here
                if not is_shed_message(str(err)) or attempt == attempts - 1:
                    raise
                time.sleep(0.1)


def judge(per_round: Sequence[dict], capacity_rps: float, slo_ms: float) -> dict:
    """Intervals over rounds of the three overload figures, each as a ratio to its bound."""
    def ratio_to(values: list[float | None], bound: float) -> dict | None:
        values = [v for v in values if v is not None]
        if len(values) != len(per_round) or not values:
            return None  # a round without the figure (nothing answered, nothing shed): no interval
        floor = 1e-6 * bound  # a round with no goodput is the worst case, not a missing one
        return stats.paired_ratio([max(v, floor) for v in values], [bound] * len(values)).to_dict()

    return {
        "admitted_p99_over_slo": ratio_to([r["admitted_ms"].get("p99") for r in per_round], slo_ms),
        "goodput_over_capacity": ratio_to([r["goodput_rps"] for r in per_round], capacity_rps),
        "shed_p99_over_bound": ratio_to([r["shed_ms"].get("p99") for r in per_round], SHED_ANSWER_MS),
    }


def overload_section(repository: Path, capacity: dict, slo_ms: float, payloads, workdir: Path, *,
                     factors: Sequence[float], rounds: int, round_s: float, recovery_s: float,
                     running_server, progress: Progress, soak_s: float = 0.0, pair: dict | None = None) -> dict:
    """The bench section: derive the policy from the capacity section's first set, serve the
    shadow repository with it, run `run_overload`; then the spill-over pair
    (benchmarks/spill_over.py) with `pair` as its settings (None: skipped). Its servers start and
    stop overlapped (benchmarks/server_overlap.py), never during a measurement."""
    capacity_rps = capacity.get("interval", {}).get("low") or capacity.get("median_qps")
    service_ms = (capacity.get("search") or {}).get("idle_latency_ms")
    if not capacity_rps or not service_ms:
        raise ValueError("the capacity section has no capacity and idle latency to derive admission from")
    policy: QueuePolicy = derive(capacity_rps, slo_ms, service_ms)
    shadow = shadow_repository(repository, workdir / "admitted")
    models = apply_to_repository(shadow, policy, {"slo_ms": slo_ms, "capacity_rps": capacity_rps,
                                                  "service_ms": service_ms, "derived_by": "bench overload section"})
    progress(f"admission on {', '.join(models)}: max_queue_size {policy.max_queue_size}, queue budget "
             f"{policy.timeout_us / 1e3:.1f} ms, {policy.instances} instances (capacity {capacity_rps:.1f}/s, idle {service_ms:.1f} ms)")
    with OverlappedServers(running_server) as servers:
        server = servers.start(shadow, workdir / "tritonserver_admitted.log")
        before = failures_by_reason(server.urls["metrics"])
        result = run_overload(server.urls["grpc"], payloads, capacity_rps, slo_ms, factors=factors, rounds=rounds,
                              round_s=round_s, recovery_s=recovery_s, soak_s=soak_s, server_pid=server.pid,
                              progress=progress)
        after = failures_by_reason(server.urls["metrics"])
        servers.stop(server)  # shuts down while the pair's first replica starts
        if pair:
            from .spill_over import run_pair

            if len(os.sched_getaffinity(0)) < 2:
                result["pair"] = {"skipped": "two replicas on their own cores need at least 2 usable cores"}
            else:
                result["pair"] = run_pair(repository, payloads, slo_ms, workdir, servers=servers,
                                          progress=progress, **pair)
    result["prometheus_failures"] = {reason: after[reason] - before.get(reason, 0.0) for reason in after}
    result[MANIFEST_KEY] = {"policy": asdict(policy),
                            "models": models, "service_ms": service_ms}
    result["bounds"] = {"shed_answer_ms": SHED_ANSWER_MS, "goodput_share": GOODPUT_SHARE, "recovery_s": RECOVERY_S}
    return result
