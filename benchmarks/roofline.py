"""Roofline: FLOPs counted from the ONNX graph vs the GEMM peak measured on this machine.

FLOPs: MatMul / Gemm / Conv nodes (2 per multiply-accumulate) with shapes from ONNX shape
inference after the graph's dynamic axes are fixed to the benchmark's batch/sequence length;
every other op is cheap next to these and is not counted (so achieved GFLOP/s is a lower bound).
Peak: large square sgemm timed in this same run with numpy (its BLAS), PyTorch and ONNX
Runtime (MLAS) at the benchmark's thread count; the best of them is the machine's peak.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from mmrec import schema

COUNTED_OPS = ("MatMul", "Gemm", "Conv")
ROOFLINE_MODELS = (schema.TEXT_ENCODER, schema.IMAGE_ENCODER, schema.FUSION)


@dataclass(frozen=True)
class FlopCount:
    flops: float
    by_op: dict[str, float]
    nodes: int
    unresolved: list[str]  # counted-op nodes whose shapes inference could not resolve
    inference: str = "onnx"

    def to_dict(self) -> dict:
        return {"gflop": self.flops / 1e9, "by_op_gflop": {k: v / 1e9 for k, v in self.by_op.items()},
                "nodes": self.nodes, "unresolved_nodes": self.unresolved, "shape_inference": self.inference}


def _fix_dims(model, dims: dict[str, int]) -> None:
    """Replace symbolic input dims (batch_size, sequence_length) by concrete values."""
    for tensor in model.graph.input:
        for dim in tensor.type.tensor_type.shape.dim:
            if dim.dim_param in dims:
                dim.dim_value = dims[dim.dim_param]


def _shapes(model) -> dict[str, list[int | None]]:
    shapes: dict[str, list[int | None]] = {}
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    for info in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        shape = info.type.tensor_type.shape
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
    return shapes


def _attr(node, name: str, default):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _known(shape: list[int | None] | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def _node_flops(node, shapes: dict) -> float | None:
    """2 x multiply-accumulates of one MatMul/Gemm/Conv node, None if shapes are unknown."""
    if node.op_type == "MatMul":
        a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not (_known(a) and _known(out)):
            return None
        return 2.0 * float(np.prod(out)) * a[-1]
    if node.op_type == "Gemm":
        a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not (_known(a) and _known(out)):
            return None
        k = a[0] if _attr(node, "transA", 0) else a[1]
        return 2.0 * float(np.prod(out)) * k
    if node.op_type == "Conv":
        w, out = shapes.get(node.input[1]), shapes.get(node.output[0])
        if not (_known(w) and _known(out)):
            return None
        # weight [C_out, C_in/group, kH, kW]: each output element needs C_in/group*kH*kW MACs
        return 2.0 * float(np.prod(out)) * float(np.prod(w[1:]))
    return 0.0


@lru_cache(maxsize=32)
def count_flops(onnx_path: str, batch: int, seq_len: int | None = None) -> FlopCount:
    """FLOPs of one inference of the graph at this batch (and sequence length)."""
    import onnx

    model = onnx.load(onnx_path)
    dims = {schema.BATCH_AXIS: batch}
    if seq_len:
        dims[schema.SEQUENCE_AXIS] = seq_len
    _fix_dims(model, dims)
    count = _count(onnx.shape_inference.infer_shapes(model, data_prop=True), "onnx")
    if count.unresolved:
        # onnx's inference loses broadcast dims of size 1 in some exported graphs; ORT's
        # symbolic shape inference resolves them
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        count = _count(SymbolicShapeInference.infer_shapes(model, auto_merge=True), "onnxruntime-symbolic")
    return count


def _count(inferred, inference: str) -> FlopCount:
    shapes = _shapes(inferred)
    by_op = {op: 0.0 for op in COUNTED_OPS}
    unresolved, nodes = [], 0
    for node in inferred.graph.node:
        if node.op_type not in COUNTED_OPS:
            continue
        nodes += 1
        flops = _node_flops(node, shapes)
        if flops is None:
            unresolved.append(node.name or node.output[0])
            continue
        by_op[node.op_type] += flops
    return FlopCount(sum(by_op.values()), by_op, nodes, unresolved, inference)


# --------------------------------------------------------------------------- GEMM peak


def _time_gemm(run, n: int, seconds: float) -> float:
    """Best-of-window GFLOP/s of an n x n x n sgemm: repeat `run` for `seconds`, take the best
    of several short windows (robust to other load on the machine)."""
    run()
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        reps = 0
        while reps < 2 or time.perf_counter() - t0 < min(0.25, seconds / 2):
            run()
            reps += 1
        rate = 2.0 * n**3 * reps / (time.perf_counter() - t0) / 1e9
        best = max(best, rate)
        if time.perf_counter() >= deadline:
            return best


def _numpy_gemm(n: int):
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    return lambda: np.matmul(a, b, out=out)


def _torch_gemm(n: int, threads: int):
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    return lambda: torch.mm(a, b, out=out)


def _ort_gemm(n: int, threads: int):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "sgemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"a": np.random.default_rng(0).standard_normal((n, n), dtype=np.float32),
            "b": np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)}
    del onnx
    return lambda: session.run(None, feed)


GEMM_LIBRARIES = {
    "numpy": lambda n, threads: _numpy_gemm(n),
    "torch": _torch_gemm,
    "onnxruntime": _ort_gemm,
}


def gemm_peak(sizes: tuple[int, ...], seconds: float, threads: int) -> dict:
    """GFLOP/s per library and size, and the best of all as the machine's measured peak."""
    results: dict[str, dict[str, float]] = {}
    for library, make in GEMM_LIBRARIES.items():
        results[library] = {}
        for n in sizes:
            try:
                results[library][str(n)] = _time_gemm(make(n, threads), n, seconds)
            except Exception as err:  # noqa: BLE001 - a missing library is reported, not fatal
                results[library][str(n)] = float("nan")
                results.setdefault("errors", {})[f"{library}:{n}"] = f"{type(err).__name__}: {err}"
    values = [(v, lib, n) for lib, per in results.items() if lib != "errors"
              for n, v in per.items() if np.isfinite(v)]
    best = max(values) if values else (float("nan"), None, None)
    return {"gflops": results, "peak_gflops": best[0], "peak_library": best[1], "peak_size": best[2],
            "threads": threads, "seconds_per_size": seconds}


def achieved(records: list[dict], repository: Path, peak_gflops: float) -> list[dict]:
    """Achieved GFLOP/s (FLOPs / median latency) of every timed encoder/fusion case."""
    from .engines import onnx_files

    fp32 = {m: onnx_files(Path(repository), m).get("fp32") for m in ROOFLINE_MODELS}
    rows = []
    for r in records:
        if r.get("status") != "ok" or r["model"] not in ROOFLINE_MODELS:
            continue
        path = fp32[r["model"]]
        if path is None:
            continue
        count = count_flops(str(path), r["batch"], r["seq_len"])
        p50_s = r["latency_ms"]["p50"] / 1e3
        gflops = count.flops / 1e9 / p50_s if p50_s > 0 else float("nan")
        rows.append({"model": r["model"], "engine": r["engine"], "batch": r["batch"], "seq_len": r["seq_len"],
                     "gflop": count.flops / 1e9, "achieved_gflops": gflops,
                     "fraction_of_peak": gflops / peak_gflops if peak_gflops else float("nan"),
                     "flops_from": "fp32 graph", "shape_inference": count.inference,
                     "unresolved_nodes": len(count.unresolved)})
    return rows


def paired(workload, repository: Path, cases: list[tuple[str, int, int | None]], library: str, n: int,
           seconds: float, rounds: int, threads: int) -> list[dict]:
    """Each encoder timed right after the sgemm peak probe, `rounds` times, both as best-case
    rates (the probe's best window, the encoder's fastest call): like for like, and taken
    seconds apart, so background load that comes and goes cannot make the peak and the encoder
    disagree the way the offline-based table (p50 vs best peak, minutes apart) can."""
    from .engines import onnx_files, ort_member
    from .settings import Budget
    from .timing import time_calls

    gemm = GEMM_LIBRARIES[library](n, threads)
    rows = []
    for model, batch, seq in cases:
        path = onnx_files(Path(repository), model).get("fp32")
        if path is None:
            continue
        run = ort_member(path, threads)
        feed = workload.text_feed(batch, seq) if model == schema.TEXT_ENCODER else workload.pixel_feed(batch)
        flops = count_flops(str(path), batch, seq).flops
        per_round = []
        for _ in range(rounds):
            peak = _time_gemm(gemm, n, seconds)
            t = time_calls(lambda: run(feed), batch, Budget(warmup_s=0.0, measure_s=seconds, min_reps=3))
            best_s = min(t.latencies_ms) / 1e3
            per_round.append({"peak_gflops": peak, "achieved_gflops": flops / 1e9 / best_s,
                              "fraction_of_peak": flops / 1e9 / best_s / peak, "best_ms": best_s * 1e3,
                              "p50_ms": float(np.median(t.latencies_ms)), "calls": t.reps})
        fractions = sorted(r["fraction_of_peak"] for r in per_round)
        rows.append({"model": model, "engine": "ort-fp32", "batch": batch, "seq_len": seq, "gflop": flops / 1e9,
                     "peak_library": library, "peak_size": n, "rounds": per_round,
                     "fraction_of_peak_median": float(np.median(fractions)), "fraction_of_peak_best": fractions[-1]})
    return rows


def run_roofline(records: list[dict], repository: Path, sizes: tuple[int, ...], seconds: float,
                 threads: int, workload=None, paired_cases: list[tuple[str, int, int | None]] = (),
                 rounds: int = 3) -> dict:
    peak = gemm_peak(sizes, seconds, threads)
    out = {"peak": peak, "counted_ops": list(COUNTED_OPS),
           "encoders": achieved(records, repository, peak["peak_gflops"])}
    if workload is not None and paired_cases and peak["peak_library"]:
        out["paired"] = paired(workload, repository, list(paired_cases), peak["peak_library"],
                               int(peak["peak_size"]), seconds, rounds, threads)
    return out


# --------------------------------------------------------------------------- padding waste

PADDING_HEADLINE_BATCHES = (1, 8, 32)


def padding_waste(workload, max_batch: int = 64) -> dict:
    """Real tokens / computed tokens of the text encoder per executed batch, on the held-out
    captions in order (as the serving sweep sends them), for every batch size up to `max_batch`
    (the report picks 1, 8, 32 and the sizes the dynamic batcher executed): padded to the
    bucket of the longest row (one run of the batch, what the server tokenizer produces) vs
    length-grouped (`runtime.length_groups`: each group of rows at its own bucket)."""
    from mmrec.model_repository.lib import runtime

    captions = [item.caption for item in workload.items]
    buckets = tuple(workload.tokenizer.buckets)
    by_batch = {}
    for b in range(1, min(max_batch, len(captions)) + 1):
        real = padded = grouped = batches = 0
        for start in range(0, len(captions) - b + 1, b):  # whole batches only
            _, mask = workload.tokenizer(captions[start:start + b])
            real += int(mask.sum())
            padded += mask.size
            grouped += sum(len(rows) * width for rows, width in runtime.length_groups(mask, buckets))
            batches += 1
        by_batch[str(b)] = {"batches": batches, "real_tokens_per_batch": real / batches,
                            "padded_tokens_per_batch": padded / batches, "grouped_tokens_per_batch": grouped / batches,
                            "padded_efficiency": real / padded, "grouped_efficiency": real / grouped}
    return {"captions": len(captions), "buckets": list(buckets), "headline_batches": list(PADDING_HEADLINE_BATCHES),
            "by_batch": by_batch}
