"""PNG plots of a run's results (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ENGINE_COLORS = {"pytorch": "#7f7f7f", "ort-fp32": "#1f77b4", "ort-int8": "#2ca02c", "ort-fp16": "#ff7f0e"}
DPI = 110


def _serving_series(results: dict) -> dict[str, list[dict]]:
    serving = results["sections"].get("serving") or {}
    series = {f"Triton {p} (mmrec client)": levels for p, levels in (serving.get("triton") or {}).items()}
    if serving.get("triton_raw_tritonclient"):
        series["Triton grpc (raw tritonclient)"] = serving["triton_raw_tritonclient"]
    if serving.get("reference"):
        series["in-process, threads"] = serving["reference"]
    if serving.get("reference_batched"):
        series["in-process, batched"] = serving["reference_batched"]
    pa = results["sections"].get("perf_analyzer") or {}
    levels = [lv for lv in pa.get("levels", []) if "error" not in lv]
    if levels:
        series["Triton grpc (perf_analyzer)"] = levels
    return series


def latency_vs_concurrency(results: dict, path: Path) -> Path | None:
    series = _serving_series(results)
    if not series:
        return None
    fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, levels) in enumerate(series.items()):
        levels = [lv for lv in levels if lv.get("latency_ms", {}).get("p50") is not None]
        cs = [lv["concurrency"] for lv in levels]
        color = f"C{i}"
        ax_lat.plot(cs, [lv["latency_ms"]["p50"] for lv in levels], "o-", color=color, label=f"{name} p50")
        p99 = [lv["latency_ms"].get("p99") for lv in levels]  # None: < 1,000 samples, not estimated
        if any(v is not None for v in p99):
            ax_lat.plot(cs, [float("nan") if v is None else v for v in p99], "x--", color=color,
                        alpha=0.6, label=f"{name} p99")
        ax_thr.plot(cs, [lv["throughput_items_s"] for lv in levels], "o-", color=color, label=name)
    for ax in (ax_lat, ax_thr):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (requests in flight)")
        ax.grid(True, alpha=0.3)
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_title("item_encoder latency vs concurrency")
    ax_lat.legend(fontsize=7)
    ax_thr.set_ylabel("throughput (items/s)")
    ax_thr.set_title("item_encoder throughput vs concurrency")
    ax_thr.legend(fontsize=7)
    return _save(fig, path)


def _offline_records(results: dict) -> list[dict]:
    return [r for r in (results["sections"].get("offline") or {}).get("records", []) if r["status"] == "ok"]


def throughput_vs_batch(results: dict, path: Path) -> Path | None:
    records = _offline_records(results)
    if not records:
        return None
    models = list(dict.fromkeys(r["model"] for r in records))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in records if r["model"] == model]
        seqs = sorted({r["seq_len"] for r in rows if r["seq_len"]})
        seq = seqs[-1] if seqs else None  # text encoder: the longest length
        for engine in dict.fromkeys(r["engine"] for r in rows):
            pts = sorted((r["batch"], r["throughput_items_s"]) for r in rows
                         if r["engine"] == engine and r["seq_len"] == seq)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=engine,
                    color=ENGINE_COLORS.get(engine))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_title(model + (f" (seq {seq})" if seq else ""))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("throughput (items/s)")
    return _save(fig, path)


def backend_comparison(results: dict, path: Path) -> Path | None:
    """Throughput relative to PyTorch eager, per model, at the smallest and largest batch."""
    records = _offline_records(results)
    if not records:
        return None
    batches = sorted({r["batch"] for r in records})
    picks = sorted({batches[0], batches[-1]})
    groups = []
    for model in dict.fromkeys(r["model"] for r in records):
        seqs = sorted({r["seq_len"] for r in records if r["model"] == model and r["seq_len"]})
        for b in picks:
            groups.append((model, b, seqs[-1] if seqs else None))
    engines = [e for e in ENGINE_COLORS if any(r["engine"] == e for r in records)]
    width = 0.8 / len(engines)
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(groups)), 4.5))
    for j, engine in enumerate(engines):
        values = []
        for model, b, seq in groups:
            row = next((r for r in records if r["model"] == model and r["engine"] == engine
                        and r["batch"] == b and r["seq_len"] == seq), None)
            values.append(row.get("speedup_vs_pytorch") or 0.0 if row else 0.0)
        xs = [i + (j - (len(engines) - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(xs, values, width, label=engine, color=ENGINE_COLORS[engine])
        for bar, v in zip(bars, values):
            if v:
                ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom",
                            fontsize=6)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{m}\nb={b}" + (f" s={s}" if s else "") for m, b, s in groups], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("throughput vs PyTorch eager (×)")
    ax.set_title("Backend comparison (same run, same thread count)")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def roofline(results: dict, path: Path) -> Path | None:
    section = results["sections"].get("roofline") or {}
    rows = [r for r in section.get("encoders", []) if r["model"] != "fusion"]
    peak = (section.get("peak") or {}).get("peak_gflops")
    if not rows or not peak:
        return None
    fig, ax = plt.subplots(figsize=(max(7, 0.5 * len(rows)), 4.5))
    labels = [f"{r['model'].split('_')[0]} {r['engine']}\nb={r['batch']}" + (f" s={r['seq_len']}" if r["seq_len"] else "")
              for r in rows]
    ax.bar(range(len(rows)), [r["achieved_gflops"] for r in rows],
           color=[ENGINE_COLORS.get(r["engine"], "C0") for r in rows])
    ax.axhline(peak, color="red", ls="--", label=f"measured sgemm peak {peak:.0f} GFLOP/s")
    ax.axhline(0.5 * peak, color="red", ls=":", label="50% of peak (target)")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=6, rotation=90)
    ax.set_ylabel("achieved GFLOP/s (MatMul/Gemm/Conv FLOPs / p50)")
    ax.set_title("Roofline: encoders vs measured GEMM peak")
    ax.legend(fontsize=7)
    return _save(fig, path)


PLOTS = {
    "latency_vs_concurrency.png": latency_vs_concurrency,
    "throughput_vs_batch.png": throughput_vs_batch,
    "backend_comparison.png": backend_comparison,
    "roofline.png": roofline,
}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def write_plots(results: dict, output: Path) -> dict[str, str]:
    """Every plot the results allow; name -> file (or the reason it was not drawn)."""
    written = {}
    for name, draw in PLOTS.items():
        try:
            path = draw(results, Path(output) / name)
            written[name] = path.name if path else "no data"
        except Exception as err:  # noqa: BLE001 - a plot must never lose the numbers
            written[name] = f"failed: {type(err).__name__}: {err}"
    return written
