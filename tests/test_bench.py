"""`mmrec bench`: reports are produced and well-formed (not how fast anything is).

The end-to-end test runs `mmrec bench --quick` against the session's real export and a real
tritonserver; the unit tests cover the parsing, counting and judging helpers on small inputs.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mmrec.benchmarks import checks, perf_analyzer, report, roofline, targets, timing, triton_stats
from mmrec.benchmarks.settings import QUICK, SECTIONS, Budget

PLOTS = ("latency_vs_concurrency.png", "throughput_vs_batch.png", "backend_comparison.png", "roofline.png")


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def quick_run(exported_repository, tmp_path_factory):
    from typer.testing import CliRunner

    from mmrec.cli import app

    output = tmp_path_factory.mktemp("bench")
    result = CliRunner().invoke(app, ["bench", "--quick", "--repository", str(exported_repository),
                                      "--output", str(output)])
    return result, output


@pytest.mark.server
@pytest.mark.timeout(600)
def test_quick_bench_exits_cleanly(quick_run):
    result, _ = quick_run
    assert result.exit_code == 0, (result.output, result.exception)


@pytest.mark.server
@pytest.mark.timeout(600)
def test_quick_bench_json_is_complete(quick_run):
    _, output = quick_run
    results = json.loads((output / "bench.json").read_text())
    for key in ("schema_version", "command", "git", "machine", "versions", "settings", "threads",
                "sections", "targets", "plots", "repository", "provenance"):
        assert key in results, key
    machine = results["machine"]
    assert machine["cpu"]["model"] and machine["cpu"]["usable_cores"] >= 1
    assert "avx512_vnni" in machine["cpu"]["flags"]
    assert len(machine["loadavg_start"]) == 3 and len(machine["loadavg_end"]) == 3
    assert results["settings"]["mode"] == "quick"
    assert results["versions"]["onnxruntime"] and results["versions"]["torch"]
    assert set(results["sections"]) == set(SECTIONS)
    for name, section in results["sections"].items():
        assert section["status"] in ("ok", "skipped"), (name, section.get("error"), section.get("traceback"))
    for name in ("offline", "roofline", "quality", "serving", "photos", "capacity"):
        assert results["sections"][name]["status"] == "ok", name

    offline = results["sections"]["offline"]
    assert offline["threads"]["torch_num_threads"] == offline["threads"]["ort_intra_op_threads"]
    engines = {(r["model"], r["engine"]) for r in offline["records"] if r["status"] == "ok"}
    for model in ("text_encoder", "image_encoder", "fusion", "pipeline"):
        assert (model, "pytorch") in engines and (model, "ort-fp32") in engines, model
    for r in offline["records"]:
        if r["precision"] != "fp32":  # a variant may legitimately fail its check: then it is not timed
            assert r["status"] in ("ok", "check_failed") and "rule" in r["check"], r
            if r["status"] == "check_failed":
                assert not r["check"]["passed"] and r["check"]["reason"] and "latency_ms" not in r
                continue
        assert r["status"] == "ok", r
        assert r["latency_ms"]["p50"] > 0 and r["throughput_items_s"] > 0 and r["reps"] >= QUICK.offline.min_reps
        assert r["check"]["rule"] == "reference" or r["check"]["passed"]
        assert r["speedup_vs_pytorch"] > 0 and r["speedup_vs_pytorch_p50"] > 0

    serving = results["sections"]["serving"]
    assert [lv["concurrency"] for lv in serving["reference"]] == list(QUICK.concurrency)
    for protocol in QUICK.protocols:
        levels = serving["triton"][protocol]
        assert [lv["concurrency"] for lv in levels] == list(QUICK.concurrency)
        for lv in levels:
            assert lv["requests"] > 0 and lv["errors"] == 0, lv
            assert "item_encoder" in lv["server"] and lv["server"]["item_encoder"]["requests"] > 0
    assert results["sections"]["roofline"]["peak"]["peak_gflops"] > 0
    assert results["sections"]["quality"]["variants"], "the default export has INT8/FP16 variants"

    # the method: per-round medians (no raw latencies stored), intervals paired by round, an A/A arm
    # per section, photos, padding, busy check
    assert offline["rounds"] == QUICK.offline_rounds
    for r in offline["records"]:
        assert "_latencies" not in r and not any(k.endswith("_ci95") for k in r), r
        if r["status"] != "ok":
            continue
        assert len(r["p50_ms_per_round"]) == QUICK.offline_rounds and min(r["p50_ms_per_round"]) > 0, r
        assert r["latency_ms"]["samples"] == r["reps"] and (r["reps"] >= 1000 or r["latency_ms"]["p99"] is None)
        interval = r["speedup_vs_pytorch_p50_interval"]
        if r["engine"] == "pytorch":
            assert interval is None  # PyTorch against itself
            continue
        _assert_interval(interval, "ratio", QUICK.offline_rounds)
        assert r["speedup_vs_pytorch_p50"] == pytest.approx(interval["point"], rel=1e-3)
    aa_records = [r for r in offline["records"] if r.get("aa_p50_ms_per_round")]
    assert aa_records and all(r["engine"] == "ort-fp32" for r in aa_records)
    assert all(len(r["aa_p50_ms_per_round"]) == QUICK.offline_rounds for r in aa_records)
    for name in ("offline", "serving", "photos"):
        aa = results["sections"][name]["aa"]
        assert isinstance(aa, dict) and aa["stable"] in (True, False) and aa["why"], (name, aa)
        _assert_interval(aa["interval"], "ratio")
    assert [row["concurrency"] for row in serving["intervals"]["grpc"]] == list(QUICK.concurrency)
    for protocol in QUICK.protocols:
        for row in serving["intervals"][protocol]:
            _assert_interval(row["p50_diff_ms"], "difference", QUICK.serving_rounds)
            _assert_interval(row["throughput_ratio"], "ratio", QUICK.serving_rounds)
            assert row["pooled_throughput_ratio"] > 0 and "mean_latency_ratio" not in row
            _assert_interval(row["vs_batched"]["throughput_ratio"], "ratio", QUICK.serving_rounds)
    for lv in [*serving["reference"], *serving["triton_aa"], *serving["triton"]["grpc"]]:
        assert len(lv["p50_ms_per_round"]) == len(lv["throughput_items_s_per_round"]) == QUICK.serving_rounds, lv
        assert "_latencies" not in lv
    assert [lv["concurrency"] for lv in serving["triton_aa"]] == list(QUICK.concurrency)
    photos = results["sections"]["photos"]
    assert photos["status"] == "ok", (photos.get("error"), photos.get("traceback"))
    assert set(photos["samples_per_arm"].values()) == {QUICK.photo_rounds * QUICK.photo_per_round}
    assert all(len(v) == QUICK.photo_rounds for v in photos["p50_ms_per_round"].values())
    ratio = photos["ratios"]["triton_12mp_over_640"]
    assert "ci95" not in ratio
    _assert_interval(ratio["interval"], "ratio", QUICK.photo_rounds)
    assert ratio["p50_ratio"] == pytest.approx(ratio["interval"]["point"], rel=1e-3)
    assert photos["cosine"]["min"] > 0.9 and photos["cosine"]["photos"] >= 1
    assert results["sections"]["roofline"]["padding"]["by_batch"]["1"]["padded_efficiency"] > 0
    assert results["busy_check"]["allowed"]  # --quick implies --allow-busy
    assert "start: offline" in quick_run[0].output  # not a terminal: timestamped progress lines

    capacity = results["sections"]["capacity"]
    assert capacity["status"] == "ok", (capacity.get("error"), capacity.get("traceback"))
    assert set(capacity["sets"]) == set(QUICK.capacity_sets) and capacity["slo_ms"] == QUICK.slo_ms
    jpeg = capacity["sets"]["jpeg_640x427"]
    assert jpeg["median_qps"] > 0 and len(jpeg["capacity_qps"]) == QUICK.capacity_trials, jpeg["capacity_qps"]
    assert jpeg["plot"] == "capacity_jpeg_640x427.png" and (output / jpeg["plot"]).is_file()
    overload = results["sections"]["overload"]  # admission derived from that capacity, 1.5x and 2x offered
    assert overload["status"] == "ok", (overload.get("error"), overload.get("traceback"))
    assert set(overload["factors"]) == {f"{f:g}" for f in QUICK.overload_factors}
    for factor in overload["factors"].values():
        assert len(factor["rounds"]) == QUICK.overload_rounds
        for r in factor["rounds"]:
            assert r["requests"] == r["ok"] + r["shed"] + r["errors"] > 0 and r["errors"] == 0, r
    assert overload["admission"]["policy"]["max_queue_size"] >= 1 and "item_encoder" in overload["admission"]["models"]
    assert overload["recovery"]["observed_s"] == QUICK.overload_recovery_s
    assert overload["rss_mb"]["before"] > 0 and overload["rss_mb"]["after"] > 0
    assert {t["id"] for t in results["targets"]} >= {"overload.admitted_p99", "overload.goodput",
                                                      "overload.shed_answer", "overload.recovery"}

    provenance = results["provenance"]
    assert provenance["git"]["commit"] and provenance["git"]["dirty"] in (True, False)
    assert len(provenance["loadavg"]["before"]) == 3 and len(provenance["loadavg"]["after"]) == 3
    assert provenance["started"] <= provenance["finished"]

    pa = results["sections"]["perf_analyzer"]
    if pa["status"] == "ok":
        assert pa["levels"] and all("error" not in lv for lv in pa["levels"]), pa["levels"]
        assert pa["comparison"]
    else:
        assert "perf_analyzer" in pa["reason"]

    ids = {t["id"] for t in results["targets"]}
    assert len(ids) == len(targets.TARGETS)
    assert not targets.errors(results), [(t["id"], t["error"]) for t in targets.errors(results)]
    for t in results["targets"]:
        assert t["verdict"] in VERDICTS, t
        assert t["met"] is {"met": True, "missed": False}.get(t["verdict"]), t
        assert "beyond doubt" not in t["detail"], t
    # what --quick measures is judged on an interval (whatever the verdict), not reported as unmeasured
    judged = {t["id"]: t for t in results["targets"]}
    for tid in ("ort_fp32_vs_pytorch.text_encoder.b1", "ort_fp32_vs_pytorch.image_encoder.b1",
                "triton_vs_inprocess.p50.c1"):
        assert judged[tid]["verdict"] != "not measured", judged[tid]
        _assert_interval(judged[tid]["interval"], "difference" if tid.endswith("c1") else "ratio")


VERDICTS = {"met", "missed", "not conclusive", "not judged (A/A unstable)", "not measured"}


def _assert_interval(interval: dict, kind: str, rounds: int | None = None) -> None:
    """An mmrec.stats.Interval dict from enough rounds: finite, ordered, of the right kind."""
    assert interval["kind"] == kind and interval["level"] == 0.95 and interval["method"], interval
    if rounds is not None:
        assert interval["rounds"] == rounds, interval
    assert interval["low"] is not None and interval["high"] is not None, interval  # >= MIN_ROUNDS rounds
    assert interval["low"] <= interval["point"] <= interval["high"], interval
    if kind == "ratio":
        assert interval["low"] > 0, interval


@pytest.mark.server
@pytest.mark.timeout(600)
def test_quick_bench_markdown_and_plots(quick_run):
    from PIL import Image

    _, output = quick_run
    text = (output / "summary.md").read_text()
    assert text.startswith("# mmrec benchmark (quick)")
    for heading in ("## Headline", "## Serving", "## Targets", "## Offline backend comparison", "## Quality drift",
                    "## Real photos", "## Padding waste", "## Capacity at the p99 bound (open loop)"):
        assert heading in text, heading
    assert "A/A arms" in text and "beyond doubt" not in text
    table = [line for line in text.splitlines() if line.startswith("| model | case |")]
    assert table, "headline table missing"
    lines = text.splitlines()
    start = lines.index(table[0])
    assert set(lines[start + 1].replace("|", "")) == {"-"}
    assert lines[start].count("|") == lines[start + 2].count("|")
    for name in PLOTS:
        with Image.open(output / name) as image:
            image.verify()
        with Image.open(output / name) as image:
            assert image.size[0] > 200 and image.size[1] > 200
        assert f"![{name}]({name})" in text


@pytest.mark.server
@pytest.mark.timeout(600)
def test_rerender_rebuilds_reports_without_measuring(quick_run):
    from typer.testing import CliRunner

    from mmrec.cli import app

    _, output = quick_run
    before = json.loads((output / "bench.json").read_text())
    (output / "summary.md").unlink()
    result = CliRunner().invoke(app, ["bench", "--rerender", "--output", str(output)])
    assert result.exit_code == 0, (result.output, result.exception)
    after = json.loads((output / "bench.json").read_text())
    assert after["rerendered"]["at"] and (output / "summary.md").is_file()
    assert after["sections"]["serving"] == before["sections"]["serving"]
    # the offline ratios are recomputed from the stored per-round medians: the same intervals come back
    assert after["sections"]["offline"]["records"] == before["sections"]["offline"]["records"]
    assert [(t["id"], t["verdict"], t["interval"]) for t in after["targets"]] == \
        [(t["id"], t["verdict"], t["interval"]) for t in before["targets"]]


# --------------------------------------------------------------------------- units


@pytest.mark.server
def test_overlapped_servers_start_together_on_their_own_cores_and_settle_only_once_stopped(tmp_path):
    """benchmarks/server_overlap.py: what the overload section's measurements rely on."""
    import os
    import urllib.request

    from mmrec.benchmarks.server_overlap import OverlappedServers
    from mmrec.benchmarks.serving import running_server
    from toy_models import DOUBLE_CONFIG, DOUBLE_MODEL, write_model

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("two servers on their own cores need at least 2 usable cores")
    repo = write_model(tmp_path / "repo", "double", DOUBLE_CONFIG, DOUBLE_MODEL)
    with OverlappedServers(running_server) as servers:
        a, b = servers.start_all([(repo, tmp_path / "a.log", {cores[0]}), (repo, tmp_path / "b.log", {cores[-1]})])
        assert os.sched_getaffinity(a.pid) == {cores[0]} and os.sched_getaffinity(b.pid) == {cores[-1]}
        assert os.sched_getaffinity(0) == set(cores)  # the caller is not left pinned
        servers.stop(a)
        assert a.returncode is None  # stop() returns at once; Triton takes over a second to shut down
        servers.settle()
        assert a.returncode is not None  # settled: the stopped server has exited
        with urllib.request.urlopen(f"http://{b.urls['http']}/v2/health/ready", timeout=5) as ready:
            assert ready.status == 200  # the other one still serves
    assert b.returncode is not None  # leaving the block stops what is left


def test_percentiles_and_time_bounded_repetition():
    p = timing.percentiles([1.0, 2.0, 3.0, 4.0])
    assert p["p50"] == pytest.approx(2.5) and p["min"] == 1.0
    calls = []
    result = timing.time_calls(lambda: calls.append(1), 3, Budget(warmup_s=0.0, measure_s=0.0, min_reps=5))
    assert result.reps == 5 and result.warmup_reps == 1 and len(calls) == 6
    assert result.summary()["throughput_items_s"] > 0


def test_peak_rss_is_recorded():
    with timing.PeakRSS() as mem:
        block = np.ones(8 * 2**20 // 8)
        block += 1
    info = mem.to_dict()
    assert info["peak_rss_mb"] >= info["rss_before_mb"] > 0


def test_checks_use_the_real_tolerances():
    want = [np.eye(3, dtype=np.float32)]
    assert checks.compare("fp32", [want[0] + 5e-5], want).passed
    failed = checks.compare("fp32", [want[0] + 2e-4], want)
    assert not failed.passed and "max|Δ|" in failed.reason
    assert checks.compare("int8", [want[0] + 0.01], want).passed
    assert not checks.compare("int8", [np.roll(want[0], 1, axis=1)], want).passed
    assert not checks.compare("fp16", [want[0][:2]], want).passed


def test_flops_counted_from_onnx_graph(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w_conv = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w_conv")
    w_fc = numpy_helper.from_array(np.zeros((8, 4), np.float32), "w_fc")
    w_gemm = numpy_helper.from_array(np.zeros((4, 2), np.float32), "w_gemm")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w_conv"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("GlobalAveragePool", ["c"], ["g"]),
         helper.make_node("Flatten", ["g"], ["f"]),
         helper.make_node("MatMul", ["f", "w_fc"], ["m"]),
         helper.make_node("Gemm", ["m", "w_gemm"], ["y"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", 2])],
        [w_conv, w_fc, w_gemm])
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    count = roofline.count_flops(str(path), 2)
    conv = 2 * (2 * 8 * 5 * 5) * (3 * 3 * 3)
    assert count.by_op["Conv"] == conv
    assert count.by_op["MatMul"] == 2 * 2 * 4 * 8
    assert count.by_op["Gemm"] == 2 * 2 * 2 * 4
    assert not count.unresolved


def test_triton_statistics_window():
    def stats(count, queue_ns, execs, batches):
        return {"m": {"name": "m", "execution_count": str(execs), "inference_count": str(count),
                      "inference_stats": {"success": {"count": str(count), "ns": str(count * 10**6)},
                                          "queue": {"count": str(count), "ns": str(queue_ns)},
                                          "compute_infer": {"count": str(count), "ns": str(count * 5 * 10**5)}},
                      "batch_stats": [{"batch_size": str(b), "compute_infer": {"count": str(n)}}
                                      for b, n in batches.items()]},
                "idle": {"name": "idle"}}

    w = triton_stats.window(stats(4, 10**6, 4, {1: 4}), stats(12, 9 * 10**6, 6, {1: 4, 4: 2}))
    assert set(w) == {"m"}
    assert w["m"]["requests"] == 8 and w["m"]["executions"] == 2 and w["m"]["mean_batch"] == 4
    assert w["m"]["queue_ms"] == pytest.approx(1.0) and w["m"]["compute_infer_ms"] == pytest.approx(0.5)
    assert w["m"]["batch_sizes"] == {"4": 2}


def test_perf_analyzer_input_data_and_parsing(tmp_path):
    png = b"\x89PNG\r\n\x1a\nfake"
    path = perf_analyzer.write_input_data(["A magpie."], [png], tmp_path / "data.json")
    step = json.loads(path.read_text())["data"][0]
    assert step["TEXT"] == ["A magpie."]
    import base64
    raw = base64.b64decode(step["IMAGE"]["b64"])
    assert int.from_bytes(raw[:4], "little") == len(png) and raw[4:] == png

    csv_file = tmp_path / "pa.csv"
    csv_file.write_text("Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,"
                        "Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,"
                        "p50 latency,p90 latency,p95 latency,p99 latency\n"
                        "4,34.0,6,5079,2,968,108723,1902,3,114800,181600,188825,216902\n")
    raw = perf_analyzer.parse_csv(csv_file)
    assert raw["throughput_infer_s"] == 34.0 and raw["p50_us"] == 114800
    stdout = "  Throughput: 12.5 infer/sec\n  p50 latency: 80000 usec\n  p99 latency: 90000 usec\n"
    assert perf_analyzer.parse_stdout(stdout) == {"throughput_infer_s": 12.5, "p50_us": 80000, "p99_us": 90000}
    pa = [{"concurrency": 4, "latency_ms": {"p50": 100.0}, "throughput_items_s": 40.0}]
    own = [{"concurrency": 4, "latency_ms": {"p50": 105.0, "p95": 1, "p99": 1}, "throughput_items_s": 38.0}]
    (row,) = perf_analyzer.compare(own, pa)
    assert row["throughput_ratio"] == pytest.approx(0.95) and row["p50_ratio"] == pytest.approx(1.05)


def test_missing_perf_analyzer_is_a_clear_skip(tmp_path, monkeypatch):
    monkeypatch.setenv("MMREC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(perf_analyzer.ENV_BINARY, raising=False)
    located = perf_analyzer.locate()
    assert located.tool is None
    assert "--setup" in located.reason and "libb64-0d" in located.reason


def test_targets_judged_from_results():
    """Offline records as the bench writes them (per-round p50s, ratios from add_ratios): the
    speed-up targets are judged on the paired interval; serving levels without paired rounds
    give no interval, so their target is not conclusive, never met or missed on a point."""
    from mmrec.benchmarks.offline import add_ratios

    drift = np.random.default_rng(3).lognormal(0.0, 0.2, 10)  # whole rounds slower or faster
    records = []
    for model in ("text_encoder", "image_encoder"):
        for batch in (1, 32):
            for engine, speed in (("pytorch", 1.0), ("ort-fp32", 2.0)):
                per_round = [10.0 * d / speed for d in drift]
                records.append({"model": model, "engine": engine, "batch": batch, "status": "ok",
                                "seq_len": 128 if model == "text_encoder" else None, "label": f"batch={batch}",
                                "latency_ms": {"p50": float(np.median(per_round))}, "p50_ms_per_round": per_round,
                                "throughput_items_s": 100.0 * speed})
    add_ratios(records)
    results = {"sections": {"offline": {"status": "ok", "records": records},
                            "serving": {"status": "ok",
                                        "reference": [{"concurrency": 1, "requests": 5, "latency_ms": {"p50": 10.0},
                                                       "throughput_items_s": 100.0}],
                                        "triton": {"grpc": [{"concurrency": 1, "requests": 5,
                                                             "latency_ms": {"p50": 15.0}, "throughput_items_s": 60.0}]}}}}
    by_id = {t["id"]: t for t in targets.evaluate(results)}
    ort = by_id["ort_fp32_vs_pytorch.text_encoder.b32"]
    assert ort["verdict"] == "met" and ort["met"] is True and ort["measured"] == "2.00× (worst case)"
    assert ort["interval"]["rounds"] == 10 and ort["interval"]["low"] > 1.5, ort["interval"]
    c1 = by_id["triton_vs_inprocess.p50.c1"]
    assert c1["verdict"] == "not conclusive" and c1["met"] is None and c1["interval"] is None
    assert "no interval" in c1["detail"] and c1["measured"] == "+5.00 ms"
    assert by_id["triton_vs_inprocess.throughput.c8"]["verdict"] == "not measured"
    assert by_id["triton_vs_inprocess.throughput.c8"]["met"] is None
    assert by_id["client_vs_perf_analyzer"]["verdict"] == "not measured"


def test_an_exception_while_judging_is_a_failure_not_unmeasured(monkeypatch):
    """A judge that raises (a bug, a malformed section) fails its target; the others are still judged."""
    def broken(results, tid, description):
        return {"p50": 1.0}["p95"]

    monkeypatch.setattr(targets, "TARGETS", [*targets.TARGETS, ("broken.judge", "a judge that raises", broken)])
    malformed = {"sections": {"offline": {"status": "ok", "records": [{"model": "text_encoder"}]}}}
    by_id = {t["id"]: t for t in targets.evaluate(malformed)}
    assert len(by_id) == len(targets.TARGETS)
    for tid in ("broken.judge", "ort_fp32_vs_pytorch.text_encoder.b1"):  # KeyError inside the judge
        assert by_id[tid]["verdict"] == "error" and by_id[tid]["met"] is False, by_id[tid]
        assert "KeyError" in by_id[tid]["error"], by_id[tid]
        assert by_id[tid]["detail"].startswith("could not judge: KeyError")
    assert by_id["triton_vs_inprocess.p50.c1"]["met"] is None and not by_id["triton_vs_inprocess.p50.c1"]["error"]
    assert {t["id"] for t in targets.errors({"targets": list(by_id.values())})} >= {"broken.judge"}
    assert "**error**" in "\n".join(report.targets_table({"targets": list(by_id.values())}))


def test_bench_exits_nonzero_when_a_target_cannot_be_judged(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import mmrec.benchmarks.suite as suite
    from mmrec.cli import app

    def broken(results, tid, description):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(targets, "TARGETS", [("broken.judge", "a judge that raises", broken)])
    monkeypatch.setattr(suite, "write_reports", lambda results, output: {**results,
                                                                         "targets": targets.evaluate(results)})
    (tmp_path / "bench.json").write_text(json.dumps({"sections": {}}))
    result = CliRunner().invoke(app, ["bench", "--rerender", "--output", str(tmp_path)])
    assert result.exit_code == 1, (result.output, result.exception)
    assert "error judging broken.judge" in result.output and "ZeroDivisionError" in result.output


def test_perf_analyzer_target_never_counts_a_missing_p50_as_met():
    row = {"concurrency": 1, "throughput_ratio": 1.0}
    results = {"sections": {"perf_analyzer": {"comparison": [row]}}}
    verdict = next(t for t in targets.evaluate(results) if t["id"] == "client_vs_perf_analyzer")
    assert verdict["verdict"] == "not measured" and verdict["met"] is None and not verdict["error"]
    assert "no p50" in verdict["detail"]
    row["p50_ratio"] = 1.2
    verdict = next(t for t in targets.evaluate(results) if t["id"] == "client_vs_perf_analyzer")
    assert verdict["verdict"] == "missed" and verdict["met"] is False and "point estimates" in verdict["detail"]
    row["p50_ratio"] = 1.05
    verdict = next(t for t in targets.evaluate(results) if t["id"] == "client_vs_perf_analyzer")
    assert verdict["verdict"] == "met" and verdict["met"] is True


def test_json_report_has_no_nan(tmp_path):
    path = report.write_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}}, tmp_path)
    data = json.loads(path.read_text())
    assert data == {"a": None, "b": [1.0, None], "c": {"d": 2}}
    assert not any(isinstance(v, float) and math.isnan(v) for v in data["b"] if v is not None)


# --------------------------------------------------------------------------- method (issue 11)


def test_full_offline_cases_get_100_samples_or_5_seconds_and_10():
    from mmrec.benchmarks.offline import _round_budget, sample_rule_met
    from mmrec.benchmarks.settings import FULL

    budget = FULL.offline
    assert budget.min_reps >= 100 and budget.max_s <= 5.0 and budget.measure_s <= budget.max_s
    per_round = _round_budget(budget, FULL.offline_rounds)
    assert per_round.min_reps * FULL.offline_rounds >= 100
    assert per_round.max_s * FULL.offline_rounds == pytest.approx(budget.max_s)
    # a fast case stops at the sample count (once the short minimum time has passed) ...
    fast = timing.time_calls(lambda: None, 1, Budget(warmup_s=0.0, measure_s=0.01, min_reps=100, max_s=5.0))
    assert fast.reps >= 100 and fast.wall_s < 5.0
    assert sample_rule_met(fast.reps, fast.wall_s, budget)
    # ... a slow one at the time cap, with fewer samples
    import time

    slow = timing.time_calls(lambda: time.sleep(0.02), 1, Budget(warmup_s=0.0, measure_s=0.01, min_reps=100,
                                                                  max_s=0.1, min_warmup_reps=0))
    assert 1 <= slow.reps < 100 and slow.wall_s >= 0.1
    assert timing.enough_samples(10, 5.0, budget) and not timing.enough_samples(99, 4.9, budget)
    assert not timing.enough_samples(3, 5.0, budget), "a slow case keeps going to 10 samples past the time cap"
    assert timing.enough_samples(100, 1.0, budget) and not timing.enough_samples(100, 0.5, budget)
    assert not sample_rule_met(99, 4.9, budget) and sample_rule_met(3, 5.0, budget)


def _drifting_rounds(rounds: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-round p50s (ms) of PyTorch, ORT FP32, ORT FP32 again (the A/A arm) and ORT INT8 on a
    machine whose speed drifts between rounds by far more than the 1.3× between the engines:
    every arm of a round shares that round's factor, each call adds a little noise of its own."""
    rng = np.random.default_rng(seed)
    drift = rng.lognormal(0.0, 0.4, rounds)

    def arm(ms: float) -> np.ndarray:
        return ms * drift * rng.lognormal(0.0, 0.02, rounds)

    return arm(13.0), arm(10.0), arm(10.0), arm(5.0)


def test_paired_rounds_separate_a_real_difference_from_drift_and_the_aa_arm_from_noise():
    """The bench's use of mmrec.stats: speed-ups are ratios paired by round, so drift shared by a
    round cancels (the same numbers compared unpaired could not tell 1.3× from 1); the A/A arm
    (ORT FP32 timed twice per round) must contain 1, and a shift between the two copies
    marks the section unstable."""
    from mmrec import stats
    from mmrec.benchmarks.offline import offline_aa

    torch_ms, ort_ms, again_ms, _ = _drifting_rounds()
    speedup = stats.paired_ratio(torch_ms, ort_ms)
    assert speedup.kind == "ratio" and speedup.rounds == 10 and speedup.conclusive
    assert 1.2 < speedup.low <= speedup.point <= speedup.high < 1.4, speedup
    assert speedup.point == pytest.approx(np.exp(np.mean(np.log(torch_ms / ort_ms))))  # geometric mean per round
    assert speedup.verdict(1.0, "above") == "met" and speedup.verdict(1.5, "above") == "missed"
    assert speedup.verdict(1.3, "above") == "not conclusive"
    # unpaired, the drift swamps the difference: the spread of one arm's rounds covers the ratio
    assert np.min(torch_ms) / np.max(ort_ms) < 1.0 < np.max(torch_ms) / np.min(ort_ms)
    assert stats.paired_ratio(torch_ms, ort_ms) == speedup  # fixed seed: same rounds, same interval
    diff = stats.paired_difference(torch_ms, ort_ms)
    assert diff.kind == "difference" and diff.low <= diff.point <= diff.high
    assert diff.point == pytest.approx(np.mean(torch_ms - ort_ms))
    d = speedup.to_dict()
    assert d["level"] == 0.95 and d["rounds"] == 10 and d["kind"] == "ratio" and d["method"] == stats.METHOD
    assert stats.Interval.from_dict(d).verdict(1.0, "above") == "met"
    # two rounds give no interval: never met or missed on them
    few = stats.paired_ratio(torch_ms[:2], ort_ms[:2])
    assert not few.conclusive and few.to_dict()["high"] is None and few.verdict(1.0, "above") == "not conclusive"
    with pytest.raises(ValueError):
        stats.paired_ratio(torch_ms, ort_ms[:5])  # rounds are paired: one value per round in each arm

    def record(p50s: np.ndarray, aa: np.ndarray) -> dict:
        return {"status": "ok", "p50_ms_per_round": list(p50s), "aa_p50_ms_per_round": list(aa)}

    aa = offline_aa([record(ort_ms, again_ms)])
    assert aa["stable"] is True and aa["cases"] == 1 and aa["interval"]["low"] <= 1.0 <= aa["interval"]["high"]
    shifted = offline_aa([record(ort_ms, again_ms * 1.2)])  # the second copy 20 % slower in every round
    assert shifted["stable"] is False and "excludes 1" in shifted["why"]
    assert offline_aa([{"status": "ok", "p50_ms_per_round": [1.0]}])["stable"] is None  # no A/A arm


def test_offline_speedups_are_paired_by_round_and_kept_on_rerender():
    """add_ratios pairs the per-round p50s of each engine with the reference's same rounds; a
    re-render (bench.json read back) recomputes the same intervals; an old unpaired `_ci95`
    field is dropped."""
    from mmrec import stats
    from mmrec.benchmarks.offline import add_ratios

    torch_ms, ort_ms, _, int8_ms = _drifting_rounds(seed=1)

    def record(engine, per_round):
        return {"model": "text_encoder", "engine": engine, "batch": 1, "seq_len": 16, "status": "ok",
                "throughput_items_s": 1e3 / np.mean(per_round), "latency_ms": {"p50": float(np.median(per_round))},
                "p50_ms_per_round": [float(x) for x in per_round], "speedup_vs_pytorch_p50_ci95": [1.0, 2.0]}

    records = [record("pytorch", torch_ms), record("ort-fp32", ort_ms), record("ort-int8", int8_ms)]
    add_ratios(records)
    torch, ort, int8 = records
    assert ort["speedup_vs_pytorch_p50_interval"] == stats.paired_ratio(torch_ms, ort_ms).to_dict()
    assert ort["speedup_vs_pytorch_p50"] == pytest.approx(np.exp(np.mean(np.log(torch_ms / ort_ms))))
    assert 1.2 < ort["speedup_vs_pytorch_p50_interval"]["low"] and ort["speedup_vs_pytorch_p50_interval"]["high"] < 1.4
    assert int8["speedup_vs_ort_fp32_p50_interval"] == stats.paired_ratio(ort_ms, int8_ms).to_dict()
    assert 1.8 < int8["speedup_vs_ort_fp32_p50"] < 2.2
    assert torch["speedup_vs_pytorch_p50_interval"] is None and torch["speedup_vs_pytorch_p50"] == 1.0
    assert ort["speedup_vs_ort_fp32_p50_interval"] is None  # the reference against itself
    assert not any(k.endswith("_ci95") for r in records for k in r)
    stored = json.loads(json.dumps(records))
    add_ratios(stored)  # a re-render: the per-round medians are in the records, the intervals come back
    assert stored == json.loads(json.dumps(records))
    # rounds that cannot be paired (a failed round, an older file): the point stays, no interval
    stored[1]["p50_ms_per_round"] = stored[1]["p50_ms_per_round"][:5]
    add_ratios(stored)
    assert stored[1]["speedup_vs_pytorch_p50_interval"] is None
    assert stored[1]["speedup_vs_pytorch_p50"] == pytest.approx(torch["latency_ms"]["p50"] / ort["latency_ms"]["p50"])


def test_p99_only_from_1000_samples():
    few = timing.percentiles(np.arange(999, dtype=float))
    assert few["p99"] is None and few["samples"] == 999 and few["p50"] == pytest.approx(499.0)
    many = timing.percentiles(np.arange(1000, dtype=float))
    assert many["p99"] == pytest.approx(np.percentile(np.arange(1000), 99)) and many["samples"] == 1000
    # older results (p99 from a few samples) are shown as "–" too, by their request count
    level = {"concurrency": 1, "requests": 50, "items": 50, "throughput_items_s": 10.0,
             "latency_ms": {"p50": 10.0, "p95": 12.0, "p99": 99.0}}
    results = {"sections": {"serving": {"triton": {"grpc": [level]}, "reference": [dict(level)]}}}
    table = "\n".join(report.serving_table(results))
    assert "10.0 / –, 10.0" in table and "99.0" not in table and "1,000 samples" in table
    level["requests"] = 5000
    assert "10.0 / 99.0, 10.0" in "\n".join(report.serving_table(results))


def test_pa_p99_needs_1000_requests_in_its_window():
    raw = {"throughput_infer_s": 100.0, "p50_us": 10_000, "p99_us": 30_000}
    assert perf_analyzer._as_result(raw, 1, 4, window_ms=2000)["latency_ms"]["p99"] is None
    assert perf_analyzer._as_result(raw, 1, 4, window_ms=20_000)["latency_ms"]["p99"] == 30.0
    own = [{"concurrency": 4, "latency_ms": {"p50": 10.0, "p99": None}, "throughput_items_s": 100.0}]
    (row,) = perf_analyzer.compare(own, [perf_analyzer._as_result(raw, 1, 4, window_ms=20_000)])
    assert "p99_ratio" not in row and row["p50_ratio"] == pytest.approx(1.0)


def _fake_repository(tmp_path):
    from mmrec.layout import RepositoryLayout

    repository = tmp_path / "repo"
    contract = RepositoryLayout(repository).contract_file
    contract.parent.mkdir(parents=True, exist_ok=True)
    contract.write_text("{}")
    return repository


def test_bench_refuses_a_busy_machine_unless_allowed(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import mmrec.benchmarks.machine as machine
    import mmrec.benchmarks.suite as suite
    from mmrec.benchmarks import cli
    from mmrec.cli import app

    monkeypatch.setattr(machine.os, "getloadavg", lambda: (9.0, 8.0, 7.0))
    monkeypatch.setattr(machine, "cpu_share", lambda seconds=0.5: 0.95)
    seen = {}

    def fake_run(options, step):
        seen["options"] = options
        step("a step", 1)(1)
        return {"sections": {}, "targets": [], "plots": {}, "files": {"json": "bench.json", "markdown": "summary.md"}}

    monkeypatch.setattr(suite, "run_bench", fake_run)
    repository = _fake_repository(tmp_path)
    args = ["bench", "--repository", str(repository), "--output", str(tmp_path / "out")]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == cli.EXIT_BUSY, (refused.output, refused.exception)
    assert "busy" in refused.output and "load average 9.0" in refused.output and "--allow-busy" in refused.output
    assert "options" not in seen  # nothing was measured
    for extra in (["--allow-busy"], ["--quick"]):
        result = CliRunner().invoke(app, args + extra)
        assert result.exit_code == 0, (result.output, result.exception)
        check = seen.pop("options").busy_check
        assert check["busy"] and check["allowed"] and "load average" in check["reasons"][0]
        assert "results marked contended" in result.output
        # not a terminal here: timestamped plain lines per step start and end
        assert "start: a step" in result.output and "done: a step" in result.output
    monkeypatch.setattr(machine.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    monkeypatch.setattr(machine, "cpu_share", lambda seconds=0.5: 0.5)  # the busy probe alone also refuses
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == cli.EXIT_BUSY and "busy probe" in refused.output
    monkeypatch.setattr(machine, "cpu_share", lambda seconds=0.5: 0.99)
    quiet = CliRunner().invoke(app, args)
    assert quiet.exit_code == 0 and not seen.pop("options").busy_check["busy"]


def _iv(point: float, low: float | None, high: float | None, kind: str = "ratio", rounds: int = 10) -> dict:
    """An mmrec.stats.Interval dict as the bench writes it."""
    from mmrec import stats

    return {"point": point, "low": low, "high": high, "level": 0.95, "rounds": rounds, "kind": kind,
            "method": stats.METHOD}


def _aa(stable: bool | None, point: float = 1.0, low: float = 0.97, high: float = 1.03) -> dict:
    why = ("A/A interval contains no-difference" if stable else
           f"A/A interval [{low:.3f}, {high:.3f}] excludes 1: the same code measured against itself differs")
    return {"stable": stable, "interval": _iv(point, low, high), "why": why}


def _synthetic_results(contended: bool = False) -> dict:
    """A full run in the bench's schema: per-round values, paired intervals, an A/A arm per section."""
    rounds = 10

    def level(c, p50, thr, requests=200):
        return {"concurrency": c, "requests": requests, "latency_ms": {"p50": p50, "p95": p50, "p99": None},
                "throughput_items_s": thr, "rounds": rounds, "p50_ms_per_round": [p50] * rounds,
                "throughput_items_s_per_round": [thr] * rounds}

    def compared(diff, thr, pooled):
        return {"p50_diff_ms": _iv(*diff, kind="difference"), "throughput_ratio": _iv(*thr),
                "pooled_throughput_ratio": pooled}

    offline = [{"model": m, "engine": e, "batch": b, "seq_len": s, "status": "ok", "label": f"batch={b}",
                "latency_ms": {"p50": 10.0 / speed, "p95": 1.0, "p99": None}, "reps": 120, "measured_s": 1.0,
                "rounds": rounds, "p50_ms_per_round": [10.0 / speed] * rounds,
                "throughput_items_s": 100.0 * speed, "speedup_vs_pytorch": speed, "speedup_vs_pytorch_p50": speed,
                "speedup_vs_pytorch_p50_interval": _iv(speed, speed - 0.1, speed + 0.1) if e != "pytorch" else None,
                "check": {"rule": "reference"}, "memory": {"peak_rss_mb": 100.0}, "sample_rule_met": True}
               for m, s in (("text_encoder", 128), ("image_encoder", None)) for b in (1, 32)
               for e, speed in (("pytorch", 1.0), ("ort-fp32", 2.0))]
    return {
        "settings": {"mode": "full"}, "command": "mmrec bench", "repository": "/r", "duration_s": 1.0,
        "started_at": "2026-01-01T00:00:00+00:00", "contended": contended,
        "busy_check": {"busy": contended, "allowed": contended, "reasons": ["1-min load average 9.0 > 2 usable cores + 0.5"]
                       if contended else []},
        "git": {"commit": "0123456789abcdef", "dirty": False},
        "machine": {"cpu": {"model": "Test CPU", "usable_cores": 2, "memory_gib": 8,
                            "flags": {"avx512_vnni": True, "amx_tile": True, "avx2": True}},
                    "loadavg_start": [0.2, 0.2, 0.2], "loadavg_end": [0.3, 0.2, 0.2],
                    "cpu_share_start": 0.99, "cpu_share_end": 0.98},
        "provenance": {"git": {"commit": "0123456789abcdef", "dirty": False},
                       "machine": {"cpu": {"model": "Test CPU", "usable_cores": 2}},
                       "loadavg": {"before": [0.2, 0.2, 0.2], "after": [0.3, 0.2, 0.2]},
                       "cpu_share": {"before": 0.99, "after": 0.98}, "started": "2026-01-01T00:00:00+00:00",
                       "finished": "2026-01-01T00:40:00+00:00"},
        "sections": {
            "offline": {"status": "ok", "records": offline, "threads": {"threads": 2}, "rounds": rounds,
                        "budget": {"min_reps": 100, "measure_s": 1.0, "max_s": 5.0},
                        "aa": {**_aa(True), "arm": "ort-fp32 twice per round", "cases": 4}},
            "serving": {"status": "ok", "rounds": rounds,
                        "reference": [level(1, 20.0, 50.0), level(8, 80.0, 100.0), level(32, 300.0, 105.0)],
                        "reference_batched": [level(8, 60.0, 130.0), level(32, 250.0, 128.0)],
                        "triton": {"grpc": [level(1, 20.5, 48.0), level(8, 70.0, 115.0), level(32, 270.0, 118.0)]},
                        "triton_aa": [level(1, 20.4, 48.5), level(8, 70.5, 114.0), level(32, 268.0, 119.0)],
                        "intervals": {"grpc": [
                            {"concurrency": 1, **compared((0.5, -0.2, 1.4), (0.96, 0.9, 1.02), 0.96)},
                            {"concurrency": 8, **compared((-10.0, -12.0, -8.0), (1.15, 1.12, 1.17), 1.15),
                             "vs_batched": compared((10.0, 8.0, 12.0), (0.88, 0.8, 0.95), 0.88)},
                            {"concurrency": 32, **compared((-30.0, -40.0, -20.0), (1.12, 1.05, 1.2), 1.12),
                             "vs_batched": compared((20.0, 10.0, 30.0), (0.92, 0.85, 0.99), 0.92)}]},
                        "aa": {**_aa(True, 1.01, 0.98, 1.04), "statistic": "p50 ratio Triton gRPC / Triton gRPC (A/A)",
                               "levels": []}},
            "photos": {"status": "ok", "caption": "c", "photo": "palace", "rounds": 10, "per_round": 12,
                       "samples_per_arm": {"triton/jpeg_640x427": 120, "triton/jpeg_12mp_exif6": 120,
                                           "triton/jpeg_640x427 (A/A)": 120,
                                           "in_process/jpeg_640x427": 120, "in_process/jpeg_12mp_exif6": 120},
                       "p50_ms": {"triton/jpeg_640x427": 20.0, "triton/jpeg_12mp_exif6": 36.0,
                                  "in_process/jpeg_640x427": 18.0, "in_process/jpeg_12mp_exif6": 34.0},
                       "p50_ms_per_round": {"triton/jpeg_640x427": [20.0] * 10, "triton/jpeg_12mp_exif6": [36.0] * 10},
                       "ratios": {"triton_12mp_over_640": {"p50_ratio": 1.8, "interval": _iv(1.8, 1.7, 1.9)}},
                       "aa": {**_aa(True), "arm": "triton/jpeg_640x427 twice per round"},
                       "cosine": {"item_embedding_served": {"palace": 0.999}, "image_embedding_in_process_decoder":
                                  {"palace": 0.998}, "min": 0.998, "photos": 1, "what": "min"}},
            "roofline": {"status": "ok", "peak": {"peak_gflops": 400.0, "peak_library": "torch", "peak_size": 2048,
                                                  "threads": 2, "gflops": {}},
                         "encoders": [{"model": m, "engine": "ort-fp32", "batch": 32, "seq_len": s, "gflop": 10.0,
                                       "achieved_gflops": f * 400, "fraction_of_peak": f}
                                      for m, s, f in (("text_encoder", 128, 0.55), ("image_encoder", None, 0.45))],
                         "paired": [{"model": m, "engine": "ort-fp32", "batch": 32, "seq_len": s, "gflop": 10.0,
                                     "rounds": [{"fraction_of_peak": x, "achieved_gflops": 400 * x, "peak_gflops": 400.0}
                                                for x in (f - 0.02, f, f + 0.02)],
                                     "fraction_of_peak_median": f, "fraction_of_peak_best": f + 0.02}
                                    for m, s, f in (("text_encoder", 128, 0.6), ("image_encoder", None, 0.45))],
                         "padding": {"captions": 64, "buckets": [16, 32], "headline_batches": [1, 8, 32],
                                     "by_batch": {str(b): {"batches": 64 // b, "real_tokens_per_batch": 7.0 * b,
                                                           "padded_tokens_per_batch": 16.0 * b,
                                                           "grouped_tokens_per_batch": 14.0 * b,
                                                           "padded_efficiency": 7 / 16, "grouped_efficiency": 0.5}
                                                  for b in range(1, 33)}}},
            "capacity": {"status": "ok", "slo_ms": 100.0, "percentile": 99, "model": "item_encoder",
                         "items_per_request": 1, "loadgen_version": "5.0",
                         "sets": {"jpeg_640x427": _capacity_set([31.0, 34.5, 33.0])}},
        },
    }


def _capacity_set(trials: list[float]) -> dict:
    from mmrec.benchmarks.open_loop import median_interval

    return {"capacity_qps": trials, "median_qps": float(np.median(trials)), "interval": median_interval(trials),
            "slo_ms": 100.0, "payloads": {"items": 12, "distinct_images": 12}, "search": {"idle_latency_ms": 8.0},
            "samples_at_capacity": 300, "points": [], "plot": "capacity_jpeg_640x427.png"}


def test_targets_are_the_issue_goals_judged_with_their_intervals():
    by_id = {t["id"]: t for t in targets.evaluate(_synthetic_results())}
    c1 = by_id["triton_vs_inprocess.p50.c1"]
    assert c1["threshold"] == "≤ +1.0 ms" and c1["measured"] == "+0.50 ms"
    # +0.5 ms, but the interval reaches past +1 ms: neither met nor missed
    assert c1["verdict"] == "not conclusive" and c1["met"] is None and "straddles 1 ms" in c1["detail"]
    assert (c1["interval"]["low"], c1["interval"]["high"], c1["interval"]["kind"]) == (-0.2, 1.4, "difference")
    c8 = by_id["triton_vs_inprocess.throughput.c8"]
    assert c8["threshold"] == "≥ 1.10×" and c8["verdict"] == "met" and c8["met"] is True
    assert "lies wholly above 1.1×: met" in c8["detail"] and "over 10 paired rounds" in c8["detail"]
    sat = by_id["triton_vs_batched.throughput.saturation"]
    assert sat["verdict"] == "not conclusive" and "c=32" in sat["measured"] and "straddles 0.9×" in sat["detail"]
    photos = by_id["photos.12mp_vs_640.triton"]
    assert photos["verdict"] == "met" and "lies wholly below 2×" in photos["detail"] and "0.9980" in photos["measured"]
    text, image = by_id["roofline.text_encoder.b32"], by_id["roofline.image_encoder.b32"]
    assert text["threshold"] == "≥ 50%" and text["verdict"] == "met" and image["verdict"] == "missed"
    assert "s=128" in text["detail"] and image["met"] is False
    ort = by_id["ort_fp32_vs_pytorch.text_encoder.b32"]
    assert ort["verdict"] == "met" and (ort["interval"]["low"], ort["interval"]["high"]) == (1.9, 2.1)
    assert "lies wholly above 1.5×" in ort["detail"]
    assert by_id["ort_int8_vs_fp32.text_encoder.b32s128"]["verdict"] == "not measured"
    for t in by_id.values():
        assert t["verdict"] in VERDICTS and "beyond doubt" not in t["detail"], t
        assert t["met"] is {"met": True, "missed": False}.get(t["verdict"]), t

    # a missed cosine fails the photo target whatever the latency
    results = _synthetic_results()
    results["sections"]["photos"]["cosine"]["min"] = 0.98
    assert next(t for t in targets.evaluate(results) if t["id"] == "photos.12mp_vs_640.triton")["verdict"] == "missed"
    # a Triton that trails in-process at c=8 misses: the interval lies wholly below the threshold
    serving = results["sections"]["serving"]
    serving["triton"]["grpc"][1]["throughput_items_s"] = 90.0
    serving["intervals"]["grpc"][1]["throughput_ratio"] = _iv(0.9, 0.85, 0.95)
    c8 = next(t for t in targets.evaluate(results) if t["id"] == "triton_vs_inprocess.throughput.c8")
    assert c8["verdict"] == "missed" and c8["met"] is False and "lies wholly below 1.1×: missed" in c8["detail"]
    assert "beyond doubt" not in c8["detail"]
    # too few rounds for an interval: not conclusive, whatever the point says
    serving["intervals"]["grpc"][1]["throughput_ratio"] = _iv(1.5, None, None, rounds=2)
    c8 = next(t for t in targets.evaluate(results) if t["id"] == "triton_vs_inprocess.throughput.c8")
    assert c8["verdict"] == "not conclusive" and "too few" in c8["detail"]
    # a roofline whose paired rounds fall on both sides of 50 % is not conclusive
    results["sections"]["roofline"]["paired"][0]["rounds"][0]["fraction_of_peak"] = 0.45
    text = next(t for t in targets.evaluate(results) if t["id"] == "roofline.text_encoder.b32")
    assert text["verdict"] == "not conclusive" and "straddles the threshold" in text["detail"]


def test_a_section_whose_aa_arm_shows_a_difference_is_not_judged():
    """The serving A/A arm (Triton against itself) excludes 1: every serving target is "not
    judged (A/A unstable)", met None, with the verdict it would have had in the detail; the
    other sections' targets are judged as before; the report says which section and why."""
    results = _synthetic_results()
    results["sections"]["serving"]["aa"] = {**_aa(False, 1.12, 1.06, 1.18), "statistic": "p50 ratio", "levels": []}
    results["targets"] = targets.evaluate(results)
    by_id = {t["id"]: t for t in results["targets"]}
    for tid in ("triton_vs_inprocess.p50.c1", "triton_vs_inprocess.throughput.c8",
                "triton_vs_batched.throughput.saturation"):
        t = by_id[tid]
        assert t["verdict"] == "not judged (A/A unstable)" and t["met"] is None, t
        assert t["detail"].startswith("serving A/A unstable") and "excludes 1" in t["detail"], t
        assert t["interval"] is not None  # the interval stays on record
    assert "would be met" in by_id["triton_vs_inprocess.throughput.c8"]["detail"]
    assert by_id["ort_fp32_vs_pytorch.text_encoder.b32"]["verdict"] == "met"
    assert by_id["photos.12mp_vs_640.triton"]["verdict"] == "met"
    text = report.markdown(results)
    assert "| not judged (A/A unstable) |" in text and "**unstable**: targets not judged" in text
    assert "beyond doubt" not in text
    # an A/A arm without a verdict (too few rounds) does not block judging
    results["sections"]["serving"]["aa"]["stable"] = None
    assert next(t for t in targets.evaluate(results)
                if t["id"] == "triton_vs_inprocess.throughput.c8")["verdict"] == "met"


def test_reproducibility_compares_two_runs_interval_by_interval():
    """Two bench.json files, figure by figure: overlapping intervals, disjoint ones (not
    conclusive), a figure without an interval in one run (no verdict), figures only one run has."""
    import copy

    from mmrec.benchmarks import reproducibility

    first = _synthetic_results()
    second = copy.deepcopy(first)
    second["git"] = {"commit": "fedcba9876543210", "dirty": True}
    serving = second["sections"]["serving"]["intervals"]["grpc"]
    serving[1]["throughput_ratio"] = _iv(1.25, 1.2, 1.3)  # first run: [1.12, 1.17]
    del serving[0]  # c=1 only in the first run
    second["sections"]["photos"]["ratios"]["triton_12mp_over_640"]["interval"] = _iv(1.85, 1.75, 1.95)
    ort_b1 = next(r for r in second["sections"]["offline"]["records"]
                  if (r["model"], r["engine"], r["batch"]) == ("text_encoder", "ort-fp32", 1))
    ort_b1["speedup_vs_pytorch_p50_interval"] = _iv(2.0, None, None, rounds=2)  # too few rounds
    second["sections"]["capacity"]["sets"]["jpeg_640x427"] = _capacity_set([33.0, 36.0, 35.0])
    for results in (first, second):
        results["targets"] = targets.evaluate(results)

    comparison = reproducibility.compare(first, second)
    rows = {r["figure"]: r for r in comparison["figures"]}
    c8 = rows["serving grpc c=8 Triton vs in-process throughput_ratio"]
    assert c8["overlap"] is False and c8["status"] == "not conclusive: the runs' intervals do not overlap"
    assert (c8["first"], c8["second"]) == ("1.15 [1.12, 1.17]×", "1.25 [1.20, 1.30]×")
    assert rows["target: triton_vs_inprocess.throughput.c8"]["overlap"] is False
    assert rows["photos triton_12mp_over_640"]["overlap"] is True
    assert rows["serving grpc c=32 Triton vs in-process p50_diff_ms"]["overlap"] is True
    b1 = rows["offline text_encoder ort-fp32 batch=1 p50 vs PyTorch"]
    assert b1["overlap"] is None and b1["second"] == "2.00 [no interval]×" and "no interval" in b1["status"]
    capacity = rows["capacity jpeg_640x427 (items/s at p99 ≤ 100 ms)"]
    assert capacity["overlap"] is True and capacity["second"] == "35.00 [33.00, 36.00] items/s"
    assert rows["A/A offline"]["overlap"] is True
    assert "serving grpc c=1 Triton vs in-process p50_diff_ms" in comparison["only_in_one_run"]
    assert not any("c=1" in name for name in rows)
    judged = [r for r in comparison["figures"] if r["overlap"] is not None]
    assert comparison["judged"] == len(judged) and comparison["overlapping"] == sum(r["overlap"] for r in judged)
    assert 0 < comparison["overlapping"] < comparison["judged"]
    assert [r["commit"] for r in comparison["runs"]] == ["0123456789abcdef", "fedcba9876543210"]

    text = reproducibility.markdown(comparison)
    assert "run 1 commit `0123456789ab` (clean tree)" in text and "run 2 commit `fedcba987654` (uncommitted changes)" in text
    assert f"**{comparison['overlapping']} of {comparison['judged']}** figures" in text
    assert ("| serving grpc c=8 Triton vs in-process throughput_ratio | 1.15 [1.12, 1.17]× | 1.25 [1.20, 1.30]× | "
            "not conclusive: the runs' intervals do not overlap |") in text
    assert "| photos triton_12mp_over_640 | 1.80 [1.70, 1.90]× | 1.85 [1.75, 1.95]× | yes |" in text


def test_chart_items_target_is_rendered_from_the_open_loop_capacity(tmp_path):
    """values-cpu.yaml's items/s target is u × the low end of the capacity interval over trials;
    rendered into a copy of the chart values it stays valid YAML, and a second render changes nothing."""
    import shutil

    import yaml

    from mmrec.benchmarks import doc_blocks
    from mmrec.benchmarks.machine import REPO_ROOT

    results = _synthetic_results()  # capacity trials 31.0, 34.5, 33.0: median 33.0, low end 31.0
    expected = round(doc_blocks.headroom() * 31.0)
    assert expected != round(doc_blocks.headroom() * 33.0)  # the low end, not the median
    assert f'averageValue: "{expected}"' in doc_blocks.chart_items_target(results)
    (tmp_path / doc_blocks.BENCH_JSON).parent.mkdir(parents=True)
    (tmp_path / doc_blocks.BENCH_JSON).write_text(json.dumps(results))
    values = tmp_path / doc_blocks.CHART_VALUES
    values.parent.mkdir(parents=True)
    shutil.copy(REPO_ROOT / doc_blocks.CHART_VALUES, values)
    doc_blocks.rewrite(values, tmp_path)
    assert doc_blocks.rewrite(values, tmp_path) == [] and doc_blocks.stale_blocks(values, tmp_path) == []
    assert "    # /doc-block:chart-items-target\n" in values.read_text()  # the end marker keeps its indentation
    metrics = yaml.safe_load(values.read_text())["autoscaling"]["podsMetrics"]
    items = next(m for m in metrics if m["name"] == "triton_items_per_second")
    assert items["averageValue"] == str(expected) and "item_encoder" in items["models"]["default"]
    assert [m["name"] for m in metrics] == ["triton_queue_compute_ratio", "triton_items_per_second",
                                            "triton_shed_per_second"]
    # no capacity section: the chart's target cannot be rendered (never a stale number)
    del results["sections"]["capacity"]
    with pytest.raises(ValueError, match="capacity"):
        doc_blocks.chart_items_target(results)


def test_contended_runs_say_so_in_bold_at_the_top():
    quiet = report.markdown({**_synthetic_results(), "targets": targets.evaluate(_synthetic_results())})
    assert "Contended run" not in quiet
    results = _synthetic_results(contended=True)
    results["targets"] = targets.evaluate(results)
    lines = report.markdown(results).splitlines()
    assert lines[0].startswith("# mmrec benchmark") and lines[2].startswith("**Contended run")
    assert "load average 9.0" in lines[2] and "--allow-busy" in lines[2]


def test_summary_reports_padding_waste_photos_and_intervals():
    results = _synthetic_results()
    results["sections"]["serving"]["triton"]["grpc"][1]["server"] = {
        "text_encoder": {"requests": 31, "mean_batch": 4.4, "queue_ms": 0.1, "compute_infer_ms": 5.0,
                         "compute_input_ms": 0.1, "compute_output_ms": 0.1, "batch_sizes": {"3": 5, "8": 2}}}
    results["targets"] = targets.evaluate(results)
    text = report.markdown(results)
    assert "## Padding waste (text encoder)" in text and "| 3 (served) |" in text and "| 32 |" in text
    assert "44%" in text and "50%" in text  # real / computed, padded vs grouped
    assert "## Real photos" in text and "1.80× [1.70, 1.90]" in text
    # the serving comparison: per-round p50 difference and throughput ratio with their intervals
    assert "| grpc | 8 | -10.00 ms [-12.00, -8.00] | 1.15× [1.12, 1.17] | 1.15× | 0.88× [0.80, 0.95] | 0.88× |" in text
    assert "mean_latency" not in text and "beyond doubt" not in text
    # every section's A/A arm, and the targets by verdict
    assert "| offline | ort-fp32 twice per round | 1.000× [0.970, 1.030] | stable |" in text
    assert "| serving |" in text and "| photos |" in text
    assert "| +0.50 ms | not conclusive |" in text and "| 1.15× | **met** |" in text and "| 45.0% | **missed** |" in text
    # the open-loop capacity, with its interval over trials
    assert "## Capacity at the p99 bound (open loop)" in text
    assert "**33.0 items/s** [31.0, 34.5] over 3 trials (75 % order-statistic interval)" in text
    assert "capacity_jpeg_640x427.png" in text


def test_readme_block_is_rewritten_from_bench_json(tmp_path):
    results = _synthetic_results()
    results["targets"] = targets.evaluate(results)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n\n{report.README_START}\nold numbers\n{report.README_END}\n\nafter\n")
    assert report.update_readme(readme, results, "benchmarks/results/bench.json")
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n\n<!-- bench:start -->\n") and text.endswith("<!-- bench:end -->\n\nafter\n")
    block = text.split(report.README_START)[1].split(report.README_END)[0]
    assert "old numbers" not in block and "benchmarks/results/bench.json" in block
    for expected in ("Test CPU", "avx512_vnni", "amx_tile", "`0123456789ab` (clean tree)", "[0.2, 0.2, 0.2]",
                     "**+0.50 ms** [-0.20, 1.40] ms", "**1.15× [1.12, 1.17]**", "concurrency 32",
                     "**0.92× [0.85, 0.99]**", "1.80× [1.70, 1.90]", "text_encoder b=32 s=128 60%",
                     "image_encoder b=32 45%", "**33.0 items/s** [31.0, 34.5]",
                     "| target | threshold | measured | status |", "| ≤ +1.0 ms | +0.50 ms | not conclusive |",
                     "| ≥ 1.10× | 1.15× | **met** |"):
        assert expected in block, expected
    assert "beyond doubt" not in block
    assert "Contended" not in block
    assert not report.update_readme(readme, results, "benchmarks/results/bench.json")  # idempotent
    readme.write_text("no markers\n")
    with pytest.raises(ValueError):
        report.update_readme(readme, results)


def test_bench_readme_option_rewrites_the_block(tmp_path):
    from typer.testing import CliRunner

    from mmrec.cli import app

    results = _synthetic_results(contended=True)
    results["targets"] = targets.evaluate(results)
    report.write_json(results, tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{report.README_START}\n{report.README_END}\ny\n")
    result = CliRunner().invoke(app, ["bench", "--readme", str(readme), "--output", str(tmp_path)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "**Contended run" in readme.read_text() and readme.read_text().endswith(f"{report.README_END}\ny\n")


def test_padding_waste_counts_real_and_computed_tokens():
    from types import SimpleNamespace

    buckets = (4, 8)

    def tokenizer(texts):  # one token per word, padded to the bucket of the longest
        lengths = [len(t.split()) for t in texts]
        width = next(b for b in buckets if b >= max(lengths))
        return None, (np.arange(width)[None, :] < np.array(lengths)[:, None]).astype(np.int64)

    tokenizer.buckets = buckets
    captions = ["a b", "a b c d e f g h", "a", "a b c"]
    workload = SimpleNamespace(items=[SimpleNamespace(caption=c) for c in captions], tokenizer=tokenizer)
    padding = roofline.padding_waste(workload, max_batch=4)
    one, four = padding["by_batch"]["1"], padding["by_batch"]["4"]
    assert one["batches"] == 4 and one["padded_efficiency"] == pytest.approx(14 / 20)
    assert four["batches"] == 1 and four["real_tokens_per_batch"] == 14 and four["padded_tokens_per_batch"] == 32
    assert four["grouped_tokens_per_batch"] == 3 * 4 + 8  # three rows at width 4, one at 8
    assert four["grouped_efficiency"] == pytest.approx(14 / 20)


def test_perf_analyzer_levels_average_runs_without_inventing_a_p99(tmp_path):
    session = perf_analyzer.Session.__new__(perf_analyzer.Session)
    raw = {"throughput_infer_s": 100.0, "p50_us": 10_000, "p99_us": 30_000}
    run = perf_analyzer._as_result(raw, 1, 4, window_ms=2000)
    run.update(stable=True, stability_pct=15)
    session.runs = [run, dict(run, latency_ms=dict(run["latency_ms"], p50=12.0))]
    (level,) = session.levels
    assert level["latency_ms"]["p50"] == pytest.approx(11.0) and level["latency_ms"]["p99"] is None
    assert level["latency_ms"]["samples"] == 400


def test_own_server_load_does_not_mark_a_quiet_run_contended():
    """The load average counts this run's own tritonserver and client workers: a serving section
    ending at load 4 on 2 cores is not other work; an in-process section at that load is, and so
    is a busy probe below 80 % at the end."""
    from mmrec.benchmarks.suite import _contended

    results = _synthetic_results()
    results["machine"].update({"cpu_share_start": 0.99, "cpu_share_end": 0.99, "loadavg_start": [1.2, 1.5, 1.9],
                               "loadavg_end": [4.3, 3.0, 2.3]})
    quiet = {"start": [1.3, 1.7, 2.0], "end": [1.7, 1.7, 1.9]}
    results["sections"] = {"offline": {"loadavg": quiet}, "serving": {"loadavg": {"start": [1.8, 1.7, 1.9],
                                                                                   "end": [4.3, 3.0, 2.3]}}}
    assert not _contended(results)
    results["sections"]["offline"]["loadavg"]["end"] = [4.3, 3.0, 2.3]
    assert _contended(results)
    results["sections"]["offline"]["loadavg"] = quiet
    results["machine"]["cpu_share_end"] = 0.6
    assert _contended(results)
