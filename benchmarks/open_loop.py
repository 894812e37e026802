"""Open-loop capacity of the served `item_encoder` under a latency SLO, driven by MLPerf LoadGen.

Closed-loop load (N clients that each wait for their answer) slows down when the server does and
so hides queueing delay (coordinated omission). Here the load is open loop: MLPerf LoadGen's
Server scenario (`mlcommons-loadgen`, module `mlperf_loadgen`) draws Poisson arrivals at
`server_target_qps`, one item per query, and times every sample from its *scheduled* issue time
to `QuerySamplesComplete`, so a client or server that falls behind is charged for it.

How a trial runs (`run_rate`):
- The SUT's `issue_queries` sends each sample with tritonclient.grpc `async_infer` (prebuilt
  request tensors, a callback) and returns at once: issuing never waits for an answer.
- The gRPC callback completes the sample. A failed call (server error, invalid payload,
  client-side deadline) completes it too and is counted as an error, so LoadGen never hangs.
  Every call carries a client deadline (`timeout_s`, default max(1 s, 5 x SLO)): under heavy
  overload a sample completes as an error at about that deadline, which is past the SLO, so
  the verdict stands and a trial lasts at most its duration plus the deadline (p99 values above
  the deadline are censored at it; the record says so).
- Latency comes from LoadGen's own detail log (`mlperf_log_detail.txt`, one `:::MLLOG {json}`
  line per key, written into a temporary folder through LogSettings/LogOutputSettings):
  `result_{50,90,95,99}.00_percentile_latency_ns`, `result_query_count` (samples; one per
  query here), `result_completed_samples_per_sec` (achieved), `result_scheduled_samples_per_sec`
  (the Poisson schedule actually drawn), `result_perf_constraints_met` (the latency
  constraint: p99 <= target), `early_stopping_met` / `early_stopping_result` (LoadGen's
  binomial bound on whether enough samples back the percentile), `result_validity`.
- A rate passes when LoadGen's p99 <= SLO and no request failed (`max_error_rate`, default 0:
  a fast failure would otherwise lower the percentile).
- After the trial the server is drained (probe requests until one answers as fast as an idle
  server does), so a backlog does not leak into the next trial.

`find_capacity` searches the highest passing rate: from a start rate (half a short closed-loop
throughput estimate unless given), up geometrically until a rate fails, down if the first one
fails, then geometric bisection until the bracket is within `resolution` (5 %). The search is
repeated `trials` times independently (different LoadGen schedule seeds); it reports each
trial's capacity, their median and an order-statistic interval for it, and every measured point
(offered rate -> p50/p99) for the plot.

`perf_analyzer_at_rate` cross-checks one rate with NVIDIA perf_analyzer
(`--request-distribution poisson --request-rate-range R:R:1`) on the same payloads; note that
perf_analyzer times a request from when it is sent, LoadGen from when it was scheduled.

    python -m mmrec.benchmarks.open_loop --repository REPO --slo-ms 100 --trials 3 --output DIR
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mmrec import schema

from .settings import DEFAULT_SLO_MS, Settings

Progress = Callable[[str], None]

PERCENTILE = 0.99
NS_PER_MS = 1e6
OUTPUTS = (schema.ITEM_EMBEDDING, schema.INTEREST_PROBS, schema.ALIGNMENT)
PAYLOAD_SETS = ("jpeg_640x427", "jpeg_12mp_exif6")
PHONE_ORIENTATION = 6  # stored sideways, EXIF says rotate 90° clockwise (what phones send)
PHOTO_SIZES = ((640, 427), (427, 640))
LONG_CAPTION_EVERY = 4  # one caption in four is at the maximum token length
PERCENTILE_KEYS = {"p50": "result_50.00_percentile_latency_ns", "p90": "result_90.00_percentile_latency_ns",
                   "p95": "result_95.00_percentile_latency_ns", "p97": "result_97.00_percentile_latency_ns",
                   "p99": "result_99.00_percentile_latency_ns", "p99.9": "result_99.90_percentile_latency_ns",
                   "mean": "result_mean_latency_ns", "min": "result_min_latency_ns", "max": "result_max_latency_ns"}

_LOADGEN_LOCK = threading.Lock()  # LoadGen runs one test per process at a time


# --------------------------------------------------------------------------- payloads


@dataclass(frozen=True)
class Payload:
    """One item_encoder request: a caption and an encoded image (one item)."""

    text: str
    image: bytes
    label: str = ""
    tokens: int | None = None


def payload_sets(repository: Path, captions_per_photo: int = 8) -> dict[str, list[Payload]]:
    """The two payload sets, from the project's real data.

    `jpeg_640x427`: the known photos (mmrec.photos) that are 640 x 427 / 427 x 640 JPEGs (rocket,
    daisy, palace), as stored. `jpeg_12mp_exif6`: the same photos as 12 MP phone JPEGs stored
    sideways with EXIF orientation 6. Captions: real held-out captions of the repository's
    workload; every LONG_CAPTION_EVERY-th one is real captions joined until the server tokenizer
    truncates it to its maximum length (128 tokens). Payloads are ordered caption-major, so any
    stride through the list meets every photo."""
    from PIL import Image

    from mmrec.photos import known_photos, phone_photo

    from .workload import Workload

    workload = Workload(repository)
    photos = []
    for photo in known_photos():
        with Image.open(photo.path) as image:
            if image.format == "JPEG" and image.size in PHOTO_SIZES:
                photos.append(photo)
    if not photos:
        raise RuntimeError("no 640 x 427 JPEG among mmrec.photos.known_photos()")
    short = [item.caption for item in workload.items]
    long_texts = workload.long_texts(captions_per_photo)
    captions = [long_texts[i] if i % LONG_CAPTION_EVERY == LONG_CAPTION_EVERY - 1 else short[i % len(short)]
                for i in range(captions_per_photo)]
    _, mask = workload.tokenizer(captions)
    tokens = [int(n) for n in mask.sum(axis=1)]
    images = {PAYLOAD_SETS[0]: {p.name: p.read_bytes() for p in photos},
              PAYLOAD_SETS[1]: {p.name: phone_photo(p, PHONE_ORIENTATION) for p in photos}}
    return {name: [Payload(caption, by_photo[photo.name], f"{photo.name}/{n}tok", n)
                   for caption, n in zip(captions, tokens) for photo in photos]
            for name, by_photo in images.items()}


def describe_payloads(payloads: Sequence[Payload]) -> dict:
    tokens = [p.tokens for p in payloads if p.tokens is not None]
    sizes = sorted({len(p.image) for p in payloads})
    return {"items": len(payloads), "distinct_images": len(sizes), "image_bytes": sizes,
            "tokens": {"min": min(tokens), "max": max(tokens), "at_max": sum(t == max(tokens) for t in tokens)}
            if tokens else None,
            "labels": sorted({p.label for p in payloads})}


def _as_payloads(payloads) -> list[Payload]:
    return [p if isinstance(p, Payload) else Payload(*p) for p in payloads]


# --------------------------------------------------------------------------- the gRPC target

CATALOG_SET = "recommend_100k"  # catalog_scorer over a 100k-item catalog, one user per request
CATALOG_ITEMS = 100_000
CATALOG_USERS = 64
CATALOG_K = 10


class Target:
    """A gRPC client to item_encoder with every payload's request tensors built once (one
    IMAGE tensor per distinct image, shared by the payloads that use it), so issuing a sample
    costs one `async_infer` call."""

    def __init__(self, url: str, payloads, model: str = schema.ITEM_ENCODER, *, requests: list | None = None,
                 outputs: Sequence[str] = OUTPUTS, description: dict | None = None) -> None:
        """`payloads`: item_encoder items; or `requests` (prepared InferInput lists) for another
        model, with its `outputs` and a `description` of what the requests carry."""
        import tritonclient.grpc as grpcclient

        self.url, self.model = url, model
        self.client = grpcclient.InferenceServerClient(url)
        self.outputs = [grpcclient.InferRequestedOutput(name) for name in outputs]
        self._idle_ms: float | None = None
        if requests is not None:
            self.payloads, self.requests = [], list(requests)
            self.description = description or {"items": len(self.requests)}
            return
        self.payloads = _as_payloads(payloads)
        if not self.payloads:
            raise ValueError("no payloads")
        self.description = describe_payloads(self.payloads)
        images: dict[int, object] = {}

        def tensor(name: str, value: bytes):
            t = grpcclient.InferInput(name, [1, 1], "BYTES")
            t.set_data_from_numpy(np.array([[value]], dtype=object))
            return t

        self.requests = []
        for p in self.payloads:
            key = id(p.image)
            if key not in images:
                images[key] = tensor(schema.IMAGE, p.image)
            self.requests.append([tensor(schema.TEXT, p.text.encode()), images[key]])

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "Target":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, index: int, callback, timeout_s: float) -> None:
        """Asynchronous: returns once the call is started; `callback(result, error)` later."""
        self.client.async_infer(self.model, self.requests[index % len(self.requests)], callback,
                                outputs=self.outputs, client_timeout=timeout_s)

    def infer(self, index: int, timeout_s: float = 60.0) -> float:
        """One synchronous call; its latency in ms."""
        t0 = time.perf_counter()
        self.client.infer(self.model, self.requests[index % len(self.requests)], outputs=self.outputs,
                          client_timeout=timeout_s)
        return (time.perf_counter() - t0) * 1e3

    def warm_up(self, rounds: int = 2) -> None:
        for _ in range(rounds):
            for i in range(len(self.requests)):
                self.infer(i)

    def idle_ms(self) -> float:
        """Median latency of sequential calls on an otherwise idle server (measured once)."""
        if self._idle_ms is None:
            self._idle_ms = float(np.median([self.infer(i) for i in range(min(7, max(3, len(self.requests))))]))
        return self._idle_ms

    def drain(self, max_s: float = 30.0) -> float:
        """Wait until the server has no backlog: probe calls (one at a time) until one answers
        within 2 x the idle latency + 20 ms. Returns the seconds it took (bounded by `max_s`;
        at once when the server cannot be reached at all)."""
        start = time.perf_counter()
        try:
            limit = 2 * self.idle_ms() + 20.0
        except Exception:  # noqa: BLE001 - no server to drain (the trial's errors say why)
            return time.perf_counter() - start
        i = 0
        while time.perf_counter() - start < max_s:
            try:
                if self.infer(i, timeout_s=max_s) <= limit:
                    break
            except Exception:  # noqa: BLE001 - a failing probe: wait and try again
                time.sleep(0.2)
            i += 1
        return time.perf_counter() - start


def closed_loop_rate(target: Target, concurrency: int = 2, seconds: float = 3.0) -> float:
    """Items/s of `concurrency` clients that each wait for their answer (a start point for the
    search; closed loop, so it is not a capacity under an SLO)."""
    deadline = time.perf_counter() + seconds
    counts = [0] * concurrency

    def worker(w: int) -> None:
        i = w
        while time.perf_counter() < deadline:
            target.infer(i)
            counts[w] += 1
            i += concurrency

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    return sum(counts) / (time.perf_counter() - start)


# --------------------------------------------------------------------------- LoadGen log


def read_detail_log(path: Path) -> dict:
    """key -> value of every `:::MLLOG {json}` line of LoadGen's mlperf_log_detail.txt (the
    last one wins), plus `_errors`/`_warnings`: the messages LoadGen flagged as such."""
    values: dict = {"_errors": [], "_warnings": []}
    for line in Path(path).read_text(errors="replace").splitlines():
        if not line.startswith(":::MLLOG "):
            continue
        try:
            entry = json.loads(line[len(":::MLLOG "):])
        except json.JSONDecodeError:
            continue
        values[entry["key"]] = entry.get("value")
        meta = entry.get("metadata") or {}
        if meta.get("is_error"):
            values["_errors"].append(f"{entry['key']}: {entry.get('value')}")
        elif meta.get("is_warning"):
            values["_warnings"].append(f"{entry['key']}: {entry.get('value')}")
    return values


def _loadgen_version() -> str | None:
    try:
        return importlib.metadata.version("mlcommons-loadgen")
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- one rate


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok = 0
        self.errors = 0
        self.timeouts = 0
        self.first_error: str | None = None
        self.issue_s = 0.0  # time spent inside issue_queries (must stay tiny: open loop)
        self.issue_calls = 0

    def failed(self, err: BaseException | str) -> None:
        text = str(err)
        with self.lock:
            self.errors += 1
            if "deadline" in text.lower():
                self.timeouts += 1
            if self.first_error is None:
                self.first_error = text.strip()[:500]


def default_timeout_s(slo_ms: float) -> float:
    """A sample's client deadline: well past the SLO, so a timed-out sample counts as over it."""
    return max(1.0, 5 * slo_ms / 1e3)


def run_rate(url: str | Target, payloads, qps: float, duration_s: float, slo_ms: float = DEFAULT_SLO_MS, *,
             min_queries: int = 1, timeout_s: float | None = None, seed: int = 0, max_error_rate: float = 0.0,
             drain: bool = True, drain_max_s: float = 30.0, log_dir: Path | None = None) -> dict:
    """One LoadGen Server-scenario trial at `qps` Poisson arrivals for at least `duration_s`
    (and `min_queries` queries), one item per query, against item_encoder at `url` (or a
    prepared `Target`, whose `payloads` are then its own). Returns offered/achieved rates,
    p50/p90/p99 (ms, LoadGen's, from scheduled issue time), samples, errors, the SLO verdict
    and LoadGen's raw verdict. `log_dir`: keep LoadGen's logs there (default: a temp folder,
    removed)."""
    import mlperf_loadgen as lg

    if qps <= 0 or duration_s <= 0:
        raise ValueError("qps and duration_s must be positive")
    own = not isinstance(url, Target)
    target = Target(url, payloads) if own else url
    timeout_s = timeout_s if timeout_s is not None else default_timeout_s(slo_ms)
    if timeout_s * 1e3 <= slo_ms:
        raise ValueError("timeout_s must exceed the SLO (a timed-out sample must count as over it)")
    counters = _Counters()

    def issue_queries(query_samples) -> None:
        t0 = time.perf_counter()
        for q in query_samples:
            qid = q.id

            def done(result=None, error=None, qid=qid) -> None:  # tritonclient passes keywords
                try:
                    if error is not None:
                        counters.failed(error)
                    else:
                        with counters.lock:
                            counters.ok += 1
                finally:  # whatever happens above, LoadGen gets its sample back
                    lg.QuerySamplesComplete([lg.QuerySampleResponse(qid, 0, 0)])

            try:
                target.send(q.index, done, timeout_s)
            except Exception as err:  # noqa: BLE001 - never leave a sample unanswered
                counters.failed(f"{type(err).__name__}: {err}")
                lg.QuerySamplesComplete([lg.QuerySampleResponse(qid, 0, 0)])
        counters.issue_s += time.perf_counter() - t0
        counters.issue_calls += 1

    def flush_queries() -> None:
        pass

    settings = lg.TestSettings()
    settings.scenario = lg.TestScenario.Server
    settings.mode = lg.TestMode.PerformanceOnly
    settings.server_target_qps = float(qps)
    settings.server_target_latency_ns = int(slo_ms * NS_PER_MS)
    settings.server_target_latency_percentile = PERCENTILE
    settings.min_duration_ms = int(duration_s * 1e3)
    settings.max_duration_ms = int(max(2 * duration_s, duration_s + 5) * 1e3)
    settings.min_query_count = int(min_queries)
    settings.schedule_rng_seed = settings.sample_index_rng_seed = settings.qsl_rng_seed = int(seed)

    temp = Path(tempfile.mkdtemp(prefix="loadgen_")) if log_dir is None else Path(log_dir)
    temp.mkdir(parents=True, exist_ok=True)
    log = lg.LogSettings()
    log.log_output.outdir = str(temp)
    log.log_output.copy_summary_to_stdout = False
    log.log_output.copy_detail_to_stdout = False
    log.enable_trace = False

    if drain:  # the drain's yardstick: idle latency, taken before the load (cached on the target)
        try:
            target.idle_ms()
        except Exception:  # noqa: BLE001 - unreachable server: the trial records the errors
            pass
    n = len(target.requests)
    try:
        with _LOADGEN_LOCK:
            sut = lg.ConstructSUT(issue_queries, flush_queries)
            qsl = lg.ConstructQSL(n, n, lambda samples: None, lambda samples: None)
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                lg.StartTestWithLogSettings(sut, qsl, settings, log)
            finally:
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                lg.DestroyQSL(qsl)
                lg.DestroySUT(sut)
        detail = read_detail_log(temp / "mlperf_log_detail.txt")
    finally:
        if log_dir is None:
            shutil.rmtree(temp, ignore_errors=True)
    drained_s = target.drain(drain_max_s) if drain else None
    if own:
        target.close()

    ms = {k: detail[key] / NS_PER_MS for k, key in PERCENTILE_KEYS.items() if detail.get(key) is not None}
    samples = int(detail.get("result_query_count") or 0)
    p99 = ms.get("p99")
    within = p99 is not None and p99 <= slo_ms
    error_ok = counters.errors <= max_error_rate * max(1, samples)
    return {
        "offered_qps": float(qps),
        "scheduled_qps": detail.get("result_scheduled_samples_per_sec"),
        "achieved_qps": detail.get("result_completed_samples_per_sec"),
        "latency_ms": ms,
        "samples": samples,
        "answered": counters.ok + counters.errors,
        "ok": counters.ok,
        "errors": counters.errors,
        "timeouts": counters.timeouts,
        "first_error": counters.first_error,
        "slo_ms": slo_ms,
        "p99_within_slo": within,
        "passed": bool(within and error_ok),
        # a timed-out sample's latency is the deadline: percentiles at or above it are censored
        "p99_censored": bool(counters.timeouts and p99 is not None and p99 >= timeout_s * 1e3 * 0.95),
        "timeout_s": timeout_s,
        "duration_s": duration_s,
        "min_queries": min_queries,
        "seed": seed,
        "wall_s": round(wall, 3),
        "drain_s": None if drained_s is None else round(drained_s, 3),
        "client_cpu_ms_per_sample": cpu * 1e3 / samples if samples else None,
        "issue_ms_per_call": counters.issue_s * 1e3 / counters.issue_calls if counters.issue_calls else None,
        "loadgen": {
            "version": _loadgen_version(),
            "log": "mlperf_log_detail.txt",
            "validity": detail.get("result_validity"),
            "latency_constraint_met": detail.get("result_perf_constraints_met"),
            "min_duration_met": detail.get("result_min_duration_met"),
            "min_queries_met": detail.get("result_min_queries_met"),
            "early_stopping_met": detail.get("early_stopping_met"),
            "early_stopping_result": " ".join(str(detail.get("early_stopping_result") or "").split()),
            "overlatency_queries": detail.get("result_overlatency_query_count"),
            "generated_queries": detail.get("generated_query_count"),
            "invalid_reason": detail.get("result_invalid_reason") or None,
            "errors": detail["_errors"],
            "warnings": detail["_warnings"][:10],
        },
    }


def progress_line(step: dict, trial: int | None = None) -> str:
    ms = step["latency_ms"]
    head = f"trial {trial}: " if trial is not None else ""
    return (f"{head}offered {step['offered_qps']:7.2f}/s  achieved {step['achieved_qps'] or 0:7.2f}/s  "
            f"p50 {ms.get('p50', float('nan')):8.1f} ms  p99 {ms.get('p99', float('nan')):8.1f} ms  "
            f"n={step['samples']} err={step['errors']}  {'PASS' if step['passed'] else 'FAIL'}"
            f"{' (early stopping met)' if step['loadgen']['early_stopping_met'] else ''}")


# --------------------------------------------------------------------------- capacity search


def median_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Distribution-free interval for the median of independent trials from order statistics.

    With n sorted values x(1) <= ... <= x(n), the pair (x(k), x(n+1-k)) covers the true median
    with probability 1 - 2 P(Binomial(n, 1/2) < k). The narrowest pair reaching `confidence` is
    returned; with too few trials for that, [min, max] and the coverage it really has
    (n = 3: 75 %, n = 5: 93.8 %, n = 6: 96.9 %). No resampling: trials are the unit."""
    xs = sorted(float(v) for v in values)
    n = len(xs)
    if n == 0:
        return {"low": None, "high": None, "coverage": None, "method": "order statistics", "n": 0}

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n

    k = max([k for k in range(1, (n + 1) // 2 + 1) if coverage(k) >= confidence] or [1])
    return {"low": xs[k - 1], "high": xs[n - k], "coverage": round(coverage(k), 4),
            "method": f"order statistics x({k}), x({n + 1 - k}) of {n} trials", "n": n}


def _search(target: Target, start: float, slo_ms: float, step_s: float, growth: float, resolution: float,
            max_steps: int, budget_s: float | None, min_queries: int, timeout_s: float | None, seed: int,
            min_qps: float, progress: Progress, trial: int) -> dict:
    lo = hi = None
    rate = start
    steps: list[dict] = []
    began = time.perf_counter()
    stop = "max_steps"
    while len(steps) < max_steps:
        if budget_s is not None and steps and time.perf_counter() - began + step_s > budget_s:
            stop = "budget"
            break
        step = run_rate(target, None, rate, step_s, slo_ms, min_queries=min_queries, timeout_s=timeout_s,
                        seed=seed + len(steps))
        step["trial"] = trial
        steps.append(step)
        progress(progress_line(step, trial))
        if step["passed"]:
            lo = rate if lo is None else max(lo, rate)
        else:
            hi = rate if hi is None else min(hi, rate)
        if hi is None:
            rate = rate * growth
        elif lo is None:
            rate = rate / growth
            if rate < min_qps:
                stop = "below_min_qps"
                break
        elif (hi - lo) / lo <= resolution:
            stop = "resolved"
            break
        else:
            rate = math.sqrt(lo * hi)
    return {"trial": trial, "capacity_qps": lo if lo is not None else 0.0, "first_failing_qps": hi,
            "resolved": stop == "resolved", "stopped": stop, "steps": len(steps),
            "seconds": round(time.perf_counter() - began, 1), "_points": steps}


def find_capacity(url: str | Target, payloads, slo_ms: float = DEFAULT_SLO_MS, trials: int = 3, *,
                  step_s: float = 5.0, start_qps: float | None = None, growth: float = 1.5, later_growth: float = 1.2,
                  resolution: float = 0.05, max_steps: int = 12, trial_budget_s: float | None = None,
                  min_queries: int = 1, timeout_s: float | None = None, min_qps: float = 0.25,
                  seed: int = 0, progress: Progress | None = print) -> dict:
    """The highest Poisson rate (items/s) whose LoadGen p99 stays <= `slo_ms` with no failed
    request, searched `trials` times independently.

    The first trial starts at `start_qps` (default: half a 3 s closed-loop throughput estimate
    with 2 clients); a later trial starts at the capacity the trial before it found and steps by
    `later_growth` (a shorter search; its LoadGen schedule is drawn afresh). A trial multiplies
    by its growth until a rate fails (divides if the first one fails, down
    to `min_qps`), then bisects geometrically until (fail - pass) / pass <= `resolution`. Every
    step is one `run_rate` of `step_s` seconds (plus drain); a trial stops after `max_steps`
    steps or when another step would pass `trial_budget_s`. `progress` gets one line per rate.
    Returns per-trial capacities, their median with an order-statistic interval
    (`median_interval`), and every measured point for `plot_capacity`."""
    say = progress or (lambda line: None)
    own = not isinstance(url, Target)
    target = Target(url, payloads) if own else url
    try:
        target.warm_up()
        idle = target.idle_ms()
        estimate = None
        if start_qps is None:
            estimate = closed_loop_rate(target)
            start_qps = max(min_qps, 0.5 * estimate)
            say(f"closed-loop estimate {estimate:.1f} items/s (2 clients); idle latency {idle:.1f} ms; "
                f"search starts at {start_qps:.1f}/s")
        runs = []
        for t in range(trials):
            begin = runs[-1]["capacity_qps"] if runs and runs[-1]["capacity_qps"] > 0 else start_qps
            runs.append(_search(target, begin, slo_ms, step_s, growth if t == 0 else later_growth, resolution,
                                max_steps, trial_budget_s, min_queries, timeout_s, seed + 1000 * t, min_qps, say, t))
    finally:
        if own:
            target.close()
    points = [p for r in runs for p in r.pop("_points")]
    capacities = [r["capacity_qps"] for r in runs]
    interval = median_interval(capacities)
    result = {
        "slo_ms": slo_ms, "percentile": PERCENTILE, "trials": runs, "capacity_qps": capacities,
        "median_qps": float(np.median(capacities)) if capacities else None,
        "interval": interval,
        "search": {"start_qps": start_qps, "closed_loop_estimate_qps": estimate, "growth": growth,
                   "later_growth": later_growth, "later_trials_start": "at the previous trial's capacity",
                   "resolution": resolution, "step_s": step_s, "max_steps": max_steps,
                   "trial_budget_s": trial_budget_s, "min_queries": min_queries, "timeout_s": timeout_s,
                   "idle_latency_ms": idle, "seeds": [seed + 1000 * t for t in range(trials)],
                   "pass_rule": "LoadGen p99 (from scheduled issue time) <= SLO and no failed request"},
        "early_stopping_used": "LoadGen defaults (recorded per point: loadgen.early_stopping_met)",
        "early_stopping_met_points": sum(bool(p["loadgen"]["early_stopping_met"]) for p in points),
        "points": points,
        "payloads": target.description,
        "model": target.model,
        "unit": "users/s" if target.model == schema.CATALOG_SCORER else "items/s",
    }
    say(f"capacity at p99 <= {slo_ms:g} ms: median {result['median_qps']:.1f}/s over {trials} trial(s) "
        f"{[round(c, 1) for c in capacities]}")
    return result


# --------------------------------------------------------------------------- perf_analyzer


def perf_analyzer_at_rate(url: str, payloads, rate: float, workdir: Path, *, window_ms: int = 5000,
                          max_trials: int = 4, stability_pct: int = 20, max_items: int = 8,
                          model: str = schema.ITEM_ENCODER, perf_analyzer: Path | None = None) -> dict:
    """NVIDIA perf_analyzer at one Poisson rate (`--request-distribution poisson
    --request-rate-range R:R:1`, batch 1, gRPC) on up to `max_items` of the payloads (a stride
    through them). Returns its p50/p90/p99 (ms; timed from send, not from schedule) and
    throughput, or {"skipped": True, "reason": ...} when perf_analyzer cannot run here.
    Like benchmarks/perf_analyzer.run_level, a run that cannot reach the stability threshold is
    retried looser, then with none (`stable` says which)."""
    from . import perf_analyzer as pa

    located = pa.locate(perf_analyzer)
    if located.tool is None:
        return {"skipped": True, "reason": located.reason, "rate": rate}
    items = _as_payloads(payloads)
    chosen = items[::max(1, math.ceil(len(items) / max_items))][:max_items]
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = pa.write_input_data([p.text for p in chosen], [p.image for p in chosen], workdir / "pa_open_loop.json")
    report = workdir / "pa_open_loop.csv"
    attempts, output, cmd = [], "", []
    for stability in (stability_pct, max(3 * stability_pct, 50), pa.ACCEPT_ANY_STABILITY_PCT):
        cmd = [str(located.tool.binary), "-m", model, "-u", url, "-i", "grpc", "--request-distribution", "poisson",
               "--request-rate-range", f"{rate:g}:{rate:g}:1", "--input-data", str(data), "-b", "1",
               "--measurement-mode", "time_windows", "-p", str(window_ms), "--max-trials", str(max_trials),
               "-s", str(stability), "-f", str(report)]
        timeout = 60 + (max_trials + 2) * window_ms / 1000 * 2
        report.unlink(missing_ok=True)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=located.tool.env(), timeout=timeout)
            output, rc = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as err:
            output, rc = f"timed out after {timeout:.0f} s: {err.stdout or ''}", -1
        raw = (pa.parse_csv(report) if report.is_file() else {}) or pa.parse_stdout(output)
        attempts.append({"stability_pct": stability, "rc": rc})
        if rc == 0 and "throughput_infer_s" in raw:
            ms = {p: raw[f"{p}_us"] / pa.US_PER_MS for p in ("p50", "p90", "p95", "p99", "avg") if f"{p}_us" in raw}
            return {"skipped": False, "rate": rate, "latency_ms": ms, "throughput_items_s": raw["throughput_infer_s"],
                    "samples_last_window": int(raw["throughput_infer_s"] * window_ms / 1000),
                    "breakdown_ms": {k[:-3] + "_ms": v / pa.US_PER_MS for k, v in raw.items()
                                     if k.startswith(("server_", "client_", "network_"))},
                    "stability_pct": stability, "stable": stability <= 100, "attempts": attempts,
                    "items": len(chosen), "window_ms": window_ms, "command": " ".join(cmd),
                    "timed_from": "send (perf_analyzer), not scheduled issue time"}
    return {"skipped": False, "rate": rate, "error": output.strip()[-800:], "command": " ".join(cmd),
            "attempts": attempts}


def cross_check(url: str, payloads, rate: float, slo_ms: float, workdir: Path, *, duration_s: float = 15.0,
                max_items: int = 8, timeout_s: float | None = None, seed: int = 7) -> dict:
    """LoadGen and perf_analyzer at the same Poisson rate on the same payload subset, back to back."""
    items = _as_payloads(payloads)
    chosen = items[::max(1, math.ceil(len(items) / max_items))][:max_items]
    with Target(url, chosen) as target:
        target.warm_up(1)
        loadgen = run_rate(target, None, rate, duration_s, slo_ms, timeout_s=timeout_s, seed=seed)
        window_ms = int(max(2000, duration_s * 1000 / 3))
        pa = perf_analyzer_at_rate(url, chosen, rate, workdir, window_ms=window_ms, max_items=max_items)
        if not pa.get("skipped"):
            pa["drain_s"] = round(target.drain(), 3)
    row = {"rate": rate, "loadgen": loadgen, "perf_analyzer": pa}
    if not pa.get("skipped") and "latency_ms" in pa:
        row["ratio_loadgen_over_pa"] = {q: loadgen["latency_ms"][q] / pa["latency_ms"][q]
                                        for q in ("p50", "p90", "p99")
                                        if pa["latency_ms"].get(q) and loadgen["latency_ms"].get(q)}
    return row


# --------------------------------------------------------------------------- plot


def plot_capacity(result: dict, path: Path, title: str | None = None) -> Path:
    """Offered rate vs LoadGen p50/p99 (every measured point, one colour per trial), the SLO
    line, and the capacity median with its interval over trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 5))
    trials = sorted({p.get("trial", 0) for p in result["points"]})
    for t in trials:
        pts = sorted((p for p in result["points"] if p.get("trial", 0) == t), key=lambda p: p["offered_qps"])
        x = [p["offered_qps"] for p in pts]
        ax.plot(x, [p["latency_ms"].get("p50", float("nan")) for p in pts], "o", color=f"C{t}", alpha=0.8,
                label=f"trial {t} p50")
        ax.plot(x, [p["latency_ms"].get("p99", float("nan")) for p in pts], "^", color=f"C{t}", alpha=0.8,
                mfc="none", label=f"trial {t} p99")
    ax.axhline(result["slo_ms"], color="red", ls="--", lw=1, label=f"SLO p99 {result['slo_ms']:g} ms")
    median = result.get("median_qps")
    if median:
        ax.axvline(median, color="black", lw=1.2, label=f"capacity {median:.1f}/s (median)")
        iv = result.get("interval") or {}
        if iv.get("low") is not None and iv["high"] > iv["low"]:
            ax.axvspan(iv["low"], iv["high"], color="grey", alpha=0.2,
                       label=f"trials {iv['low']:.1f}–{iv['high']:.1f}/s ({100 * iv['coverage']:.0f} % cover)")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate (Poisson, items/s)")
    ax.set_ylabel("latency from scheduled issue (ms)")
    ax.set_title(title or "item_encoder open loop (MLPerf LoadGen, Server scenario)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- the bench section


def samples_at_capacity(result: dict) -> int | None:
    """LoadGen samples behind the p99 of the highest passing rate of the median trial."""
    passing = [p for p in result["points"] if p["passed"] and result["median_qps"]
               and abs(p["offered_qps"] - result["median_qps"]) < 1e-9]
    return passing[0]["samples"] if passing else None


def catalog_target(url: str, vectors: np.ndarray, users: int = CATALOG_USERS, k: int = CATALOG_K) -> Target:
    """Requests to catalog_scorer (what `recommend` sends): one user vector each, near real items
    of the catalog (index_scan.simulated_users), top-k."""
    import tritonclient.grpc as grpcclient

    from .index_scan import simulated_users

    vectors_users = simulated_users(vectors, users, seed=1)
    requests = []
    for user in vectors_users:
        embedding = grpcclient.InferInput(schema.USER_EMBEDDING, [1, vectors.shape[1]], "FP32")
        embedding.set_data_from_numpy(user[None, :].astype(np.float32))
        top = grpcclient.InferInput(schema.TOP_K, [1, 1], "INT32")
        top.set_data_from_numpy(np.array([[k]], np.int32))
        requests.append([embedding, top])
    return Target(url, None, schema.CATALOG_SCORER, requests=requests, outputs=(schema.ITEM_IDS, schema.SCORE),
                  description={"items": len(requests), "catalog_items": int(vectors.shape[0]),
                               "dim": int(vectors.shape[1]), "k": k, "what": "one user vector per request"})


def catalog_capacity(settings: Settings, workdir: Path, progress: Progress) -> dict:
    """Capacity of `recommend` (catalog_scorer) on a simulated 100k-item catalog, served by its
    own tritonserver (the suite's serves the export, not an index)."""
    from .index_scan import publish_catalog, served_catalog

    vectors = publish_catalog(Path(workdir) / "catalog", CATALOG_ITEMS)
    with served_catalog(Path(workdir) / "catalog", Path(workdir) / "catalog_server") as server, \
            catalog_target(server.urls["grpc"], vectors) as target:
        return find_capacity(target, None, settings.slo_ms, settings.capacity_trials, step_s=settings.capacity_step_s,
                             max_steps=settings.capacity_max_steps, progress=lambda line: progress("  " + line))


def run_capacity(repository: Path, settings: Settings, url: str, workdir: Path, progress: Progress) -> dict:
    """`mmrec bench`'s capacity section: `find_capacity` on each payload set of
    `settings.capacity_sets` through the suite's server, then the cross-check at the median;
    `recommend_100k` on a catalog server of its own."""
    sets = payload_sets(repository)
    out: dict = {"slo_ms": settings.slo_ms, "percentile": PERCENTILE, "model": schema.ITEM_ENCODER,
                 "items_per_request": 1, "loadgen_version": _loadgen_version(), "sets": {}}
    for name in settings.capacity_sets:
        if name == CATALOG_SET:
            progress(f"capacity {name}: catalog_scorer over {CATALOG_ITEMS:,} items, {settings.capacity_trials} trial(s)")
            result = catalog_capacity(settings, workdir, progress)
            result["samples_at_capacity"] = samples_at_capacity(result)
            out["sets"][name] = result
            continue
        progress(f"capacity {name}: {len(sets[name])} payloads, {settings.capacity_trials} trial(s)")
        result = find_capacity(url, sets[name], settings.slo_ms, settings.capacity_trials,
                               step_s=settings.capacity_step_s, max_steps=settings.capacity_max_steps,
                               progress=lambda line: progress("  " + line))
        if settings.capacity_cross_check_s > 0 and result["median_qps"] and name == settings.capacity_sets[0]:
            result["cross_check"] = cross_check(url, sets[name], round(result["median_qps"], 1), settings.slo_ms,
                                                workdir, duration_s=settings.capacity_cross_check_s)
        result["samples_at_capacity"] = samples_at_capacity(result)
        out["sets"][name] = result
    return out


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Open-loop capacity of item_encoder under a p99 SLO "
                                                 "(MLPerf LoadGen Server scenario), both payload sets.")
    parser.add_argument("--repository", type=Path, required=True, help="exported model repository")
    parser.add_argument("--output", type=Path, required=True, help="folder for open_loop.json and the PNGs")
    parser.add_argument("--slo-ms", type=float, default=DEFAULT_SLO_MS)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--step-s", type=float, default=5.0, help="seconds of load per rate tried")
    parser.add_argument("--max-steps", type=int, default=12, help="rates tried per trial at most")
    parser.add_argument("--trial-budget-s", type=float, default=None, help="seconds per trial at most")
    parser.add_argument("--resolution", type=float, default=0.05)
    parser.add_argument("--growth", type=float, default=1.5)
    parser.add_argument("--sets", nargs="+", default=list(PAYLOAD_SETS), choices=PAYLOAD_SETS)
    parser.add_argument("--cross-check-s", type=float, default=15.0,
                        help="seconds of LoadGen and of perf_analyzer at the capacity rate (0: skip)")
    args = parser.parse_args(argv)

    from .machine import RunStart, busy_check, write_results
    from .serving import running_server

    start = RunStart.now()
    args.output.mkdir(parents=True, exist_ok=True)
    record: dict = {"mlcommons-loadgen": _loadgen_version(), "busy_check": busy_check(),
                    "settings": vars(args) | {"repository": str(args.repository), "output": str(args.output)},
                    "sets": {}}
    print(f"busy check before: {record['busy_check']}", flush=True)
    sets = payload_sets(args.repository)
    started = time.perf_counter()
    with running_server(args.repository, args.output / "tritonserver.log") as server:
        url = server.urls["grpc"]
        for name in args.sets:
            print(f"== {name}: {describe_payloads(sets[name])['items']} payloads", flush=True)
            result = find_capacity(url, sets[name], args.slo_ms, args.trials, step_s=args.step_s,
                                   growth=args.growth, resolution=args.resolution, max_steps=args.max_steps,
                                   trial_budget_s=args.trial_budget_s,
                                   progress=lambda line: print("  " + line, flush=True))
            if args.cross_check_s > 0 and result["median_qps"]:
                rate = round(result["median_qps"], 1)
                result["cross_check"] = cross_check(url, sets[name], rate, args.slo_ms, args.output / "pa",
                                                    duration_s=args.cross_check_s)
                pa = result["cross_check"]["perf_analyzer"]
                lgp = result["cross_check"]["loadgen"]["latency_ms"]
                print(f"  cross-check at {rate}/s: LoadGen p50 {lgp.get('p50', float('nan')):.1f} "
                      f"p99 {lgp.get('p99', float('nan')):.1f} ms; perf_analyzer "
                      + (pa.get("reason") or pa.get("error") or
                         f"p50 {pa['latency_ms'].get('p50', float('nan')):.1f} p99 "
                         f"{pa['latency_ms'].get('p99', float('nan')):.1f} ms, {pa['throughput_items_s']:.1f}/s"),
                      flush=True)
            result["plot"] = str(plot_capacity(result, args.output / f"open_loop_{name}.png",
                                               f"item_encoder open loop, {name}"))
            record["sets"][name] = result
    record["seconds"] = round(time.perf_counter() - started, 1)
    out = write_results(args.output / "open_loop.json", json.loads(json.dumps(record, default=str)), start)
    print(f"wrote {out} (provenance: commit, machine, load before and after)", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
