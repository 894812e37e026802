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
                "sections", "targets", "plots", "repository"):
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
    for name in ("offline", "roofline", "quality", "serving"):
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

    pa = results["sections"]["perf_analyzer"]
    if pa["status"] == "ok":
        assert pa["levels"] and all("error" not in lv for lv in pa["levels"]), pa["levels"]
        assert pa["comparison"]
    else:
        assert "perf_analyzer" in pa["reason"]

    ids = {t["id"] for t in results["targets"]}
    assert len(ids) == len(targets.TARGETS)
    assert all(t["met"] in (True, False, None) for t in results["targets"])
    assert not targets.errors(results), [(t["id"], t["error"]) for t in targets.errors(results)]
    # what --quick measures is judged (met or missed), not reported as unmeasured
    judged = {t["id"]: t["met"] for t in results["targets"]}
    for tid in ("ort_fp32_vs_pytorch.text_encoder.b1", "ort_fp32_vs_pytorch.image_encoder.b1",
                "triton_vs_inprocess.p50.c1"):
        assert judged[tid] is not None, (tid, next(t for t in results["targets"] if t["id"] == tid))


@pytest.mark.server
@pytest.mark.timeout(600)
def test_quick_bench_markdown_and_plots(quick_run):
    from PIL import Image

    _, output = quick_run
    text = (output / "summary.md").read_text()
    assert text.startswith("# mmrec benchmark (quick)")
    for heading in ("## Headline", "## Serving", "## Targets", "## Offline backend comparison", "## Quality drift"):
        assert heading in text, heading
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
    assert [t["id"] for t in after["targets"]] == [t["id"] for t in before["targets"]]


# --------------------------------------------------------------------------- units


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
    records = []
    for model in ("text_encoder", "image_encoder"):
        for batch in (1, 32):
            for engine, speed in (("pytorch", 1.0), ("ort-fp32", 2.0)):
                records.append({"model": model, "engine": engine, "batch": batch, "seq_len": 128 if model == "text_encoder" else None,
                                "status": "ok", "label": f"batch={batch}", "speedup_vs_pytorch": speed,
                                "speedup_vs_pytorch_p50": speed, "throughput_items_s": speed})
    results = {"sections": {"offline": {"status": "ok", "records": records},
                            "serving": {"status": "ok",
                                        "reference": [{"concurrency": 1, "requests": 5, "latency_ms": {"p50": 10.0},
                                                       "throughput_items_s": 100.0}],
                                        "triton": {"grpc": [{"concurrency": 1, "requests": 5,
                                                             "latency_ms": {"p50": 15.0}, "throughput_items_s": 60.0}]}}}}
    by_id = {t["id"]: t for t in targets.evaluate(results)}
    assert by_id["ort_fp32_vs_pytorch.text_encoder.b32"]["met"] is True
    assert by_id["triton_vs_inprocess.p50.c1"]["met"] is False
    assert by_id["triton_vs_inprocess.throughput.c8"]["met"] is None
    assert by_id["client_vs_perf_analyzer"]["met"] is None


def test_an_exception_while_judging_is_a_failure_not_unmeasured(monkeypatch):
    """A judge that raises (a bug, a malformed section) fails its target; the others are still judged."""
    def broken(results, tid, description):
        return {"p50": 1.0}["p95"]

    monkeypatch.setattr(targets, "TARGETS", [*targets.TARGETS, ("broken.judge", "a judge that raises", broken)])
    malformed = {"sections": {"offline": {"status": "ok", "records": [{"model": "text_encoder"}]}}}
    by_id = {t["id"]: t for t in targets.evaluate(malformed)}
    assert len(by_id) == len(targets.TARGETS)
    for tid in ("broken.judge", "ort_fp32_vs_pytorch.text_encoder.b1"):  # KeyError inside the judge
        assert by_id[tid]["met"] is False and "KeyError" in by_id[tid]["error"], by_id[tid]
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
    assert verdict["met"] is None and "no p50" in verdict["detail"] and not verdict["error"]
    row["p50_ratio"] = 1.2
    verdict = next(t for t in targets.evaluate(results) if t["id"] == "client_vs_perf_analyzer")
    assert verdict["met"] is False


def test_json_report_has_no_nan(tmp_path):
    path = report.write_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}}, tmp_path)
    data = json.loads(path.read_text())
    assert data == {"a": None, "b": [1.0, None], "c": {"d": 2}}
    assert not any(isinstance(v, float) and math.isnan(v) for v in data["b"] if v is not None)
