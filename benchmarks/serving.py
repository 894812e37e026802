"""Serving sweep: closed-loop load at each concurrency level against the real tritonserver
(mmrec's own asyncio client, gRPC and HTTP) and against the in-process reference pipeline,
so the cost of serving is a ratio measured in one run.

Every level warms up first, then runs for a fixed time; each of the `concurrency` workers
sends one request (of `request_batch` real items) at a time and waits for its answer.
Triton's statistics are snapshotted around the measured window of every level, giving the
per-member queue/compute breakdown and the batch sizes the dynamic batcher executed.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

from mmrec.server import ServerConfig, TritonServer, free_ports

from . import triton_stats
from .settings import Settings
from .timing import percentiles
from .workload import Workload

Tick = Callable[[int], None]
SERVER_READY_TIMEOUT_S = 180.0
CLIENT_TIMEOUT_S = 60.0


@contextmanager
def running_server(repository: Path, log_path: Path) -> Iterator[TritonServer]:
    """tritonserver over the repository on free loopback ports (stopped on exit)."""
    http, grpc, metrics = free_ports(3)
    config = ServerConfig(repository=repository, host="127.0.0.1", http_port=http, grpc_port=grpc,
                          metrics_port=metrics)
    with TritonServer(config, log_path=log_path, ready_timeout_s=SERVER_READY_TIMEOUT_S) as server:
        yield server


def _level_result(latencies_ms: list[float], items: int, wall_s: float, errors: int,
                  first_error: str | None, concurrency: int) -> dict:
    """One measured window; `_latencies` (raw, ms) is kept until rounds are merged."""
    return {"concurrency": concurrency, "requests": len(latencies_ms), "items": items,
            "errors": errors, "first_error": first_error, "measured_s": wall_s,
            "latency_ms": percentiles(latencies_ms),
            "throughput_items_s": items / wall_s if wall_s > 0 else float("nan"),
            "throughput_requests_s": len(latencies_ms) / wall_s if wall_s > 0 else float("nan"),
            "_latencies": list(latencies_ms)}


def merge_rounds(parts: list[dict], keep_raw: bool = False) -> dict:
    """Windows of one series at one level (several rounds) as one result: latencies pooled,
    throughput = all items / all measured time, server statistics summed. The per-round values
    the intervals are taken over stay: `p50_ms_per_round`, `throughput_items_s_per_round`.
    `keep_raw` keeps the pooled latencies as `_latencies` (in memory only; never written)."""
    latencies = [x for p in parts for x in p.get("_latencies", [])]
    merged = _level_result(latencies, sum(p["items"] for p in parts), sum(p["measured_s"] for p in parts),
                           sum(p["errors"] for p in parts),
                           next((p["first_error"] for p in parts if p["first_error"]), None),
                           parts[0]["concurrency"])
    if not keep_raw:
        merged.pop("_latencies")
    merged["rounds"] = len(parts)
    merged["throughput_items_s_per_round"] = [p["throughput_items_s"] for p in parts]
    merged["p50_ms_per_round"] = [p["latency_ms"]["p50"] for p in parts]
    cpu = [(p["client_cpu_ms_per_request"], p["requests"]) for p in parts if p.get("client_cpu_ms_per_request")]
    if cpu:
        merged["client_cpu_ms_per_request"] = sum(c * n for c, n in cpu) / max(1, sum(n for _, n in cpu))
    if any("server" in p for p in parts):
        merged["server"] = triton_stats.merge([p.get("server", {}) for p in parts])
    return merged


class Cursor:
    """Round-robin over the workload's items, shared by all workers (thread-safe)."""

    def __init__(self, workload: Workload, batch: int) -> None:
        batches = max(1, -(-len(workload.items) // batch))  # every item once
        self.inputs = [workload.pipeline_input(batch, offset=i * batch) for i in range(batches)]
        self._i = 0
        self._lock = threading.Lock()

    def next(self):
        with self._lock:
            self._i += 1
            return self.inputs[self._i % len(self.inputs)]


# --------------------------------------------------------------------------- Triton, own client


async def _closed_loop(call, cursor: Cursor, concurrency: int, seconds: float) -> dict:
    """`concurrency` coroutines, each sending its next request when its last one is answered.
    Also records this process's CPU time per request: the client's own cost."""
    latencies: list[float] = []
    errors = [0]
    first_error: list[str] = []
    items = [0]
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            batch = cursor.next()
            t0 = time.perf_counter()
            try:
                await call(batch)
            except Exception as err:  # noqa: BLE001 - failures are counted and reported
                errors[0] += 1
                if not first_error:
                    first_error.append(f"{type(err).__name__}: {err}")
                continue
            latencies.append((time.perf_counter() - t0) * 1e3)
            items[0] += len(batch)

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result = _level_result(latencies, items[0], time.perf_counter() - start, errors[0],
                           first_error[0] if first_error else None, concurrency)
    result["client_cpu_ms_per_request"] = ((time.process_time() - cpu) * 1e3 / len(latencies)
                                           if latencies else None)
    return result


async def client_level(url: str, grpc_url: str, protocol: str, cursor: Cursor, concurrency: int,
                       settings: Settings) -> dict:
    from mmrec.client import AsyncMMRecClient

    async with AsyncMMRecClient(url, protocol, concurrency=concurrency, retries=0,
                                client_timeout=CLIENT_TIMEOUT_S) as client:
        async def call(batch) -> None:
            await client.encode_items(list(zip(batch.texts, batch.images)))

        await _closed_loop(call, cursor, concurrency, settings.level_warmup_s)
        before = await asyncio.to_thread(triton_stats.snapshot, grpc_url)
        result = await _closed_loop(call, cursor, concurrency, settings.level_s)
        after = await asyncio.to_thread(triton_stats.snapshot, grpc_url)
    result["server"] = triton_stats.window(before, after)
    return result


async def raw_level(url: str, cursor: Cursor, concurrency: int, settings: Settings) -> dict:
    """Baseline without mmrec's client: tritonclient.grpc.aio with prebuilt request tensors,
    so the difference to the mmrec client is the wrapper's own cost."""
    import tritonclient.grpc.aio as grpcaio

    import numpy as np

    from mmrec import schema

    def tensors(batch):
        inputs = []
        for name, values in ((schema.TEXT, [t.encode() for t in batch.texts]), (schema.IMAGE, batch.images)):
            column = np.empty((len(values), 1), dtype=object)
            column[:, 0] = values
            tensor = grpcaio.InferInput(name, [len(values), 1], "BYTES")
            tensor.set_data_from_numpy(column)
            inputs.append(tensor)
        return inputs

    prebuilt = {id(b): tensors(b) for b in cursor.inputs}
    outputs = [grpcaio.InferRequestedOutput(name)
               for name in (schema.ITEM_EMBEDDING, schema.INTEREST_PROBS, schema.ALIGNMENT)]
    client = grpcaio.InferenceServerClient(url)
    try:
        async def call(batch) -> None:
            await client.infer(schema.ITEM_ENCODER, prebuilt[id(batch)], outputs=outputs,
                               client_timeout=CLIENT_TIMEOUT_S)

        await _closed_loop(call, cursor, concurrency, settings.level_warmup_s)
        return await _closed_loop(call, cursor, concurrency, settings.level_s)
    finally:
        await client.close()


# --------------------------------------------------------------------------- in-process reference


def _threaded_loop(call, cursor: Cursor, concurrency: int, seconds: float) -> dict:
    lock = threading.Lock()
    latencies: list[float] = []
    state = {"items": 0, "errors": 0, "first_error": None}
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        while time.perf_counter() < deadline:
            batch = cursor.next()
            t0 = time.perf_counter()
            try:
                call(batch)
            except Exception as err:  # noqa: BLE001
                with lock:
                    state["errors"] += 1
                    state["first_error"] = state["first_error"] or f"{type(err).__name__}: {err}"
                continue
            elapsed = (time.perf_counter() - t0) * 1e3
            with lock:
                latencies.append(elapsed)
                state["items"] += len(batch)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    return _level_result(latencies, state["items"], time.perf_counter() - start, state["errors"],
                         state["first_error"], concurrency)


def reference_level(pipeline, workload: Workload, settings: Settings, concurrency: int,
                    batched: bool = False) -> dict:
    """The same closed loop in this process: `pipeline.encode_items` (mmrec.reference's
    in-process encoder: the served item engine on the portable target).

    batched=False: `concurrency` threads each encode one request's items (what Triton sees);
    batched=True: one caller encodes `concurrency` requests' items in one call, the ideal
    batching a server could reach without any queueing delay.
    """
    def call(batch) -> None:
        pipeline.encode_items(batch.texts, batch.images)

    if batched:
        cursor = Cursor(workload, settings.request_batch * concurrency)
        _threaded_loop(call, cursor, 1, settings.level_warmup_s)
        result = _threaded_loop(call, cursor, 1, settings.level_s)
        result["concurrency"] = concurrency
        return result
    cursor = Cursor(workload, settings.request_batch)
    _threaded_loop(call, cursor, concurrency, settings.level_warmup_s)
    return _threaded_loop(call, cursor, concurrency, settings.level_s)


def _paired(a: dict, b: dict) -> dict | None:
    """Per-round comparisons of two series at one level (round i of each was measured in the same
    minute): p50 difference (ms) and throughput ratio, both as mmrec.stats intervals."""
    from mmrec.stats import paired_difference, paired_ratio

    n = min(len(a.get("p50_ms_per_round", [])), len(b.get("p50_ms_per_round", [])))
    if n == 0 or a.get("errors") or b.get("errors"):
        return None
    return {"p50_diff_ms": paired_difference(a["p50_ms_per_round"][:n], b["p50_ms_per_round"][:n]).to_dict(3),
            "throughput_ratio": paired_ratio(a["throughput_items_s_per_round"][:n],
                                             b["throughput_items_s_per_round"][:n]).to_dict(),
            "pooled_throughput_ratio": a["throughput_items_s"] / b["throughput_items_s"]}


def compare_levels(triton: list[dict], reference: list[dict], batched: list[dict]) -> list[dict]:
    """Triton vs the in-process pipelines at every concurrency, paired by round (mmrec.stats):
    `p50_diff_ms` (Triton p50 - in-process p50, mean over rounds) and `throughput_ratio`
    (geometric mean over rounds of Triton items/s / in-process items/s), each with its interval;
    `vs_batched`: the same against the batched in-process pipeline (one call of c requests'
    items) at that concurrency. `pooled_throughput_ratio`: all items / all time, for reference."""
    by_c = {name: {lv["concurrency"]: lv for lv in levels}
            for name, levels in (("reference", reference), ("batched", batched))}
    rows = []
    for t in triton:
        row: dict = {"concurrency": t["concurrency"]}
        ref = by_c["reference"].get(t["concurrency"])
        if ref is not None and (paired := _paired(t, ref)):
            row.update(paired)
        batch = by_c["batched"].get(t["concurrency"])
        if batch is not None and (paired := _paired(t, batch)):
            row["vs_batched"] = paired
        rows.append(row)
    return rows


def aa_levels(triton: list[dict], again: list[dict]) -> dict:
    """The section's A/A arm: Triton gRPC against itself (a second series interleaved in the same
    rounds). Per level the paired comparisons; for the section one pooled p50 ratio over levels,
    whose interval must contain 1 (mmrec.stats.aa_check)."""
    from mmrec.stats import aa_check, pooled_ratio

    by_c = {lv["concurrency"]: lv for lv in again}
    levels, cases = [], []
    for t in triton:
        other = by_c.get(t["concurrency"])
        paired = _paired(t, other) if other else None
        if paired:
            levels.append({"concurrency": t["concurrency"], **paired})
            n = min(len(t["p50_ms_per_round"]), len(other["p50_ms_per_round"]))
            cases.append((t["p50_ms_per_round"][:n], other["p50_ms_per_round"][:n]))
    section = aa_check(pooled_ratio(cases) if cases else None)
    return {**section, "statistic": "p50 ratio Triton gRPC / Triton gRPC (A/A), pooled over levels",
            "levels": levels}


PerLevelHook = Callable[[TritonServer, int], None]


def run_serving(workload: Workload, settings: Settings, threads: int, step: Callable[[str, int], Tick],
                server: Callable[[], TritonServer], per_level: PerLevelHook | None = None) -> dict:
    """The whole section. Every series is measured level by level, one right after the other
    (in-process, Triton per protocol, raw tritonclient, then `per_level`, e.g. perf_analyzer),
    in `serving_rounds` rounds of alternating order with the level's time split between them,
    so the numbers compared at one concurrency were taken within the same minute, under the
    same background load. The server idles while the in-process pipeline runs."""
    from mmrec.reference import in_process_encoder

    tick = step("serving: starting tritonserver", 1)
    srv = server()
    tick(1)
    # each caller thread gets its own text branch: an in-process thread pool over the same engine
    pipeline = in_process_encoder(workload.repository, text_workers=max(settings.concurrency),
                                  intra_op_threads=threads)
    try:
        out = _serving_levels(pipeline, workload, settings, step, srv, threads, per_level)
    finally:
        pipeline.close()
    return out


def _serving_levels(pipeline, workload: Workload, settings: Settings, step: Callable[[str, int], Tick],
                    srv: TritonServer, threads: int, per_level: PerLevelHook | None) -> dict:
    series = ["in-process", "in-process batched", *[f"Triton {p}" for p in settings.protocols], "Triton A/A"]
    if settings.raw_client_baseline:
        series.append("raw tritonclient")
    if per_level is not None:
        series.append("perf_analyzer (once per level, after the rounds)")
    tick = step(f"serving: {', '.join(series)} at concurrency {list(settings.concurrency)}",
                len(settings.concurrency))
    rounds = max(1, settings.serving_rounds)
    # every round's window is short (the level's time split over rounds) and warms up briefly
    # first; the first round of a level warms up for the level's full warm-up
    first = replace(settings, level_s=settings.level_s / rounds)
    later = replace(first, level_warmup_s=settings.round_warmup_s)
    cursor = Cursor(workload, settings.request_batch)
    out: dict = {"reference": [], "reference_batched": [], "triton": {p: [] for p in settings.protocols},
                 "triton_aa": [], "triton_raw_tritonclient": []}
    aa_protocol = "grpc" if "grpc" in settings.protocols else settings.protocols[0]
    for c in settings.concurrency:
        measures: list[tuple[list, Callable[[Settings], dict]]] = [
            (out["reference"], lambda s: reference_level(pipeline, workload, s, c)),
            (out["reference_batched"], lambda s: reference_level(pipeline, workload, s, c, batched=True))]
        for protocol in settings.protocols:
            measures.append((out["triton"][protocol], lambda s, p=protocol: asyncio.run(
                client_level(srv.urls[p], srv.urls["grpc"], p, cursor, c, s))))
        measures.append((out["triton_aa"], lambda s: asyncio.run(
            client_level(srv.urls[aa_protocol], srv.urls["grpc"], aa_protocol, cursor, c, s))))
        if settings.raw_client_baseline:
            measures.append((out["triton_raw_tritonclient"],
                             lambda s: asyncio.run(raw_level(srv.urls["grpc"], cursor, c, s))))
        windows: dict[int, list[dict]] = {i: [] for i in range(len(measures))}
        for r in range(rounds):  # alternate the order: A B C D, then D C B A, ...
            order = list(enumerate(measures))
            for i, (_, measure) in (order if r % 2 == 0 else order[::-1]):
                windows[i].append(measure(first if r == 0 else later))
        for i, (target, _) in enumerate(measures):
            if windows[i] and windows[i][0]:
                target.append(merge_rounds(windows[i], keep_raw=True))
        if per_level is not None:  # a cross-check with its own windows, once per level (not paired)
            per_level(srv, c)
        tick(1)
    out["intervals"] = {p: compare_levels(out["triton"][p], out["reference"], out["reference_batched"])
                        for p in settings.protocols}
    out["aa"] = aa_levels(out["triton"][aa_protocol], out["triton_aa"])
    for levels in [out["reference"], out["reference_batched"], out["triton_raw_tritonclient"], out["triton_aa"],
                   *out["triton"].values()]:
        for lv in levels:
            lv.pop("_latencies", None)
    return {"model": "item_encoder", "request_batch": settings.request_batch,
            "level_s": settings.level_s, "level_warmup_s": settings.level_warmup_s,
            "round_warmup_s": settings.round_warmup_s, "rounds": rounds, "aa_protocol": aa_protocol,
            "client": "mmrec.client.AsyncMMRecClient (retries=0, concurrency=level)",
            "order_per_level": series, "reference_threads": threads, "in_process": pipeline.kind, **out,
            "server": {"urls": srv.urls, "log": str(srv.log_path)}}
