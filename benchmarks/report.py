"""Write a run's results: bench.json (everything) and summary.md (tables a person reads)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .timing import P99_MIN_SAMPLES

JSON_FILE = "bench.json"
MARKDOWN_FILE = "summary.md"
ENGINE_ORDER = ("pytorch", "ort-fp32", "ort-int8", "ort-fp16")
ENGINE_TITLES = {"pytorch": "PyTorch eager FP32", "ort-fp32": "ORT FP32", "ort-int8": "ORT INT8",
                 "ort-fp16": "ORT FP16"}
STATUS_MARK = {"met": "**met**", "missed": "**missed**", "not conclusive": "not conclusive",
               "not judged (A/A unstable)": "not judged (A/A unstable)", "not measured": "not measured",
               "error": "**error**"}


def _clean(value):
    """JSON without NaN/Infinity (not valid JSON): they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(results: dict, output: Path) -> Path:
    path = Path(output) / JSON_FILE
    path.write_text(json.dumps(_clean(results), indent=1, sort_keys=False, default=str) + "\n")
    return path


def _f(value, digits: int = 1, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}{suffix}"


def _p99(latency_ms: dict, samples: int | None) -> float | None:
    """p99 only where >= P99_MIN_SAMPLES back it (also for results written before that rule)."""
    n = latency_ms.get("samples", samples)
    return latency_ms.get("p99") if n is not None and n >= P99_MIN_SAMPLES else None


def _ci(ci, digits: int = 2, suffix: str = "") -> str:
    """[low, high] of a 95 % interval over paired rounds (mmrec.stats.Interval dict), or ''."""
    if not ci:
        return ""
    low, high = (ci["low"], ci["high"]) if isinstance(ci, dict) else ci
    if low is None or high is None:
        return " [too few rounds]"
    return f" [{low:.{digits}f}, {high:.{digits}f}]{suffix}"


def _iv(ci, digits: int = 2, suffix: str = "×") -> str:
    """Point and interval of an Interval dict, or '–'."""
    return f"{_f(ci['point'], digits, suffix)}{_ci(ci, digits)}" if ci else "–"


P99_NOTE = (f"p99 is shown only where ≥ {P99_MIN_SAMPLES:,} samples back it (– otherwise: from fewer it is a "
            "maximum, not a tail estimate); [a, b]: 95 % interval over paired rounds (mmrec.stats).")


def aa_lines(results: dict) -> list[str]:
    """Each section's A/A verdict: the reference measured against itself in the same rounds."""
    rows = []
    for name, section in results["sections"].items():
        aa = (section or {}).get("aa")
        if not aa:
            continue
        iv = aa.get("interval")
        state = {True: "stable", False: "**unstable**: targets not judged", None: "no verdict"}[aa.get("stable")]
        rows.append([name, aa.get("arm") or aa.get("statistic") or "", _iv(iv, 3) if iv else "–", state])
    if not rows:
        return []
    return ["A/A arms (the reference against itself, interleaved like every arm; its interval must contain "
            "no difference):", ""] + _table(["section", "arm", "A/A ratio [95 %]", "verdict"], rows)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


# --------------------------------------------------------------------------- headline


def _offline_ok(results: dict) -> list[dict]:
    return [r for r in (results["sections"].get("offline") or {}).get("records", []) if r["status"] == "ok"]


def headline_cases(records: list[dict]) -> list[tuple[str, int, int | None]]:
    """(model, batch, seq) rows of the headline: smallest and largest batch per model; the text
    encoder at its shortest length for the smallest batch and longest for the largest."""
    cases = []
    for model in dict.fromkeys(r["model"] for r in records):
        rows = [r for r in records if r["model"] == model]
        batches = sorted({r["batch"] for r in rows})
        seqs = sorted({r["seq_len"] for r in rows if r["seq_len"]})
        for b, seq in ((batches[0], seqs[0] if seqs else None), (batches[-1], seqs[-1] if seqs else None)):
            if (model, b, seq) not in cases:
                cases.append((model, b, seq))
    return cases


def headline_offline(results: dict) -> list[str]:
    records = _offline_ok(results)
    if not records:
        return []
    engines = [e for e in ENGINE_ORDER if any(r["engine"] == e for r in records)]
    rows = []
    for model, b, seq in headline_cases(records):
        row = [model, f"b={b}" + (f" s={seq}" if seq else "")]
        for engine in engines:
            r = next((x for x in records if x["model"] == model and x["engine"] == engine
                      and x["batch"] == b and x["seq_len"] == seq), None)
            if r is None:
                row.append("–")
                continue
            cell = f"{_f(r['throughput_items_s'])}/s · p50 {_f(r['latency_ms']['p50'])} ms"
            if engine != "pytorch" and r.get("speedup_vs_pytorch_p50"):
                cell += (f" · **{r['speedup_vs_pytorch_p50']:.2f}×**{_ci(r.get('speedup_vs_pytorch_p50_interval'))}"
                         f" (thr {_f(r.get('speedup_vs_pytorch'), 2, '×')})")
            row.append(cell)
        rows.append(row)
    return _table(["model", "case", *[ENGINE_TITLES[e] for e in engines]], rows)


def serving_table(results: dict) -> list[str]:
    serving = results["sections"].get("serving") or {}
    pa = {lv["concurrency"]: lv for lv in (results["sections"].get("perf_analyzer") or {}).get("levels", [])
          if "error" not in lv}
    series = [(f"Triton {p}", levels) for p, levels in (serving.get("triton") or {}).items()]
    series += [("Triton grpc, raw tritonclient", serving.get("triton_raw_tritonclient") or []),
               ("in-process (threads)", serving.get("reference") or []),
               ("in-process (batched)", serving.get("reference_batched") or [])]
    series = [(n, {lv["concurrency"]: lv for lv in levels}) for n, levels in series if levels]
    if not series:
        return []
    concurrency = sorted({c for _, levels in series for c in levels})
    header = ["concurrency", *[f"{n}: p50 / p99 ms, items/s" for n, _ in series]]
    if pa:
        header.append("perf_analyzer gRPC: p50 / p99 ms, items/s")
    rows = []
    for c in concurrency:
        row = [str(c)]
        for _, levels in series:
            lv = levels.get(c)
            row.append(f"{_f(lv['latency_ms']['p50'])} / {_f(_p99(lv['latency_ms'], lv.get('requests')))}, "
                       f"{_f(lv['throughput_items_s'])}" if lv else "–")
        if pa:
            lv = pa.get(c)
            row.append(f"{_f(lv['latency_ms'].get('p50'))} / {_f(_p99(lv['latency_ms'], None))}, "
                       f"{_f(lv['throughput_items_s'])}" if lv else "–")
        rows.append(row)
    return _table(header, rows) + [P99_NOTE, ""] + serving_intervals(results)


def serving_intervals(results: dict) -> list[str]:
    """Triton vs in-process per concurrency, paired by round, with 95 % intervals over rounds."""
    intervals = (results["sections"].get("serving") or {}).get("intervals") or {}
    rows = []
    for protocol, levels in intervals.items():
        for row in levels:
            batched = row.get("vs_batched") or {}
            rows.append([protocol, str(row["concurrency"]), _iv(row.get("p50_diff_ms"), 2, " ms"),
                         _iv(row.get("throughput_ratio")), _f(row.get("pooled_throughput_ratio"), 2, "×"),
                         _iv(batched.get("throughput_ratio")), _f(batched.get("pooled_throughput_ratio"), 2, "×")])
    if not rows:
        return []
    return ["Triton vs in-process at each concurrency (closed loop; per-round p50 difference and per-round "
            "throughput ratio, geometric mean over rounds, [95 % interval over rounds]; pooled: all items / all "
            "time):", ""] + _table(
        ["protocol", "concurrency", "Triton − in-process p50", "throughput ratio", "pooled",
         "vs batched", "vs batched pooled"], rows)


def client_cost_table(results: dict) -> list[str]:
    """CPU time the benchmark process spent per request: the client's own cost."""
    serving = results["sections"].get("serving") or {}
    series = [(f"mmrec client {p}", levels) for p, levels in (serving.get("triton") or {}).items()]
    series += [("raw tritonclient grpc", serving.get("triton_raw_tritonclient") or [])]
    series = [(n, {lv["concurrency"]: lv for lv in levels}) for n, levels in series if levels]
    if not series:
        return []
    concurrency = sorted({c for _, levels in series for c in levels})
    rows = [[str(c), *[_f((levels.get(c) or {}).get("client_cpu_ms_per_request"), 2) for _, levels in series]]
            for c in concurrency]
    return _table(["concurrency", *[f"{n}: client CPU ms/request" for n, _ in series]], rows)


def _status(t: dict) -> str:
    if t.get("error"):  # judging raised: a failure, shown as such (the detail names the exception)
        return "**error**"
    return STATUS_MARK.get(t.get("verdict"), t.get("verdict") or "?")


def targets_table(results: dict) -> list[str]:
    rows = [[t["description"], t["threshold"], t["measured"], _status(t), t["detail"]]
            for t in results.get("targets", [])]
    return _table(["target", "threshold", "measured", "status", "detail"], rows) if rows else []


# --------------------------------------------------------------------------- detail sections


def offline_detail(results: dict) -> list[str]:
    section = results["sections"].get("offline") or {}
    records = section.get("records", [])
    if not records:
        return []
    rows = []
    for r in records:
        if r["status"] != "ok":
            reason = r.get("error") or (r.get("check") or {}).get("reason", "")
            rows.append([r["model"], r["engine"], r["label"], r["status"] + (f": {reason}" if reason else ""),
                         "–", "–", "–", "–", "–", "–", "–", _f(r.get("load_rss_rise_mb"), 0), "–"])
            continue
        check = r["check"]
        check_cell = "reference" if check.get("rule") == "reference" else (
            f"pass (max|Δ| {check['max_abs_error']:.1e}, cos {check['mean_cosine']:.5f})")
        rows.append([r["model"], r["engine"], r["label"], check_cell,
                     _f(r["latency_ms"]["p50"], 2), _f(r["latency_ms"]["p95"], 2),
                     _f(_p99(r["latency_ms"], r.get("reps")), 2),
                     f"{r.get('reps')} in {_f(r.get('measured_s'), 1)} s"
                     + ("" if r.get("sample_rule_met", True) else " (**< rule**)"),
                     _f(r["throughput_items_s"]),
                     f"{_f(r.get('speedup_vs_pytorch'), 2, '×')} / {_f(r.get('speedup_vs_pytorch_p50'), 2, '×')}"
                     f"{_ci(r.get('speedup_vs_pytorch_p50_interval'))}",
                     f"{_f(r.get('speedup_vs_ort_fp32'), 2, '×')} / {_f(r.get('speedup_vs_ort_fp32_p50'), 2, '×')}"
                     f"{_ci(r.get('speedup_vs_ort_fp32_p50_interval'))}",
                     _f(r.get("load_rss_rise_mb"), 0),
                     _f(r["memory"]["peak_rss_mb"], 0)])
    threads = "; ".join(f"{k}={v}" for k, v in section["threads"].items() if v is not None)
    budget = ", ".join(f"{k}={v}" for k, v in section["budget"].items())
    lines = [f"Thread settings (same count for both runtimes): {threads}.", "",
             f"Time budget per case (all rounds): {budget}; a case stops at min_reps samples over at least "
             "measure_s, or at max_s. " + P99_NOTE, ""]
    lines += _table(["model", "engine", "case", "check vs PyTorch", "p50 ms", "p95 ms", "p99 ms", "samples",
                     "items/s", "× PyTorch (thr / p50 [95 % CI])", "× ORT FP32 (thr / p50 [95 % CI])",
                     "engine RSS MB (load)", "process peak RSS MB"], rows)
    skipped = {m: v for m, v in (section.get("skipped_variants") or {}).items() if v}
    for model, variants in skipped.items():
        for variant, why in variants.items():
            lines.append(f"- {model} {variant}: not in the repository (export gate: {why})")
    return lines + ([""] if skipped else [])


def roofline_detail(results: dict) -> list[str]:
    section = results["sections"].get("roofline") or {}
    if not section.get("peak"):
        return []
    peak = section["peak"]
    lines = [f"Measured sgemm peak: **{_f(peak['peak_gflops'])} GFLOP/s** ({peak['peak_library']}, n={peak['peak_size']}, "
             f"{peak['threads']} threads). Per library: "
             + "; ".join(f"{lib} " + ", ".join(f"n={n}: {_f(v)}" for n, v in per.items())
                         for lib, per in peak["gflops"].items() if lib != "errors"), ""]
    lines += ["FLOPs: MatMul/Gemm/Conv of the FP32 graph at each case's shape (2 per multiply-add); "
              "achieved = FLOPs / p50. INT8/FP16 rows are FP32-equivalent rates (INT8 runs VNNI integer "
              "math, so it can exceed the sgemm peak); rows above 100% for FP32 mean the peak probe "
              "itself was slowed by other load.", ""]
    rows = [[r["model"], r["engine"], f"b={r['batch']}" + (f" s={r['seq_len']}" if r["seq_len"] else ""),
             _f(r["gflop"], 2), _f(r["achieved_gflops"]), _f(100 * r["fraction_of_peak"], 0, "%")]
            for r in section.get("encoders", [])]
    lines += _table(["model", "engine", "case", "GFLOP / call", "achieved GFLOP/s", "of peak"], rows)
    pairs = section.get("paired") or []
    if pairs:
        lines += ["Paired rounds: the sgemm probe (best window), then the encoder (fastest call), seconds "
                  "apart — like for like, robust to background load that comes and goes:", ""]
        lines += _table(["model", "case", "rounds: encoder / peak GFLOP/s", "of peak (median round)",
                         "of peak (best round)"],
                        [[p["model"], f"b={p['batch']}" + (f" s={p['seq_len']}" if p["seq_len"] else ""),
                          "; ".join(f"{_f(r['achieved_gflops'])} / {_f(r['peak_gflops'])}" for r in p["rounds"]),
                          _f(100 * p["fraction_of_peak_median"], 0, "%"), _f(100 * p["fraction_of_peak_best"], 0, "%")]
                         for p in pairs])
    return lines


def server_breakdown(results: dict) -> list[str]:
    levels = ((results["sections"].get("serving") or {}).get("triton") or {}).get("grpc") or []
    rows = []
    for lv in levels:
        for model, s in sorted((lv.get("server") or {}).items()):
            rows.append([str(lv["concurrency"]), model, str(s["requests"]), _f(s["mean_batch"], 2),
                         _f(s["queue_ms"], 2), _f(s["compute_infer_ms"], 2),
                         _f((s["compute_input_ms"] or 0) + (s["compute_output_ms"] or 0), 2),
                         ", ".join(f"{b}×{n}" for b, n in s["batch_sizes"].items())])
    if not rows:
        return []
    return _table(["concurrency", "model", "requests", "mean batch", "queue ms", "compute ms",
                   "in+out ms", "executed batch sizes (size×count)"], rows)


def perf_analyzer_detail(results: dict) -> list[str]:
    section = results["sections"].get("perf_analyzer") or {}
    if section.get("status") != "ok":
        why = section.get("reason") or section.get("error") or "not run"
        return [f"perf_analyzer: {section.get('status', 'not run')} — {why}", ""]
    lines = [f"Binary: `{section['tool']}`; model `{section['model']}`, batch {section['batch']}, "
             f"real items from `{section['input_items']}` held-out captions/images.", ""]
    rows = [[str(r["concurrency"]), _f(r["throughput_ratio"], 2, "×"), _f(r.get("p50_ratio"), 2, "×"),
             _f(r.get("p50_diff_ms"), 1), _f(r.get("p99_ratio"), 2, "×"),
             f"±{r.get('pa_stability_pct')}%" if r.get("pa_stable") else "none reached (accepted as measured)"]
            for r in section.get("comparison", [])]
    errors = [f"- c={lv['concurrency']}: {lv['error'][-200:]}" for lv in section.get("levels", []) if "error" in lv]
    return lines + _table(["concurrency", "own/PA throughput", "own/PA p50", "p50 Δ ms", "own/PA p99",
                           "PA stability"], rows) + errors


def quality_detail(results: dict) -> list[str]:
    section = results["sections"].get("quality") or {}
    if not section.get("variants"):
        return []
    fp32 = section["fp32"]
    lines = [f"{section['items']} held-out items, {section['users']} simulated users "
             f"({section['items_per_user']} items of one category each). FP32: interest accuracy "
             f"{fp32['interest_accuracy']:.3f}, macro-F1 {fp32['interest_macro_f1']:.3f}.", ""]
    rows = [[v["label"], _f(v["item_mean_cosine"], 4), _f(v["item_min_cosine"], 4),
             _f(v["item_neighbour_agreement"], 3), _f(v["interest_accuracy"], 3), _f(v["interest_macro_f1"], 3),
             _f(v["macro_f1_drop_points"], 2), _f(v["prediction_agreement"], 3), _f(v["ranking_agreement_top10"], 3),
             "pass" if v["gate"]["passed"] else "FAIL: " + "; ".join(v["gate"]["reasons"])]
            for v in section["variants"]]
    lines += _table(["variants", "item cos mean", "item cos min", "top-10 nbr agr", "accuracy", "macro-F1",
                     "F1 drop (pts)", "pred agr", "user top-10 rank agr", "export gate (item level)"], rows)
    for model, variants in (section.get("left_out") or {}).items():
        for variant, reasons in variants.items():
            lines.append(f"- {model} {variant}: left out by the export ({'; '.join(reasons)})")
    return lines + [""]


def header(results: dict) -> list[str]:
    m = results["machine"]
    cpu = m["cpu"]
    flags = ", ".join(f for f, on in cpu["flags"].items() if on and f.startswith(("avx512", "amx", "avx_vnni")))
    git = results.get("git", {})
    lines = [f"# mmrec benchmark ({results['settings']['mode']})", ""]
    if results.get("contended"):
        lines += [contended_banner(results), ""]
    lines += [f"- command: `{results['command']}`",
             f"- git commit: `{git.get('commit')}`" + (" (uncommitted changes)" if git.get("dirty") else ""),
             f"- machine: {cpu['model']}, {cpu['usable_cores']} usable cores, {cpu['memory_gib']} GiB; "
             f"flags: {flags or 'no AVX-512/AMX'}",
             f"- load average (1/5/15 min): start {m['loadavg_start']}, end {m.get('loadavg_end')}; "
             f"share of the cores this process got in a busy probe: start {m.get('cpu_share_start')}, "
             f"end {m.get('cpu_share_end')}"
             + (" — **the machine was shared with other work: absolute numbers are pessimistic, and "
                "PyTorch's OpenMP suffers most from it**" if results.get("contended") else ""),
             f"- repository: `{results['repository']}`; duration {results.get('duration_s', 0):.0f} s", ""]
    statuses = [f"{name}: {s.get('status')}" + (f" ({s.get('reason') or s.get('error', '')})"
                                                  if s.get("status") != "ok" else "")
                for name, s in results["sections"].items()]
    return lines + ["Sections: " + "; ".join(statuses), ""]


def contended_banner(results: dict) -> str:
    busy = results.get("busy_check") or {}
    if busy.get("busy"):
        why = f"busy before measuring: {'; '.join(busy.get('reasons') or [])}; measured anyway (--allow-busy or --quick)"
    else:
        why = "the load average or the busy probe during the run showed other work"
    return (f"**Contended run: {why}. These numbers were taken under other load; do not commit them as results — "
            "re-run `make bench` on a quiet machine.**")


def photos_detail(results: dict) -> list[str]:
    section = results["sections"].get("photos") or {}
    if not section.get("p50_ms"):
        return []
    n = section["samples_per_arm"]
    lines = [f"Caption “{section['caption']}”, photo `{section['photo']}` as a 640×427 JPEG and as a 12 MP phone "
             f"JPEG stored sideways (EXIF orientation 6), {section['rounds']} alternating rounds × "
             f"{section['per_round']} calls per arm, concurrency 1, Triton gRPC (the suite's server) and in-process.", ""]
    lines += _table(["arm", "p50 ms", "samples"], [[k, _f(v, 1), str(n.get(k))] for k, v in section["p50_ms"].items()])
    lines += _table(["ratio of medians", "value [95 % CI]"],
                    [[k, f"{_f(v['p50_ratio'], 2, '×')}{_ci(v.get('interval'))}"] for k, v in section["ratios"].items()])
    cos = section.get("cosine") or {}
    if cos:
        rows = [[name, _f(cos["item_embedding_served"].get(name), 5),
                 _f((cos.get("image_embedding_in_process_decoder") or {}).get(name), 5)]
                for name in cos["item_embedding_served"]]
        lines += ["Cosine of the 12 MP photo's embeddings to a full-resolution decode of the same file "
                  "(mmrec.photos.full_resolution_pixels):", ""]
        lines += _table(["photo", "served item_embedding", "image embedding (served decoder code)"], rows)
    return lines


def padding_detail(results: dict) -> list[str]:
    padding = (results["sections"].get("roofline") or {}).get("padding") or {}
    by_batch = padding.get("by_batch") or {}
    if not by_batch:
        return []
    executed = padding.get("executed_batch_sizes") or executed_text_batches(results)
    sizes = sorted({int(b) for b in (*padding.get("headline_batches", ()), *executed)} & {int(b) for b in by_batch})
    rows = []
    for b in sizes:
        r = by_batch[str(b)]
        rows.append([str(b) + (" (served)" if b in executed else ""), str(r["batches"]), _f(r["real_tokens_per_batch"], 1),
                     _f(r["padded_tokens_per_batch"], 1), _f(100 * r["padded_efficiency"], 0, "%"),
                     _f(r["grouped_tokens_per_batch"], 1), _f(100 * r["grouped_efficiency"], 0, "%")])
    return [f"Padding waste of the text encoder on the {padding['captions']} held-out captions (server tokenizer, "
            f"buckets {padding['buckets']}), consecutive captions per executed batch: real tokens / computed tokens, "
            "padded to the bucket of the longest row vs length-grouped (`runtime.length_groups`). "
            "\"(served)\": a batch size the dynamic batcher executed in the serving sweep.", ""] + _table(
        ["batch", "batches", "real tokens / batch", "computed (padded)", "real / computed (padded)",
         "computed (grouped)", "real / computed (grouped)"], rows)


def closed_loop_peak(results: dict) -> tuple[float, int] | None:
    """Highest closed-loop throughput of the Triton gRPC sweep and its concurrency."""
    levels = [lv for lv in ((results["sections"].get("serving") or {}).get("triton") or {}).get("grpc") or []
              if lv.get("requests")]
    if not levels:
        return None
    top = max(levels, key=lambda lv: lv["throughput_items_s"])
    return top["throughput_items_s"], top["concurrency"]


def capacity_summary(results: dict) -> list[str]:
    """One line per payload set: capacity at the p99 bound (open loop), beside the closed-loop peak."""
    section = results["sections"].get("capacity") or {}
    if not section.get("sets"):
        return []
    peak = closed_loop_peak(results)
    lines = []
    for name, r in section["sets"].items():
        iv = r.get("interval") or {}
        span = (f" [{iv['low']:.1f}, {iv['high']:.1f}] over {iv['n']} trials ({100 * iv['coverage']:.0f} % "
                "order-statistic interval)" if iv.get("low") is not None and iv.get("n", 0) > 1 else
                f" ({len(r['capacity_qps'])} trial)")
        unit = r.get("unit", "items/s")
        per = "1 user/request, `recommend`" if unit == "users/s" else "1 item/request"
        lines.append(f"- capacity at p99 ≤ {section['slo_ms']:g} ms (open loop, Poisson, {per}), {name}: "
                     f"**{_f(r.get('median_qps'))} {unit}**{span}"
                     + (f"; closed-loop peak of the sweep (workload drawings): {_f(peak[0])} items/s at "
                        f"concurrency {peak[1]}" if peak and unit == "items/s" else ""))
    return lines


def capacity_detail(results: dict) -> list[str]:
    section = results["sections"].get("capacity") or {}
    if not section.get("sets"):
        return []
    rows = []
    for name, r in section["sets"].items():
        cc = r.get("cross_check") or {}
        lg = (cc.get("loadgen") or {}).get("latency_ms") or {}
        pa = (cc.get("perf_analyzer") or {})
        pa_ms = pa.get("latency_ms") or {}
        what = r["payloads"]
        rows.append([f"{name} (`{r.get('model', section['model'])}`)",
                     f"{what['items']} ({what['distinct_images']} images)" if "distinct_images" in what
                     else f"{what['items']} users, {what.get('catalog_items', 0):,} catalog items",
                     ", ".join(_f(c) for c in r["capacity_qps"]), _f(r.get("median_qps")),
                     _f(r["search"]["idle_latency_ms"]), str(r.get("samples_at_capacity") or "–"),
                     (f"LoadGen p50 {_f(lg.get('p50'))} / p99 {_f(lg.get('p99'))} ms" if lg else "–"),
                     (pa.get("reason") or pa.get("error", "")[:80] if pa.get("skipped") or pa.get("error") else
                      f"p50 {_f(pa_ms.get('p50'))} / p99 {_f(pa_ms.get('p99'))} ms, {_f(pa.get('throughput_items_s'))}/s"
                      if pa else "–"), r.get("plot") or ""])
    return [f"MLPerf LoadGen {section.get('loadgen_version')} Server scenario over gRPC: "
            "Poisson arrivals, latency from the *scheduled* issue time, a rate passes when p99 ≤ the SLO and no "
            "request failed; geometric search to 5 %, repeated per trial. The cross-check runs LoadGen and then "
            "perf_analyzer (`--request-distribution poisson`, timed from send) at the median capacity.", ""] + _table(
        ["payloads", "requests", "capacity per trial (/s)", "median", "idle p50 ms", "samples at capacity",
         "cross-check LoadGen", "cross-check perf_analyzer", "plot"], rows)


def overload_detail(results: dict) -> list[str]:
    """Per factor of capacity offered to the admitted server: what was answered, shed, and how fast."""
    section = results["sections"].get("overload") or {}
    if section.get("status") != "ok" or not section.get("factors"):
        return []
    policy = (section.get("admission") or {}).get("policy") or {}
    rows = []
    for factor, data in section["factors"].items():
        rounds = data["rounds"]

        def med(values: list) -> str:
            values = [v for v in values if v is not None]
            return _f(float(sorted(values)[len(values) // 2])) if values else "–"
        rows.append([f"{factor}× ({_f(data['offered_rps'])}/s)", str(len(rounds)),
                     med([r["admitted_ms"].get("p99") for r in rounds]) + " " + _iv(data.get("admitted_p99_over_slo")),
                     med([r["goodput_rps"] for r in rounds]) + " " + _iv(data.get("goodput_over_capacity")),
                     f"{100 * sum(r['shed'] for r in rounds) / max(1, sum(r['requests'] for r in rounds)):.0f} %",
                     med([r["shed_ms"].get("p99") for r in rounds]) + " " + _iv(data.get("shed_p99_over_bound")),
                     str(sum(r["errors"] for r in rounds))])
    recovery = section.get("recovery") or {}
    rss = section.get("rss_mb") or {}
    seconds = recovery.get("recovery_s")
    return [f"Admission policy derived from capacity {_f(section['capacity_rps'])}/s ({section.get('payloads')}) and "
            f"the SLO {section['slo_ms']:g} ms: at most {policy.get('max_queue_size')} requests waiting, queue budget "
            f"{_f((policy.get('timeout_us') or 0) / 1e3)} ms, {policy.get('instances', 1)} instance(s) each, on "
            f"{', '.join((section.get('admission') or {}).get('models', []))}. "
            "Per round the median over rounds, then the ratio to its bound with its 95 % interval over rounds.", ""] + _table(
        ["offered", "rounds", "admitted p99 ms (/ SLO)", "goodput /s (/ capacity)", "shed", "shed answer p99 ms (/ 5 ms)",
         "other errors"], rows) + [
        "", f"- recovery at {_f(recovery.get('load_rps'))}/s after the overload: "
            + (f"{seconds:.2f} s" if seconds is not None else f"not within {recovery.get('observed_s')} s")
            + f"; server RSS (process tree) {_f(rss.get('before'))} MB before, {_f(rss.get('after'))} MB after",
        "- Triton's `nv_inference_request_failure` over the section, by reason (2.51 counts queue-timeout "
        "rejections under REJECTED, not queue-full ones): " + (", ".join(
            f"{reason} {count:.0f}" for reason, count in sorted((section.get("prometheus_failures") or {}).items()))
            or "none")] + _soak_lines(section.get("soak")) + _pair_lines(section.get("pair"))


def _soak_lines(soak: dict | None) -> list[str]:
    if not soak:
        return []
    rss, summary = soak["rss_mb"], soak["summary"]
    return [f"- soak: {soak['seconds']:g} s at {_f(soak['offered_rps'])}/s: server RSS {_f(rss['start'])} -> "
            f"{_f(rss['end'])} MB ({100 * (soak['growth'] or 0):+.1f} %, sampled {len(rss['series'])} times); "
            f"goodput {_f(summary['goodput_rps'])}/s, admitted p99 {_f(summary['admitted_ms'].get('p99'))} ms, "
            f"{100 * summary['shed_share']:.0f} % shed, {summary['errors']} other errors"]


def _pair_lines(pair: dict | None) -> list[str]:
    if not pair or "rounds" not in pair:
        return [f"- spill-over pair: not run ({pair['skipped']})"] if pair and pair.get("skipped") else []
    replicas = "; ".join(f"cores {r['cores']}: {_f(r['capacity_rps'])}/s, idle {_f(r['service_ms'])} ms, "
                         f"queue {r['policy']['max_queue_size']}" for r in pair["replicas"])
    rounds = pair["rounds"]
    moved = sum(next(iter(r["endpoints"].values()), {}).get("shed", 0) for r in rounds)
    first = sum(next(iter(r["endpoints"].values()), {}).get("requests", 0) for r in rounds)
    goodput = sorted(r["goodput_rps"] for r in rounds)[len(rounds) // 2]
    return [f"- spill-over pair (two replicas, each on its own cores; {replicas}): their sum "
            f"{_f(pair['capacity_sum_rps'])}/s offered to the first through `AsyncMMRecClient(spill_over=True)` in "
            f"{len(rounds)} rounds of {pair['round_s']:g} s: goodput {_f(goodput)}/s (median), "
            f"{_iv(pair['goodput_over_capacity_sum'])} of the sum; the first replica shed {moved} of {first} "
            f"attempts, moved to the second; {sum(r['shed'] for r in rounds)} shed by both, "
            f"{sum(r['errors'] for r in rounds)} other errors"]


def executed_text_batches(results: dict) -> list[int]:
    """Batch sizes the dynamic batcher executed for the text encoder in the serving sweep."""
    sizes: set[int] = set()
    for levels in ((results["sections"].get("serving") or {}).get("triton") or {}).values():
        for lv in levels:
            sizes |= {int(b) for b in ((lv.get("server") or {}).get("text_encoder") or {}).get("batch_sizes", {})}
    return sorted(sizes)


def markdown(results: dict) -> str:
    lines = header(results)
    blocks = [
        ("Headline: offline throughput (items/s), p50 latency, speed-up vs PyTorch eager "
         "(throughput ratio; p50-latency ratio in brackets)", headline_offline(results)),
        ("Capacity at the p99 bound (open loop)", capacity_summary(results) + [""] + capacity_detail(results)
         if capacity_summary(results) else []),
        ("Overload: admission at 1.5× and 2× capacity (open loop)", overload_detail(results)),
        ("Serving: item_encoder, closed loop, 1 item per request", serving_table(results)),
        ("Targets", targets_table(results) + aa_lines(results)),
        ("Client cost (CPU time of the benchmark process per request, same 2 cores as the server)",
         client_cost_table(results)),
        ("Offline backend comparison (all cases)", offline_detail(results)),
        ("Roofline", roofline_detail(results)),
        ("Padding waste (text encoder)", padding_detail(results)),
        ("Real photos: 640×427 vs 12 MP phone JPEG (concurrency 1)", photos_detail(results)),
        ("Triton server-side breakdown per member (gRPC sweep, statistics API)", server_breakdown(results)),
        ("perf_analyzer cross-check (own client / perf_analyzer)", perf_analyzer_detail(results)),
        ("Quality drift vs FP32 (held-out items)", quality_detail(results)),
    ]
    for title, body in blocks:
        if body:
            lines += [f"## {title}", "", *body]
    plots = [f"![{n}]({n})" for n, v in (results.get("plots") or {}).items() if v == n]
    if plots:
        lines += ["## Plots", "", *plots, ""]
    return "\n".join(lines)


def write_markdown(results: dict, output: Path) -> Path:
    path = Path(output) / MARKDOWN_FILE
    path.write_text(markdown(results))
    return path


# --------------------------------------------------------------------------- README block

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"


def _target(results: dict, tid: str) -> dict | None:
    return next((t for t in results.get("targets", []) if t["id"] == tid), None)


def _serving_row(results: dict, concurrency: int, protocol: str = "grpc") -> dict:
    rows = ((results["sections"].get("serving") or {}).get("intervals") or {}).get(protocol) or []
    return next((r for r in rows if r["concurrency"] == concurrency), {})


def _level_of(levels: list[dict] | None, concurrency: int) -> dict | None:
    return next((lv for lv in levels or [] if lv["concurrency"] == concurrency and lv.get("requests")), None)


def readme_headline(results: dict) -> list[str]:
    """The headline numbers as bullets: serving c=1 and c=8, saturation, photos, roofline."""
    serving = results["sections"].get("serving") or {}
    grpc = (serving.get("triton") or {}).get("grpc") or []
    bullets = []
    t1, r1 = _level_of(grpc, 1), _level_of(serving.get("reference"), 1)
    if t1 and r1:
        diff = _serving_row(results, 1).get("p50_diff_ms")
        point = diff["point"] if diff else t1["latency_ms"]["p50"] - r1["latency_ms"]["p50"]
        bullets.append(f"- concurrency 1, p50: Triton gRPC {_f(t1['latency_ms']['p50'])} ms vs in-process "
                       f"{_f(r1['latency_ms']['p50'])} ms: **{point:+.2f} ms**{_ci(diff, 2, ' ms')} (per round)")
    t8, r8 = _level_of(grpc, 8), _level_of(serving.get("reference"), 8)
    if t8 and r8:
        row = _serving_row(results, 8)
        ratio = row.get("throughput_ratio")
        bullets.append(f"- concurrency 8, throughput: Triton {_f(t8['throughput_items_s'])} vs in-process thread pool "
                       f"{_f(r8['throughput_items_s'])} items/s: **{_iv(ratio)}** (per round)")
    if grpc:
        top = max(lv["concurrency"] for lv in grpc)
        tb, bb = _level_of(grpc, top), _level_of(serving.get("reference_batched"), top)
        if tb and bb:
            vs = _serving_row(results, top).get("vs_batched") or {}
            bullets.append(f"- saturation (concurrency {top}): Triton {_f(tb['throughput_items_s'])} vs in-process batched "
                           f"{_f(bb['throughput_items_s'])} items/s: **{_iv(vs.get('throughput_ratio'))}** (per round)")
    photos = results["sections"].get("photos") or {}
    ratio = (photos.get("ratios") or {}).get("triton_12mp_over_640")
    if ratio:
        p50 = photos["p50_ms"]
        bullets.append(f"- phone photo: 12 MP EXIF-rotated JPEG {_f(p50['triton/jpeg_12mp_exif6'])} ms vs 640×427 "
                       f"{_f(p50['triton/jpeg_640x427'])} ms through Triton: {_f(ratio['p50_ratio'], 2, '×')}"
                       f"{_ci(ratio.get('interval'))}; cosine to full decode ≥ {_f((photos.get('cosine') or {}).get('min'), 4)}")
    bullets += capacity_summary(results)
    roof = results["sections"].get("roofline") or {}
    if roof.get("peak"):
        parts = []
        for p in roof.get("paired") or []:
            parts.append(f"{p['model']} b={p['batch']}" + (f" s={p['seq_len']}" if p["seq_len"] else "")
                         + f" {_f(100 * p['fraction_of_peak_median'], 0, '%')}")
        bullets.append(f"- roofline (ORT FP32, share of the measured sgemm peak {_f(roof['peak']['peak_gflops'], 0)} "
                       f"GFLOP/s): " + ("; ".join(parts) or "no paired rounds"))
    return bullets


def readme_block(results: dict, source: str | None = None) -> str:
    """The README's benchmark block, generated from bench.json (`mmrec bench --readme README.md`)."""
    m = results["machine"]
    cpu = m["cpu"]
    flags = ", ".join(f for f, on in cpu["flags"].items() if on and f.startswith(("avx512", "amx", "avx_vnni")))
    git = results.get("git") or {}
    clean = {True: "uncommitted changes", False: "clean tree", None: "tree state unknown"}[git.get("dirty")]
    lines = [f"Generated from `{source or JSON_FILE}` ({results['settings']['mode']} run, "
             f"{results.get('started_at', '?')}); do not edit by hand.", ""]
    if results.get("contended"):
        lines += [contended_banner(results), ""]
    lines += [f"- machine: {cpu['model']}, {cpu['usable_cores']} usable cores; flags: {flags or 'no AVX-512/AMX'}",
              f"- commit `{(git.get('commit') or '?')[:12]}` ({clean}); load average at start {m.get('loadavg_start')}, "
              f"end {m.get('loadavg_end')}; busy-probe share start {m.get('cpu_share_start')}, end {m.get('cpu_share_end')}",
              *readme_headline(results), ""]
    offline = headline_offline(results)
    if offline:
        lines += ["Offline (items/s · p50 · **median speed-up vs PyTorch eager** [95 % CI] (throughput ratio)):", "",
                  *offline]
    rows = [[t["description"], t["threshold"], t["measured"], _status(t)] for t in results.get("targets", [])]
    if rows:
        lines += _table(["target", "threshold", "measured", "status"], rows)
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme: Path, results: dict, source: str | None = None) -> bool:
    """Replace what lies between README_START and README_END with `readme_block`; True if the
    file changed. Raises ValueError when the markers are missing or out of order."""
    readme = Path(readme)
    text = readme.read_text()
    pattern = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.S)
    if text.count(README_START) != 1 or text.count(README_END) != 1 or not pattern.search(text):
        raise ValueError(f"{readme}: needs exactly one {README_START} ... {README_END} block")
    new = pattern.sub(lambda _: f"{README_START}\n{readme_block(results, source)}{README_END}", text)
    if new != text:
        readme.write_text(new)
    return new != text
