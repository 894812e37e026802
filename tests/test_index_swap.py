"""A catalog index published to several replicas and swapped live (issue 23).

Two real tritonservers on 127.0.0.1 serve ONE repository directory, as replicas of a Deployment
serve copies of one bucket: explicit model control with an admin key (the chart's setup), each
on its own ports. `mmrec index build --url A --url B` (the real CLI, MMREC_ADMIN_KEY set)
publishes version 1 and loads it on both; then three client threads query both replicas nonstop
while the same command publishes version 2 (four items removed, four added). Every answer must
be the exact full-catalog ranking of version 1 or of version 2 (the id sets tell which), none may
fail, some must arrive during the swap, and afterwards both replicas answer from version 2.

Then the failure path (its own versions, so it runs alone too): a replica that cannot load stops
the rollout with exit 3 and a report of who serves what, `mmrec index load` finishes it, and
`mmrec index rollback` serves an older catalog again as a new version. A rollout over a headless
name resolves it again at the end: a pod that appeared is loaded, one that left is "gone" (the
resolver is injected: DNS is not Triton; the servers are real). The replicas use a non-default
admin header (MMREC_ADMIN_HEADER on both sides). A TLS server is refused with a clear message.
Unit tests cover rollback on disk, replica resolution and a stale local copy.
"""
from __future__ import annotations

import itertools
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from typer.testing import CliRunner

from mmrec import schema
from mmrec.index_publish import (MAX_RESOLVES, PublishError, ReplicaSet, _install_version, check_not_behind,
                                 model_dir, publish, replica_urls, republish, resolve_replicas, roll_out,
                                 served_versions, versions)
from mmrec.index_store import IndexStore, default_build_dir
from mmrec.server import ADMIN_HEADER, ADMIN_HEADER_ENV, ADMIN_KEY_ENV, ServerConfig, ServerError
from mmrec.tls_probe import answers_tls
from test_index import D, HashEncoder, entries, exact_top_k, linked_copy

ADMIN_KEY = "swap-test-key"
ADMIN_HEADER_NAME = "x-swap-admin"  # not the default: the client must read MMREC_ADMIN_HEADER
V1_ITEMS, CHURN = 20, 4  # version 1: items [0, 20); version 2: items [4, 24)


# ---- unit: rollback on disk, replica addresses ----------------------------------------------------------

@pytest.fixture
def repository(tmp_path) -> Path:
    from mmrec.preprocess import ServedContract

    folder = tmp_path / "repository"
    folder.mkdir()
    ServedContract(item_dim=D, max_batch_size=8).save(folder)
    return folder


def _build(store: IndexStore, count: int) -> None:
    from mmrec.index_build import build

    build(store, entries(count), HashEncoder(), sync=True)


def test_rollback_copies_an_older_version_as_the_next_one(repository, tmp_path):
    with IndexStore.open(tmp_path / "ix", D) as store:
        _build(store, 10)
        first = publish(store, repository)
        _build(store, 12)
        second = publish(store, repository)
        files = {p.name: p.read_bytes() for p in first.folder.iterdir()}
        rolled, source = republish(repository)
        assert (source, rolled.version, versions(repository)) == (1, 3, [2, 3])  # --keep 2 pruned version 1
        assert rolled.fingerprint == first.fingerprint != second.fingerprint and rolled.items == 10
        assert {p.name: p.read_bytes() for p in rolled.folder.iterdir()} == files  # version 1, byte for byte
        # the catalog of version 2 is not "unchanged" any more: publishing it again serves it again
        again = publish(store, repository)
        assert (again.version, again.unchanged, again.fingerprint) == (4, False, second.fingerprint)
        forward, source = republish(repository, 3, keep=3)
        assert (forward.version, source, versions(repository)) == (5, 3, [3, 4, 5])
    assert not [p for p in (repository / schema.CATALOG_SCORER).iterdir() if p.name.startswith(".")]


def test_rollback_refuses_what_it_cannot_do(repository, tmp_path):
    with pytest.raises(PublishError, match="nothing older to roll back"):
        republish(repository)
    with IndexStore.open(tmp_path / "ix", D) as store:
        _build(store, 5)
        publish(store, repository)
    with pytest.raises(PublishError, match="nothing older"):
        republish(repository)
    with pytest.raises(PublishError, match=r"no version 7 on disk \(it holds \[1\]\)"):
        republish(repository, 7)


def test_replica_addresses_resolve_each_once_in_order():
    port = 8001
    assert resolve_replicas(f"localhost:{port}") == [f"127.0.0.1:{port}"]  # IPv4 only, even if ::1 resolves too
    assert resolve_replicas(f"[::1]:{port}") == [f"[::1]:{port}"]
    assert replica_urls(["b:1", "a:1", "b:1"], [f"127.0.0.1:{port}"]) == ["b:1", "a:1", f"127.0.0.1:{port}"]
    for bad in ("no-port", "host:", ":8001", "host:http"):
        with pytest.raises(PublishError, match="is not NAME:PORT"):
            resolve_replicas(bad)
    with pytest.raises(PublishError, match="does not resolve .* inside the cluster"):
        resolve_replicas("no-such-replica.invalid:8001")


def test_names_are_resolved_until_two_resolutions_agree():
    calls = itertools.count()
    moving = ReplicaSet(names=("svc:1",), resolve=lambda name: [f"10.0.0.{next(calls)}:1"], pause_s=0)
    with pytest.raises(PublishError, match="still scaling"):
        moving.settled()
    assert next(calls) == MAX_RESOLVES
    answers = iter([["10.0.0.1:1"], ["10.0.0.1:1", "10.0.0.2:1"], ["10.0.0.2:1", "10.0.0.1:1"]])
    growing = ReplicaSet(urls=("fixed:1",), names=("svc:1",), resolve=lambda name: next(answers), pause_s=0)
    assert sorted(growing.settled()) == ["10.0.0.1:1", "10.0.0.2:1"]  # the 2nd and 3rd agree (any order)
    steady = ReplicaSet(urls=("fixed:1",), names=("svc:1",), resolve=lambda name: ["10.0.0.1:1"])
    assert [steady.left(u) for u in ("10.0.0.9:1", "10.0.0.1:1", "fixed:1")] == [True, False, False]


def test_a_version_folder_already_there_means_a_stale_copy(repository, tmp_path):
    with IndexStore.open(tmp_path / "ix", D) as store:
        _build(store, 5)
        first = publish(store, repository)
    with pytest.raises(PublishError, match="the local copy is stale: sync it down first"):  # the bucket (another publisher) is ahead
        _install_version(model_dir(repository), first.version, lambda staging: (staging / "x").write_text("x"))
    assert not [p for p in model_dir(repository).iterdir() if p.name.startswith(".")]  # staging cleaned up


def test_the_admin_header_comes_from_one_variable(monkeypatch, tmp_path):
    config = ServerConfig(repository=tmp_path, host="0.0.0.0", admin_key="k")
    assert f"--grpc-restricted-protocol=model-repository:{ADMIN_HEADER}=k" in config.restricted_api_args()
    monkeypatch.setenv(ADMIN_HEADER_ENV, ADMIN_HEADER_NAME)
    assert f"--grpc-restricted-protocol=model-repository:{ADMIN_HEADER_NAME}=k" in config.restricted_api_args()
    monkeypatch.setenv(ADMIN_HEADER_ENV, "Bad Header")
    with pytest.raises(ServerError, match="is not a header name"):
        config.restricted_api_args()


def test_the_cli_rejects_bad_replica_arguments(tmp_path):
    from mmrec.cli import app

    done = CliRunner().invoke(app, ["index", "load", "--repository", str(tmp_path), "--replicas", "no-port"])
    assert done.exit_code == 2 and "is not NAME:PORT" in done.output
    done = CliRunner().invoke(app, ["index", "load", "--repository", str(tmp_path), "--url", "127.0.0.1:1"])
    assert done.exit_code == 2 and "holds no catalog_scorer version" in " ".join(done.output.split())


# ---- integration: two replicas of one repository ----------------------------------------------------------

def _mmrec_index(*args: str, key: str | None = ADMIN_KEY, header: str | None = ADMIN_HEADER_NAME):
    """The real `mmrec index ...` entry point, in-process; key=None runs it without MMREC_ADMIN_KEY,
    header=None without MMREC_ADMIN_HEADER (the default header)."""
    from mmrec.cli import app

    return CliRunner().invoke(app, ["index", *args], env={ADMIN_KEY_ENV: key, ADMIN_HEADER_ENV: header})


def _dead_address() -> str:
    """A port nobody listens on: a replica that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _catalog_file(path: Path, items) -> Path:
    path.write_text("".join(json.dumps({"text": i.caption, "image": str(i.image_path), "id": i.item_id}) + "\n"
                            for i in items))
    return path


@pytest.fixture(scope="module")
def replicas(exported_repository, tmp_path_factory):
    """Two tritonservers on one repository directory (no index yet), explicit mode, admin key under a
    non-default header (MMREC_ADMIN_HEADER, as a chart with another triton.restrictedApis.header)."""
    import os

    from mmrec.server import TritonServer, free_ports

    root = tmp_path_factory.mktemp("replicas")
    repository = linked_copy(Path(exported_repository), root / "repository")
    for old in (repository / schema.CATALOG_SCORER, default_build_dir(repository)):  # the source's own index
        shutil.rmtree(old, ignore_errors=True)
    servers = []
    previous_header = os.environ.get(ADMIN_HEADER_ENV)
    os.environ[ADMIN_HEADER_ENV] = ADMIN_HEADER_NAME  # read when each server's command line is built
    try:
        for n in range(2):
            http, grpc, metrics = free_ports(3)
            config = ServerConfig(repository=repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                                  model_control="explicit", admin_key=ADMIN_KEY)
            server = TritonServer(config, log_path=root / f"replica{n}.log", ready_timeout_s=300)
            server.start()
            servers.append(server)
        _restore(ADMIN_HEADER_ENV, previous_header)
        for server in servers:
            server.wait_ready()
        yield repository, [s.urls["grpc"] for s in servers]
    finally:
        _restore(ADMIN_HEADER_ENV, previous_header)
        for server in servers:
            server.stop()


def _restore(name: str, value: str | None) -> None:
    import os

    os.environ.pop(name, None)
    if value is not None:
        os.environ[name] = value


@pytest.fixture(scope="module")
def catalogs(tmp_path_factory):
    from mmrec.export.data import load_items

    items = load_items()[:V1_ITEMS + CHURN]
    root = tmp_path_factory.mktemp("catalogs")
    return (_catalog_file(root / "v1.jsonl", items[:V1_ITEMS]), _catalog_file(root / "v2.jsonl", items[CHURN:]))


def _truth(repository: Path, users: np.ndarray) -> tuple[frozenset[str], list[list[str]]]:
    """A version's id set and, per user, its exact full-catalog ranking (numpy, float64)."""
    with IndexStore.open(default_build_dir(repository)) as store:
        ids, vectors = store.catalog()
    return frozenset(ids), [[ids[r] for r in exact_top_k(vectors, u, len(ids))[0]] for u in users]


def _ask(url: str, user: np.ndarray, k: int) -> tuple[str, list[str]]:
    """One catalog_scorer request straight to one replica: (answering version, ids)."""
    client = grpcclient.InferenceServerClient(url)
    try:
        inputs = [grpcclient.InferInput(schema.USER_EMBEDDING, [1, len(user)], "FP32"),
                  grpcclient.InferInput(schema.TOP_K, [1, 1], "INT32")]
        inputs[0].set_data_from_numpy(user[None, :].astype(np.float32))
        inputs[1].set_data_from_numpy(np.array([[k]], np.int32))
        result = client.infer(schema.CATALOG_SCORER, inputs)
        return result.get_response().model_version, [i.decode() for i in result.as_numpy(schema.ITEM_IDS)[0]]
    finally:
        client.close()


def _settled(url: str, version: int, timeout_s: float = 120.0) -> tuple[int, ...]:
    """The versions `url` serves once the retired one is gone (it goes after its last request)."""
    deadline = time.monotonic() + timeout_s
    while True:
        serves, _ = served_versions(url)
        if serves == (version,) or time.monotonic() > deadline:
            return serves
        time.sleep(0.2)


@pytest.mark.server
@pytest.mark.timeout(600)
def test_swap_on_two_replicas_under_load_fails_nothing(replicas, catalogs):
    from mmrec.client import MMRecClient

    repository, urls = replicas
    v1_file, v2_file = catalogs
    both = [a for u in urls for a in ("--url", u)]
    done = _mmrec_index("build", "--items", str(v1_file), "--repository", str(repository), *both)
    assert done.exit_code == 0, done.output
    assert [_settled(u, 1) for u in urls] == [(1,), (1,)]
    with IndexStore.open(default_build_dir(repository)) as store:
        _, vectors = store.catalog()
    rng = np.random.default_rng(23)
    users = np.stack([vectors[rng.choice(len(vectors), 3, replace=False)].mean(axis=0) for _ in range(8)])
    truth = {1: _truth(repository, users)}
    k = V1_ITEMS  # the whole catalog: the id set says which version answered

    answers: list[tuple[float, float, int, list[str]]] = []  # (sent at, answered at, user, ids)
    errors: list[str] = []
    endpoints = []
    stop, lock = threading.Event(), threading.Lock()

    def load(seed: int) -> None:
        local = np.random.default_rng(seed)
        with MMRecClient(",".join(urls), client_timeout=60) as client:  # both replicas, taking turns
            while not stop.is_set():
                u = int(local.integers(len(users)))
                sent = time.monotonic()
                try:
                    got = [h.item_id for h in client.recommend(users[u], k)]
                    with lock:
                        answers.append((sent, time.monotonic(), u, got))
                except Exception as err:  # every failure is a finding: recorded, asserted below
                    with lock:
                        errors.append(f"{type(err).__name__}: {err}")
            endpoints.append(client.endpoints)

    threads = [threading.Thread(target=load, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 120
        while len(answers) < 20 and not errors and time.monotonic() < deadline:  # load flowing before the swap
            time.sleep(0.1)
        swap_start = time.monotonic()
        done = _mmrec_index("build", "--items", str(v2_file), "--repository", str(repository), *both)
        swap_end = time.monotonic()
        assert done.exit_code == 0, done.output
        after = len(answers)
        while len(answers) < after + 20 and not errors and time.monotonic() < deadline + 60:
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    truth[2] = _truth(repository, users)

    def version_of(user: int, ids: list[str]) -> int | None:
        return next((v for v, (id_set, ranked) in truth.items() if set(ids) == id_set and ids == ranked[user]), None)

    judged = [(sent, at, version_of(u, ids)) for sent, at, u, ids in answers]
    during = [v for _, at, v in judged if swap_start <= at <= swap_end]
    later = [v for sent, _, v in judged if sent > swap_end]
    counts = {v: sum(1 for *_, w in judged if w == v) for v in (1, 2, None)}
    summary = {"answers": len(answers), "errors": len(errors), "during_swap": len(during), "by_version": counts}
    print(f"\nREPLICA-SWAP {json.dumps(summary)}")
    assert not errors, errors[:3]
    assert counts[None] == 0, [ids for (*_, ids), (*_, v) in zip(answers, judged) if v is None][:2]
    assert counts[1] > 0 and counts[2] > 0 and len(during) > 0
    assert later and set(later) == {2}  # asked after the rollout: version 2 only, from either replica
    for status in (s for statuses in endpoints for s in statuses):
        assert status.requests > 0 and status.failures == 0 and status.shed == 0, status  # no retried attempt
    assert truth[1][0] != truth[2][0] and versions(repository) == [1, 2]
    for url in urls:  # each replica, asked directly, answers from version 2 only
        assert _settled(url, 2) == (2,)
        assert _ask(url, users[0], k) == ("2", truth[2][1][0])


def _publish_both(repository: Path, urls: list[str], catalogs) -> tuple[int, int]:
    """Publish version 1's catalog, then version 2's, on both replicas: this test's own state,
    whatever ran before it. Returns the two version numbers."""
    made = []
    for catalog in catalogs:
        done = _mmrec_index("build", "--items", str(catalog), "--repository", str(repository),
                            *[a for u in urls for a in ("--url", u)])
        assert done.exit_code == 0, done.output
        made.append(versions(repository)[-1])
    return made[0], made[1]


@pytest.mark.server
@pytest.mark.timeout(600)
def test_a_replica_that_cannot_load_stops_the_rollout_and_rollback_serves_the_old_catalog(replicas, catalogs):
    repository, urls = replicas
    first, second = _publish_both(repository, urls, catalogs)
    dead = _dead_address()
    assert [_settled(u, second) for u in urls] == [(second,), (second,)]

    rolled = _mmrec_index("rollback", "--repository", str(repository), "--no-load")  # as before a bucket upload
    assert rolled.exit_code == 0, rolled.output
    third = second + 1
    assert versions(repository) == [second, third]  # a copy of `first`; --keep 2 pruned it
    refused = _mmrec_index("load", "--repository", str(repository), "--url", urls[0], key=None)
    assert refused.exit_code == 3 and ADMIN_KEY_ENV in " ".join(refused.output.split())
    wrong_header = _mmrec_index("load", "--repository", str(repository), "--url", urls[0], header=None)
    assert wrong_header.exit_code == 3 and ADMIN_HEADER_ENV in " ".join(wrong_header.output.split())
    assert served_versions(urls[0])[0] == (second,)

    stopped = _mmrec_index("load", "--repository", str(repository), "--url", urls[0], "--url", dead,
                           "--url", urls[1])
    message = " ".join(stopped.output.split())
    assert stopped.exit_code == 3, stopped.output
    assert dead in message and "rollout stopped at replica 2 of 3" in message
    assert "mmrec index rollback" in message and "--no-load" in message and "mmrec index load" in message
    assert [_settled(urls[0], third), served_versions(urls[1])[0]] == [(third,), (second,)]  # the rest keep theirs
    status = _mmrec_index("status", "--repository", str(repository), *[a for u in urls for a in ("--url", u)])
    assert status.exit_code == 0, status.output
    report = json.loads(status.stdout)
    assert [r["serves"] for r in report["replicas"]] == [[third], [second]]
    assert report["published"][-1]["rollback_of"] == first
    sizes = report["version_bytes"]  # what sizes the pods' cache (docs/deployment.md)
    assert sorted(sizes) == sorted([str(second), str(third)]) and all(n > 0 for n in sizes.values())

    finished = _mmrec_index("load", "--repository", str(repository), "--url", urls[0], "--url", urls[1])
    assert finished.exit_code == 0, finished.output
    with IndexStore.open(default_build_dir(repository)) as store:
        ids, vectors = store.catalog()  # the store still holds version 2's catalog
    user = vectors[0]
    for url in urls:
        assert _settled(url, third) == (third,)
        version, got = _ask(url, user, V1_ITEMS)
        assert version == str(third) and set(got) != set(ids) and len(set(got) & set(ids)) == V1_ITEMS - CHURN


@pytest.mark.server
@pytest.mark.timeout(600)
def test_a_rollout_loads_a_replica_that_appears_and_skips_one_that_leaves(replicas, catalogs, monkeypatch):
    """A headless name resolving to [A, dead pod], then to [A, B] (scale-in, and a pod becoming
    ready): A loads, the dead pod is "gone", B is loaded after the re-resolution, all verified."""
    repository, urls = replicas
    monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN_KEY)
    monkeypatch.setenv(ADMIN_HEADER_ENV, ADMIN_HEADER_NAME)
    built = _mmrec_index("build", "--items", str(catalogs[0]), "--repository", str(repository), "--url", urls[0],
                         "--no-load")
    assert built.exit_code == 0, built.output
    with IndexStore.open(default_build_dir(repository)) as store:
        version = publish(store, repository, force=True).version  # neither replica serves it yet
    dead = _dead_address()
    calls = []

    def resolve(name: str) -> list[str]:
        calls.append(name)
        return [urls[0], dead] if len(calls) == 1 else [urls[0], urls[1]]

    rollout = roll_out(ReplicaSet(names=("mmrec-headless:8001",), resolve=resolve, pause_s=0), version)
    assert [(s.url, s.outcome) for s in rollout.replicas] == [(urls[0], "loaded"), (dead, "gone"), (urls[1], "loaded")]
    assert [version in s.serves for s in rollout.replicas] == [True, False, True]
    assert len(calls) >= 4  # the start, the dead pod's check, two agreeing resolutions
    assert [_settled(u, version) for u in urls] == [(version,), (version,)]
    assert answers_tls(urls[0]) is False and answers_tls(dead) is False  # plaintext and closed: not TLS
    with pytest.raises(PublishError, match="the local copy is stale"):  # replicas ahead of an empty copy
        check_not_behind(repository.parent / "empty-copy", urls)


@pytest.mark.server
@pytest.mark.timeout(300)
def test_index_commands_refuse_a_tls_server_with_a_clear_message(tmp_path):
    from test_security import make_certificates, tls_server
    from toy_models import DOUBLE_CONFIG, DOUBLE_MODEL, write_model

    served = tmp_path / "served"
    write_model(served, "double", DOUBLE_CONFIG, DOUBLE_MODEL)
    local = tmp_path / "local"
    (local / schema.CATALOG_SCORER / "1").mkdir(parents=True)  # a published version to load
    with tls_server(served, make_certificates(tmp_path / "tls"), tmp_path / "triton.log") as server:
        url = server.urls["grpc"]
        assert answers_tls(url)
        done = _mmrec_index("load", "--repository", str(local), "--url", url)
        items = tmp_path / "items.jsonl"
        items.write_text('{"id": "a", "text": "a red apple", "image": "missing.png"}\n')
        encoding = _mmrec_index("build", "--items", str(items), "--repository", str(local), "--url", url, "--no-load")
    message = " ".join(done.output.split())
    assert done.exit_code == 3, done.output
    assert f"{url} serves gRPC over TLS" in message and "plaintext gRPC only" in message
    # encoding on a TLS server: the same cause, named for what failed
    message = " ".join(encoding.output.split())
    assert encoding.exit_code == 3, encoding.output
    assert f"{url} serves gRPC over TLS" in message and "cannot encode items there" in message
