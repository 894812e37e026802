"""Server-side breakdown from Triton's statistics API: what each model spent queueing vs
computing, and which batch sizes the dynamic batcher actually executed, over one window.

Statistics are cumulative since load, so a window is the difference of two snapshots.
"""
from __future__ import annotations

from typing import Any

STAGES = ("queue", "compute_input", "compute_infer", "compute_output")


def snapshot(url: str) -> dict[str, dict]:
    """model name -> its cumulative statistics (gRPC statistics API, JSON form)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model_name="", as_json=True)
    finally:
        client.close()
    return {m["name"]: m for m in stats.get("model_stats", [])}


def _int(d: dict | None, *path: str) -> int:
    value: Any = d or {}
    for key in path:
        value = value.get(key, {}) if isinstance(value, dict) else {}
    return int(value) if isinstance(value, (int, str)) and value != {} else 0


def _batch_counts(model: dict) -> dict[int, int]:
    """batch size -> executions (compute_infer count per batch size)."""
    return {int(b.get("batch_size", 0)): _int(b, "compute_infer", "count") for b in model.get("batch_stats", [])}


def window(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """Per model with traffic in the window: requests, executions, mean batch, ms per request
    in each stage (queue, compute input/infer/output), and executed batch-size histogram."""
    out = {}
    for name, now in after.items():
        then = before.get(name, {})
        requests = _int(now, "inference_stats", "success", "count") - _int(then, "inference_stats", "success", "count")
        if requests <= 0:
            continue
        executions = _int(now, "execution_count") - _int(then, "execution_count")
        inferences = _int(now, "inference_count") - _int(then, "inference_count")
        row: dict[str, Any] = {"requests": requests, "executions": executions, "inferences": inferences,
                               "mean_batch": inferences / executions if executions else None,
                               "failed": _int(now, "inference_stats", "fail", "count")
                               - _int(then, "inference_stats", "fail", "count")}
        for stage in STAGES:
            count = _int(now, "inference_stats", stage, "count") - _int(then, "inference_stats", stage, "count")
            ns = _int(now, "inference_stats", stage, "ns") - _int(then, "inference_stats", stage, "ns")
            row[f"{stage}_ms"] = ns / count / 1e6 if count else None
        success_ns = _int(now, "inference_stats", "success", "ns") - _int(then, "inference_stats", "success", "ns")
        row["request_ms"] = success_ns / requests / 1e6
        hist_now, hist_then = _batch_counts(now), _batch_counts(then)
        row["batch_sizes"] = {str(b): c - hist_then.get(b, 0) for b, c in sorted(hist_now.items())
                              if c - hist_then.get(b, 0) > 0}
        out[name] = row
    return out


def merge(windows: list[dict[str, dict]]) -> dict[str, dict]:
    """Several windows of the same models as one: counts summed, per-request times weighted."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(n for w in windows for n in w):
        rows = [w[name] for w in windows if name in w]
        requests = sum(r["requests"] for r in rows)
        row: dict[str, Any] = {k: sum(r[k] for r in rows) for k in ("requests", "executions", "inferences", "failed")}
        row["mean_batch"] = row["inferences"] / row["executions"] if row["executions"] else None
        for key in [f"{stage}_ms" for stage in STAGES] + ["request_ms"]:
            weighted = [(r[key], r["requests"]) for r in rows if r.get(key) is not None]
            row[key] = sum(v * n for v, n in weighted) / requests if weighted and requests else None
        sizes: dict[str, int] = {}
        for r in rows:
            for size, count in r["batch_sizes"].items():
                sizes[size] = sizes.get(size, 0) + count
        row["batch_sizes"] = dict(sorted(sizes.items(), key=lambda kv: int(kv[0])))
        out[name] = row
    return out
