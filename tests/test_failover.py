"""mmrec.client across replicas: spreading, failover when a server is SIGKILLed, re-admission.

The server tests run two real tritonservers on loopback over the same export. A replica can
be killed (SIGKILL to its process group) and started again on the same ports. The unit tests
at the top check EndpointPool's decisions without any server.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from mmrec import schema
from mmrec.client import AsyncMMRecClient, EncodedItems, Item, MMRecClient, ServerUnavailableError
from mmrec.client._endpoints import Attempts, EndpointPool, parse_urls
from mmrec.client._retry import RetryPolicy
from mmrec.client._shm import RegionPool
from mmrec.server import ServerConfig, TritonServer, free_port, free_ports

ATOL = 1e-4
NUM_ITEMS = 16
LOAD_REQUESTS = 200  # encode calls during a failover test
LOAD_WORKERS = 8  # threads (sync) or tasks (async) sending them
KILL_AFTER = 50  # answered calls before one replica is killed
HEALTH_S = 0.25  # health_interval_s in these tests
DEADLINE_S = 60.0  # upper bound on any wait below
ENCODER = schema.ITEM_ENCODER


# ---- EndpointPool without servers --------------------------------------------------------------

def unavailable() -> InferenceServerException:
    return InferenceServerException("connection refused", status="StatusCode.UNAVAILABLE")


def test_urls_come_as_one_string_a_comma_list_or_a_sequence():
    assert parse_urls("a:1") == ("a:1",)
    assert parse_urls(" a:1, b:2 ") == ("a:1", "b:2")
    assert parse_urls(["a:1", "b:2"]) == parse_urls(("a:1", "b:2")) == ("a:1", "b:2")
    for bad in ("", "a:1,", [], ["a:1", ""]):
        with pytest.raises(ValueError, match="host:port"):
            parse_urls(bad)
    with pytest.raises(ValueError, match="more than once: a:1"):
        parse_urls("a:1,b:2,a:1")
    with pytest.raises(TypeError):
        parse_urls([("a", 1)])
    with pytest.raises(ValueError, match="health_interval_s"):
        MMRecClient("a:1,b:2", health_interval_s=0)


def test_pool_prefers_fewest_in_flight_and_rotates_ties():
    pool = EndpointPool(["a", "b", "c"], transport=lambda url: url)
    with pool.use() as first, pool.use() as second, pool.use() as third:
        assert {first.url, second.url, third.url} == {"a", "b", "c"}  # one each while busy
        with pool.use() as fourth:
            assert fourth.in_flight == 2
    picked = []
    for _ in range(6):
        with pool.use() as endpoint:
            picked.append(endpoint.url)
    assert sorted(picked) == ["a", "a", "b", "b", "c", "c"]  # idle endpoints take turns
    assert all(s.in_flight == 0 for s in pool.statuses())
    assert sum(s.requests for s in pool.statuses()) == 10


def test_connection_failures_eject_and_success_readmits_but_bad_requests_do_not():
    pool = EndpointPool(["a", "b"], transport=lambda url: url)
    a = pool.endpoints[0]
    with pytest.raises(InferenceServerException):
        with pool.use() as endpoint:
            assert endpoint is a  # both idle: the first turn goes to the first endpoint
            raise unavailable()
    states = {s.url: s for s in pool.statuses()}
    assert not states["a"].healthy and states["a"].failures == 1
    assert states["b"].healthy and states["b"].failures == 0
    for _ in range(4):  # only "b" is healthy now
        with pool.use() as endpoint:
            assert endpoint.url == "b"
    with pytest.raises(InferenceServerException):  # rejected requests leave "b" in
        with pool.use():
            raise InferenceServerException("bad", status="StatusCode.INVALID_ARGUMENT")
    assert pool.statuses()[1].healthy
    pool.probed(pool.endpoints[1], ready=False)
    with pool.use() as endpoint:  # everything ejected: try them anyway, in turn
        pass
    other = next(e for e in pool.endpoints if e is not endpoint)
    assert endpoint.healthy and not other.healthy  # ...and a success re-admits the one that answered
    pool.probed(other, ready=True)  # a health probe re-admits the other
    assert all(s.healthy for s in pool.statuses())


def test_attempts_fail_over_at_once_and_back_off_only_when_all_are_ejected():
    pool = EndpointPool(["a", "b"], transport=lambda url: url)
    attempts = Attempts(pool, RetryPolicy(retries=3, backoff_s=0.5))
    assert attempts.backoff_s() == 0
    assert not attempts.again(InferenceServerException("bad", status="StatusCode.INVALID_ARGUMENT"))
    pool.eject(pool.endpoints[0], "down")
    assert attempts.again(unavailable()) and attempts.backoff_s() == 0  # "b" is still in
    pool.eject(pool.endpoints[1], "down")
    assert attempts.again(unavailable()) and attempts.backoff_s() == 0.5
    assert attempts.again(unavailable()) and attempts.backoff_s() == 1.0
    assert not attempts.again(unavailable())  # 1 try + 3 retries


def test_reset_regions_register_again_replacing_any_old_registration():
    calls: list[tuple] = []
    regions = RegionPool(64)
    register = lambda name, key, size: calls.append(("register", name))  # noqa: E731
    unregister = lambda name: calls.append(("unregister", name))  # noqa: E731
    try:
        with regions.lease(register, unregister) as region:
            pass
        with regions.lease(register, unregister):
            pass
        assert calls == [("register", region.name)]  # once, then reused
        regions.reset()  # the endpoint was ejected: it may come back as a new server
        with regions.lease(register, unregister):
            pass
        assert calls[1:] == [("unregister", region.name), ("register", region.name)]
    finally:
        regions.close(lambda name: None)


# ---- two real replicas ----------------------------------------------------------------------------

class Replica:
    """One tritonserver on fixed ports that a test can SIGKILL and start again."""

    def __init__(self, repository: Path, logs: Path, name: str) -> None:
        http, grpc, metrics = free_ports(3)
        self.config = ServerConfig(repository=repository, http_port=http, grpc_port=grpc, metrics_port=metrics)
        self.logs, self.name = logs, name
        self.server: TritonServer | None = None
        self.starts = 0

    def url(self, protocol: str = "grpc") -> str:
        return f"127.0.0.1:{self.config.grpc_port if protocol == 'grpc' else self.config.http_port}"

    def running(self) -> bool:
        return self.server is not None and self.server.is_running()

    def start(self) -> None:
        """Launch without waiting (see wait_ready), so two replicas start side by side."""
        self.starts += 1
        self.server = TritonServer(self.config, log_path=self.logs / f"{self.name}-{self.starts}.log",
                                   ready_timeout_s=180)
        self.server.start()

    def wait_ready(self) -> None:
        self.server.wait_ready()

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would; stop() then reaps it and removes its shm."""
        os.killpg(self.server.pid, signal.SIGKILL)
        self.server.stop()

    def successes(self, model: str = ENCODER) -> int:
        """Requests this server process has answered successfully for `model`."""
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.url("http"))
        try:
            stats = client.get_inference_statistics(model)
        finally:
            client.close()
        return sum(int(s["inference_stats"]["success"]["count"]) for s in stats["model_stats"])


def ensure_running(replicas: list[Replica]) -> None:
    stopped = [r for r in replicas if not r.running()]
    for replica in stopped:
        replica.start()
    for replica in stopped:
        replica.wait_ready()


@pytest.fixture(scope="module")
def replicas(exported_repository, tmp_path_factory) -> Iterator[list[Replica]]:
    logs = tmp_path_factory.mktemp("replicas")
    pair = [Replica(exported_repository, logs, "a"), Replica(exported_repository, logs, "b")]
    try:
        ensure_running(pair)
        yield pair
    finally:
        for replica in pair:
            if replica.server is not None:
                replica.server.stop()


@pytest.fixture(scope="module")
def items(sample_items) -> list[Item]:
    return [Item(caption, png, f"item-{i}") for i, (caption, png, _) in enumerate(sample_items[:NUM_ITEMS])]


@pytest.fixture(scope="module")
def expected(reference, items) -> dict[str, np.ndarray]:
    return reference.encode_items([i.text for i in items], [i.image for i in items])


def assert_matches(encoded: EncodedItems, expected: dict[str, np.ndarray], rows: slice) -> None:
    np.testing.assert_allclose(encoded.item_embedding, expected[schema.ITEM_EMBEDDING][rows], atol=ATOL, rtol=0)
    np.testing.assert_allclose(encoded.interest_probs, expected[schema.INTEREST_PROBS][rows], atol=ATOL, rtol=0)
    np.testing.assert_allclose(encoded.alignment, expected[schema.ALIGNMENT][rows].reshape(-1), atol=ATOL,
                               rtol=0)


def call_rows(n: int) -> slice:
    """The item the n-th load call encodes, walking round the list."""
    return slice(n % NUM_ITEMS, n % NUM_ITEMS + 1)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


async def await_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.05)


def healthy(client: Any, url: str) -> bool:
    return next(s.healthy for s in client.endpoints if s.url == url)


def urls_of(replicas: list[Replica], protocol: str = "grpc") -> list[str]:
    return [r.url(protocol) for r in replicas]


def settled_counts(replicas, before: list[int], expected_total: int, timeout_s: float = 5.0) -> list[int]:
    """Per-replica successes since `before`. Triton updates its statistics just after sending
    a response, so the last count can trail the client by a moment: poll until the total
    settles (bounded), then return what the servers report."""
    deadline = time.monotonic() + timeout_s
    while True:
        served = [r.successes() - b for r, b in zip(replicas, before)]
        if sum(served) >= expected_total or time.monotonic() > deadline:
            return served
        time.sleep(0.05)


@pytest.mark.server
@pytest.mark.parametrize("mode,protocol", [("sync", "grpc"), ("sync", "http"), ("async", "grpc")])
def test_requests_spread_across_replicas(mode, protocol, replicas, items, expected):
    ensure_running(replicas)
    before = [r.successes() for r in replicas]
    settings = dict(protocol=protocol, max_batch_size=2, health_interval_s=HEALTH_S)
    if mode == "sync":
        with MMRecClient(urls_of(replicas, protocol), **settings) as client:
            encoded = client.encode_items(items)  # 8 sub-batches, 4 at a time
            states = client.endpoints
    else:
        async def run():
            async with AsyncMMRecClient(",".join(urls_of(replicas, protocol)), **settings) as client:
                return await client.encode_items(items), client.endpoints
        encoded, states = asyncio.run(run())
    assert_matches(encoded, expected, slice(None))
    served = settled_counts(replicas, before, NUM_ITEMS // 2)
    assert sum(served) == NUM_ITEMS // 2 and min(served) >= 2, served
    assert [s.requests for s in states] == served
    assert all(s.healthy and s.in_flight == 0 and s.failures == 0 for s in states)


@pytest.mark.server
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_connect_needs_one_ready_endpoint_and_warns_about_the_rest(mode, replicas, items, expected, caplog):
    ensure_running(replicas)
    dead = f"127.0.0.1:{free_port()}"
    urls = [dead, replicas[0].url()]
    with caplog.at_level(logging.WARNING, logger="mmrec.client"):
        if mode == "sync":
            with MMRecClient(urls, retries=1, backoff_s=0.01, health_interval_s=HEALTH_S) as client:
                encoded = [client.encode_items(items[:2]) for _ in range(4)]
                states = client.endpoints
        else:
            async def run():
                async with AsyncMMRecClient(urls, retries=1, backoff_s=0.01, health_interval_s=HEALTH_S) as c:
                    return [await c.encode_items(items[:2]) for _ in range(4)], c.endpoints
            encoded, states = asyncio.run(run())
    for result in encoded:
        assert_matches(result, expected, slice(0, 2))
    assert not states[0].healthy and states[0].requests == 0  # never sent a request
    assert states[1].healthy and states[1].requests == 4
    assert any(dead in r.getMessage() and "ejected" in r.getMessage() for r in caplog.records)


@pytest.mark.server
def test_shared_memory_regions_are_registered_per_replica_and_removed(replicas, items, expected):
    ensure_running(replicas)
    before = set(os.listdir("/dev/shm"))
    with MMRecClient(urls_of(replicas), local_preprocessing=True, shared_memory=True, max_batch_size=2,
                     health_interval_s=HEALTH_S) as client:
        encoded = client.encode_items(items)
        for endpoint in client._pool.endpoints:
            names = set(endpoint.regions.names)
            status = str(endpoint.transport.client().get_system_shared_memory_status())
            assert names and all(name in status for name in names), endpoint.url
    assert_matches(encoded, expected, slice(None))
    assert not {n for n in set(os.listdir("/dev/shm")) - before if n.startswith("mmrec_client_")}


@pytest.mark.server
def test_cli_takes_comma_separated_replicas(replicas, items, expected, tmp_path):
    from typer.testing import CliRunner

    from mmrec.cli import app

    ensure_running(replicas)
    image = tmp_path / "item.png"
    image.write_bytes(items[0].image)
    url = f"127.0.0.1:{free_port()},{replicas[1].url()}"  # the first one is down
    result = CliRunner().invoke(app, ["encode", "--text", items[0].text, "--image", str(image), "--url", url,
                                      "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    embedding = json.loads(result.stdout.splitlines()[0])["embedding"]
    np.testing.assert_allclose(embedding, expected[schema.ITEM_EMBEDDING][0], atol=ATOL, rtol=0)


@pytest.mark.server
@pytest.mark.parametrize("protocol,shared_memory", [("grpc", False), ("http", True)],
                         ids=["grpc", "http-shared-memory"])
def test_sync_client_fails_over_when_a_replica_is_killed_and_readmits_it(protocol, shared_memory, replicas, items,
                                                                          expected):
    """With shared memory, the restarted replica must get the client's regions registered again."""
    ensure_running(replicas)
    model = schema.ITEM_ENCODER_PIXELS if shared_memory else ENCODER
    victim, survivor = replicas
    results: dict[int, EncodedItems] = {}
    errors: list[BaseException] = []
    next_call = iter(range(LOAD_REQUESTS))
    lock = threading.Lock()
    answered = threading.Semaphore(0)

    with MMRecClient(urls_of(replicas, protocol), protocol, health_interval_s=HEALTH_S,
                     local_preprocessing=shared_memory, shared_memory=shared_memory) as client:
        def worker() -> None:
            while True:
                with lock:
                    n = next(next_call, None)
                if n is None:
                    return
                try:
                    results[n] = client.encode_items(items[call_rows(n)])
                except BaseException as exc:  # noqa: BLE001 - collected and reported below
                    errors.append(exc)
                answered.release()

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(LOAD_WORKERS)]
        for thread in threads:
            thread.start()
        for _ in range(KILL_AFTER):
            assert answered.acquire(timeout=DEADLINE_S)
        # both replicas take load (a replica restarted by the previous case may still be warming
        # up its first batches when the first KILL_AFTER answers come from the other)
        wait_until(lambda: victim.successes(model) > 0, "the victim serves before it is killed")
        victim.kill()
        for thread in threads:
            thread.join(DEADLINE_S)
        assert not any(t.is_alive() for t in threads)

        assert errors == [], f"{len(errors)} calls failed, first: {errors[0]!r}"
        assert sorted(results) == list(range(LOAD_REQUESTS))
        for n, encoded in results.items():
            assert_matches(encoded, expected, call_rows(n))
        wait_until(lambda: not healthy(client, victim.url(protocol)), "the killed replica is ejected")

        victim.start()
        victim.wait_ready()
        wait_until(lambda: healthy(client, victim.url(protocol)), "the restarted replica is re-admitted")
        for n in range(8):
            assert_matches(client.encode_items(items[call_rows(n)]), expected, call_rows(n))
        assert victim.successes(model) > 0  # a new process: it counts only requests since the restart
    assert survivor.running()


@pytest.mark.server
def test_async_client_fails_over_when_a_replica_is_killed_and_readmits_it(replicas, items, expected):
    ensure_running(replicas)
    survivor, victim = replicas

    async def load(client: AsyncMMRecClient) -> tuple[dict[int, EncodedItems], list[BaseException]]:
        results: dict[int, EncodedItems] = {}
        errors: list[BaseException] = []
        next_call = iter(range(LOAD_REQUESTS))
        killed = asyncio.Event()

        async def worker() -> None:
            for n in next_call:  # one shared iterator: each call is taken once
                try:
                    results[n] = await client.encode_items(items[call_rows(n)])
                except Exception as exc:  # noqa: BLE001 - collected and reported below
                    errors.append(exc)
                if len(results) + len(errors) >= KILL_AFTER and not killed.is_set():
                    killed.set()
                    assert victim.successes() > 0
                    await asyncio.to_thread(victim.kill)

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(LOAD_WORKERS))), DEADLINE_S)
        return results, errors

    async def scenario() -> None:
        async with AsyncMMRecClient(urls_of(replicas), health_interval_s=HEALTH_S) as client:
            results, errors = await load(client)
            assert errors == [], f"{len(errors)} calls failed, first: {errors[0]!r}"
            assert sorted(results) == list(range(LOAD_REQUESTS))
            for n, encoded in results.items():
                assert_matches(encoded, expected, call_rows(n))
            await await_until(lambda: not healthy(client, victim.url()), "the killed replica is ejected")

            await asyncio.to_thread(lambda: (victim.start(), victim.wait_ready()))
            await await_until(lambda: healthy(client, victim.url()), "the restarted replica is re-admitted")
            for n in range(8):
                assert_matches(await client.encode_items(items[call_rows(n)]), expected, call_rows(n))
            assert victim.successes() > 0

    asyncio.run(scenario())
    assert survivor.running()


@pytest.mark.server
def test_all_replicas_down_fails_promptly_naming_every_url(replicas, items):
    """Last in this module: it leaves both replicas dead."""
    ensure_running(replicas)
    urls = urls_of(replicas)

    def fails_promptly_naming_every_url(caught: pytest.ExceptionInfo, started: float) -> None:
        assert time.perf_counter() - started < 5
        assert all(url in str(caught.value) for url in urls), caught.value

    async def scenario() -> None:
        # One event loop for the async client's whole life (grpc.aio binds its calls to the
        # loop that made the channel); the sync calls block it briefly, as a mixed service would.
        async with AsyncMMRecClient(urls, retries=2, backoff_s=0.05, health_interval_s=HEALTH_S) as async_client:
            with MMRecClient(urls, retries=2, backoff_s=0.05, health_interval_s=HEALTH_S) as sync_client:
                sync_client.encode_items(items[:2])
                await async_client.encode_items(items[:2])
                for replica in replicas:
                    replica.kill()
                started = time.perf_counter()
                with pytest.raises(ServerUnavailableError) as caught:
                    sync_client.encode_items(items[:4])
                fails_promptly_naming_every_url(caught, started)
                started = time.perf_counter()
                with pytest.raises(ServerUnavailableError) as caught:
                    await async_client.encode_items(items[:4])
                fails_promptly_naming_every_url(caught, started)

    asyncio.run(scenario())

    async def connect_async() -> None:
        async with AsyncMMRecClient(urls, retries=1, backoff_s=0.01):
            pass

    def connect_sync() -> None:
        with MMRecClient(urls, retries=1, backoff_s=0.01):
            pass

    for connect in (connect_sync, lambda: asyncio.run(connect_async())):  # new clients cannot connect
        started = time.perf_counter()
        with pytest.raises(ServerUnavailableError, match="none of the 2 endpoints is ready") as caught:
            connect()
        assert time.perf_counter() - started < 5
        assert all(url in str(caught.value) for url in urls)
