"""Catalog scan benchmark (issue 13): top-k latency and memory of the served exact scan for 10k,
100k and 1M items, next to this machine's physical limits measured in the same run.

- Limits: memory bandwidth = a threaded numpy copy of a 512 MiB array ((read + write) bytes / s,
  one thread per usable core); GEMM peak = the best of numpy sgemm and ONNX Runtime MatMul on
  2048^3 at the same thread count, both measured at the start and again right before each
  catalog (the machine is shared; a ratio is judged against the limit measured next to it).
  One user's scan cannot beat (Et bytes / bandwidth), a batch cannot beat (2·B·N·D / peak).
- What is timed is the served code itself: the catalog_scorer model.py's CatalogScan over files
  written by the same publisher (`write_version_files`), after checking its top-k equals numpy's
  exact ranking (float64, stable) for several users.
- Reduced precision (benchmark-only graphs, not served): INT8 (MatMulInteger on an int8 copy)
  and FP16 copies of Et; top-k overlap with the exact answer, raw and after an exact float64
  re-rank of K + margin candidates (what a served variant would do), and their time.
- Served: the same index behind tritonserver (gRPC, python backend), one user per request.

Synthetic unit vectors stand in for size (quality is measured on real items by the tests).
`python -m mmrec.benchmarks.index_scan --help` or `mmrec bench-index`.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from mmrec import schema

from .machine import (RunStart, command_line, cpu_info, cpu_share, git_commit, loadavg, machine_info, package_versions,
                      write_results)

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
DEFAULT_DIM = 256
DEFAULT_K = 100
BATCH_USERS = 32
CHECK_USERS = 8
BANDWIDTH_BYTES = 512 * 2**20
GEMM_SIZE = 2048
DEFAULT_OUTPUT = Path("benchmarks/results/index")
QUANT_MARGIN_FACTOR = 2  # quantized scans keep 2K candidates for the exact re-rank


# ---------------------------------------------------------------------------------- helpers

def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def memory_kib() -> dict[str, int]:
    """Resident memory split into anonymous (heap: prepacked copies) and file-backed (mmapped index
    files). PSS, not RSS: the two sessions of prepacking=auto map the same files, and RSS would
    count a page once per mapping."""
    out = {}
    for source, keys in (("/proc/self/status", ("VmRSS",)), ("/proc/self/smaps_rollup", ("Pss_Anon", "Pss_File"))):
        try:
            lines = Path(source).read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0])
    return out


def percentiles(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "min_ms": float(a.min()), "runs": len(a)}


def timed(fn, runs: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def unit_vectors(n: int, d: int, seed: int, block: int = 262_144) -> np.ndarray:
    """[n, d] float32 unit vectors, generated in blocks (1M x 256 is 1 GiB)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for start in range(0, n, block):
        v = rng.standard_normal((min(block, n - start), d), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        out[start:start + len(v)] = v
    return out


def simulated_users(vectors: np.ndarray, count: int, seed: int) -> np.ndarray:
    """A user = the mean of 3 items' vectors (the project's user model)."""
    rng = np.random.default_rng(seed)
    return np.stack([vectors[rng.choice(len(vectors), 3, replace=False)].mean(axis=0)
                     for _ in range(count)]).astype(np.float32)


def exact_top_k(vectors: np.ndarray, users: np.ndarray, k: int, block: int = 131_072) -> np.ndarray:
    """numpy's exact ranking: float64 logits, (score desc, row asc); blocked to bound memory."""
    logits = np.empty((len(users), len(vectors)), np.float64)
    u = users.astype(np.float64)
    for start in range(0, len(vectors), block):
        logits[:, start:start + block] = u @ vectors[start:start + block].astype(np.float64).T
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


# ---------------------------------------------------------------------------------- limits

def measure_bandwidth(threads: int, nbytes: int = BANDWIDTH_BYTES, repeats: int = 7) -> dict:
    """Threaded numpy copy: (read + write) bytes / best time, and the median for context."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(len(src)), threads)
    slices = [slice(int(p[0]), int(p[-1]) + 1) for p in parts if len(p)]

    def once() -> float:
        workers = [threading.Thread(target=np.copyto, args=(dst[s], src[s])) for s in slices]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - start

    once()
    times = [once() for _ in range(repeats)]
    return {"copy_gbps_best": 2 * nbytes / min(times) / 1e9, "copy_gbps_median": 2 * nbytes / float(np.median(times)) / 1e9,
            "bytes": nbytes, "threads": threads, "method": "numpy.copyto per thread; (read+write) bytes / time"}


def measure_gemm_peak(threads: int, size: int = GEMM_SIZE, repeats: int = 5) -> dict:
    """sgemm GFLOP/s: numpy (its BLAS) and ONNX Runtime MatMul (MLAS), same thread count."""
    from onnx import TensorProto, helper

    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    flops = 2.0 * size ** 3
    numpy_times = timed(lambda: a @ a, repeats, warmup=1)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [size, size])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])])
    session = _ort_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                           threads)
    ort_times = timed(lambda: session.run(None, {"a": a, "b": a}), repeats, warmup=1)
    numpy_gflops, ort_gflops = flops / min(numpy_times) / 1e9, flops / min(ort_times) / 1e9
    return {"numpy_gflops": numpy_gflops, "onnxruntime_gflops": ort_gflops,
            "peak_gflops": max(numpy_gflops, ort_gflops), "size": size, "threads": threads}


class Probes:
    """Short limit probes interleaved with the timed runs: each scan is judged against the
    bandwidth (or GEMM rate) measured right next to it, so a load spike moves both sides."""

    def __init__(self, threads: int, nbytes: int = 128 * 2**20, gemm: int = 1024) -> None:
        self.src = np.ones(nbytes // 4, np.float32)
        self.dst = np.empty_like(self.src)
        parts = np.array_split(np.arange(len(self.src)), threads)
        self.slices = [slice(int(p[0]), int(p[-1]) + 1) for p in parts if len(p)]
        self.a = np.random.default_rng(0).standard_normal((gemm, gemm), dtype=np.float32)
        self.copy_gbps(), self.gemm_gflops()  # warm

    def copy_gbps(self) -> float:
        workers = [threading.Thread(target=np.copyto, args=(self.dst[s], self.src[s])) for s in self.slices]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return 2 * self.src.nbytes / (time.perf_counter() - start) / 1e9

    def gemm_gflops(self) -> float:
        start = time.perf_counter()
        self.a @ self.a
        return 2.0 * len(self.a) ** 3 / (time.perf_counter() - start) / 1e9


def paired(fn, probe, bound_s, runs: int, warmup: int = 3) -> tuple[list[float], list[float]]:
    """Times of fn() and, per run, time / (the bound from the probe measured just before it)."""
    for _ in range(warmup):
        fn()
    times, ratios = [], []
    for _ in range(runs):
        rate = probe()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        ratios.append(elapsed / bound_s(rate))
    return times, ratios


def _ort_session(model, threads: int, prepacking: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepacking:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------- the served scan

@dataclass
class Limits:
    bandwidth_gbps: float
    peak_gflops: float


def bench_served_scan(vectors: np.ndarray, users: np.ndarray, k: int, folder: Path, runs: int,
                      batch_runs: int, prepacking: str, limits: Limits) -> dict:
    """Time the catalog_scorer model's own CatalogScan over freshly published files."""
    from mmrec.index_publish import fingerprint, write_version_files
    from mmrec.model_repository.lib import runtime
    from mmrec.model_repository.lib.catalog_scan import INDEX_FILE, CatalogScan

    n, d = vectors.shape
    ids = [f"item-{i}" for i in range(n)]
    if not (folder / INDEX_FILE).is_file():
        write_version_files(folder, ids, vectors, fingerprint(ids, vectors))
    probes = Probes(_threads())  # allocated before the memory baseline: only the index counts
    gc.collect()
    before = memory_kib()
    start = time.perf_counter()
    scan = CatalogScan(folder, runtime.make_session, prepacking=prepacking)
    load_s = time.perf_counter() - start
    loaded = memory_kib()
    want = exact_top_k(vectors, users[:CHECK_USERS], k)
    got = scan.search(users[:CHECK_USERS], k)
    exact = bool((got.rows == want).all())
    one = users[:1]
    batch = users[:BATCH_USERS]
    scan_bytes = n * d * 4
    flops = 2.0 * len(batch) * n * d
    single_t, single_r = paired(lambda: scan.search(one, k), probes.copy_gbps,
                                lambda gbps: scan_bytes / (gbps * 1e9), runs)
    batch_t, batch_r = paired(lambda: scan.search(batch, k), probes.gemm_gflops,
                              lambda gflops: flops / (gflops * 1e9), batch_runs)
    single, batched = percentiles(single_t), percentiles(batch_t)
    after = memory_kib()
    t_bw = scan_bytes / (limits.bandwidth_gbps * 1e9)
    t_flop = flops / (limits.peak_gflops * 1e9)
    del scan
    gc.collect()
    return {
        "items": n, "dim": d, "k": k, "prepacking": prepacking, "exact_vs_numpy": exact,
        "load_s": load_s, "one_user": single, "batch_users": len(batch), "batch": batched,
        "index_bytes_scan": scan_bytes, "files_bytes": sum(p.stat().st_size for p in folder.iterdir()),
        "rss_kib": {"before": before, "loaded": loaded, "after_queries": after},
        # what the index added to this process (anonymous heap: prepacked copies; file: mmapped pages)
        "index_pss_mib": {key: (after.get(key, 0) - before.get(key, 0)) / 1024 for key in ("Pss_Anon", "Pss_File")},
        "bound_one_user_ms": t_bw * 1e3, "one_user_over_bound": single["p50_ms"] / (t_bw * 1e3),
        "bound_batch_ms": t_flop * 1e3, "batch_over_bound": batched["p50_ms"] / (t_flop * 1e3),
        # the fair ratios: each run against the limit probed right before it, median over runs
        "one_user_over_bound_paired": float(np.median(single_r)),
        "batch_over_bound_paired": float(np.median(batch_r)),
        "batch_gflops": flops / (batched["p50_ms"] / 1e3) / 1e9,
        "one_user_gbps": scan_bytes / (single["p50_ms"] / 1e3) / 1e9,
    }


# ---------------------------------------------------------------------------------- reduced precision

def _quantized_session(vectors: np.ndarray, precision: str, threads: int):
    """Benchmark-only scan graphs over an FP16 or INT8 copy of Et: user -> (logits, TopK rows)."""
    from onnx import TensorProto, helper, numpy_helper

    d = vectors.shape[1]
    et = np.ascontiguousarray(vectors.T)
    user = helper.make_tensor_value_info("u", TensorProto.FLOAT, ["B", d])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    outputs = [helper.make_tensor_value_info("v", TensorProto.FLOAT, None),
               helper.make_tensor_value_info("i", TensorProto.INT64, None)]
    if precision == "fp16":
        inits = [numpy_helper.from_array(et.astype(np.float16), "et")]
        nodes = [helper.make_node("Cast", ["u"], ["u16"], to=TensorProto.FLOAT16),
                 helper.make_node("MatMul", ["u16", "et"], ["s16"]),
                 helper.make_node("Cast", ["s16"], ["s"], to=TensorProto.FLOAT)]
    elif precision == "int8":
        scale = float(np.abs(et).max()) / 127.0  # symmetric, per tensor (unit vectors)
        inits = [numpy_helper.from_array(np.clip(np.round(et / scale), -127, 127).astype(np.int8), "et")]
        nodes = [helper.make_node("DynamicQuantizeLinear", ["u"], ["uq", "us", "uz"]),
                 helper.make_node("MatMulInteger", ["uq", "et", "uz"], ["si"]),
                 helper.make_node("Cast", ["si"], ["s"], to=TensorProto.FLOAT)]
    else:
        raise ValueError(precision)
    nodes.append(helper.make_node("TopK", ["s", "k"], ["v", "i"], axis=-1))
    model = helper.make_model(helper.make_graph(nodes, f"scan_{precision}", [user, k], outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    return _ort_session(model.SerializeToString(), threads)


def bench_reduced_precision(vectors: np.ndarray, users: np.ndarray, k: int, runs: int, threads: int,
                            fp32_one_user_ms: float) -> dict:
    """Overlap@k with the exact answer (raw, and after an exact re-rank of 2K candidates) and time."""
    want = exact_top_k(vectors, users, k)
    results = {}
    for precision in ("fp16", "int8"):
        try:
            session = _quantized_session(vectors, precision, threads)
        except Exception as err:  # noqa: BLE001 - a kernel ORT lacks on this CPU is a result too
            results[precision] = {"error": f"{type(err).__name__}: {err}"[:300]}
            continue
        candidates = min(len(vectors), QUANT_MARGIN_FACTOR * k)
        _, rows = session.run(None, {"u": users, "k": np.array([candidates], np.int64)})
        raw = np.mean([len(set(rows[b, :k]) & set(want[b])) / k for b in range(len(users))])
        reranked = []
        for b in range(len(users)):
            cand = np.sort(rows[b])
            exact = vectors[cand].astype(np.float64) @ users[b].astype(np.float64)
            reranked.append(cand[np.argsort(-exact, kind="stable")[:k]])
        overlap_rerank = np.mean([len(set(reranked[b]) & set(want[b])) / k for b in range(len(users))])
        identical = float(np.mean([(reranked[b] == want[b]).all() for b in range(len(users))]))
        one = percentiles(timed(lambda: session.run(None, {"u": users[:1], "k": np.array([candidates], np.int64)}), runs))
        results[precision] = {"overlap_at_k_raw": float(raw), "overlap_at_k_after_exact_rerank": float(overlap_rerank),
                              "identical_after_rerank": identical, "candidates": candidates,
                              "one_user_scan": one, "speedup_vs_fp32_served": fp32_one_user_ms / one["p50_ms"],
                              "index_bytes": vectors.size * (2 if precision == "fp16" else 1)}
        del session
        gc.collect()
    return results


# ---------------------------------------------------------------------------------- through Triton

@contextmanager
def served_catalog(folder: Path, log_dir: Path):
    """A real tritonserver serving catalog_scorer over the published index files in `folder`
    (symlinked into a throw-away repository); yields the server."""
    from mmrec.index_publish import INDEX_FILE, ServeOptions, scorer_config_text
    from mmrec.layout import RepositoryLayout
    from mmrec.server import ServerConfig, TritonServer, free_ports

    meta = json.loads((folder / INDEX_FILE).read_text())
    layout = RepositoryLayout(Path(log_dir) / "repository")
    version = layout.version_dir(schema.CATALOG_SCORER)
    version.mkdir(parents=True)
    for path in folder.iterdir():
        os.symlink(path.resolve(), version / path.name)
    layout.config_file(schema.CATALOG_SCORER).write_text(scorer_config_text(meta["dim"], BATCH_USERS, ServeOptions()))
    http, grpc, metrics = free_ports(3)
    config = ServerConfig(repository=layout.root, http_port=http, grpc_port=grpc, metrics_port=metrics)
    with TritonServer(config, log_path=Path(log_dir) / "triton.log", ready_timeout_s=600) as server:
        yield server


def publish_catalog(folder: Path, n: int, dim: int = DEFAULT_DIM) -> np.ndarray:
    """Write a simulated catalog of `n` unit vectors as an index version in `folder`; its vectors."""
    from mmrec.index_publish import fingerprint, write_version_files

    vectors = unit_vectors(n, dim, seed=n)
    ids = [f"item-{i}" for i in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    write_version_files(folder, ids, vectors, fingerprint(ids, vectors))
    return vectors


def bench_through_triton(folder: Path, users: np.ndarray, k: int, runs: int) -> dict:
    """One user per gRPC request to catalog_scorer on a real tritonserver (python backend)."""
    import tritonclient.grpc as grpcclient

    with tempfile.TemporaryDirectory(prefix="mmrec-bench-index-") as tmp, served_catalog(folder, Path(tmp)) as server:
        client = grpcclient.InferenceServerClient(server.urls["grpc"])
        try:
            def once() -> None:
                inputs = [grpcclient.InferInput(schema.USER_EMBEDDING, [1, users.shape[1]], "FP32"),
                          grpcclient.InferInput(schema.TOP_K, [1, 1], "INT32")]
                inputs[0].set_data_from_numpy(users[:1])
                inputs[1].set_data_from_numpy(np.array([[k]], np.int32))
                client.infer(schema.CATALOG_SCORER, inputs)
            return percentiles(timed(once, runs, warmup=5))
        finally:
            client.close()


# ---------------------------------------------------------------------------------- report

def run(sizes: tuple[int, ...] = DEFAULT_SIZES, dim: int = DEFAULT_DIM, k: int = DEFAULT_K,
        output: Path = DEFAULT_OUTPUT, served: bool = True, quick: bool = False, workdir: Path | None = None) -> dict:
    start = RunStart.now()
    threads = _threads()
    report: dict = {"command": command_line(), "machine": machine_info(), "cpu": cpu_info(),
                    "packages": package_versions(), "git": git_commit(), "threads": threads,
                    "sizes": list(sizes), "dim": dim, "k": k, "catalogs": [], "notes": []}
    small = {"nbytes": 64 * 2**20, "repeats": 3} if quick else {}
    report["bandwidth"] = measure_bandwidth(threads, **small)
    report["gemm"] = measure_gemm_peak(threads, **({"size": 768, "repeats": 2} if quick else {}))
    root = Path(workdir or tempfile.mkdtemp(prefix="mmrec-index-bench-"))
    try:
        for n in sizes:
            runs = 10 if quick else (200 if n <= 100_000 else 60)
            batch_runs = 3 if quick else (30 if n <= 100_000 else 8)
            vectors = unit_vectors(n, dim, seed=n)
            users = simulated_users(vectors, max(BATCH_USERS, CHECK_USERS), seed=1)
            entry = {"items": n, "loadavg_start": loadavg(), "cpu_share_start": cpu_share()}
            # limits again right before this catalog: on a shared machine the load moves, and a
            # ratio is only fair against a limit measured under the same load
            entry["bandwidth"] = report["bandwidth"] if quick else measure_bandwidth(threads)
            entry["gemm"] = report["gemm"] if quick else measure_gemm_peak(threads)
            limits = Limits(entry["bandwidth"]["copy_gbps_best"], entry["gemm"]["peak_gflops"])
            folder = root / f"n{n}"
            entry["fp32"] = bench_served_scan(vectors, users, k, folder, runs, batch_runs, "auto", limits)
            if n <= 100_000 and not quick:  # the single-copy modes, for their memory/speed trade
                for mode in ("off", "on"):
                    entry[f"fp32_{mode}"] = bench_served_scan(vectors, users, k, folder, runs, batch_runs, mode, limits)
            entry["reduced_precision"] = bench_reduced_precision(
                vectors, users[:CHECK_USERS * 2], k, runs, threads, entry["fp32"]["one_user"]["p50_ms"])
            if served:
                entry["through_triton_one_user"] = bench_through_triton(folder, users, k, runs)
            entry["loadavg_end"] = loadavg()
            report["catalogs"].append(entry)
            shutil.rmtree(folder, ignore_errors=True)
            del vectors
            gc.collect()
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    report["machine"]["loadavg_end"] = loadavg()
    save(output, report, start)
    plot(report, output / "index_scan.png")
    (output / "summary.md").write_text(summary_markdown(report))
    return report


RESULTS_FILE = "index_scan.json"


def save(output: Path, report: dict, start: RunStart) -> Path:
    """index_scan.json with its provenance (commit, machine, load before/after, command, times)."""
    return write_results(Path(output) / RESULTS_FILE, report, start, indent=1)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = report["catalogs"]
    n = [c["items"] for c in cats]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.loglog(n, [c["fp32"]["one_user"]["p50_ms"] for c in cats], "o-", label="served scan, fp32 exact (p50)")
    for mode, marker in (("off", "x:"), ("on", "+:")):
        pts = [(c["items"], c[f"fp32_{mode}"]["one_user"]["p50_ms"]) for c in cats if f"fp32_{mode}" in c]
        if pts:
            left.loglog(*zip(*pts), marker, label=f"served, prepacking={mode}")
    left.loglog(n, [c["fp32"]["bound_one_user_ms"] for c in cats], "k--", label="Et bytes / copy bandwidth")
    for precision, marker in (("int8", "s:"), ("fp16", "^:")):
        pts = [(c["items"], c["reduced_precision"][precision]["one_user_scan"]["p50_ms"]) for c in cats
               if "one_user_scan" in c["reduced_precision"].get(precision, {})]
        if pts:
            left.loglog(*zip(*pts), marker, label=f"{precision} scan only (benchmark graph)")
    tri = [(c["items"], c["through_triton_one_user"]["p50_ms"]) for c in cats if "through_triton_one_user" in c]
    if tri:
        left.loglog(*zip(*tri), "d-", label="through Triton gRPC (p50)")
    left.axhline(10, color="grey", lw=0.5)
    left.set_xlabel("catalog items (256-d)")
    left.set_ylabel("one user, top-100 latency (ms)")
    left.legend(fontsize=7)
    right.loglog(n, [c["fp32"]["batch"]["p50_ms"] for c in cats], "o-", label=f"{BATCH_USERS} users, served (p50)")
    right.loglog(n, [c["fp32"]["bound_batch_ms"] for c in cats], "k--", label="2·B·N·D / GEMM peak")
    for mode, marker in (("off", "x:"), ("on", "+:")):
        pts = [(c["items"], c[f"fp32_{mode}"]["batch"]["p50_ms"]) for c in cats if f"fp32_{mode}" in c]
        if pts:
            right.loglog(*zip(*pts), marker, label=f"served, prepacking={mode}")
    right.set_xlabel("catalog items (256-d)")
    right.set_ylabel(f"batch of {BATCH_USERS} users (ms)")
    right.legend(fontsize=7)
    cpu = report["cpu"]["model"]
    fig.suptitle(f"catalog scan — {cpu}, {report['threads']} threads, load {report['machine']['loadavg_start']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_markdown(report: dict) -> str:
    lines = [
        "# Catalog scan benchmark (issue 13)", "",
        f"Command: `{report['command']}`  ",
        f"CPU: {report['cpu']['model']}, {report['threads']} usable cores, flags "
        f"{', '.join(f for f, on in report['cpu']['flags'].items() if on)}; load average at start "
        f"{report['machine']['loadavg_start']}, end {report['machine']['loadavg_end']}; commit "
        f"{(report['git'].get('commit') or '')[:10]}{' (dirty tree)' if report['git'].get('dirty') else ''}.", ""]
    return "\n".join(lines + result_lines(report)) + "\n"


def result_lines(report: dict) -> list[str]:
    """The measured part of summary.md: limits, the served scan per catalog size, the single-copy
    modes, the reduced-precision copies (also rendered into docs/catalog_index.md)."""
    bw, gemm = report["bandwidth"], report["gemm"]
    lines = [
        f"Limits measured in this run: copy bandwidth {bw['copy_gbps_best']:.1f} GB/s (best; median "
        f"{bw['copy_gbps_median']:.1f}), sgemm peak {gemm['peak_gflops']:.0f} GFLOP/s (numpy {gemm['numpy_gflops']:.0f}, "
        f"ORT {gemm['onnxruntime_gflops']:.0f}).", "",
        "Per catalog, the limits were measured again right before it (bandwidth GB/s, GEMM GFLOP/s, load).", "",
        "×bound = p50 / bound with the limits above; paired = median over runs of (run time / bound from a "
        "bandwidth or sgemm probe run right before it), the fair ratio on a shared machine.", "",
        "| items | limits next to it | exact | one user p50 / p95 / min (ms) | bound (ms) | ×bound | paired "
        "| batch of 32 p50 (ms) | bound (ms) | ×bound | paired | via Triton p50 (ms) "
        "| index memory anon / file, PSS (MiB) | files (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["catalogs"]:
        f = c["fp32"]
        rss = f["index_pss_mib"]
        tri = c.get("through_triton_one_user", {}).get("p50_ms")
        limits = (f"{c['bandwidth']['copy_gbps_best']:.1f} GB/s, {c['gemm']['peak_gflops']:.0f} GFLOP/s, "
                  f"load {c['loadavg_start'][0]}")
        lines.append(
            f"| {c['items']:,} | {limits} | {'yes' if f['exact_vs_numpy'] else '**no**'} | {f['one_user']['p50_ms']:.2f} / "
            f"{f['one_user']['p95_ms']:.2f} / {f['one_user']['min_ms']:.2f} | {f['bound_one_user_ms']:.2f} | "
            f"{f['one_user_over_bound']:.2f} | {f['one_user_over_bound_paired']:.2f} | "
            f"{f['batch']['p50_ms']:.1f} | {f['bound_batch_ms']:.1f} | {f['batch_over_bound']:.2f} | "
            f"{f['batch_over_bound_paired']:.2f} | "
            f"{'–' if tri is None else f'{tri:.2f}'} | {rss['Pss_Anon']:.0f} / "
            f"{rss['Pss_File']:.0f} | {f['files_bytes'] / 2**20:.0f} |")
    lines += ["", "The table is the served default, `prepacking=auto` (one user: unpacked GEMV over the mmapped "
              "file; batches: MLAS's prepacked copy; the index twice in memory). The single-copy modes:", ""]
    for c in report["catalogs"]:
        for mode in ("off", "on"):
            if f"fp32_{mode}" in c:
                p = c[f"fp32_{mode}"]
                rss = p["index_pss_mib"]
                lines.append(
                    f"- {c['items']:,} items, prepacking={mode}: one user p50 {p['one_user']['p50_ms']:.2f} ms "
                    f"(paired ×{p['one_user_over_bound_paired']:.2f} of the bandwidth bound), batch of 32 "
                    f"{p['batch']['p50_ms']:.1f} ms (paired ×{p['batch_over_bound_paired']:.2f} of the GEMM bound), "
                    f"index memory anon / file {rss['Pss_Anon']:.0f} / {rss['Pss_File']:.0f} MiB")
    lines += ["", "Reduced-precision copies of the index (benchmark graphs; scan time for one user, and top-100 "
              "overlap with the exact answer raw / after an exact re-rank of 2K candidates):", "",
              "| items | precision | scan p50 (ms) | speed-up vs served fp32 | overlap raw | overlap re-ranked | "
              "identical lists re-ranked |", "|---|---|---|---|---|---|---|"]
    for c in report["catalogs"]:
        for precision, r in c["reduced_precision"].items():
            if "error" in r:
                lines.append(f"| {c['items']:,} | {precision} | {r['error']} | | | | |")
                continue
            lines.append(f"| {c['items']:,} | {precision} | {r['one_user_scan']['p50_ms']:.2f} | "
                         f"{r['speedup_vs_fp32_served']:.2f}× | {r['overlap_at_k_raw']:.3f} | "
                         f"{r['overlap_at_k_after_exact_rerank']:.3f} | {r['identical_after_rerank']:.2f} |")
    return lines


def bench_index_command(
    sizes: Annotated[str, typer.Option(help="Catalog sizes, comma-separated.")] = ",".join(map(str, DEFAULT_SIZES)),
    dim: Annotated[int, typer.Option(help="Embedding width.")] = DEFAULT_DIM,
    k: Annotated[int, typer.Option(help="Top-k.")] = DEFAULT_K,
    output: Annotated[Path, typer.Option(help="Where JSON, PNG and summary.md go.")] = DEFAULT_OUTPUT,
    served: Annotated[bool, typer.Option("--served/--no-served", help="Also time it through tritonserver.")] = True,
    quick: Annotated[bool, typer.Option(help="Few repetitions (CI smoke run).")] = False,
    workdir: Annotated[Optional[Path], typer.Option(help="Scratch folder for index files (default: a temp dir).")] = None,
) -> None:
    """Catalog scan: top-k latency and memory at 10k/100k/1M items vs measured bandwidth and GEMM peak."""
    report = run(tuple(int(s) for s in sizes.split(",") if s), dim, k, output, served, quick, workdir)
    print(summary_markdown(report))


if __name__ == "__main__":  # pragma: no cover
    typer.run(bench_index_command)
