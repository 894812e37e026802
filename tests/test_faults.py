"""Faults under load, each on a server of its own (never the shared session server):

(a) SIGKILL tritonserver mid-load and restart it on the same ports: the mmrec client retries
    UNAVAILABLE with exponential backoff, and with a retry budget longer than the restart every
    call returns the correct result (no error of any kind); a client with retries=0 gets a
    ServerUnavailableError naming the URL at once during the outage.
(b) a new model version loaded under load (explicit model control): zero failed requests.
(c) a python-backend stub SIGKILLed: requests fail promptly (bounded by client timeouts, never
    hang) and Triton restarts the stub; service resumes without restarting the server.

Observed numbers are printed as `FAULT {...}` JSON lines (pytest -s).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from mmrec import schema
from mmrec.client import MMRecClient, MMRecError, ServerUnavailableError
from mmrec.export.repository import parse
from mmrec.server import ServerConfig, TritonServer, free_ports
from test_bad_inputs import OUTPUTS, TOLERANCE, column, infer
from test_load import cmdline, process_tree

READY_TIMEOUT_S = 240
# (a): the outage lasts at most stop() (seconds) + a restart within READY_TIMEOUT_S; the retry
# budget (backoff doubling from BACKOFF_S) must outlast twice that, so no call may run out of it.
BACKOFF_S = 0.25
RETRIES = next(n for n in range(64) if BACKOFF_S * (2 ** n - 1) >= 2 * READY_TIMEOUT_S)


def linked_copy(source: Path, target: Path) -> Path:
    """Copy a repository, symlinking the big model files (Triton follows links)."""
    def copy(src, dst):
        if src.endswith((".onnx", ".plan")):
            os.symlink(os.path.abspath(src), dst)
        else:
            shutil.copy2(src, dst)
    shutil.copytree(source, target, copy_function=copy)
    return target


def new_server(repository: Path, log: Path, ports: tuple[int, int, int] | None = None,
               model_control: str = "none") -> TritonServer:
    http, grpc, metrics = ports or tuple(free_ports(3))
    # exit_timeout_s: a model whose stub was killed never finishes unloading; do not wait 10 s for it
    config = ServerConfig(repository=repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                          model_control=model_control, exit_timeout_s=3)
    server = TritonServer(config, log_path=log, ready_timeout_s=READY_TIMEOUT_S)
    server.start()
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def report(kind: str, **numbers) -> None:
    print(f"\nFAULT {json.dumps({'fault': kind, **numbers})}")


# ---- (a) kill -9 the server mid-load, restart on the same ports -------------------------------------

@pytest.mark.server
@pytest.mark.timeout(900)
def test_server_killed_mid_load_and_restarted_every_call_succeeds(exported_repository, reference, sample_items,
                                                                  tmp_path):
    items = [(t, i) for t, i, _ in sample_items[:16]]
    want = reference.encode_items([t for t, _ in items], [i for _, i in items])[schema.ITEM_EMBEDDING]
    sent_total, workers, kill_after = 120, 8, 24
    server = new_server(Path(exported_repository), tmp_path / "before.log")
    ports = server.config.ports
    results: dict[int, float] = {}  # call number -> finish time, correct results only
    wrong: list[int] = []  # call numbers answered with a wrong embedding
    errors: list[tuple[int, BaseException]] = []  # calls that raised anything at all
    lock = threading.Lock()
    done_count = threading.Event()

    def worker(calls: list[int]) -> None:
        with MMRecClient(server.urls["grpc"], retries=RETRIES, backoff_s=BACKOFF_S, client_timeout=120) as client:
            for n in calls:
                k = n % len(items)
                try:
                    got = client.encode_items([items[k]]).item_embedding[0]
                except Exception as err:  # noqa: BLE001 - every failure is collected and fails the test below
                    with lock:
                        errors.append((n, err))
                else:
                    with lock:
                        if np.allclose(got, want[k], atol=TOLERANCE, rtol=0):
                            results[n] = time.monotonic()
                        else:
                            wrong.append(n)
                with lock:
                    if len(results) + len(wrong) + len(errors) >= kill_after:
                        done_count.set()

    plan = [list(range(w, sent_total, workers)) for w in range(workers)]
    restarted_at = killed_at = None
    no_retry_outcomes: list[BaseException | str] = []
    no_retry = MMRecClient(server.urls["grpc"], retries=0, client_timeout=30)
    no_retry.connect()
    try:
        with ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(worker, p) for p in plan]
            assert done_count.wait(300), "load never got going"
            os.kill(server.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            server.stop()  # reap; kill the orphaned stubs; remove their shared memory
            for k in range(3):  # without retries, the outage is a typed error at once
                try:
                    no_retry.encode_items([items[k]])
                    no_retry_outcomes.append("answered while the server was down")
                except Exception as err:  # noqa: BLE001 - its type is asserted below
                    no_retry_outcomes.append(err)
            server = new_server(Path(exported_repository), tmp_path / "after.log", ports=ports)
            restarted_at = time.monotonic()
            for future in futures:
                future.result(timeout=600)
    finally:
        no_retry.close()
        server.stop()
    report("server SIGKILL + restart on the same ports", sent=sent_total, results=len(results), wrong=len(wrong),
           errors=len(errors), retries=RETRIES, retry_budget_s=BACKOFF_S * (2 ** RETRIES - 1),
           restart_s=round(restarted_at - killed_at, 1),
           results_after_restart=sum(1 for t in results.values() if t > restarted_at),
           error_example=f"{type(errors[0][1]).__name__}: {errors[0][1]}"[:200] if errors else None,
           no_retry_client_during_outage=[type(e).__name__ if isinstance(e, BaseException) else e
                                          for e in no_retry_outcomes],
           no_retry_message=str(no_retry_outcomes[0])[:200])
    # the retry budget outlasts the restart: every call returns the correct result, none fails
    assert not errors, [f"call {n}: {type(e).__name__}: {e}" for n, e in errors[:3]]
    assert not wrong, f"wrong embeddings for calls {wrong}"
    assert sorted(results) == list(range(sent_total))
    assert sum(1 for t in results.values() if t > restarted_at) > 0, "no request succeeded after the restart"
    # without retries, a call during the outage fails at once with the documented typed error
    assert all(isinstance(e, ServerUnavailableError) and isinstance(e, MMRecError) for e in no_retry_outcomes), \
        no_retry_outcomes
    assert f"no Triton server answers grpc at {server.urls['grpc']}" in str(no_retry_outcomes[0])


# ---- (b) and (c) share one server with explicit model control -------------------------------------

@pytest.fixture(scope="module")
def explicit_server(exported_repository, tmp_path_factory):
    """A server of this module's own on a linked copy of the repository (model versions get added)."""
    folder = tmp_path_factory.mktemp("explicit")
    repository = linked_copy(Path(exported_repository), folder / "repository")
    server = new_server(repository, folder / "triton.log", model_control="explicit")
    try:
        yield server
    finally:
        server.stop()


# ---- (b) a new model version under load -------------------------------------------------------------

@pytest.mark.server
@pytest.mark.timeout(900)
def test_new_model_version_loads_under_load_without_failed_requests(explicit_server, reference, sample_items):
    server = explicit_server
    repository = Path(server.config.repository)
    text, image, _ = sample_items[0]
    # interest_scorer is an ensemble ending in the scorer member on every target, so its requests
    # run the member whose new version loads (fusion runs inside the portable item engine)
    user = np.full((1, reference.encode_items([text], [image])[schema.ITEM_EMBEDDING].shape[1]), 0.05, np.float32)
    want = reference.score_items([text], [image], user[0])
    tensors = {schema.TEXT: (column([text.encode()]), "BYTES"), schema.IMAGE: (column([image]), "BYTES"),
               schema.USER_EMBEDDING: (user, "FP32")}
    stop = threading.Event()
    outcomes: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 300

    def load() -> None:
        client = grpcclient.InferenceServerClient(server.urls["grpc"])
        try:
            while not stop.is_set() and time.monotonic() < deadline and len(outcomes) < 2000:
                try:
                    got = infer(client, "grpc", schema.INTEREST_SCORER, tensors, OUTPUTS[schema.INTEREST_SCORER])
                    ok = all(np.allclose(got[o], want[o], atol=TOLERANCE, rtol=0)
                             for o in OUTPUTS[schema.INTEREST_SCORER])
                    outcome = "ok" if ok else "wrong result"
                except InferenceServerException as err:
                    outcome = f"{err.status()}: {err.message()}"
                with lock:
                    outcomes.append(outcome)
        finally:
            client.close()

    threads = [threading.Thread(target=load) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        while len(outcomes) < 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        before_load = len(outcomes)
        version2 = repository / schema.SCORER / "2"
        shutil.copytree(repository / schema.SCORER / "1", version2, symlinks=True)
        control = grpcclient.InferenceServerClient(server.urls["grpc"])
        started = time.monotonic()
        control.load_model(schema.SCORER)  # version policy "latest 1": serves 2, retires 1
        load_s = time.monotonic() - started
        during = len(outcomes) - before_load
        while len(outcomes) < before_load + during + 40 and time.monotonic() < deadline:
            time.sleep(0.2)
        versions = list(control.get_model_metadata(schema.SCORER).versions)
        stats = control.get_inference_statistics(schema.SCORER, "2").model_stats
        v2_inferences = sum(s.inference_count for s in stats)
        ready = (control.is_model_ready(schema.SCORER, "2"), control.is_model_ready(schema.SCORER, "1"))
        control.close()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    failures = [o for o in outcomes if o != "ok"]
    report("load scorer version 2 under load (explicit model control)", requests=len(outcomes),
           failed=len(failures), load_model_s=round(load_s, 1), requests_during_load=during,
           scorer_versions=versions, v2_inferences=v2_inferences)
    assert not failures, failures[:5]
    assert versions == ["2"] and ready == (True, False)
    assert v2_inferences > 0


# ---- (c) kill -9 a python stub ------------------------------------------------------------------

def stub_of(server: TritonServer, model: str) -> int:
    for pid in process_tree(server.pid):
        if f"/{model}/1/model.py" in cmdline(pid) and "triton_python_backend_stub" in cmdline(pid):
            return pid
    raise LookupError(f"no python stub for {model} under tritonserver {server.pid}")


@pytest.mark.server
@pytest.mark.timeout(600)
def test_killed_python_stub_fails_requests_promptly_and_recovers_by_reload(explicit_server, reference,
                                                                          sample_items):
    """What Triton 2.51 (nvidia-pytriton 0.7.0) does when a python stub dies: every request to the
    model fails at once with INTERNAL "Stub process '<instance>' is not healthy." (no hang), the
    server and model stay "ready", and the stub is NOT restarted by Triton; unloading and loading
    the model (explicit model control) or restarting the server brings it back. The test records whether
    Triton restarted the stub by itself, so a newer build that does is noticed, not failed."""
    server = explicit_server
    repository = Path(server.config.repository)
    # the python model that first handles an item_encoder request: item_encoder itself where it is
    # one python model (portable), else the ensemble's first step (decoding + tokenizing)
    merged = parse((repository / schema.ITEM_ENCODER / "config.pbtxt").read_text()).backend == "python"
    model = schema.ITEM_ENCODER if merged else "item_preprocess"
    text, image, _ = sample_items[0]
    want = reference.encode_items([text], [image])
    tensors = {schema.TEXT: (column([text.encode()]), "BYTES"), schema.IMAGE: (column([image]), "BYTES")}
    timeout_s = 30.0

    def attempt() -> tuple[str, float]:
        client = grpcclient.InferenceServerClient(server.urls["grpc"])
        started = time.monotonic()
        try:
            inputs = []
            for name, (array, datatype) in tensors.items():
                tensor = grpcclient.InferInput(name, list(array.shape), datatype)
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            result = client.infer(schema.ITEM_ENCODER, inputs, client_timeout=timeout_s)
            ok = np.allclose(result.as_numpy(schema.ITEM_EMBEDDING), want[schema.ITEM_EMBEDDING], atol=TOLERANCE)
            return ("ok" if ok else "wrong result"), time.monotonic() - started
        except InferenceServerException as err:
            return f"{err.status()}: {err.message()}", time.monotonic() - started
        finally:
            client.close()

    control = grpcclient.InferenceServerClient(server.urls["grpc"])
    try:
        assert attempt()[0] == "ok"
        old_stub = stub_of(server, model)
        os.kill(old_stub, signal.SIGKILL)
        killed = time.monotonic()
        with ThreadPoolExecutor(4) as pool:  # some in flight at the kill, all right after it
            burst = list(pool.map(lambda _: attempt(), range(8)))
        self_healed_after = None
        while time.monotonic() - killed < 20:  # does Triton restart the stub by itself?
            if attempt()[0] == "ok":
                self_healed_after = time.monotonic() - killed
                break
            time.sleep(1)
        reported_ready = (control.is_server_ready(), control.is_model_ready(model))
        reload_s = None
        if self_healed_after is None:
            # explicit model control: load_model alone is a no-op for an unchanged model; unload
            # first, then load: a fresh instance with a fresh stub (the ensembles follow)
            started = time.monotonic()
            control.unload_model(model)
            control.load_model(model)
            reload_s = time.monotonic() - started
            while not control.is_model_ready(schema.ITEM_ENCODER) and time.monotonic() - started < 60:
                time.sleep(0.2)
        after_reload = attempt()[0]
        new_stub = stub_of(server, model)
        still_running = server.is_running()
    finally:
        control.close()
    errors = [o for o, _ in burst if o != "ok"]
    report("SIGKILL python stub of " + model, burst=len(burst), burst_errors=len(errors),
           slowest_answer_s=round(max(s for _, s in burst), 2),
           triton_restarted_stub_after_s=self_healed_after and round(self_healed_after, 1),
           reported_ready_while_broken=reported_ready, reload_model_s=reload_s and round(reload_s, 1),
           ok_after_reload=after_reload == "ok", error_example=errors[0][:200] if errors else None)
    assert all(seconds < timeout_s for _, seconds in burst), burst  # nothing hung
    assert all(o == "ok" or ("INTERNAL" in o and "is not healthy" in o) for o, _ in burst), burst
    assert errors, "no request noticed the dead stub"
    assert still_running, "tritonserver itself died"
    assert after_reload == "ok" and new_stub != old_stub
