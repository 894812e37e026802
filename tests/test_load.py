"""Load without loss: many concurrent mixed requests, every one answered correctly, memory flat.

    pytest -m slow tests/test_load.py -s      # 10 000 requests at concurrency 32 (minutes)
    pytest tests/test_load.py                 # the CI size: 300 requests

Requests mix the three ensembles, batch sizes 1..8 and short/long texts (16..128-token buckets)
over real captioned images, sent with tritonclient.grpc.aio. Every request must succeed; a
deterministic sample is compared with the in-process reference pipeline at 1e-4; the resident
memory of tritonserver and its python stubs is read from /proc before (after a warm-up) and
after, and must stay within a stated bound. Numbers are printed as one JSON line.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mmrec import schema
from test_bad_inputs import OUTPUTS, TOLERANCE

CONCURRENCY = 32
CLIENT_TIMEOUT_S = 300.0
# Growth of the server's total RSS (tritonserver + stubs) allowed between the warmed-up start and
# the end of the 10 000-request run: ORT arenas, allocator pools and the python backend's shm
# settle during the first few hundred requests (measured: +~1.3 GB, then flat within +-40 MB);
# 10 % of ~2.3 GB is ~230 MiB: a leak of >= ~25 KB per request over 10 000 requests exceeds it.
RSS_GROWTH_BOUND_FRACTION = 0.10
RSS_GROWTH_BOUND_MIB = 64
MODEL_MIX = ((schema.ITEM_ENCODER, 0.5), (schema.INTEREST_SCORER, 0.3), (schema.ITEM_ENCODER_PIXELS, 0.2))


# ---- /proc helpers (also used by test_faults) ------------------------------------------------------

def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (tritonserver's python stubs are its children)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, stack = [], [pid]
    while stack:
        current = stack.pop()
        tree.append(current)
        stack.extend(children.get(current, []))
    return tree


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def server_rss_mib(pid: int) -> float:
    return sum(rss_kib(p) for p in process_tree(pid)) / 1024


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


# ---- the workload ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Planned:
    index: int
    model: str
    items: tuple[int, ...]  # indexes into the item pool
    long_text: bool


def plan(count: int, pool_size: int, seed: int = 7, max_batch: int = 8, long_fraction: float = 0.2,
         min_batch: int = 1) -> list[Planned]:
    """A deterministic mix: model by MODEL_MIX, batch size uniform in min_batch..max_batch."""
    rng = np.random.default_rng(seed)
    models = [m for m, _ in MODEL_MIX]
    weights = np.array([w for _, w in MODEL_MIX])
    return [Planned(i, models[rng.choice(len(models), p=weights / weights.sum())],
                    tuple(int(x) for x in rng.integers(0, pool_size, int(rng.integers(min_batch, max_batch + 1)))),
                    bool(rng.random() < long_fraction))
            for i in range(count)]


class Workload:
    def __init__(self, sample_items, reference) -> None:
        captions = [t for t, _, _ in sample_items]
        self.short = captions
        # ~100-130 tokens: spans the 64 and 128 buckets next to the short captions' 16
        self.long = [" ".join(captions[(i + j) % len(captions)] for j in range(24)) for i in range(len(captions))]
        self.images = [i for _, i, _ in sample_items]
        self.pixels = reference.preprocess_images(self.images)
        history = reference.encode_items(captions[:4], self.images[:4])[schema.ITEM_EMBEDDING]
        self.user = history.mean(axis=0).astype(np.float32)

    def texts(self, request: Planned) -> list[str]:
        source = self.long if request.long_text else self.short
        return [source[i] for i in request.items]

    def inputs(self, module, request: Planned) -> list:
        n = len(request.items)
        arrays = {schema.TEXT: (np.array([[t.encode()] for t in self.texts(request)], dtype=object), "BYTES")}
        if request.model == schema.ITEM_ENCODER_PIXELS:
            arrays[schema.PIXELS] = (self.pixels[list(request.items)], "FP32")
        else:
            arrays[schema.IMAGE] = (np.array([[self.images[i]] for i in request.items], dtype=object), "BYTES")
        if request.model == schema.INTEREST_SCORER:
            arrays[schema.USER_EMBEDDING] = (np.repeat(self.user[None, :], n, axis=0), "FP32")
        inputs = []
        for name, (array, datatype) in arrays.items():
            tensor = module.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs

    def expected(self, reference, request: Planned) -> dict[str, np.ndarray]:
        texts, images = self.texts(request), [self.images[i] for i in request.items]
        if request.model == schema.INTEREST_SCORER:
            return reference.score_items(texts, images, self.user)
        return reference.encode_items(texts, images)


async def send_all(url: str, workload: Workload, requests: list[Planned], keep: set[int]) -> dict:
    import tritonclient.grpc.aio as aio
    from tritonclient.utils import InferenceServerException

    client = aio.InferenceServerClient(url)
    semaphore = asyncio.Semaphore(CONCURRENCY)
    kept: dict[int, dict[str, np.ndarray]] = {}
    errors: dict[str, int] = {}
    answered = 0

    async def one(request: Planned) -> None:
        nonlocal answered
        async with semaphore:
            outputs = [aio.InferRequestedOutput(o) for o in OUTPUTS[request.model]]
            try:
                result = await client.infer(request.model, workload.inputs(aio, request), outputs=outputs,
                                            client_timeout=CLIENT_TIMEOUT_S)
            except InferenceServerException as err:
                key = f"{err.status()}: {(err.message() or '')[:120]}"
                errors[key] = errors.get(key, 0) + 1
                return
            answered += 1
            if request.index in keep:
                kept[request.index] = {o: result.as_numpy(o) for o in OUTPUTS[request.model]}

    try:
        await asyncio.gather(*(one(r) for r in requests))
    finally:
        await client.close()
    return {"answered": answered, "errors": errors, "kept": kept}


def run_load(server, reference, sample_items, count: int, samples: int, warmup: int, max_batch: int,
             long_fraction: float) -> dict:
    """Warm up with the largest shapes (so ORT arenas and shm pools reach their size), then measure."""
    workload = Workload(sample_items, reference)
    url = server.urls["grpc"]
    warm = plan(warmup, len(sample_items), seed=1, min_batch=8, max_batch=8, long_fraction=0.5)
    asyncio.run(send_all(url, workload, warm, set()))
    rss_before = server_rss_mib(server.pid)
    requests = plan(count, len(sample_items), max_batch=max_batch, long_fraction=long_fraction)
    keep = set(range(0, count, max(1, count // samples)))
    started = time.monotonic()
    outcome = asyncio.run(send_all(url, workload, requests, keep))
    wall = time.monotonic() - started
    rss_after = server_rss_mib(server.pid)
    items = sum(len(r.items) for r in requests)
    report = {
        "requests": count, "items": items, "concurrency": CONCURRENCY, "answered": outcome["answered"],
        "errors": outcome["errors"], "wall_s": round(wall, 1), "requests_per_s": round(count / wall, 1),
        "items_per_s": round(items / wall, 1), "rss_before_mib": round(rss_before, 1),
        "rss_after_mib": round(rss_after, 1), "rss_growth_mib": round(rss_after - rss_before, 1),
        "processes": len(process_tree(server.pid)), "sampled": len(outcome["kept"]), "warmup_requests": warmup,
        "cpus": os.cpu_count(),
    }
    print("\nLOAD " + json.dumps(report))
    mismatches = []
    for index, got in sorted(outcome["kept"].items()):
        want = workload.expected(reference, requests[index])
        for name in OUTPUTS[requests[index].model]:
            if not np.allclose(got[name], want[name], atol=TOLERANCE, rtol=0):
                mismatches.append((index, requests[index].model, name, float(np.abs(got[name] - want[name]).max())))
    report["mismatches"] = mismatches
    return report


def check(report: dict, rss_bound_mib: float) -> None:
    assert not report["errors"], report["errors"]
    assert report["answered"] == report["requests"]
    assert report["sampled"] >= 1 and not report["mismatches"], report["mismatches"][:5]
    assert report["rss_growth_mib"] <= rss_bound_mib, (
        f"server RSS grew {report['rss_growth_mib']} MiB (bound {rss_bound_mib:.0f} MiB)")


@pytest.mark.server
@pytest.mark.timeout(600)
def test_load_ci_300_requests(triton_server, reference, sample_items):
    """CI size (1-2 items per request). The warm-up (16 concurrent requests of 8 items) grows the
    ORT arenas towards the dynamic batcher's largest batches (~1 GB for the image encoder alone);
    what is left to settle is bounded loosely here (a leak of ~1 MB per request trips it); the
    slow test is the tight one."""
    report = run_load(triton_server, reference, sample_items, count=300, samples=30, warmup=16,
                      max_batch=2, long_fraction=0.1)
    check(report, rss_bound_mib=max(300.0, 0.25 * report["rss_before_mib"]))


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.timeout(5400)
def test_load_10000_requests_at_concurrency_32(triton_server, reference, sample_items):
    count = int(os.environ.get("MMREC_LOAD_REQUESTS", "10000"))
    report = run_load(triton_server, reference, sample_items, count=count, samples=200, warmup=400,
                      max_batch=8, long_fraction=0.2)
    check(report, rss_bound_mib=max(RSS_GROWTH_BOUND_MIB, RSS_GROWTH_BOUND_FRACTION * report["rss_before_mib"]))
