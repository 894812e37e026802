"""Admission (issue 24): Triton's queue policy sheds overload at once, the client tells a shed from
a dead server and keeps its retries within a budget.

Server tests run the real tritonserver on a shadow of the session export (symlinked files, the
configs rewritten with a tiny queue) so a storm of concurrent requests overflows it for sure.
"""
from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from mmrec import schema
from mmrec.admission import (ADMITTED_INSTANCES, SHED_MESSAGES, AdmissionError, QueuePolicy, derive, entry_models,
                             policy_of)
from mmrec.client import MMRecClient, OverloadedError, RetryBudget
from mmrec.client._endpoints import Attempts, EndpointPool
from mmrec.client._errors import Failure, classify
from mmrec.client._requests import CallOptions
from mmrec.client._retry import RetryPolicy
from mmrec.export.admission import apply_to_repository, clear_repository
from mmrec.export.repository import parse
from mmrec.layout import CONFIG_FILE, RepositoryLayout


def shed(message: str = SHED_MESSAGES[0]) -> InferenceServerException:
    return InferenceServerException(message, status="StatusCode.UNAVAILABLE")


# ------------------------------------------------------------------------------ the policy


def test_policy_is_littles_law_over_the_wait_budget():
    policy = derive(capacity_rps=80.0, slo_ms=100.0, service_ms=20.0)
    assert policy.timeout_us == 80_000  # SLO - service
    assert policy.max_queue_size == 3  # floor(80/s x 0.08 s / 2): the batch in service, then its own
    assert policy.instances == ADMITTED_INSTANCES == 2  # one instance stalls on Triton's missed wake-up
    assert derive(1.0, 100.0, 20.0).max_queue_size == 1  # never unbounded (0 means that to Triton)
    with pytest.raises(AdmissionError, match="leaves no time to queue"):
        derive(80.0, 20.0, 25.0)
    with pytest.raises(AdmissionError):
        derive(0.0, 100.0, 20.0)


def test_policy_goes_on_entry_models_only_and_round_trips(exported_repository, tmp_path):
    from mmrec.benchmarks.overload import shadow_repository

    shadow = shadow_repository(exported_repository, tmp_path / "repo")
    configs = {p.parent.name: parse(p.read_text()) for p in shadow.glob(f"*/{CONFIG_FILE}")}
    entries = entry_models(configs)
    assert schema.ITEM_ENCODER in entries  # the merged python model a request meets first
    for name, config in configs.items():
        if config.platform == "ensemble":
            assert name not in entries  # no queue of its own
            first = config.ensemble_scheduling.step[0].model_name
            assert first in entries, (name, first)
    assert schema.FUSION not in entries  # only ever fed by what an entry admitted
    assert schema.SCORER in entries  # an inner step, but the client also calls it on embeddings

    policy = QueuePolicy(max_queue_size=3, timeout_us=50_000)
    models = apply_to_repository(shadow, policy, {"slo_ms": 100.0, "derived_by": "given"})
    assert models == entries
    layout = RepositoryLayout(shadow)
    for name in models:
        assert policy_of(parse(layout.config_file(name).read_text())) == policy  # two instances included
    assert policy_of(parse(layout.config_file(schema.FUSION).read_text())) is None
    assert [g.count for g in parse(layout.config_file(schema.FUSION).read_text()).instance_group] == \
        [g.count for g in configs[schema.FUSION].instance_group]  # inner members keep theirs
    manifest = json.loads(layout.manifest_file.read_text())
    assert manifest["admission"]["policy"]["max_queue_size"] == 3 and manifest["admission"]["models"] == models
    listed = {f["path"]: f["sha256"] for f in manifest["files"]}
    assert f"{schema.ITEM_ENCODER}/{CONFIG_FILE}" in listed  # rehashed with the new config
    # the shadow never touched the original
    assert policy_of(parse(RepositoryLayout(exported_repository).config_file(schema.ITEM_ENCODER).read_text())) is None
    apply_to_repository(shadow, QueuePolicy(max_queue_size=2, timeout_us=50_000), {"derived_by": "again"})
    assert clear_repository(shadow) == models
    assert "admission" not in json.loads(layout.manifest_file.read_text())
    for name in models:  # no policy, and the instance counts export chose (not the first admission's)
        config = parse(layout.config_file(name).read_text())
        assert policy_of(config) is None
        assert [g.count for g in config.instance_group] == [g.count for g in configs[name].instance_group]


# ------------------------------------------------------------------------------ the client


def test_shed_is_its_own_failure_not_a_dead_server():
    assert classify(shed()) is Failure.shed
    assert classify(shed("Request timeout expired")) is Failure.shed
    assert classify(InferenceServerException("connection refused", status="StatusCode.UNAVAILABLE")) \
        is Failure.unavailable
    pool = EndpointPool(["a", "b"], transport=lambda url: url)
    with pytest.raises(InferenceServerException):
        with pool.use() as endpoint:
            raise shed()
    status = {s.url: s for s in pool.statuses()}[endpoint.url]
    assert status.healthy and status.shed == 1 and status.failures == 0


def test_a_shed_moves_to_another_replica_at_once_else_waits_a_jittered_backoff():
    pool = EndpointPool(["a", "b"], transport=lambda url: url)
    policy = RetryPolicy(retries=3, backoff_s=0.4)
    attempts = Attempts(pool, policy, RetryBudget(ratio=1.0))
    first = pool.endpoints[0]
    assert attempts.again(shed(), first) and attempts.backoff_s() == 0.0
    with pool.use(attempts.shed_by) as chosen:
        assert chosen is not first  # the replica that has not shed it
    assert attempts.again(shed(), chosen)  # both shed it now: back off, jittered
    waits = [attempts.backoff_s()]
    assert 0.2 <= waits[0] <= 0.4
    lone = EndpointPool(["a"], transport=lambda url: url)
    delays = set()
    for _ in range(20):
        single = Attempts(lone, policy, RetryBudget(ratio=1.0))
        assert single.again(shed(), lone.endpoints[0])
        delays.add(round(single.backoff_s(), 6))
    assert len(delays) > 1 and all(0.2 <= d <= 0.4 for d in delays)  # clients shed together spread out


def test_a_move_to_a_replica_that_has_not_shed_is_free_and_spill_over_keeps_the_order():
    pool = EndpointPool(["a", "b"], transport=lambda url: url, spill_over=True)
    none_left = RetryBudget(ratio=0.0, min_per_s=0.0)
    attempts = Attempts(pool, RetryPolicy(retries=3, backoff_s=0.1), none_left)
    with pool.use() as first:
        pass
    assert first.url == "a"  # spill over: the first listed, however many are in flight elsewhere
    with pool.use(), pool.use() as again:
        assert again.url == "a"
    assert attempts.again(shed(), first)  # b has not shed it: moving costs no budget
    assert attempts.backoff_s() == 0.0
    with pool.use(attempts.shed_by) as second:
        assert second.url == "b"
    assert not attempts.again(shed(), second)  # both shed it: a retry that waits needs the budget
    assert none_left.denied == 1
    balanced = EndpointPool(["a", "b"], transport=lambda url: url)
    with balanced.use() as one, balanced.use() as two:
        assert {one.url, two.url} == {"a", "b"}  # least in flight by default


def test_the_retry_budget_is_a_share_of_recent_requests():
    now = [0.0]
    budget = RetryBudget(ratio=0.1, min_per_s=0.0, window_s=10.0, clock=lambda: now[0])
    for _ in range(50):
        budget.request()
    assert sum(budget.try_retry() for _ in range(20)) == 5  # 10 % of 50
    assert budget.denied == 15
    now[0] = 11.0  # the window moved on: old requests and retries no longer count
    budget.request()
    assert budget.try_retry() is False  # 10 % of 1 request
    floor = RetryBudget(ratio=0.0, min_per_s=1.0, window_s=2.0, clock=lambda: now[0])
    assert [floor.try_retry() for _ in range(3)] == [True, True, False]


def test_a_denied_budget_or_a_passed_deadline_ends_the_retries():
    pool = EndpointPool(["a"], transport=lambda url: url)
    none_left = RetryBudget(ratio=0.0, min_per_s=0.0)
    assert not Attempts(pool, RetryPolicy(retries=3), none_left).again(shed(), pool.endpoints[0])
    now = [0.0]
    attempts = Attempts(pool, RetryPolicy(retries=3, backoff_s=1.0), RetryBudget(ratio=1.0), deadline_s=0.3,
                        clock=lambda: now[0])
    assert not attempts.again(shed(), pool.endpoints[0])  # a 0.5-1 s backoff outlasts the 0.3 s deadline
    down = Attempts(EndpointPool(["b"], transport=lambda url: url), RetryPolicy(retries=3, backoff_s=1.0),
                    deadline_s=0.3, clock=lambda: now[0])
    down.pool.eject(down.pool.endpoints[0], "refused")
    refused = InferenceServerException("connection refused", status="StatusCode.UNAVAILABLE")
    assert not down.again(refused)  # a dead server's backoff past the deadline: its error, not a 1 ms try
    options = attempts.options(CallOptions())
    assert options.client_timeout == pytest.approx(0.3) and options.timeout == 300_000  # sent to the server
    capped = Attempts(pool, RetryPolicy(), deadline_s=5.0, clock=lambda: now[0], queue_budget_us=84_000)
    assert capped.options(CallOptions()).timeout == 84_000  # never longer than the server's own budget
    now[0] = 0.2
    assert attempts.options(CallOptions(timeout=7)).timeout == 7  # the caller's own timeout stays
    assert attempts.options(CallOptions()).client_timeout == pytest.approx(0.1)


# ------------------------------------------------------------------------------ real server


@pytest.fixture(scope="module")
def tight_server(exported_repository, tmp_path_factory):
    """The session export behind a queue of one request, on its own tritonserver."""
    from mmrec.benchmarks.overload import shadow_repository
    from mmrec.server import ServerConfig, TritonServer, free_ports

    work = tmp_path_factory.mktemp("admission")
    shadow = shadow_repository(exported_repository, work / "repo")
    apply_to_repository(shadow, QueuePolicy(max_queue_size=1, timeout_us=5_000_000), {"derived_by": "test"})
    http, grpc, metrics = free_ports(3)
    config = ServerConfig(repository=shadow, http_port=http, grpc_port=grpc, metrics_port=metrics)
    with TritonServer(config, log_path=work / "tritonserver.log", ready_timeout_s=180) as server:
        yield server


def _items(sample_items, n: int):
    return [(caption, image) for caption, image, _ in sample_items[:n]]


@pytest.mark.server
@pytest.mark.timeout(180)
def test_a_request_over_the_queue_limit_is_shed_at_once_and_the_server_stays_ready(tight_server, sample_items):
    from mmrec.benchmarks.overload import failures_by_reason

    import tritonclient.grpc as grpcclient

    url = tight_server.urls["grpc"]
    client = grpcclient.InferenceServerClient(url)
    caption, image, _ = sample_items[0]
    inputs = []
    for name, value in ((schema.TEXT, caption.encode()), (schema.IMAGE, image)):
        tensor = grpcclient.InferInput(name, [8, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[value]] * 8, dtype=object))
        inputs.append(tensor)
    before = failures_by_reason(tight_server.urls["metrics"])
    outcomes: list[tuple[str, float]] = []
    lock = threading.Lock()

    messages: list[str] = []

    def one(i: int) -> None:
        start = time.perf_counter()
        try:  # the second half sets a 1 ms deadline of its own (allow_timeout_override)
            client.infer(schema.ITEM_ENCODER, inputs, timeout=1000 if i >= 48 else None)
            outcome = "ok"
        except InferenceServerException as err:
            outcome = "shed" if classify(err) is Failure.shed else f"error: {err}"
            messages.append(err.message())
        with lock:
            outcomes.append((outcome, (time.perf_counter() - start) * 1e3))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(48)))
    queue_full = list(outcomes)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(48, 96)))
    kinds = {o for o, _ in outcomes}
    assert kinds <= {"ok", "shed"}, (kinds, messages)
    assert any(SHED_MESSAGES[0] in m for m in messages), messages  # queue full
    assert any(SHED_MESSAGES[1] in m for m in messages), messages  # waited past its own deadline
    shed_ms = sorted(ms for o, ms in queue_full if o == "shed")
    ok_ms = sorted(ms for o, ms in queue_full if o == "ok")
    assert shed_ms and ok_ms, queue_full
    assert np.median(shed_ms) < np.median(ok_ms), (shed_ms, ok_ms)  # a full queue says so at once
    after = failures_by_reason(tight_server.urls["metrics"])
    # Prometheus: Triton 2.51 counts a queue-timeout rejection under reason="REJECTED"; a request
    # refused by a full queue never reaches the model's statistics (not counted; documented)
    timed_out = sum(SHED_MESSAGES[1] in m for m in messages)
    for _ in range(20):  # Triton updates the counter as it releases the request: let it settle
        if after.get("REJECTED", 0) - before.get("REJECTED", 0) >= timed_out:
            break
        time.sleep(0.1)
        after = failures_by_reason(tight_server.urls["metrics"])
    assert timed_out <= after.get("REJECTED", 0) - before.get("REJECTED", 0) <= len(messages)
    assert client.is_server_ready() and client.is_model_ready(schema.ITEM_ENCODER)
    client.infer(schema.ITEM_ENCODER, inputs)  # and answers once the storm is over
    client.close()


@pytest.mark.server
@pytest.mark.timeout(180)
def test_the_retry_budget_holds_under_a_shed_storm(tight_server, sample_items):
    ratio = 0.2
    budget = RetryBudget(ratio=ratio, min_per_s=0.0)
    items = _items(sample_items, 8)
    calls, overloaded, answered = 64, [], []
    with MMRecClient(tight_server.urls["grpc"], retry_budget=budget, retries=5, backoff_s=0.01,
                     concurrency=16) as client:
        def one(_: int) -> None:
            try:
                client.encode_items(items)
                answered.append(1)
            except OverloadedError as err:
                overloaded.append(err)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(one, range(calls)))
        attempts = client.endpoints[0].requests
        shed_count = client.endpoints[0].shed
        # the server's queue budget caps the timeout the client sends (a longer one would replace it)
        assert client.server_info.queue_budget_us == 5_000_000
    assert len(answered) + len(overloaded) == calls
    assert overloaded and shed_count, "the storm must overflow a queue of one"
    assert "overloaded" in str(overloaded[0])
    assert attempts <= (1 + ratio) * calls, (attempts, calls)  # retries cannot multiply the load
    assert client.endpoints[0].healthy  # a shed never ejects the endpoint


@pytest.mark.server
@pytest.mark.timeout(300)
def test_admit_measures_capacity_and_writes_the_policy(exported_repository, tmp_path):
    """`mmrec admit` end to end: an open-loop search on the served item_encoder (short steps here),
    the derived policy on every entry model, the record in the manifest; given numbers skip the
    measurement and an SLO below the service time is refused."""
    from typer.testing import CliRunner

    from mmrec.benchmarks.overload import shadow_repository
    from mmrec.cli import app

    shadow = shadow_repository(exported_repository, tmp_path / "repo")
    runner = CliRunner()
    result = runner.invoke(app, ["admit", str(shadow), "--slo-ms", "300", "--step-s", "0.5", "--max-steps", "4"])
    assert result.exit_code == 0, (result.output, result.exception)
    record = json.loads(RepositoryLayout(shadow).manifest_file.read_text())["admission"]
    measured = record["measured"]
    assert record["derived_by"] == "measured" and measured["capacity_rps"] > 0 and 0 < measured["service_ms"] < 300
    expected = derive(measured["capacity_rps"], 300.0, measured["service_ms"])
    config = parse(RepositoryLayout(shadow).config_file(schema.ITEM_ENCODER).read_text())
    assert policy_of(config) == expected and record["policy"]["max_queue_size"] == expected.max_queue_size

    result = runner.invoke(app, ["admit", str(shadow), "--capacity", "40", "--service-ms", "20"])
    assert result.exit_code == 0, result.output
    assert policy_of(parse(RepositoryLayout(shadow).config_file(schema.ITEM_ENCODER).read_text())) == \
        QueuePolicy(1, 80_000)  # floor(40/s x 0.08 s / 2)
    result = runner.invoke(app, ["admit", str(shadow), "--capacity", "40", "--service-ms", "120"])
    assert result.exit_code == 2 and "leaves no time to queue" in result.output
    result = runner.invoke(app, ["admit", str(shadow), "--clear"])
    assert result.exit_code == 0 and "admission removed" in result.output
    config = parse(RepositoryLayout(shadow).config_file(schema.ITEM_ENCODER).read_text())
    assert policy_of(config) is None and [g.count for g in config.instance_group] == [1]


def test_overload_rounds_are_sorted_by_outcome_and_recovery_is_the_last_late_answer():
    from mmrec.benchmarks.overload import judge, recovery_time, summarize

    records = [(0.0, 20.0, "ok"), (0.1, 150.0, "ok"), (0.2, 1.0, "shed"), (0.3, 2.0, "shed"), (0.4, 30.0, "error")]
    summary = summarize(records, slo_ms=100.0, duration_s=2.0)
    assert (summary["ok"], summary["shed"], summary["errors"], summary["requests"]) == (2, 2, 1, 5)
    assert summary["goodput_rps"] == 0.5  # one answer within the SLO in 2 s
    assert summary["shed_share"] == 0.4 and summary["shed_ms"]["p99"] <= 2.0
    late_then_fine = [(10.0, 300.0, "ok"), (10.5, 120.0, "ok"), (11.2, 20.0, "ok"), (12.0, 25.0, "ok")]
    assert recovery_time(late_then_fine, start=10.0, slo_ms=100.0) == pytest.approx(0.5)
    assert recovery_time([(10.0, 20.0, "ok")], start=10.0, slo_ms=100.0) == 0.0
    assert recovery_time([(10.0, 20.0, "ok"), (11.0, 500.0, "ok")], start=10.0, slo_ms=100.0) is None
    rounds = [{"admitted_ms": {"p99": p}, "goodput_rps": g, "shed_ms": {"p99": s}, "shed": 3}
              for p, g, s in ((60, 75, 2.0), (70, 72, 2.5), (65, 74, 1.5))]
    judged = judge(rounds, capacity_rps=80.0, slo_ms=100.0)
    assert judged["admitted_p99_over_slo"]["high"] < 1.0 and judged["goodput_over_capacity"]["rounds"] == 3
    assert judged["shed_p99_over_bound"]["point"] < 1.0


def test_overload_targets_are_judged_on_their_intervals():
    from mmrec import stats
    from mmrec.benchmarks import report, targets
    from mmrec.benchmarks.overload import judge, summarize

    def rounds(p99s, goodputs):
        return [{"admitted_ms": {"p99": p}, "goodput_rps": g, "shed_ms": {"p99": 1.0 + i / 10}, "shed": 5, "ok": 50,
                 "requests": 55, "errors": 0} for i, (p, g) in enumerate(zip(p99s, goodputs))]

    factors = {"1.5": rounds([60, 65, 62, 64, 61], [76, 77, 75, 78, 76]),
               "2": rounds([90, 130, 95, 120, 100], [70, 60, 72, 65, 71])}
    section = {"status": "ok", "capacity_rps": 80.0, "slo_ms": 100.0, "payloads": "jpeg_640x427",
               "factors": {f: {"offered_rps": float(f) * 80, "rounds": r, **judge(r, 80.0, 100.0)}
                           for f, r in factors.items()},
               "recovery": {"load_rps": 40.0, "observed_s": 5.0, "recovery_s": 0.4, "bound_s": 2.0},
               "rss_mb": {"before": 900.0, "after": 905.0}, "prometheus_failures": {"REJECTED": 50.0},
               "admission": {"policy": {"max_queue_size": 6, "timeout_us": 80000}, "models": ["item_encoder"]}}
    section["soak"] = {"offered_rps": 160.0, "seconds": 300.0, "growth": 0.031, "bound": 0.02,
                       "rss_mb": {"start": 1500.0, "end": 1546.5, "series": [[0, 1500.0], [300, 1546.5]]},
                       "summary": summarize([(0.0, 20.0, "ok"), (0.1, 1.0, "shed")], 100.0, 1.0)}
    pair_rounds = [{**summarize([(0.0, 20.0, "ok")] * 70, 100.0, 1.0), "endpoints": {"a": {"requests": 90, "shed": 20},
                                                                                    "b": {"requests": 20, "shed": 0}}}
                   for _ in range(5)]
    section["pair"] = {"replicas": [{"cores": [0], "capacity_rps": 36.0, "service_ms": 17.0,
                                     "policy": {"max_queue_size": 1}},
                                    {"cores": [1], "capacity_rps": 38.0, "service_ms": 16.0,
                                     "policy": {"max_queue_size": 1}}],
                       "capacity_sum_rps": 74.0, "offered_rps": 74.0, "slo_ms": 100.0, "round_s": 6.0,
                       "rounds": pair_rounds, "bound": 0.9,
                       "goodput_over_capacity_sum": stats.paired_ratio([70, 72, 69, 71, 70], [74] * 5).to_dict()}
    results = {"sections": {"overload": section}}
    judged = {t["id"]: t for t in targets.evaluate(results) if t["id"].startswith("overload.")}
    assert judged["overload.memory"]["verdict"] == "missed" and judged["overload.memory"]["measured"] == "+3.1 %"
    assert judged["overload.spill_over"]["verdict"] == "met", judged["overload.spill_over"]
    assert judged["overload.admitted_p99"]["verdict"] == "not conclusive"  # 2x straddles the SLO
    assert judged["overload.goodput"]["verdict"] == "missed"  # 2x lies wholly under 0.9x capacity
    assert judged["overload.shed_answer"]["verdict"] == "met"
    assert judged["overload.recovery"]["verdict"] == "met" and "no interval" in judged["overload.recovery"]["detail"]
    lines = report.overload_detail(results)
    assert any("REJECTED 50" in line for line in lines) and any(line.startswith("| 2×") for line in lines)
    assert any(line.startswith("- soak: 300 s") and "+3.1 %" in line for line in lines)
    assert any(line.startswith("- spill-over pair") and "shed 100 of 450" in line for line in lines)
    del results["sections"]["overload"]
    assert all(t["verdict"] == "not measured" for t in targets.evaluate(results) if t["id"].startswith("overload."))


def _thread_nice_values(pid: int) -> set[int]:
    """The nice value of every thread of a process (Linux keeps nice per thread)."""
    from pathlib import Path

    values = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        values.add(int(fields[16]))  # field 19 of stat; the split starts at field 3 (state)
    return values


@pytest.mark.server
@pytest.mark.timeout(120)
def test_python_stubs_yield_the_cpu_to_the_server_and_admitted_models_run_two_instances(tight_server):
    """Every python stub runs all its threads at the compute nice value, the server process at
    its own; the admitted item_encoder has two stubs."""
    import psutil

    from mmrec.model_repository.lib.priority import COMPUTE_NICE

    server = psutil.Process(tight_server.pid)
    tritonserver = [p for p in [server, *server.children(recursive=True)] if p.name() == "tritonserver"]
    stubs = [p for p in server.children(recursive=True) if "triton_python_backend_stub" in p.name()]
    assert tritonserver and stubs
    own = os.getpriority(os.PRIO_PROCESS, 0)  # a runner may itself run under nice
    for stub in stubs:
        assert _thread_nice_values(stub.pid) == {max(COMPUTE_NICE, own)}, (stub.cmdline(),
                                                                          _thread_nice_values(stub.pid))
    assert _thread_nice_values(tritonserver[0].pid) == {own}
    item_stubs = [s for s in stubs if any(f"/{schema.ITEM_ENCODER}/" in part or part.endswith(f"/{schema.ITEM_ENCODER}")
                                          for part in s.cmdline())]
    assert len(item_stubs) == ADMITTED_INSTANCES, [s.cmdline() for s in stubs]


def test_yield_to_server_renices_threads_started_before_and_after(tmp_path):
    """In a child process (a nice value cannot be lowered again): threads that already run get
    the value, threads started later inherit it, and a lower target never lowers it."""
    import subprocess
    import sys

    from mmrec.model_repository.lib import priority

    script = f"""
import sys, threading, time, os
sys.path.insert(0, {str(__import__('pathlib').Path(priority.__file__).parent)!r})
import priority
stop = threading.Event()
early = threading.Thread(target=stop.wait); early.start()
assert priority.yield_to_server(7) == 7
late = threading.Thread(target=stop.wait); late.start()
values = {{os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir('/proc/self/task')}}
assert priority.yield_to_server(3) == 7
stop.set(); early.join(); late.join()
print(sorted(values))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[7]"
