"""The issue's performance targets, judged on numbers from one run: met, missed, or not measured.

Each target is a small function registered with its id; it returns the measured value, the
threshold and a one-line detail, or says what was not measured (e.g. batch 32 in --quick).
"Not measured" is only ever a judge's own answer about missing numbers: an exception raised
while judging is a failure (`met` False, `error` set), which `mmrec bench` reports and exits on.

Targets are issue 11's goals, judged on medians (throughput targets on the measured throughput),
each with its bootstrap 95 % interval where the run has one; the detail says whether that
interval lies wholly on one side of the threshold or straddles it (then the verdict is not
conclusive: more samples or a quieter machine are needed).
"""
from __future__ import annotations

import traceback
from dataclasses import asdict, dataclass
from typing import Callable

from mmrec import schema


@dataclass
class TargetResult:
    id: str
    description: str
    threshold: str
    measured: str
    met: bool | None  # None: not measured in this run; False: missed, or could not be judged (error)
    detail: str = ""
    # For a target judged on throughput: the verdict on p50-latency ratios, where the run has it.
    # Where it differs from `met`, bursts of other load decided the outcome. (Targets on
    # latency ratios are judged on medians directly and leave this None.)
    met_on_p50: bool | None = None
    # The exception that judging this target raised ("" when it was judged): a bug or a malformed
    # results section, never a reason to call the target unmeasured.
    error: str = ""
    # The bootstrap 95 % interval [low, high] of the judged number, where the run has one.
    interval: list[float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


TARGETS: list[tuple[str, str, Callable[[dict, str, str], TargetResult]]] = []


def target(target_id: str, description: str):
    def register(fn):
        TARGETS.append((target_id, description, fn))
        return fn
    return register


def _not_measured(tid: str, description: str, threshold: str, why: str) -> TargetResult:
    return TargetResult(tid, description, threshold, "–", None, why)


def _offline(results: dict, model: str, engine: str, batch: int, seq_len: int | None = None) -> list[dict]:
    section = results["sections"].get("offline") or {}
    return [r for r in section.get("records", []) if r["model"] == model and r["engine"] == engine
            and r["batch"] == batch and r["status"] == "ok" and (seq_len is None or r["seq_len"] == seq_len)]


def _level(levels: list[dict], concurrency: int) -> dict | None:
    return next((lv for lv in levels or [] if lv["concurrency"] == concurrency and lv.get("requests")), None)


def _ort_vs_torch(model: str, batch: int):
    tid = f"ort_fp32_vs_pytorch.{model}.b{batch}"
    description = f"ORT FP32 ≥ 1.5× PyTorch eager (median latency ratio), {model}, batch {batch}"

    def evaluate(results: dict, tid: str, description: str) -> TargetResult:
        rows = [r for r in _offline(results, model, "ort-fp32", batch) if r.get("speedup_vs_pytorch_p50")]
        if not rows:
            return _not_measured(tid, description, "≥ 1.50×", f"batch {batch} not measured for {model}")
        worst = min(rows, key=lambda r: r["speedup_vs_pytorch_p50"])
        per = "; ".join(f"{r['label']}: p50 ratio {r['speedup_vs_pytorch_p50']:.2f}× "
                        f"({_interval_note(r.get('speedup_vs_pytorch_p50_ci95'), 1.5, 'above')}), "
                        f"throughput ratio {r.get('speedup_vs_pytorch') or 0:.2f}×" for r in rows)
        ci = worst.get("speedup_vs_pytorch_p50_ci95")
        return TargetResult(tid, description, "≥ 1.50×", f"{worst['speedup_vs_pytorch_p50']:.2f}× (worst case)",
                            worst["speedup_vs_pytorch_p50"] >= 1.5, "judged on medians: " + per,
                            interval=list(ci) if ci else None)

    target(tid, description)(evaluate)


for _model in (schema.TEXT_ENCODER, schema.IMAGE_ENCODER):
    for _batch in (1, 32):
        _ort_vs_torch(_model, _batch)


@target("ort_int8_vs_fp32.text_encoder.b32s128",
        "ORT INT8 ≥ 1.8× ORT FP32 (median latency ratio), text encoder batch 32 seq 128, quality gates met")
def _int8(results: dict, tid: str, description: str) -> TargetResult:
    threshold = "≥ 1.80× and gates pass"
    int8 = _offline(results, schema.TEXT_ENCODER, "ort-int8", 32, 128)
    if not int8 or not int8[0].get("speedup_vs_ort_fp32_p50"):
        return _not_measured(tid, description, threshold, "text encoder INT8 at batch 32 seq 128 not measured")
    ratio = int8[0].get("speedup_vs_ort_fp32") or 0.0
    ratio_p50 = int8[0]["speedup_vs_ort_fp32_p50"]
    ci = int8[0].get("speedup_vs_ort_fp32_p50_ci95")
    quality = results["sections"].get("quality") or {}
    rows = [v for v in quality.get("variants", []) if v["combination"].get(schema.TEXT_ENCODER) == "int8"
            and all(p == "fp32" for m, p in v["combination"].items() if m != schema.TEXT_ENCODER)]
    gate = rows[0]["gate"]["passed"] if rows else None
    check = int8[0]["check"]["passed"]
    detail = (f"p50-latency ratio {ratio_p50:.2f}× ({_interval_note(ci, 1.8, 'above')}), throughput ratio {ratio:.2f}×; "
              f"output check vs PyTorch {'pass' if check else 'FAIL'} "
              f"(mean cos {int8[0]['check']['mean_cosine']:.4f}); quality gate on held-out items: "
              + ("pass" if gate else "FAIL: " + "; ".join(rows[0]["gate"]["reasons"]) if rows else "not measured"))
    met = ratio_p50 >= 1.8 and check and gate is True
    return TargetResult(tid, description, threshold, f"{ratio_p50:.2f}×", met if gate is not None else None, detail,
                        interval=list(ci) if ci else None)


def _serving(results: dict) -> dict:
    return results["sections"].get("serving") or {}


def _spinning_note(results: dict) -> str:
    """Both sides run the portable runner's ORT sessions; say how they spin (it decides a lot
    on a shared 2-core machine: 3 spinning sessions in one process starve each other)."""
    threads = (results["sections"].get("offline") or {}).get("threads") or {}
    value = threads.get("session.intra_op.allow_spinning")
    return f"; ORT intra-op spinning in both: {value}" if value else ""


def _interval_note(ci: dict | list | None, threshold: float, better: str, unit: str = "×", digits: int = 2) -> str:
    """How a 95 % interval lies against a threshold; `better` is 'above' or 'below' (the side
    that meets the target). Says in words whether the interval straddles the threshold."""
    if not ci:
        return "no interval (raw samples not kept for this number)"
    low, high = (ci["low"], ci["high"]) if isinstance(ci, dict) else ci
    span = f"95 % interval [{low:.{digits}f}, {high:.{digits}f}]{unit}"
    if low > threshold or high < threshold:
        side = "above" if low > threshold else "below"
        verdict = "met" if side == better else "missed"
        return f"{span} lies wholly {side} {threshold:g}{unit}: {verdict} beyond doubt"
    return f"{span} straddles {threshold:g}{unit}: not conclusive, the verdict on the point estimate could flip"


def _interval_of(serving: dict, concurrency: int, protocol: str = "grpc") -> dict:
    return next((row for row in (serving.get("intervals") or {}).get(protocol, []) if row["concurrency"] == concurrency),
                {})


C8_RATIO = 1.1
C1_SLACK_MS = 1.0
SATURATION_RATIO = 0.9
PHOTO_RATIO = 2.0
PHOTO_MIN_COSINE = 0.99
ROOFLINE_FRACTION = 0.5


@target("triton_vs_inprocess.throughput.c8",
        f"Triton item_encoder throughput at concurrency 8 ≥ {C8_RATIO}× in-process thread pool")
def _c8(results: dict, tid: str, description: str) -> TargetResult:
    threshold = f"≥ {C8_RATIO:.2f}×"
    serving = _serving(results)
    triton = _level(serving.get("triton", {}).get("grpc"), 8)
    ref = _level(serving.get("reference"), 8)
    if not (triton and ref):
        return _not_measured(tid, description, threshold, "concurrency 8 not measured")
    ratio = triton["throughput_items_s"] / ref["throughput_items_s"]
    ci = _interval_of(serving, 8).get("mean_latency_ratio")
    batched = _level(serving.get("reference_batched"), 8)
    extra = (f"; in-process batched (8 items per call): {batched['throughput_items_s']:.1f} items/s"
             if batched else "")
    detail = (f"Triton gRPC {triton['throughput_items_s']:.1f} vs in-process (8 threads) "
              f"{ref['throughput_items_s']:.1f} items/s (measured throughput ratio; closed loop, so its interval is "
              f"that of mean in-process latency / mean Triton latency"
              + (f", point {ci['point']:.2f}×" if ci else "") + f"): {_interval_note(ci, C8_RATIO, 'above')}"
              f"{extra}{_spinning_note(results)}")
    return TargetResult(tid, description, threshold, f"{ratio:.2f}×", ratio >= C8_RATIO, detail,
                        interval=[ci["low"], ci["high"]] if ci else None)


@target("triton_vs_inprocess.p50.c1", f"Triton p50 at concurrency 1 ≤ in-process p50 + {C1_SLACK_MS:g} ms")
def _c1(results: dict, tid: str, description: str) -> TargetResult:
    threshold = f"≤ +{C1_SLACK_MS:.1f} ms"
    serving = _serving(results)
    triton = _level(serving.get("triton", {}).get("grpc"), 1)
    ref = _level(serving.get("reference"), 1)
    if not (triton and ref):
        return _not_measured(tid, description, threshold, "concurrency 1 not measured")
    diff = triton["latency_ms"]["p50"] - ref["latency_ms"]["p50"]
    ci = _interval_of(serving, 1).get("p50_diff_ms")
    return TargetResult(tid, description, threshold, f"{diff:+.1f} ms", diff <= C1_SLACK_MS,
                        f"Triton gRPC p50 {triton['latency_ms']['p50']:.1f} ms vs in-process "
                        f"{ref['latency_ms']['p50']:.1f} ms ({triton['requests']} / {ref['requests']} requests); "
                        f"difference of p50s: {_interval_note(ci, C1_SLACK_MS, 'below', ' ms', 1)}"
                        f"{_spinning_note(results)}",
                        interval=[ci["low"], ci["high"]] if ci else None)


@target("triton_vs_batched.throughput.saturation",
        f"Triton throughput at saturation (highest concurrency measured) ≥ {SATURATION_RATIO}× the in-process "
        "batched pipeline at that concurrency")
def _saturation(results: dict, tid: str, description: str) -> TargetResult:
    threshold = f"≥ {SATURATION_RATIO:.2f}×"
    serving = _serving(results)
    levels = [lv for lv in serving.get("triton", {}).get("grpc") or [] if lv.get("requests")]
    if not levels:
        return _not_measured(tid, description, threshold, "serving sweep not measured")
    top = max(lv["concurrency"] for lv in levels)
    triton = _level(levels, top)
    batched = _level(serving.get("reference_batched"), top)
    if batched is None:
        return _not_measured(tid, description, threshold, f"in-process batched not measured at concurrency {top}")
    ratio = triton["throughput_items_s"] / batched["throughput_items_s"]
    ci = (_interval_of(serving, top).get("vs_batched") or {}).get("mean_latency_ratio")
    return TargetResult(tid, description, threshold, f"{ratio:.2f}× (c={top})", ratio >= SATURATION_RATIO,
                        f"Triton gRPC {triton['throughput_items_s']:.1f} vs in-process batched ({top} items per call) "
                        f"{batched['throughput_items_s']:.1f} items/s at concurrency {top}; "
                        f"{_interval_note(ci, SATURATION_RATIO, 'above')}",
                        interval=[ci["low"], ci["high"]] if ci else None)


@target("photos.12mp_vs_640.triton",
        f"12 MP EXIF-rotated phone JPEG ≤ {PHOTO_RATIO:g}× the latency of a 640×427 JPEG through Triton "
        f"item_encoder, embedding cosine ≥ {PHOTO_MIN_COSINE} vs full-resolution decode")
def _photos(results: dict, tid: str, description: str) -> TargetResult:
    threshold = f"≤ {PHOTO_RATIO:.2f}×, cos ≥ {PHOTO_MIN_COSINE}"
    section = results["sections"].get("photos") or {}
    ratio = (section.get("ratios") or {}).get("triton_12mp_over_640")
    if not ratio:
        why = section.get("reason") or section.get("error") or "photos section not run"
        return _not_measured(tid, description, threshold, why)
    cosine = section.get("cosine") or {}
    worst = cosine.get("min")
    ci = ratio.get("ci95")
    p50 = section["p50_ms"]
    met = ratio["p50_ratio"] <= PHOTO_RATIO and worst is not None and worst >= PHOTO_MIN_COSINE
    detail = (f"Triton gRPC p50 {p50['triton/jpeg_12mp_exif6']:.1f} ms (12 MP) vs {p50['triton/jpeg_640x427']:.1f} ms "
              f"(640×427), ratio of medians {ratio['p50_ratio']:.2f}×: {_interval_note(ci, PHOTO_RATIO, 'below')}; "
              f"in-process {p50['in_process/jpeg_12mp_exif6']:.1f} vs {p50['in_process/jpeg_640x427']:.1f} ms; "
              f"cosine to full-resolution decode: " + (
                  f"min {worst:.4f} over {cosine.get('photos')} photos ({cosine.get('what')})" if worst is not None
                  else "not measured"))
    return TargetResult(tid, description, threshold, f"{ratio['p50_ratio']:.2f}×, cos {worst:.4f}"
                        if worst is not None else f"{ratio['p50_ratio']:.2f}×", met, detail,
                        interval=list(ci) if ci else None)


def _roofline(model: str):
    tid = f"roofline.{model}.b32"
    description = (f"{model} (ORT FP32) at batch 32" + (" × the longest sequence" if model == schema.TEXT_ENCODER else "")
                   + f" ≥ {100 * ROOFLINE_FRACTION:.0f}% of the measured sgemm peak")

    def evaluate(results: dict, tid: str, description: str) -> TargetResult:
        threshold = f"≥ {100 * ROOFLINE_FRACTION:.0f}%"
        section = results["sections"].get("roofline") or {}
        rows = [r for r in section.get("encoders", []) if r["model"] == model and r["engine"] == "ort-fp32"
                and r["batch"] == 32]
        if model == schema.TEXT_ENCODER and rows:
            longest = max(r["seq_len"] or 0 for r in rows)
            rows = [r for r in rows if r["seq_len"] == longest]
        if not rows:
            return _not_measured(tid, description, threshold, f"{model} at batch 32 not measured")
        r = rows[0]
        case = f"b=32" + (f" s={r['seq_len']}" if r["seq_len"] else "")
        peak = section["peak"]
        detail = (f"{case}, offline p50: {r['achieved_gflops']:.1f} GFLOP/s ({r['gflop']:.1f} GFLOP per batch) vs peak "
                  f"{peak['peak_gflops']:.1f} GFLOP/s ({peak['peak_library']} sgemm n={peak['peak_size']}) = "
                  f"{100 * r['fraction_of_peak']:.0f}%")
        pair = next((p for p in section.get("paired", []) if p["model"] == model and p["batch"] == 32
                     and p["seq_len"] == r["seq_len"]), None)
        if pair is None:
            return TargetResult(tid, description, threshold, f"{100 * r['fraction_of_peak']:.0f}%",
                                r["fraction_of_peak"] >= ROOFLINE_FRACTION, detail + "; no interval (no paired rounds)")
        fraction = pair["fraction_of_peak_median"]
        fractions = [x["fraction_of_peak"] for x in pair["rounds"]]
        spread = (f"rounds range {100 * min(fractions):.0f}–{100 * max(fractions):.0f}% "
                  + ("(all on the same side of the threshold)" if min(fractions) >= ROOFLINE_FRACTION
                     or max(fractions) < ROOFLINE_FRACTION else "(straddles the threshold: not conclusive)"))
        detail = (f"paired with the sgemm probe, best call vs best window ({len(pair['rounds'])} rounds): median "
                  f"{100 * fraction:.0f}%, {spread}; no bootstrap interval (a few paired rounds, judged on their "
                  "median); " + detail)
        return TargetResult(tid, description, threshold, f"{100 * fraction:.1f}%", fraction >= ROOFLINE_FRACTION, detail)

    target(tid, description)(evaluate)


for _model in (schema.TEXT_ENCODER, schema.IMAGE_ENCODER):
    _roofline(_model)


@target("client_vs_perf_analyzer", "Own async gRPC client within 10% of perf_analyzer at the same concurrency")
def _pa(results: dict, tid: str, description: str) -> TargetResult:
    section = results["sections"].get("perf_analyzer") or {}
    rows = section.get("comparison") or []
    if not rows:
        why = section.get("reason") or section.get("error") or "perf_analyzer not run"
        return _not_measured(tid, description, "throughput ≥ 0.90×, p50 ≤ 1.10×", why)
    no_p50 = [r["concurrency"] for r in rows if "p50_ratio" not in r]
    if no_p50:  # half of the target cannot be judged: never count a missing p50 as within 10 %
        return _not_measured(tid, description, "throughput ≥ 0.90×, p50 ≤ 1.10×",
                             f"perf_analyzer reported no p50 at concurrency {', '.join(map(str, no_p50))}")
    worst_t = min(rows, key=lambda r: r["throughput_ratio"])
    worst_l = max(rows, key=lambda r: r["p50_ratio"])
    met = all(r["throughput_ratio"] >= 0.9 and r["p50_ratio"] <= 1.1 for r in rows)
    per = ", ".join(f"c={r['concurrency']}: thr {r['throughput_ratio']:.2f}×, p50 {r['p50_ratio']:.2f}×"
                    for r in rows)
    return TargetResult(tid, description, "throughput ≥ 0.90×, p50 ≤ 1.10×",
                        f"thr {worst_t['throughput_ratio']:.2f}×, p50 {worst_l['p50_ratio']:.2f}× (worst)",
                        met, per)


def evaluate(results: dict) -> list[dict]:
    """Every target's verdict. A judge that raises fails its target (met False, `error` names the
    exception) while the others are still judged, so the run's numbers are reported either way."""
    out = []
    for tid, description, fn in TARGETS:
        try:
            out.append(fn(results, tid, description).to_dict())
        except Exception as err:  # noqa: BLE001 - recorded as a failure of this target, never as "not measured"
            out.append(TargetResult(tid, description, "", "–", False, f"could not judge: {type(err).__name__}: {err}",
                                    error="".join(traceback.format_exception(err)).strip()).to_dict())
    return out


def errors(results: dict) -> list[dict]:
    """The targets whose judging raised (see `evaluate`)."""
    return [t for t in results.get("targets", []) if t.get("error")]
