"""The issue's performance targets, judged on numbers from one run: met, missed, or not measured.

Each target is a small function registered with its id; it returns the measured value, the
threshold and a one-line detail, or says what was not measured (e.g. batch 32 in --quick).
"Not measured" is only ever a judge's own answer about missing numbers: an exception raised
while judging is a failure (`met` False, `error` set), which `mmrec bench` reports and exits on.

Targets are issue 11's goals. Each is judged on an interval over paired rounds (mmrec.stats):
**met** when the 95 % interval lies wholly on the meeting side of the threshold, **missed** when
it lies wholly on the other, **not conclusive** when it straddles it (more rounds or a quieter
machine are needed), and **not judged** when the section's A/A arm (the reference against
itself) shows a difference: then the machine, not the code, decided the numbers. `met` is True
only for "met" and False only for "missed".
"""
from __future__ import annotations

import traceback
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from mmrec import schema
from mmrec.stats import MET, MISSED, NOT_CONCLUSIVE, Interval

from .photo_latency import EXTRA_OVER_DECODE


NOT_JUDGED = "not judged (A/A unstable)"
NOT_MEASURED = "not measured"
ERROR = "error"


@dataclass
class TargetResult:
    id: str
    description: str
    threshold: str
    measured: str
    verdict: str  # met / missed / not conclusive / not judged (A/A unstable) / not measured / error
    detail: str = ""
    # The exception that judging this target raised ("" when it was judged): a bug or a malformed
    # results section, never a reason to call the target unmeasured.
    error: str = ""
    # The interval (mmrec.stats.Interval.to_dict) the verdict was taken on, where the run has one.
    interval: dict | None = None

    @property
    def met(self) -> bool | None:
        return {MET: True, MISSED: False, ERROR: False}.get(self.verdict)

    def to_dict(self) -> dict:
        return asdict(self) | {"met": self.met}


TARGETS: list[tuple[str, str, Callable[[dict, str, str], TargetResult]]] = []


def target(target_id: str, description: str):
    def register(fn):
        TARGETS.append((target_id, description, fn))
        return fn
    return register


def _not_measured(tid: str, description: str, threshold: str, why: str) -> TargetResult:
    return TargetResult(tid, description, threshold, "–", NOT_MEASURED, why)


def _judge(interval: dict | None, threshold: float, better: str, unit: str = "×", digits: int = 2) -> tuple[str, str]:
    """Verdict and a one-line note for an interval (Interval.to_dict) against a threshold;
    `better` is the side that meets it ('above' or 'below')."""
    if not interval:
        return NOT_CONCLUSIVE, "no interval (no paired rounds for this number)"
    iv = Interval.from_dict(interval)
    if not iv.conclusive:
        return NOT_CONCLUSIVE, f"only {iv.rounds} round(s): too few for an interval"
    verdict = iv.verdict(threshold, better)
    span = f"95 % interval [{iv.low:.{digits}f}, {iv.high:.{digits}f}]{unit} over {iv.rounds} paired rounds"
    if verdict == NOT_CONCLUSIVE:
        return verdict, f"{span} straddles {threshold:g}{unit}: not conclusive"
    return verdict, f"{span} lies wholly {iv.relation(threshold)} {threshold:g}{unit}: {verdict}"


def _combine(verdicts: list[str]) -> str:
    """Several cases behind one target: missed if any is missed, met if all are met."""
    if MISSED in verdicts:
        return MISSED
    return MET if verdicts and all(v == MET for v in verdicts) else NOT_CONCLUSIVE


def _aa_gate(results: dict, section: str, result: TargetResult) -> TargetResult:
    """A target of a section whose A/A arm showed a difference is not judged (see aa_check)."""
    aa = (results["sections"].get(section) or {}).get("aa") or {}
    if aa.get("stable") is False and result.verdict in (MET, MISSED, NOT_CONCLUSIVE):
        result.detail = f"{section} A/A unstable ({aa.get('why')}); would be {result.verdict}: {result.detail}"
        result.verdict = NOT_JUDGED
    return result


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
        judged = [_judge(r.get("speedup_vs_pytorch_p50_interval"), 1.5, "above") for r in rows]
        per = "; ".join(f"{r['label']}: p50 ratio {r['speedup_vs_pytorch_p50']:.2f}× ({note}), "
                        f"throughput ratio {r.get('speedup_vs_pytorch') or 0:.2f}×" for r, (_, note) in zip(rows, judged))
        return _aa_gate(results, "offline", TargetResult(
            tid, description, "≥ 1.50×", f"{worst['speedup_vs_pytorch_p50']:.2f}× (worst case)",
            _combine([v for v, _ in judged]), "p50 ratios paired by round: " + per,
            interval=worst.get("speedup_vs_pytorch_p50_interval")))

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
    ci = int8[0].get("speedup_vs_ort_fp32_p50_interval")
    speed, note = _judge(ci, 1.8, "above")
    quality = results["sections"].get("quality") or {}
    rows = [v for v in quality.get("variants", []) if v["combination"].get(schema.TEXT_ENCODER) == "int8"
            and all(p == "fp32" for m, p in v["combination"].items() if m != schema.TEXT_ENCODER)]
    gate = rows[0]["gate"]["passed"] if rows else None
    check = int8[0]["check"]["passed"]
    detail = (f"p50-latency ratio {ratio_p50:.2f}× ({note}), throughput ratio {ratio:.2f}×; "
              f"output check vs PyTorch {'pass' if check else 'FAIL'} "
              f"(mean cos {int8[0]['check']['mean_cosine']:.4f}); quality gate on held-out items: "
              + ("pass" if gate else "FAIL: " + "; ".join(rows[0]["gate"]["reasons"]) if rows else "not measured"))
    if gate is None:
        return _not_measured(tid, description, threshold, detail)
    verdict = MISSED if not (check and gate) else speed
    return _aa_gate(results, "offline", TargetResult(tid, description, threshold, f"{ratio_p50:.2f}×", verdict,
                                                     detail, interval=ci))


def _serving(results: dict) -> dict:
    return results["sections"].get("serving") or {}


def _spinning_note(results: dict) -> str:
    """Both sides run the portable runner's ORT sessions; say how they spin (it decides a lot
    on a shared 2-core machine: 3 spinning sessions in one process starve each other)."""
    threads = (results["sections"].get("offline") or {}).get("threads") or {}
    value = threads.get("session.intra_op.allow_spinning")
    return f"; ORT intra-op spinning in both: {value}" if value else ""


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
    ci = _interval_of(serving, 8).get("throughput_ratio")
    verdict, note = _judge(ci, C8_RATIO, "above")
    ratio = ci["point"] if ci else triton["throughput_items_s"] / ref["throughput_items_s"]
    batched = _level(serving.get("reference_batched"), 8)
    extra = (f"; in-process batched (8 items per call): {batched['throughput_items_s']:.1f} items/s"
             if batched else "")
    detail = (f"Triton gRPC {triton['throughput_items_s']:.1f} vs in-process (8 threads) "
              f"{ref['throughput_items_s']:.1f} items/s; throughput ratio per round (closed loop), geometric mean "
              f"{ratio:.2f}×: {note}{extra}{_spinning_note(results)}")
    return _aa_gate(results, "serving", TargetResult(tid, description, threshold, f"{ratio:.2f}×", verdict, detail,
                                                     interval=ci))


def _throughput_vs_pool(concurrency: int, bar: float):
    """Issue 21: the served engine keeps up with an in-process thread pool running the same engine."""
    def judge(results: dict, tid: str, description: str) -> TargetResult:
        threshold = f"≥ {bar:.2f}×"
        serving = _serving(results)
        triton = _level(serving.get("triton", {}).get("grpc"), concurrency)
        ref = _level(serving.get("reference"), concurrency)
        if not (triton and ref):
            return _not_measured(tid, description, threshold, f"concurrency {concurrency} not measured")
        ci = _interval_of(serving, concurrency).get("throughput_ratio")
        verdict, note = _judge(ci, bar, "above")
        ratio = ci["point"] if ci else triton["throughput_items_s"] / ref["throughput_items_s"]
        return _aa_gate(results, "serving", TargetResult(
            tid, description, threshold, f"{ratio:.2f}×", verdict,
            f"Triton gRPC {triton['throughput_items_s']:.1f} vs in-process ({concurrency} threads, the same "
            f"engine) {ref['throughput_items_s']:.1f} items/s; throughput ratio per round (closed loop), "
            f"geometric mean {ratio:.2f}×: {note}", interval=ci))
    return judge


POOL_RATIO = 1.0
for _c in (2, 4):
    target(f"triton_vs_inprocess.throughput.c{_c}",
           f"Triton item_encoder throughput at concurrency {_c} ≥ {POOL_RATIO:g}× an in-process thread pool "
           "running the same engine")(_throughput_vs_pool(_c, POOL_RATIO))


@target("triton_vs_inprocess.p50.c1", f"Triton p50 at concurrency 1 ≤ in-process p50 + {C1_SLACK_MS:g} ms")
def _c1(results: dict, tid: str, description: str) -> TargetResult:
    threshold = f"≤ +{C1_SLACK_MS:.1f} ms"
    serving = _serving(results)
    triton = _level(serving.get("triton", {}).get("grpc"), 1)
    ref = _level(serving.get("reference"), 1)
    if not (triton and ref):
        return _not_measured(tid, description, threshold, "concurrency 1 not measured")
    ci = _interval_of(serving, 1).get("p50_diff_ms")
    diff = ci["point"] if ci else triton["latency_ms"]["p50"] - ref["latency_ms"]["p50"]
    verdict, note = _judge(ci, C1_SLACK_MS, "below", " ms", 2)
    return _aa_gate(results, "serving", TargetResult(
        tid, description, threshold, f"{diff:+.2f} ms", verdict,
        f"Triton gRPC p50 {triton['latency_ms']['p50']:.1f} ms vs in-process {ref['latency_ms']['p50']:.1f} ms "
        f"({triton['requests']} / {ref['requests']} requests); p50 difference per round, mean {diff:+.2f} ms: "
        f"{note}{_spinning_note(results)}", interval=ci))


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
    ci = (_interval_of(serving, top).get("vs_batched") or {}).get("throughput_ratio")
    ratio = ci["point"] if ci else triton["throughput_items_s"] / batched["throughput_items_s"]
    verdict, note = _judge(ci, SATURATION_RATIO, "above")
    return _aa_gate(results, "serving", TargetResult(
        tid, description, threshold, f"{ratio:.2f}× (c={top})", verdict,
        f"Triton gRPC {triton['throughput_items_s']:.1f} vs in-process batched ({top} items per call) "
        f"{batched['throughput_items_s']:.1f} items/s at concurrency {top}; throughput ratio per round, "
        f"geometric mean {ratio:.2f}×: {note}", interval=ci))


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
    ci = ratio.get("interval")
    p50 = section["p50_ms"]
    speed, note = _judge(ci, PHOTO_RATIO, "below")
    verdict = MISSED if worst is None or worst < PHOTO_MIN_COSINE else speed
    detail = (f"Triton gRPC p50 {p50['triton/jpeg_12mp_exif6']:.1f} ms (12 MP) vs {p50['triton/jpeg_640x427']:.1f} ms "
              f"(640×427), p50 ratio per round, geometric mean {ratio['p50_ratio']:.2f}×: {note}; "
              f"in-process {p50['in_process/jpeg_12mp_exif6']:.1f} vs {p50['in_process/jpeg_640x427']:.1f} ms; "
              f"cosine to full-resolution decode: " + (
                  f"min {worst:.4f} over {cosine.get('photos')} photos ({cosine.get('what')})" if worst is not None
                  else "not measured"))
    return _aa_gate(results, "photos", TargetResult(
        tid, description, threshold, f"{ratio['p50_ratio']:.2f}×, cos {worst:.4f}" if worst is not None
        else f"{ratio['p50_ratio']:.2f}×", verdict, detail, interval=ci))


def _why_missing(section: dict, default: str) -> str:
    """Why a section has no number to judge: its skip reason, its error, else `default`."""
    return section.get("reason") or section.get("error") or default


@target("photos.12mp_extra_vs_dct_decode",
        f"What a 12 MP phone JPEG adds over a 640×427 one through Triton ≤ {EXTRA_OVER_DECODE:g}× the DCT-scaled "
        "(1/4) JPEG decode of the same file, measured in the same run")
def _photo_decode_floor(results: dict, tid: str, description: str) -> TargetResult:
    section = results["sections"].get("photos") or {}
    extra = section.get("extra_12mp_over_dct_decode")
    threshold = f"≤ {EXTRA_OVER_DECODE:g}×"
    if not extra:
        return _not_measured(tid, description, threshold,
                             _why_missing(section, "photos section not run (or run before the decode arm existed)"))
    interval = extra[f"extra_minus_{EXTRA_OVER_DECODE:g}x_decode_ms"]
    verdict, note = _judge(interval, 0.0, "below", " ms", 2)
    extra_ms, floor_ms = np.mean(extra["extra_ms_per_round"]), np.mean(extra["dct_decode_ms_per_round"])
    size = "×".join(map(str, extra["dct_decoded_size"]))
    return _aa_gate(results, "photos", TargetResult(
        tid, description, threshold, f"{extra['point']:.2f}×", verdict,
        f"12 MP adds {extra_ms:.1f} ms over 640×427 (Triton p50 per round); the DCT-scaled decode of the file "
        f"(to {size}) takes {floor_ms:.1f} ms; per round extra − {EXTRA_OVER_DECODE:g}× decode, mean "
        f"{interval['point']:+.2f} ms: {note}", interval=interval))


ENGINE_SPEED = 0.85
SERVED_RSS_MB = 800


def _engine(results: dict) -> dict:
    return results["sections"].get("engine") or {}


@target("engine.served_vs_in_process.b32",
        f"A batch-32 request of real items through `mmrec serve` ≥ {ENGINE_SPEED}× the speed of the same engine "
        "in-process on the same bytes (decode included)")
def _engine_speed(results: dict, tid: str, description: str) -> TargetResult:
    section = _engine(results)
    speed = section.get("served_speed_vs_in_process")
    if not speed:
        return _not_measured(tid, description, f"≥ {ENGINE_SPEED}×", _why_missing(section, "engine section not run"))
    verdict, note = _judge(speed["interval"], ENGINE_SPEED, "above")
    p50 = section["p50_ms"]
    return _aa_gate(results, "engine", TargetResult(
        tid, description, f"≥ {ENGINE_SPEED}×", f"{speed['point']:.2f}×", verdict,
        f"p50 {p50['triton']:.0f} ms served vs {p50['in_process']:.0f} ms in-process (in-process / served latency "
        f"per round): {note}; max |served − in-process| item embedding {section['max_abs_diff_item_embedding']:.1e}",
        interval=speed["interval"]))


@target("engine.served_rss", f"Resident memory of `mmrec serve` on the default export, whole process tree, idle "
        f"after warm-up ≤ {SERVED_RSS_MB} MB")
def _served_rss(results: dict, tid: str, description: str) -> TargetResult:
    section = _engine(results)
    rss = section.get("rss_mb")
    if not rss:
        return _not_measured(tid, description, f"≤ {SERVED_RSS_MB} MB", _why_missing(section, "engine section not run"))
    largest = sorted(rss["processes"].items(), key=lambda kv: -kv[1])
    return TargetResult(tid, description, f"≤ {SERVED_RSS_MB} MB", f"{rss['total']:.0f} MB",
                        MET if rss["total"] <= SERVED_RSS_MB else MISSED,
                        f"{len(largest)} processes after {rss['after']} and {rss['idle_s_before']:g} s idle: "
                        + ", ".join(f"{name} {mb:.0f}" for name, mb in largest) + " MB (one reading, no interval)")


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
                                NOT_CONCLUSIVE, detail + "; no interval (no paired rounds)")
        fraction = pair["fraction_of_peak_median"]
        fractions = [x["fraction_of_peak"] for x in pair["rounds"]]
        verdict = (MET if min(fractions) >= ROOFLINE_FRACTION else MISSED if max(fractions) < ROOFLINE_FRACTION
                   else NOT_CONCLUSIVE)
        spread = (f"rounds range {100 * min(fractions):.0f}–{100 * max(fractions):.0f}% "
                  + ("(all on the same side of the threshold)" if verdict != NOT_CONCLUSIVE
                     else "(straddles the threshold: not conclusive)"))
        detail = (f"paired with the sgemm probe, best call vs best window ({len(pair['rounds'])} rounds): median "
                  f"{100 * fraction:.0f}%, {spread}; judged on the range of the paired rounds (met only if every "
                  "round meets it); " + detail)
        return TargetResult(tid, description, threshold, f"{100 * fraction:.1f}%", verdict, detail)

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
                        MET if met else MISSED, "point estimates (perf_analyzer runs once per level, after the "
                        "paired rounds: no interval): " + per)


def _overload(results: dict) -> dict | None:
    section = results["sections"].get("overload") or {}
    return section if section.get("status") == "ok" and section.get("factors") else None


def _overload_target(key: str, threshold: float, better: str, what: str):
    """One overload figure (an interval of a ratio to its bound) at every factor offered."""
    def judge(results: dict, tid: str, description: str) -> TargetResult:
        section = _overload(results)
        shown = f"{'≤' if better == 'below' else '≥'} {threshold:g}× {what}"
        if section is None:
            why = (results["sections"].get("overload") or {}).get("reason") or \
                (results["sections"].get("overload") or {}).get("error") or "overload section not run"
            return _not_measured(tid, description, shown, why)
        verdicts, notes, points, worst = [], [], [], None
        for factor, data in section["factors"].items():
            interval = data.get(key)
            if interval is None and key == "shed_p99_over_bound" and not any(r["shed"] for r in data["rounds"]):
                notes.append(f"{factor}×: nothing shed")
                continue
            verdict, note = _judge(interval, threshold, better)
            verdicts.append(verdict)
            notes.append(f"{factor}× capacity: {note}")
            if interval:
                points.append(f"{interval['point']:.2f}× ({factor}×)")
                if worst is None or verdict == MISSED:
                    worst = interval
        return TargetResult(tid, description, shown, ", ".join(points) or "–", _combine(verdicts),
                            "; ".join(notes), interval=worst)
    return judge


target("overload.admitted_p99", "At 1.5× and 2× capacity offered, the admitted requests keep p99 ≤ the SLO")(
    _overload_target("admitted_p99_over_slo", 1.0, "below", "SLO"))
target("overload.goodput", "At 1.5× and 2× capacity offered, goodput (answered within the SLO) ≥ 0.9× capacity")(
    _overload_target("goodput_over_capacity", 0.9, "above", "capacity"))
target("overload.shed_answer", "A shed request gets its answer in ≤ 5 ms p99")(
    _overload_target("shed_p99_over_bound", 1.0, "below", "5 ms"))


@target("overload.recovery", "After the overload stops, p99 returns under the SLO within 2 s")
def _recovery(results: dict, tid: str, description: str) -> TargetResult:
    section = _overload(results)
    if section is None:
        return _not_measured(tid, description, "≤ 2 s", "overload section not run")
    recovery = section["recovery"]
    seconds, bound = recovery["recovery_s"], recovery["bound_s"]
    observed = f"one observation at {recovery['load_rps']:.1f}/s over {recovery['observed_s']:g} s (no interval)"
    if seconds is None:
        return TargetResult(tid, description, f"≤ {bound:g} s", f"> {recovery['observed_s']:g} s", MISSED,
                            f"still late at the end: {observed}")
    return TargetResult(tid, description, f"≤ {bound:g} s", f"{seconds:.2f} s", MET if seconds <= bound else MISSED,
                        observed)


@target("overload.memory", "No memory growth over a 5-minute overload (RSS of the server's process tree)")
def _soak(results: dict, tid: str, description: str) -> TargetResult:
    section = _overload(results)
    soak = (section or {}).get("soak")
    if not soak or soak.get("growth") is None:
        return _not_measured(tid, description, "≤ +2 %", "overload section or its soak not run")
    growth, bound, rss = soak["growth"], soak["bound"], soak["rss_mb"]
    short = f" (a {soak['seconds']:g} s soak, not 5 minutes)" if soak["seconds"] < 300 else ""
    return TargetResult(tid, description, f"≤ +{100 * bound:g} %", f"{100 * growth:+.1f} %",
                        MET if growth <= bound else MISSED,
                        f"{rss['start']:.0f} -> {rss['end']:.0f} MB over {soak['seconds']:g} s at "
                        f"{soak['offered_rps']:.1f}/s, sampled every few seconds (one run, no interval){short}")


@target("overload.spill_over", "Two replicas behind the failover client, one overloaded: goodput of the pair "
        "≥ 0.9× the sum of their capacities")
def _spill_over(results: dict, tid: str, description: str) -> TargetResult:
    section = _overload(results)
    pair = (section or {}).get("pair")
    if not pair or "goodput_over_capacity_sum" not in pair:
        return _not_measured(tid, description, "≥ 0.9× capacity sum",
                             (pair or {}).get("skipped") or "overload section or its pair not run")
    verdict, note = _judge(pair["goodput_over_capacity_sum"], pair["bound"], "above")
    capacities = " + ".join(f"{r['capacity_rps']:.1f}" for r in pair["replicas"])
    return TargetResult(tid, description, f"≥ {pair['bound']:g}× capacity sum",
                        f"{pair['goodput_over_capacity_sum']['point']:.2f}×", verdict,
                        f"{note}; capacities {capacities}/s, each replica on its own cores",
                        interval=pair["goodput_over_capacity_sum"])


def evaluate(results: dict) -> list[dict]:
    """Every target's verdict. A judge that raises fails its target (met False, `error` names the
    exception) while the others are still judged, so the run's numbers are reported either way."""
    out = []
    for tid, description, fn in TARGETS:
        try:
            out.append(fn(results, tid, description).to_dict())
        except Exception as err:  # noqa: BLE001 - recorded as a failure of this target, never as "not measured"
            out.append(TargetResult(tid, description, "", "–", ERROR, f"could not judge: {type(err).__name__}: {err}",
                                    error="".join(traceback.format_exception(err)).strip()).to_dict())
    return out


def errors(results: dict) -> list[dict]:
    """The targets whose judging raised (see `evaluate`)."""
    return [t for t in results.get("targets", []) if t.get("error")]
