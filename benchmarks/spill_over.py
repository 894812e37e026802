"""Two replicas behind mmrec's failover client, one of them overloaded: does the pair still
answer what the two can hold?

Each replica serves the same repository on its own half of the usable cores (CPU affinity, so
the two do not share cores and "the sum of their capacities" means something on one machine).
First each replica's open-loop capacity at the SLO is measured alone, without admission
(benchmarks/open_loop.py), and its admission policy derived from it (mmrec.admission), as
`mmrec admit` would on each serving machine. Then the sum of the two capacities is offered as
Poisson arrivals (MLPerf LoadGen) through one `AsyncMMRecClient` with `spill_over=True`: every
request goes to the first replica, which gets twice what it holds and sheds the excess at once;
the client moves each shed request to the second replica. Goodput of the pair (answers within
the SLO, latency from the scheduled issue time, the move included) per round, as a ratio to the
sum of the capacities, interval over rounds (mmrec.stats).
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

from mmrec import schema, stats
from mmrec.admission import derive
from mmrec.export.admission import apply_to_repository, clear_repository

from .open_loop import Target, _as_payloads, default_timeout_s, describe_payloads, find_capacity, run_rate
from .overload import GOODPUT_SHARE, Recording, shadow_repository, summarize, warm_up
from .server_overlap import OverlappedServers

Progress = Callable[[str], None]


def core_halves() -> list[set[int]]:
    """The usable cores split in two (one half per replica); needs at least two."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise RuntimeError("two replicas on their own cores need at least 2 usable cores")
    half = len(cores) // 2
    return [set(cores[:half]), set(cores[half:])]


class ClientTarget(Target):
    """item_encoder through mmrec's own AsyncMMRecClient over several replicas, on an event loop
    thread of its own, so LoadGen's issue call returns at once (open loop)."""

    def __init__(self, urls: Sequence[str], payloads, *, spill_over: bool = True, timeout_s: float = 5.0) -> None:
        from mmrec.client import AsyncMMRecClient

        self.url, self.model = ",".join(urls), schema.ITEM_ENCODER
        self.payloads = _as_payloads(payloads)
        self.requests = [(p.text, p.image) for p in self.payloads]
        self.description = describe_payloads(self.payloads)
        self._idle_ms = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="spill-over-client", daemon=True)
        self._thread.start()
        self.client = AsyncMMRecClient(list(urls), spill_over=spill_over, client_timeout=timeout_s)
        try:
            self._wait(self.client.connect())
        except BaseException:
            self._stop_loop()
            raise

    def _wait(self, coroutine, timeout_s: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def send(self, index: int, callback, timeout_s: float) -> None:
        future = asyncio.run_coroutine_threadsafe(
            self.client.encode_items([self.requests[index % len(self.requests)]], client_timeout=timeout_s), self.loop)

        def done(f) -> None:
            error = asyncio.CancelledError("cancelled") if f.cancelled() else f.exception()
            callback(result=None if error else f.result(), error=error)

        future.add_done_callback(done)

    def infer(self, index: int, timeout_s: float = 60.0) -> float:
        t0 = time.perf_counter()
        self._wait(self.client.encode_items([self.requests[index % len(self.requests)]], client_timeout=timeout_s),
                   timeout_s + 5)
        return (time.perf_counter() - t0) * 1e3

    def endpoint_counts(self) -> dict[str, dict]:
        return {s.url: {"requests": s.requests, "shed": s.shed, "failures": s.failures} for s in self.client.endpoints}

    def close(self) -> None:
        try:
            self._wait(self.client.close(), 30)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


class RecordingClientTarget(Recording, ClientTarget):
    """ClientTarget that sorts every sample: ok, shed (OverloadedError: every replica shed it
    within the retry budget) or error."""

    def outcome(self, error: BaseException | None) -> str:
        from mmrec.client import OverloadedError

        if error is None:
            return "ok"
        return "shed" if isinstance(error, OverloadedError) else "error"


def _delta(after: dict[str, dict], before: dict[str, dict]) -> dict[str, dict]:
    return {url: {k: v - before.get(url, {}).get(k, 0) for k, v in counts.items()} for url, counts in after.items()}


def run_pair(repository: Path, payloads, slo_ms: float, workdir: Path, *, rounds: int, round_s: float,
             search_step_s: float, search_steps: int, servers: OverlappedServers, progress: Progress = print) -> dict:
    """Capacity of each replica alone, then `rounds` rounds of their summed capacity offered
    through the spill-over client to the admitted pair; goodput per round and its interval.
    `servers` starts and stops the replicas; every measurement waits for `servers.settle()`, so
    each replica is measured with no other server of this section running, as before."""
    halves = core_halves()
    plain = shadow_repository(repository, workdir / "plain")
    clear_repository(plain)
    replicas = []
    for i, cores in enumerate(halves):
        server = servers.start(plain, workdir / f"tritonserver_alone_{i}.log", cores)
        servers.settle()  # the server before it has exited: this one is alone
        found = find_capacity(server.urls["grpc"], payloads, slo_ms, 1, step_s=search_step_s,
                              max_steps=search_steps, progress=lambda line: progress(f"  replica {i}: {line}"))
        servers.stop(server)  # shuts down while the next one starts
        capacity, service_ms = min(found["capacity_qps"]), found["search"]["idle_latency_ms"]
        policy = derive(capacity, slo_ms, service_ms)
        replicas.append({"cores": sorted(cores), "capacity_rps": capacity, "service_ms": service_ms,
                         "policy": asdict(policy)})
        progress(f"replica {i} on cores {sorted(cores)}: capacity {capacity:.1f}/s, idle {service_ms:.1f} ms, "
                 f"queue {policy.max_queue_size}")
    total = sum(r["capacity_rps"] for r in replicas)
    out: dict = {"replicas": replicas, "capacity_sum_rps": total, "offered_rps": total, "slo_ms": slo_ms,
                 "rounds": [], "round_s": round_s}
    specs = []
    for i, (cores, replica) in enumerate(zip(halves, replicas)):
        shadow = shadow_repository(repository, workdir / f"admitted_{i}")
        apply_to_repository(shadow, derive(replica["capacity_rps"], slo_ms, replica["service_ms"]),
                            {"slo_ms": slo_ms, "derived_by": "bench spill-over pair"})
        specs.append((shadow, workdir / f"tritonserver_pair_{i}.log", cores))
    pair = servers.start_all(specs)  # both at once, each on its own cores
    servers.settle()
    urls = [server.urls["grpc"] for server in pair]
    with ExitStack() as stack:
        for url in urls:
            with Target(url, payloads) as direct:  # each replica warm, not only the first
                warm_up(direct)
        target = stack.enter_context(RecordingClientTarget(urls, payloads, timeout_s=default_timeout_s(slo_ms)))
        for r in range(rounds):
            target.take()
            before = target.endpoint_counts()
            run_rate(target, None, total, round_s, slo_ms, seed=500 + r, max_error_rate=1.0)
            records = target.take()
            issued = [rec[0] for rec in records]
            span = max(issued) - min(issued) if len(issued) > 1 else round_s
            summary = summarize(records, slo_ms, span or round_s)
            summary["endpoints"] = _delta(target.endpoint_counts(), before)
            out["rounds"].append(summary)
            first = summary["endpoints"].get(urls[0], {})
            progress(f"pair round {r + 1}/{rounds} at {total:.1f}/s: goodput {summary['goodput_rps']:.1f}/s, "
                     f"admitted p99 {summary['admitted_ms'].get('p99', float('nan')):.1f} ms, first replica shed "
                     f"{first.get('shed', 0)} of {first.get('requests', 0)}, {summary['shed']} shed by both")
    servers.stop(*pair)  # both at once
    goodputs = [max(r["goodput_rps"], 1e-6 * total) for r in out["rounds"]]
    out["goodput_over_capacity_sum"] = stats.paired_ratio(goodputs, [total] * len(goodputs)).to_dict()
    out["bound"] = GOODPUT_SHARE
    return out
