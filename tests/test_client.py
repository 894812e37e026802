"""mmrec.client against the real tritonserver: sync + asyncio, gRPC + HTTP, vs the reference."""
from __future__ import annotations

import asyncio
import json
import re
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException
from typer.testing import CliRunner

from mmrec import schema
from mmrec.client import (AsyncMMRecClient, EncodedItems, InvalidItemError, InvalidRequestError, Item,
                          MMRecClient, ModelNames, ModelNotReadyError, RankedItem, RequestTimeoutError,
                          ServerUnavailableError)
from mmrec.client._plan import bisect_bad_item
from mmrec.client._requests import InferRequest
from mmrec.client._retry import RetryPolicy
from mmrec.reference import user_vector as reference_user_vector
from mmrec.server import free_port

pytestmark = pytest.mark.server

ATOL = 1e-4
NUM_ITEMS = 40
SMALL_BATCH = 16  # < NUM_ITEMS, so every call below spans several concurrent requests
BAD_INDEX = 21
VARIANTS = [("sync", "grpc"), ("sync", "http"), ("async", "grpc"), ("async", "http")]
FAST_FAIL = dict(retries=1, backoff_s=0.01)


# ---- one test body for the sync and asyncio clients ---------------------------------------------

class AsyncDriver:
    """Drives an AsyncMMRecClient on a private event loop so a test body can call it like MMRecClient."""

    def __init__(self, client: AsyncMMRecClient) -> None:
        self.client = client
        self.loop = asyncio.new_event_loop()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if asyncio.iscoroutinefunction(attr):
            return lambda *a, **k: self.loop.run_until_complete(attr(*a, **k))
        return attr

    def __enter__(self) -> "AsyncDriver":
        try:
            self.loop.run_until_complete(self.client.__aenter__())
        except BaseException:
            self.loop.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.loop.run_until_complete(self.client.__aexit__(*exc))
        finally:
            self.loop.close()


@contextmanager
def connected(mode: str, url: str, protocol: str, **kwargs: Any) -> Iterator[Any]:
    """A connected MMRecClient, or an AsyncMMRecClient behind AsyncDriver."""
    if mode == "sync":
        with MMRecClient(url, protocol, **kwargs) as client:
            yield client
    else:
        with AsyncDriver(AsyncMMRecClient(url, protocol, **kwargs)) as client:
            yield client


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def urls(triton_server) -> dict[str, str]:
    return triton_server.urls


@pytest.fixture(scope="module")
def items(sample_items) -> list[Item]:
    return [Item(caption, png, f"item-{i}") for i, (caption, png, _) in enumerate(sample_items[:NUM_ITEMS])]


@pytest.fixture(scope="module")
def expected(reference, items) -> dict[str, np.ndarray]:
    return reference.encode_items([i.text for i in items], [i.image for i in items])


@pytest.fixture(scope="module")
def user(expected) -> np.ndarray:
    """A user who engaged with the first six items."""
    return reference_user_vector(expected[schema.ITEM_EMBEDDING][:6])


def assert_matches_reference(encoded: EncodedItems, expected: dict[str, np.ndarray]) -> None:
    np.testing.assert_allclose(encoded.item_embedding, expected[schema.ITEM_EMBEDDING], atol=ATOL, rtol=0)
    np.testing.assert_allclose(encoded.interest_probs, expected[schema.INTEREST_PROBS], atol=ATOL, rtol=0)
    np.testing.assert_allclose(encoded.alignment, expected[schema.ALIGNMENT].reshape(-1), atol=ATOL, rtol=0)


def assert_same_ranking(ranked: list[RankedItem], reference_scores: np.ndarray, k: int) -> None:
    """Same order as the reference; only candidates whose scores tie within ATOL may swap."""
    order = np.argsort(-reference_scores, kind="stable")[:k]
    got = [r.index for r in ranked]
    assert len(got) == len(order)
    if got != order.tolist():
        np.testing.assert_allclose(reference_scores[got], reference_scores[order], atol=ATOL, rtol=0)
    assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)


# ---- every public call, sync and async, gRPC and HTTP ------------------------------------------

@pytest.mark.parametrize("mode,protocol", VARIANTS)
def test_connect_reads_categories_batch_size_and_limits_from_the_server(mode, protocol, urls, reference):
    with connected(mode, urls[protocol], protocol) as client:
        info = client.server_info
    assert info.categories == reference.categories and len(info.categories) > 1
    assert info.max_batch_size == reference.preprocess.max_batch_size
    assert info.item_dim == schema.ITEM_EMBEDDING_DIM
    assert info.limits.max_text_bytes == reference.preprocess.max_text_bytes
    assert info.limits.max_image_bytes == reference.preprocess.max_image_bytes
    assert info.preprocess.image_parameters() == reference.preprocess.image_parameters()


@pytest.mark.parametrize("local", [False, True], ids=["server-preprocessing", "local-preprocessing"])
@pytest.mark.parametrize("mode,protocol", VARIANTS)
def test_encode_items_matches_reference_across_batches(mode, protocol, local, urls, items, expected):
    with connected(mode, urls[protocol], protocol, max_batch_size=SMALL_BATCH, local_preprocessing=local) as c:
        encoded = c.encode_items(items)
    assert len(encoded) == NUM_ITEMS and encoded.item_ids == tuple(i.item_id for i in items)
    assert_matches_reference(encoded, expected)
    top = encoded.top_interests(2)
    assert [t[0][0] for t in top] == [c.categories[j] for j in expected[schema.INTEREST_PROBS].argmax(1)]
    assert all(t[0][1] >= t[1][1] for t in top)


@pytest.mark.parametrize("mode,protocol", VARIANTS)
def test_user_vector_score_and_rank_match_reference(mode, protocol, urls, items, expected, user, reference):
    embeddings = expected[schema.ITEM_EMBEDDING]
    reference_scores = reference.score(embeddings, user).reshape(-1)
    with connected(mode, urls[protocol], protocol, max_batch_size=SMALL_BATCH) as client:
        from_items = client.user_vector(items[:6])
        from_array = client.user_vector(embeddings[:6])
        item_scores = client.score(user, items)
        embedding_scores = client.score(user, embeddings)
        ranked = client.rank(user, items, k=5)
        ranked_embeddings = client.rank(user, embeddings, k=None)
    np.testing.assert_allclose(from_items, user, atol=ATOL, rtol=0)
    np.testing.assert_allclose(from_array, user, atol=1e-6, rtol=0)
    assert item_scores.shape == embedding_scores.shape == (NUM_ITEMS,)
    np.testing.assert_allclose(item_scores, reference_scores, atol=ATOL, rtol=0)
    np.testing.assert_allclose(embedding_scores, reference_scores, atol=ATOL, rtol=0)
    assert_same_ranking(ranked, reference_scores, 5)
    assert all(r.item_id == items[r.index].item_id for r in ranked)
    assert_same_ranking(ranked_embeddings, reference_scores, NUM_ITEMS)
    assert all(r.item_id is None for r in ranked_embeddings)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_local_preprocessing_equals_server_preprocessing(protocol, urls, items, user):
    with MMRecClient(urls[protocol], protocol) as server_side, \
            MMRecClient(urls[protocol], protocol, local_preprocessing=True) as local:
        a, b = server_side.encode_items(items[:12]), local.encode_items(items[:12])
        scores_a, scores_b = server_side.score(user, items[:12]), local.score(user, items[:12])
    np.testing.assert_allclose(a.item_embedding, b.item_embedding, atol=ATOL, rtol=0)
    np.testing.assert_allclose(a.interest_probs, b.interest_probs, atol=ATOL, rtol=0)
    np.testing.assert_allclose(a.alignment, b.alignment, atol=ATOL, rtol=0)
    np.testing.assert_allclose(scores_a, scores_b, atol=ATOL, rtol=0)


def test_rank_keeps_candidate_order_on_ties(urls, expected, user):
    duplicated = np.repeat(expected[schema.ITEM_EMBEDDING][:3], 3, axis=0)  # scores tie in threes
    with MMRecClient(urls["grpc"]) as client:
        ranked = client.rank(user, duplicated, k=None)
    for group in range(3):
        tied = [r.index for r in ranked[3 * group: 3 * group + 3]]
        assert tied == sorted(tied) and len({duplicated[i].tobytes() for i in tied}) == 1


def test_empty_inputs_need_no_request(urls, user):
    with MMRecClient(urls["grpc"]) as client:
        assert len(client.encode_items([])) == 0
        assert client.score(user, []).shape == (0,)
        assert client.rank(user, [], k=3) == []


# ---- batching, shared memory, options -------------------------------------------------------------

def _spy_infer(client: MMRecClient) -> list:
    """Record every request the client's transport sends."""
    sent: list = []
    real = client._transport.infer

    def infer(request, options, regions=None):
        sent.append((request, options))
        return real(request, options, regions)

    client._transport.infer = infer
    return sent


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_long_lists_are_split_at_max_batch_size_and_sent_concurrently(protocol, urls, items, expected):
    with MMRecClient(urls[protocol], protocol, max_batch_size=SMALL_BATCH, concurrency=3) as client:
        sent = _spy_infer(client)
        encoded = client.encode_items(items, request_id="job")
    sizes = sorted((r.offset, len(r)) for r, _ in sent)
    assert sizes == [(0, 16), (16, 16), (32, 8)]
    assert sorted(o.request_id for _, o in sent) == ["job:0", "job:1", "job:2"]
    assert_matches_reference(encoded, expected)  # reassembled in item order


def test_server_batch_limit_is_used_without_override(urls, items, reference):
    with MMRecClient(urls["grpc"]) as client:
        sent = _spy_infer(client)
        client.encode_items(items)
    limit = reference.preprocess.max_batch_size
    assert max(len(r) for r, _ in sent) == min(limit, NUM_ITEMS)
    assert len(sent) == -(-NUM_ITEMS // limit)


def _client_regions() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("mmrec_client_")}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_shared_memory_pixels_match_and_are_cleaned_up(protocol, urls, items, expected):
    before = _client_regions()
    with MMRecClient(urls[protocol], protocol, local_preprocessing=True, shared_memory=True,
                     max_batch_size=SMALL_BATCH) as client:
        encoded = client.encode_items(items)
        names = set(client._regions.names)
        status = client._transport.client().get_system_shared_memory_status()
        registered = json.dumps(status if isinstance(status, list) else str(status))
        assert names and names <= _client_regions() - before
        assert all(name in registered for name in names)
    assert_matches_reference(encoded, expected)
    assert not (_client_regions() - before), "shared memory regions left behind after close()"


def test_tritonclient_options_pass_through_on_every_request(urls, items):
    with MMRecClient(urls["grpc"], headers={"authorization": "Bearer t0ken"}, max_batch_size=8) as client:
        tc = client._transport.client()
        calls: list[dict] = []
        real = tc.async_infer
        tc.async_infer = lambda *a, **k: calls.append(k) or real(*a, **k)
        client.encode_items(items[:10], request_id="r", priority=1, timeout=30_000_000, client_timeout=20.0,
                            headers={"x-trace": "abc"})
    assert len(calls) == 2
    for call in calls:
        assert call["headers"] == {"authorization": "Bearer t0ken", "x-trace": "abc"}
        assert call["priority"] == 1 and call["timeout"] == 30_000_000
        # client_timeout is a local wait: a gRPC deadline would cancel (crashes Triton < 2.53)
        assert "client_timeout" not in call
    assert sorted(c["request_id"] for c in calls) == ["r:0", "r:1"]


def test_http_client_timeout_is_per_client_as_in_tritonclient(urls, items):
    with MMRecClient(urls["http"], "http", client_timeout=30.0) as client:
        sent = _spy_infer(client)
        with pytest.raises(ValueError, match="constructor"):
            client.encode_items(items[:1], client_timeout=5.0)
    assert sent == []


def test_tls_settings_reach_tritonclient(monkeypatch):
    import tritonclient.grpc
    import tritonclient.http

    made: dict[str, dict] = {}

    def recorder(protocol):
        class Recorder:
            def __init__(self, url, **kwargs):
                made[protocol] = dict(url=url, **kwargs)
        return Recorder

    monkeypatch.setattr(tritonclient.grpc, "InferenceServerClient", recorder("grpc"))
    monkeypatch.setattr(tritonclient.http, "InferenceServerClient", recorder("http"))
    MMRecClient("tls.example:8001", ssl=True, root_certificates="ca.pem", private_key="k.pem",
                certificate_chain="c.pem")._transport.client()
    MMRecClient("tls.example:8000", "http", ssl=True, root_certificates="ca.pem",
                client_timeout=7.0)._transport.client()
    assert made["grpc"]["ssl"] is True and made["grpc"]["root_certificates"] == "ca.pem"
    assert made["grpc"]["private_key"] == "k.pem" and made["grpc"]["certificate_chain"] == "c.pem"
    assert made["http"]["ssl"] is True and made["http"]["ssl_options"] == {"ca_certs": "ca.pem"}
    assert made["http"]["network_timeout"] == 7.0


def test_client_timeout_raises_request_timeout_error(urls, items):
    with MMRecClient(urls["grpc"], **FAST_FAIL) as client:
        with pytest.raises(RequestTimeoutError) as caught:
            client.encode_items(items[:16], client_timeout=1e-4)
    assert isinstance(caught.value.__cause__, InferenceServerException)


# ---- error paths ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,protocol", VARIANTS)
def test_server_down_fails_fast_naming_url_and_fix(mode, protocol):
    url = f"127.0.0.1:{free_port()}"
    started = time.perf_counter()
    with pytest.raises(ServerUnavailableError) as caught:
        with connected(mode, url, protocol, **FAST_FAIL):
            pass
    assert time.perf_counter() - started < 5
    assert url in str(caught.value) and "mmrec serve --repository" in str(caught.value)
    assert caught.value.__cause__ is not None


@pytest.mark.parametrize("mode,protocol", VARIANTS)
def test_missing_model_is_model_not_ready(mode, protocol, urls):
    with pytest.raises(ModelNotReadyError, match="no_such_model"):
        with connected(mode, urls[protocol], protocol, models=ModelNames(item_encoder="no_such_model")):
            pass


def _invalid_cases(tmp_path: Path, items: list[Item], limits) -> list[tuple[str, list[Item], str]]:
    good = items[:2]

    def third(item: Item) -> list[Item]:
        return good + [item]

    png = items[0].image
    return [
        ("empty text", third(Item("", png)), "empty"),
        ("whitespace text", third(Item(" \n\t", png)), "whitespace"),
        ("text over limit", third(Item("x" * (limits.max_text_bytes + 1), png)), "over the server's limit"),
        ("missing image", third(Item("ok", tmp_path / "missing.png")), "does not exist"),
        ("unreadable image", third(Item("ok", tmp_path)), "cannot be read"),
        ("empty image", third(Item("ok", b"")), "empty (0 bytes)"),
        ("image over limit", third(Item("ok", b"\0" * (limits.max_image_bytes + 1))), "over the server's limit"),
    ]


def test_client_side_validation_happens_before_any_request(urls, items, user, tmp_path):
    with MMRecClient(urls["grpc"]) as client:
        sent = _spy_infer(client)
        for name, bad_items, message in _invalid_cases(tmp_path, items, client.server_info.limits):
            for call in (lambda: client.encode_items(bad_items), lambda: client.score(user, bad_items),
                         lambda: client.rank(user, bad_items), lambda: client.user_vector(bad_items)):
                with pytest.raises(InvalidItemError, match=re.escape(message)) as caught:
                    call()
                assert caught.value.index == 2, name
        for bad_user in (np.zeros(5, np.float32), np.full(schema.ITEM_EMBEDDING_DIM, np.nan, np.float32)):
            with pytest.raises(InvalidItemError, match="user embedding"):
                client.score(bad_user, items[:2])
        with pytest.raises(InvalidItemError, match=r"\[N, 256\]"):
            client.score(user, np.zeros((3, 7), np.float32))
        with pytest.raises(InvalidItemError, match="empty"):
            client.user_vector([])
    assert sent == [], "validation errors must be raised before any inference request"


def test_async_client_validates_before_any_request(urls, items, tmp_path):
    with connected("async", urls["http"], "http") as client:
        with pytest.raises(InvalidItemError, match="does not exist") as caught:
            client.encode_items(items[:4] + [Item("ok", tmp_path / "missing.png")])
    assert caught.value.index == 4


@pytest.mark.parametrize("mode,protocol", VARIANTS)
def test_server_rejection_names_the_bad_item_with_the_server_message(mode, protocol, urls, items):
    batch = list(items[:30])
    batch[BAD_INDEX] = Item("a corrupt picture", b"not an image")  # non-empty: only the server can tell
    with connected(mode, urls[protocol], protocol, max_batch_size=8) as client:
        with pytest.raises(InvalidRequestError) as caught:
            client.encode_items(batch)
    error = caught.value
    assert error.index == BAD_INDEX and f"item {BAD_INDEX}" in str(error)
    assert "not a decodable JPEG/PNG/WebP image" in error.server_message
    assert isinstance(error.__cause__, InferenceServerException)


def test_server_rejection_is_not_retried(urls, items):
    batch = list(items[:8])
    batch[5] = Item("a corrupt picture", b"not an image")
    with MMRecClient(urls["grpc"], max_batch_size=8, retries=3) as client:
        sent = _spy_infer(client)
        with pytest.raises(InvalidRequestError) as caught:
            client.encode_items(batch)
    assert caught.value.index == 5
    # the batch once, then bisection probes (at most two per halving), never a resend of the same rows
    spans = [(r.offset, len(r)) for r, _ in sent]
    assert len(spans) == len(set(spans)) and len(spans) <= 1 + 2 * 3


def test_local_preprocessing_reports_bad_image_index(urls, items):
    batch = list(items[:30])
    batch[BAD_INDEX] = Item("a corrupt picture", b"not an image")
    with MMRecClient(urls["http"], "http", local_preprocessing=True, max_batch_size=8) as client:
        with pytest.raises(InvalidItemError, match="not a decodable") as caught:
            client.encode_items(batch)
    assert caught.value.index == BAD_INDEX


def test_retry_policy_retries_unavailable_only():
    def failing(status: str, times: int):
        calls = []

        def fn():
            calls.append(1)
            if len(calls) <= times:
                raise InferenceServerException("boom", status=status)
            return "ok"
        return fn, calls

    sleeps: list[float] = []
    policy = RetryPolicy(retries=3, backoff_s=0.2)
    fn, calls = failing("StatusCode.UNAVAILABLE", 2)
    assert policy.call(fn, sleep=sleeps.append) == "ok" and len(calls) == 3 and sleeps == [0.2, 0.4]
    fn, calls = failing("StatusCode.INVALID_ARGUMENT", 1)
    with pytest.raises(InferenceServerException):
        policy.call(fn, sleep=sleeps.append)
    assert len(calls) == 1
    fn, calls = failing("StatusCode.UNAVAILABLE", 10)
    with pytest.raises(InferenceServerException):
        policy.call(fn, sleep=lambda _: None)
    assert len(calls) == 4

    refused = []

    def refuse():
        refused.append(1)
        raise ConnectionRefusedError("refused")
    with pytest.raises(ConnectionRefusedError):
        RetryPolicy(retries=2, backoff_s=0).call(refuse, sleep=lambda _: None)
    assert len(refused) == 3


@pytest.mark.parametrize("bad", [0, 5, 12, 15, None])
def test_bisection_finds_the_first_bad_item(bad):
    request = InferRequest("m", {"x": np.arange(16)[:, None]}, ("y",), offset=100)
    probes = bisect_bad_item(request)
    try:
        probe = next(probes)
        while True:
            rows = set(probe.inputs["x"][:, 0].tolist())
            probe = probes.send(bad is not None and bad in rows)
    except StopIteration as done:
        assert done.value == (None if bad is None else 100 + bad)


# ---- CLI ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def item_files(tmp_path_factory, sample_items) -> tuple[Path, Path]:
    """Real images on disk and two JSON-lines files: candidates and a user's history."""
    folder = tmp_path_factory.mktemp("cli-items")
    lines = []
    for i, (caption, png, _) in enumerate(sample_items[:12]):
        (folder / f"{i}.png").write_bytes(png)
        lines.append(json.dumps({"text": caption, "image": f"{i}.png", "id": f"item-{i}"}))
    (folder / "candidates.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "history.jsonl").write_text("\n".join(lines[:6]) + "\n")
    return folder / "candidates.jsonl", folder / "history.jsonl"


@pytest.fixture(scope="module")
def cli():
    from mmrec.cli import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def _jsonl(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def test_cli_encode_matches_reference_and_saves_embeddings(cli, item_files, urls, expected, tmp_path):
    candidates, _ = item_files
    saved = tmp_path / "emb.npy"
    result = cli("encode", "--items", candidates, "--url", urls["grpc"], "--format", "jsonl", "--save", saved)
    assert result.exit_code == 0, result.output
    rows = _jsonl(result.stdout)
    assert [r["id"] for r in rows] == [f"item-{i}" for i in range(12)]
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), expected[schema.ITEM_EMBEDDING][:12],
                               atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.load(saved), expected[schema.ITEM_EMBEDDING][:12], atol=ATOL, rtol=0)
    table = cli("encode", "--text", "A cat.", "--image", candidates.parent / "0.png", "--url", urls["http"],
                "--protocol", "http", "--format", "table")
    assert table.exit_code == 0 and "alignment" in table.stdout


def test_cli_score_ranks_like_reference(cli, item_files, urls, expected, reference, tmp_path):
    candidates, history = item_files
    embeddings = expected[schema.ITEM_EMBEDDING][:12]
    reference_scores = reference.score(embeddings, reference_user_vector(embeddings[:6])).reshape(-1)
    result = cli("score", "--items", candidates, "--history", history, "--k", 4, "--url", urls["http"],
                 "--protocol", "http", "--format", "jsonl")
    assert result.exit_code == 0, result.output
    rows = _jsonl(result.stdout)
    ranked = [RankedItem(r["index"], r["id"], r["score"]) for r in rows]
    assert_same_ranking(ranked, reference_scores, 4)
    np.testing.assert_allclose([r.score for r in ranked], reference_scores[[r.index for r in ranked]], atol=ATOL)

    vector = tmp_path / "user.npy"
    np.save(vector, embeddings[:6])  # [N, D] history embeddings: the CLI averages them
    again = cli("score", "--items", candidates, "--user-vector", vector, "--k", 4, "--url", urls["grpc"],
                "--format", "jsonl")
    assert again.exit_code == 0, again.output
    assert [r["index"] for r in _jsonl(again.stdout)] == [r.index for r in ranked]
    table = cli("score", "--items", candidates, "--user-vector", vector, "--url", urls["grpc"], "--format", "table")
    assert table.exit_code == 0 and "score" in table.stdout


def test_cli_errors_are_one_line_with_exit_codes(cli, item_files, urls, tmp_path):
    candidates, history = item_files
    image = candidates.parent / "0.png"
    cases = [
        (("score", "--items", candidates, "--url", urls["grpc"]), 2, "--history"),
        (("score", "--text", "a", "--text", "b", "--image", image, "--history", history, "--url", urls["grpc"]),
         2, "pairs"),
        (("encode", "--text", "a cat", "--image", tmp_path / "nope.png", "--url", urls["grpc"]), 2,
         "does not exist"),
        (("encode", "--items", tmp_path / "missing.jsonl", "--url", urls["grpc"]), 2, "cannot read"),
        (("encode", "--text", "a cat", "--image", image, "--url", f"127.0.0.1:{free_port()}"), 3,
         "mmrec serve"),
    ]
    for args, code, message in cases:
        result = cli(*args)
        assert result.exit_code == code, (args, result.output)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_client_timeouts_never_cancel_requests_so_the_server_survives(triton_server, urls, items, reference):
    """Regression: a gRPC deadline cancels the request server-side, and cancellation crashes
    tritonserver 2.51 with SIGSEGV (Triton server#7368; reproduced here within 10 requests).
    Our client waits locally instead, so 30 timed-out calls leave the server serving."""
    batch = list(items[:8])
    with MMRecClient(urls["grpc"], retries=0) as client:
        for _ in range(30):
            with pytest.raises(RequestTimeoutError):
                client.encode_items(batch, client_timeout=0.002)

    async def async_timeouts() -> None:
        async with AsyncMMRecClient(urls["grpc"], retries=0) as client:
            for _ in range(10):
                with pytest.raises(RequestTimeoutError):
                    await client.encode_items(batch, client_timeout=0.002)

    asyncio.run(async_timeouts())
    assert triton_server.is_running(), triton_server.log_tail()
    with MMRecClient(urls["grpc"]) as client:
        got = client.encode_items(batch[:2])
    want = reference.encode_items([i.text for i in batch[:2]], [i.encoded_image() for i in batch[:2]])
    np.testing.assert_allclose(got.item_embedding, want[schema.ITEM_EMBEDDING], atol=1e-4)
