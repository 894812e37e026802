"""A catalog index published to several replicas and swapped live (issue 23).

Two real tritonservers on 127.0.0.1 serve ONE repository directory, as replicas of a Deployment
serve copies of one bucket: explicit model control with an admin key (the chart's setup), each
on its own ports. `mmrec index build --url A --url B` (the real CLI, MMREC_ADMIN_KEY set)
publishes version 1 and loads it on both; then three client threads query both replicas nonstop
while the same command publishes version 2 (four items removed, four added). Every answer must
be the exact full-catalog ranking of version 1 or of version 2 (the id sets tell which), none may
fail, some must arrive during the swap, and afterwards both replicas answer from version 2.

Then the failure path: a replica that cannot load stops the rollout with exit 3 and a report of
who serves what, `mmrec index load` finishes it, and `mmrec index rollback` serves an older
catalog again as a new version. Unit tests cover rollback on disk and replica resolution.
"""
from __future__ import annotations

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
from mmrec.index_publish import (PublishError, publish, replica_urls, republish, resolve_replicas,
                                 served_versions, versions)
from mmrec.index_store import IndexStore, default_build_dir
from mmrec.server import ADMIN_KEY_ENV
from test_index import D, HashEncoder, entries, exact_top_k, linked_copy

ADMIN_KEY = "swap-test-key"
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


def test_the_cli_rejects_bad_replica_arguments(tmp_path):
    from mmrec.cli import app

    done = CliRunner().invoke(app, ["index", "load", "--repository", str(tmp_path), "--replicas", "no-port"])
    assert done.exit_code == 2 and "is not NAME:PORT" in done.output
    done = CliRunner().invoke(app, ["index", "load", "--repository", str(tmp_path), "--url", "127.0.0.1:1"])
    assert done.exit_code == 2 and "holds no catalog_scorer version" in " ".join(done.output.split())


# ---- integration: two replicas of one repository ----------------------------------------------------------

def _mmrec_index(*args: str, key: str | None = ADMIN_KEY):
    """The real `mmrec index ...` entry point, in-process; key=None runs it without MMREC_ADMIN_KEY."""
    from mmrec.cli import app

    return CliRunner().invoke(app, ["index", *args], env={ADMIN_KEY_ENV: key})


def _catalog_file(path: Path, items) -> Path:
    path.write_text("".join(json.dumps({"text": i.caption, "image": str(i.image_path), "id": i.item_id}) + "\n"
                            for i in items))
    return path


@pytest.fixture(scope="module")
def replicas(exported_repository, tmp_path_factory):
    """Two tritonservers on one repository directory (no index yet), explicit mode, admin key."""
    from mmrec.server import ServerConfig, TritonServer, free_ports

    root = tmp_path_factory.mktemp("replicas")
    repository = linked_copy(Path(exported_repository), root / "repository")
    for old in (repository / schema.CATALOG_SCORER, default_build_dir(repository)):  # the source's own index
        shutil.rmtree(old, ignore_errors=True)
    servers = []
    try:
        for n in range(2):
            http, grpc, metrics = free_ports(3)
            config = ServerConfig(repository=repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                                  model_control="explicit", admin_key=ADMIN_KEY)
            server = TritonServer(config, log_path=root / f"replica{n}.log", ready_timeout_s=300)
            server.start()
            servers.append(server)
        for server in servers:
            server.wait_ready()
        yield repository, [s.urls["grpc"] for s in servers]
    finally:
        for server in servers:
            server.stop()


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


@pytest.mark.server
@pytest.mark.timeout(600)
def test_a_replica_that_cannot_load_stops_the_rollout_and_rollback_serves_the_old_catalog(replicas, catalogs):
    repository, urls = replicas
    if versions(repository) != [1, 2]:
        pytest.skip("needs the swap test's versions 1 and 2 (run the module, not this test alone)")
    with socket.socket() as s:  # a port nobody listens on: a replica that is down
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"

    rolled = _mmrec_index("rollback", "--repository", str(repository))  # on disk only, as before a bucket upload
    assert rolled.exit_code == 0, rolled.output
    assert versions(repository) == [2, 3]  # version 3 = a copy of version 1; --keep 2 pruned version 1
    refused = _mmrec_index("load", "--repository", str(repository), "--url", urls[0], key=None)
    assert refused.exit_code == 3 and ADMIN_KEY_ENV in " ".join(refused.output.split())
    assert served_versions(urls[0])[0] == (2,)

    stopped = _mmrec_index("load", "--repository", str(repository), "--url", urls[0], "--url", dead,
                           "--url", urls[1])
    message = " ".join(stopped.output.split())
    assert stopped.exit_code == 3, stopped.output
    assert dead in message and "rollout stopped at replica 2 of 3" in message and "mmrec index rollback" in message
    assert [_settled(urls[0], 3), served_versions(urls[1])[0]] == [(3,), (2,)]  # stopped: the rest keep theirs
    status = _mmrec_index("status", "--repository", str(repository), *[a for u in urls for a in ("--url", u)])
    assert status.exit_code == 0, status.output
    report = json.loads(status.stdout)
    assert [r["serves"] for r in report["replicas"]] == [[3], [2]]
    assert report["published"][-1]["rollback_of"] == 1

    finished = _mmrec_index("load", "--repository", str(repository), "--url", urls[0], "--url", urls[1])
    assert finished.exit_code == 0, finished.output
    with IndexStore.open(default_build_dir(repository)) as store:
        ids, vectors = store.catalog()  # the store still holds version 2's catalog
    user = vectors[0]
    for url in urls:
        assert _settled(url, 3) == (3,)
        version, got = _ask(url, user, V1_ITEMS)
        assert version == "3" and set(got) != set(ids) and len(set(got) & set(ids)) == V1_ITEMS - CHURN
