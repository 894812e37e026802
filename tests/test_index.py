"""The catalog index (issue 13): build, resume, exact ranking, serving, live swap under load.

Ground truth is always computed here from the same stored vectors — numpy float64 scores ranked
by (score desc, row asc) with a stable sort — never hard-coded numbers: the encoders change.

Unit tests (no models): content hashes, the tolerant catalog reader, the journal's crash
recovery, build bookkeeping (skip / reuse / remove), the scan's exactness incl. ties, zero users
and certificate re-runs, publishing. Integration (real models, real tritonserver on 127.0.0.1):
the ~760 Tux Paint items indexed with a SIGINT half-way and a restart (each content encoded
exactly once), recommend over gRPC/HTTP/asyncio and the CLI, bad requests, the server's own
encoder agreeing with the index, and a catalog swap under continuous load.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from mmrec import schema
from mmrec.index_build import BuildReport, build, remove
from mmrec.index_graph import RERANK_MARGIN
from mmrec.index_publish import ServeOptions, fingerprint, publish, versions
from mmrec.index_store import (BadEntry, CatalogEntry, IndexCorrupt, IndexStore, JOURNAL_FILE, VECTORS_FILE,
                               content_hash, default_build_dir, read_catalog)
from mmrec.model_repository.lib import catalog_scan, runtime

D = 16  # width of the synthetic unit tests
ROOT = Path(__file__).resolve().parents[1]


# ---- helpers ---------------------------------------------------------------------------------------

def exact_top_k(vectors: np.ndarray, user: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy's exact ranking: float64 logits, (score desc, row asc) via a stable sort."""
    logits = np.asarray(vectors, np.float64) @ np.asarray(user, np.float64)
    order = np.argsort(-logits, kind="stable")[:k]
    return order, 1.0 / (1.0 + np.exp(-logits[order]))


class HashEncoder:
    """A deterministic stand-in encoder for the bookkeeping tests (no model): the vector is a
    function of the content, and `items_sent` counts every item it was handed."""

    def __init__(self, dim: int = D, reject: str = "") -> None:
        self.dim, self.items_sent, self.reject = dim, 0, reject

    def encode(self, texts, images):
        self.items_sent += len(texts)
        vectors, errors = {}, {}
        for i, (text, image) in enumerate(zip(texts, images)):
            if self.reject and self.reject in text:
                errors[i] = "rejected by the test encoder"
                continue
            seed = int.from_bytes(hashlib.sha256(text.encode() + image).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            vectors[i] = v / np.linalg.norm(v)
        return vectors, errors

    def close(self) -> None:
        pass


def entries(n: int, prefix: str = "item", start: int = 0) -> list[CatalogEntry]:
    return [CatalogEntry(i + 1, f"{prefix}-{i}", f"{prefix} caption {i}", f"image {i}".encode())
            for i in range(start, start + n)]


def linked_copy(source: Path, target: Path) -> Path:
    """Copy a repository, symlinking the big model files (Triton follows links)."""
    def copy(src, dst):
        if src.endswith((".onnx", ".plan", ".data")):
            os.symlink(os.path.abspath(src), dst)
        else:
            shutil.copy2(src, dst)
    shutil.copytree(source, target, copy_function=copy)
    return target


def scan_module():
    return catalog_scan


# ---- unit: hashing, catalog reading -------------------------------------------------------------------

def test_content_hash_covers_text_and_image_not_the_id():
    assert content_hash("ab", b"c") != content_hash("a", b"bc")  # length-prefixed: no split collides
    assert content_hash("a", b"x") != content_hash("a", b"y")
    assert CatalogEntry(1, "x", "t", b"i").hash == CatalogEntry(9, "y", "t", b"i").hash


def test_catalog_reader_reports_each_bad_line_and_keeps_going(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"png bytes")
    (tmp_path / "empty.png").write_bytes(b"")
    lines = ['{"text": "A frog.", "image": "ok.png", "id": "frog"}', "not json",
             '{"text": "No id.", "image": "ok.png"}', '{"text": " ", "image": "ok.png", "id": "blank"}',
             '{"text": "Gone.", "image": "missing.png", "id": "gone"}',
             '{"text": "Empty.", "image": "empty.png", "id": "empty"}', "",
             '{"text": "Again.", "image": "ok.png", "id": 7}']
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("\n".join(lines) + "\n")
    got = list(read_catalog(catalog))
    assert [type(e).__name__ for e in got] == ["CatalogEntry", "BadEntry", "BadEntry", "BadEntry", "BadEntry",
                                               "BadEntry", "CatalogEntry"]
    assert got[0].image == b"png bytes" and got[-1].item_id == "7"
    assert [b.label for b in got[1:6]] == ["line 2", "line 3", "blank", "gone", "empty"]
    assert "no \"id\"" in got[2].error and "cannot be read" in got[4].error and "empty" in got[5].error


# ---- unit: the journaled store ------------------------------------------------------------------------

def test_build_skips_unchanged_reuses_content_removes_missing(tmp_path):
    encoder = HashEncoder()
    with IndexStore.open(tmp_path / "ix", D) as store:
        first = build(store, entries(10), encoder, sync=True, batch_size=4)
        assert (first.encoded, first.unchanged, first.items, encoder.items_sent) == (10, 0, 10, 10)
        changed = entries(10)
        changed[3] = CatalogEntry(4, "item-3", "a new caption", b"image 3")  # content changed
        changed[5] = CatalogEntry(6, "copy-of-7", "item caption 7", b"image 7")   # new id, known content
        del changed[0]                                                        # removed
        changed.append(CatalogEntry(99, "item-2", "dup id", b"x"))            # duplicate id in one catalog
        second = build(store, changed, encoder, sync=True, batch_size=4)
    assert (second.encoded, second.reused, second.unchanged, second.removed) == (1, 1, 7, 2)
    assert encoder.items_sent == 11 + 1  # 10 + the changed one + the probe check
    assert [b.item_id for b in second.bad] == ["item-2"] and "duplicate id" in second.bad[0].error
    with IndexStore.open(tmp_path / "ix") as store:  # replayed from disk
        ids, vectors = store.catalog()
        assert "item-0" not in ids and "item-5" not in ids and "copy-of-7" in ids
        assert store.vector_rows == 11
        np.testing.assert_array_equal(vectors[ids.index("copy-of-7")], vectors[ids.index("item-7")])


def test_bad_items_are_reported_by_id_and_a_good_old_version_stays(tmp_path):
    encoder = HashEncoder(reject="BROKEN")
    with IndexStore.open(tmp_path / "ix", D) as store:
        build(store, entries(4), encoder, sync=True)
        update = entries(4)
        update[1] = CatalogEntry(2, "item-1", "BROKEN caption", b"image 1")
        update.append(CatalogEntry(5, "new", "BROKEN too", b"z"))
        update.append(BadEntry(6, "unreadable", "image x.png cannot be read"))
        report = build(store, update, encoder, sync=True)
        assert sorted(b.item_id for b in report.bad) == ["item-1", "new", "unreadable"]
        assert "item-1" in store.items and "new" not in store.items  # old good version kept, none dropped
        sent = encoder.items_sent
        again = build(store, update, encoder, sync=True)  # known-bad content is not sent again
        assert encoder.items_sent == sent + 1 and len(again.bad) == 3  # +1: the probe check only


def test_journal_recovers_from_a_torn_line_and_unacknowledged_vectors(tmp_path):
    folder = tmp_path / "ix"
    encoder = HashEncoder()
    with IndexStore.open(folder, D) as store:
        build(store, entries(6), encoder, sync=False, batch_size=3)
    with open(folder / VECTORS_FILE, "ab") as f:  # a batch whose journal lines never landed
        f.write(np.ones((2, D), np.float32).tobytes())
    with open(folder / JOURNAL_FILE, "a") as f:
        f.write('{"op":"vec","hash":"dead')  # torn mid-line by a crash
    with IndexStore.open(folder, D) as store:
        assert len(store.items) == 6 and store.vector_rows == 6
        assert (folder / VECTORS_FILE).stat().st_size == 6 * D * 4
        report = build(store, entries(10), encoder, sync=False, batch_size=3)
        assert report.encoded == 4 and report.unchanged == 6
    (folder / VECTORS_FILE).write_bytes(b"")  # journal promises rows the file lacks
    with pytest.raises(IndexCorrupt, match="rebuild"):
        IndexStore.open(folder, D)


def test_stop_commits_the_batch_in_flight_and_resume_finishes_exactly(tmp_path):
    stop = threading.Event()
    encoder = HashEncoder()
    calls = []

    def advance(n):
        calls.append(n)
        if len(calls) == 2:
            stop.set()

    with IndexStore.open(tmp_path / "ix", D) as store:
        old = build(store, entries(3, prefix="old"), encoder, sync=False)
        part = build(store, entries(20), encoder, sync=True, batch_size=5, stop=stop, advance=advance)
        assert part.interrupted and part.encoded == 10 and part.removed == 0  # nothing removed when interrupted
        assert "old-0" in store.items
        rest = build(store, entries(20), encoder, sync=True, batch_size=5)
    assert rest.encoded == 10 and rest.unchanged == 10 and rest.removed == 3
    assert old.encoded + part.encoded + rest.encoded == 23 == store.vector_rows


def test_a_different_encoder_is_refused(tmp_path):
    from mmrec.index_store import EncoderChanged

    with IndexStore.open(tmp_path / "ix", D) as store:
        build(store, entries(3), HashEncoder(), sync=True)

    class Other(HashEncoder):
        def encode(self, texts, images):
            vectors, errors = super().encode([t + "!" for t in texts], images)
            return vectors, errors

    with IndexStore.open(tmp_path / "ix", D) as store, pytest.raises(EncoderChanged, match="--rebuild"):
        build(store, entries(4), Other(), sync=True)


def test_one_writer_at_a_time(tmp_path):
    from mmrec.index_store import CatalogIndexError

    with IndexStore.open(tmp_path / "ix", D):
        with pytest.raises(CatalogIndexError, match="another `mmrec index`"):
            IndexStore.open(tmp_path / "ix", D)


# ---- unit: the scan graph is exact -------------------------------------------------------------------

def _scan(tmp_path, vectors, ids=None):
    from mmrec.index_publish import write_version_files

    ids = ids or [f"id-{i}" for i in range(len(vectors))]
    folder = tmp_path / f"v{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    write_version_files(folder, ids, vectors, fingerprint(ids, vectors))
    return scan_module().CatalogScan(folder, runtime.make_session)


def _unit(rng, n, d=D):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("n", [1, 5, RERANK_MARGIN + 3, 3000])
def test_scan_equals_numpy_exact_ranking_with_ties(tmp_path, n):
    rng = np.random.default_rng(n)
    vectors = _unit(rng, n)
    if n > 10:
        vectors[n // 2:n // 2 + 7] = vectors[3]  # exact duplicates: ties broken by row
        vectors[-1] = vectors[3]
    scan = _scan(tmp_path, vectors)
    users = np.concatenate([_unit(rng, 6), vectors[3:4], np.zeros((1, D), np.float32)])
    for k in sorted({1, min(n, 7), min(n, 40), n}):
        got = scan.search(users, k)
        for b, user in enumerate(users):
            rows, scores = exact_top_k(vectors, user, k)
            np.testing.assert_array_equal(got.rows[b], rows)
            np.testing.assert_allclose(got.scores[b], scores, rtol=0, atol=1e-7)
            assert [i.decode() for i in got.ids[b]] == [f"id-{r}" for r in rows]
    zero = scan.search(np.zeros((1, D), np.float32), min(n, 5))  # no preference: lowest rows, σ(0)
    np.testing.assert_array_equal(zero.rows[0], np.arange(min(n, 5)))
    np.testing.assert_allclose(zero.scores[0], 0.5)


def test_near_ties_fail_the_certificate_and_are_rerun_to_the_exact_answer(tmp_path):
    """300 items within fp32 rounding of each other around the K-th place: the fp32 scan cannot
    tell them apart, the certificate notices, and the re-run with more candidates is exact."""
    rng = np.random.default_rng(7)
    base = _unit(rng, 1)[0]
    vectors = _unit(rng, 2000) * 0.5
    vectors[100:400] = base + rng.standard_normal((300, D)).astype(np.float32) * 1e-7
    vectors[:20] = base * 1.01  # a clear head above the cluster
    scan = _scan(tmp_path, vectors)
    got = scan.search(base[None, :], 50)
    rows, _ = exact_top_k(vectors, base, 50)
    np.testing.assert_array_equal(got.rows[0], rows)
    assert got.reruns == 1


def test_scan_checks_width_values_and_k(tmp_path):
    module = scan_module()
    scan = _scan(tmp_path, _unit(np.random.default_rng(0), 30))
    with pytest.raises(module.BadRequest, match=rf"USER_EMBEDDING must be \[batch, {D}\]"):
        scan.check_users(np.zeros((1, D + 1), np.float32), "t")
    with pytest.raises(module.BadRequest, match="row 1 has NaN"):
        scan.check_users(np.array([[0] * D, [np.nan] * D], np.float32), "t")
    for k in (0, 31):
        with pytest.raises(module.BadRequest, match=r"K=.* is out of range: this index has 30 items"):
            scan.check_k(k, 1000, "t")
    with pytest.raises(module.BadRequest, match=r"1 <= K <= 20 \(max_k 20\)"):
        scan.check_k(25, 20, "t")


# ---- unit: publishing -----------------------------------------------------------------------------------

def test_publish_writes_atomic_versions_skips_unchanged_and_prunes(tmp_path):
    from mmrec.preprocess import ServedContract

    repository = tmp_path / "repository"
    repository.mkdir()
    ServedContract(item_dim=D, max_batch_size=8).save(repository)
    with IndexStore.open(tmp_path / "ix", D) as store:
        build(store, entries(12), HashEncoder(), sync=True)
        first = publish(store, repository)
        same = publish(store, repository)
        build(store, entries(13), HashEncoder(), sync=True)
        second = publish(store, repository, keep=1)
    assert (first.version, same.version, same.unchanged, second.version) == (1, 1, True, 2)
    assert versions(repository) == [2]
    folder = repository / schema.CATALOG_SCORER
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no staging left behind
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.version_policy.latest.num_versions == 1 and config.max_batch_size == 8
    assert [i.name for i in config.input] == [schema.USER_EMBEDDING, schema.TOP_K] and config.input[1].optional
    assert [o.name for o in config.output] == [schema.ITEM_IDS, schema.ITEM_ROWS, schema.SCORE]
    meta = json.loads((folder / "2" / "index.json").read_text())
    assert meta["items"] == 13 and meta["dim"] == D and meta["tensors"]["user"] == schema.USER_EMBEDDING
    with IndexStore.open(tmp_path / "empty", D) as empty, pytest.raises(Exception, match="no items"):
        publish(empty, repository)


# ---- integration: 763 real items, interrupted half-way and resumed -----------------------------------

def _mmrec(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "mmrec.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _journal_count(folder: Path, op: str) -> int:
    path = folder / JOURNAL_FILE
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if f'"op":"{op}"' in line)


@pytest.fixture(scope="module")
def tux_catalog(tmp_path_factory):
    from mmrec.export.data import load_items

    items = load_items()
    path = tmp_path_factory.mktemp("catalog") / "catalog.jsonl"
    path.write_text("".join(json.dumps({"text": i.caption, "image": str(i.image_path), "id": i.item_id}) + "\n"
                            for i in items))
    return path, items


@pytest.fixture(scope="module")
def built_index(exported_repository, tux_catalog, tmp_path_factory):
    """`mmrec index build` over every Tux Paint item: SIGINT once half the catalog is committed,
    then the same command again. Returns the repository, build folder and both runs' reports."""
    catalog, items = tux_catalog
    repository = linked_copy(Path(exported_repository), tmp_path_factory.mktemp("index") / "repository")
    shutil.rmtree(repository / schema.CATALOG_SCORER, ignore_errors=True)  # an index of the source's own
    folder = default_build_dir(repository)
    reports = [repository.parent / "run1.json", repository.parent / "run2.json"]
    args = ["index", "build", "--items", str(catalog), "--repository", str(repository), "--batch-size", "32"]
    first = _mmrec(*args, "--report", str(reports[0]))
    deadline = time.monotonic() + 600
    while _journal_count(folder, "set") < len(items) // 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    out1, err1 = first.communicate(timeout=300)
    second = _mmrec(*args, "--report", str(reports[1]))
    out2, err2 = second.communicate(timeout=900)
    assert second.returncode == 0, err2[-2000:]
    return {"repository": repository, "folder": folder, "items": items, "codes": (first.returncode, 0),
            "stderr": (err1, err2), "reports": [json.loads(p.read_text()) for p in reports]}


@pytest.mark.server
@pytest.mark.timeout(1200)
def test_interrupted_build_resumes_and_encodes_each_item_exactly_once(built_index):
    first, second = built_index["reports"]
    items = built_index["items"]
    distinct = len({content_hash(i.caption, i.image_bytes()) for i in items})
    assert built_index["codes"][0] == 130, built_index["stderr"][0][-2000:]
    assert first["interrupted"] and "run the same command again" in built_index["stderr"][0]
    assert len(items) // 2 <= first["seen"] < len(items)
    # every distinct content went through the encoder once: the graceful stop lost no work
    assert first["encoded"] + second["encoded"] == distinct
    assert first["encoder_items_sent"] + second["encoder_items_sent"] - 1 == distinct  # -1: probe check
    assert second["unchanged"] == first["encoded"] + first["reused"] and not second["bad"]
    with IndexStore.open(built_index["folder"]) as store:
        assert len(store.items) == len(items) and store.vector_rows == distinct
        hashes = [json.loads(line)["hash"] for line in (built_index["folder"] / JOURNAL_FILE).read_text().splitlines()
                  if '"op":"vec"' in line]
        assert len(hashes) == len(set(hashes)) == distinct
    assert versions(built_index["repository"]) == [1] and second["published_version"] == 1


# ---- integration: serving -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def index_server(built_index, tmp_path_factory):
    """A tritonserver of this module's own, explicit model control, on the indexed repository."""
    from mmrec.server import ServerConfig, TritonServer, free_ports

    http, grpc, metrics = free_ports(3)
    config = ServerConfig(repository=built_index["repository"], http_port=http, grpc_port=grpc,
                          metrics_port=metrics, model_control="explicit")
    log = tmp_path_factory.mktemp("index-triton") / "tritonserver.log"
    with TritonServer(config, log_path=log, ready_timeout_s=300) as server:
        yield server


def _catalog(folder: Path) -> tuple[list[str], np.ndarray]:
    with IndexStore.open(folder) as store:
        return store.catalog()


def _users(vectors: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Simulated users: each the mean of 3 random items' vectors (a user = mean of their history)."""
    rng = np.random.default_rng(seed)
    return np.stack([vectors[rng.choice(len(vectors), 3, replace=False)].mean(axis=0) for _ in range(count)])


@pytest.mark.server
@pytest.mark.timeout(600)
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_recommend_equals_numpy_exact_ranking(index_server, built_index, protocol):
    from mmrec.client import MMRecClient

    ids, vectors = _catalog(built_index["folder"])
    users = _users(vectors, 12)
    with MMRecClient(index_server.urls[protocol], protocol) as client:
        for user in users[:6]:
            rows, scores = exact_top_k(vectors, user, 100)
            got = client.recommend(user, 100)
            assert [h.index for h in got] == rows.tolist()
            assert [h.item_id for h in got] == [ids[r] for r in rows]
            np.testing.assert_allclose([h.score for h in got], scores, rtol=0, atol=1e-6)
        batch = client.recommend_batch(users, 10)  # one request, a batch of users
        for user, got in zip(users, batch):
            assert [h.index for h in got] == exact_top_k(vectors, user, 10)[0].tolist()
        history = [ids[r] for r in exact_top_k(vectors, users[0], 3)[0]]
        kept = client.recommend(users[0], 5, exclude=history)
        assert [h.index for h in kept] == exact_top_k(vectors, users[0], 8)[0][3:8].tolist()
        with pytest.raises(ValueError, match="over the server's max_k"):
            client.recommend(users[0], 990, exclude=history[:1] * 20)


@pytest.mark.server
@pytest.mark.timeout(300)
def test_async_recommend_and_missing_index_hint(index_server, built_index):
    from mmrec.client import AsyncMMRecClient, MMRecClient, ModelNames, ModelNotReadyError

    ids, vectors = _catalog(built_index["folder"])
    users = _users(vectors, 4, seed=1)

    async def run():
        async with AsyncMMRecClient(index_server.urls["grpc"]) as client:
            return await asyncio.gather(*(client.recommend(u, 20) for u in users))

    for user, got in zip(users, asyncio.run(run())):
        assert [h.item_id for h in got] == [ids[r] for r in exact_top_k(vectors, user, 20)[0]]
    with MMRecClient(index_server.urls["grpc"], models=ModelNames(catalog_scorer="no_index_here")) as client:
        with pytest.raises(ModelNotReadyError, match="mmrec index build"):
            client.recommend(users[0], 5)
        assert len(client.rank(users[0], vectors[:30], k=5)) == 5  # ad-hoc ranking still works


@pytest.mark.server
@pytest.mark.timeout(300)
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_requests_fail_alone_with_invalid_argument(index_server, built_index, protocol):
    module = {"grpc": grpcclient, "http": httpclient}[protocol]
    client = module.InferenceServerClient(index_server.urls[protocol])
    ids, vectors = _catalog(built_index["folder"])
    n = len(ids)

    def infer(users, k=None):
        inputs = [module.InferInput(schema.USER_EMBEDDING, list(users.shape), "FP32")]
        inputs[0].set_data_from_numpy(users.astype(np.float32))
        if k is not None:
            k_in = module.InferInput(schema.TOP_K, [len(users), 1], "INT32")
            k_in.set_data_from_numpy(np.asarray(k, np.int32).reshape(len(users), 1))
            inputs.append(k_in)
        return client.infer(schema.CATALOG_SCORER, inputs)

    cases = {"wrong width": (np.zeros((1, vectors.shape[1] - 1)), None, "unexpected shape"),
             "K = 0": (vectors[:1], [0], "K=0 is out of range"),
             "K over the catalog": (vectors[:1], [n + 1], f"this index has {n} items"),
             "NaN": (np.full((1, vectors.shape[1]), np.nan), [5], "NaN or infinite"),
             "infinity": (np.full((1, vectors.shape[1]), np.inf), [5], "NaN or infinite"),
             "mixed K": (vectors[:2], [3, 4], "same K")}
    try:
        for name, (users, k, message) in cases.items():
            with pytest.raises(InferenceServerException) as err:
                infer(users, k)
            assert str(err.value.status()) in ("StatusCode.INVALID_ARGUMENT", "400"), name
            assert message in err.value.message(), (name, err.value.message())
            ok = infer(vectors[:1])  # the server keeps answering; default K from the config
            assert ok.as_numpy(schema.ITEM_IDS).shape == (1, 10)
            assert ok.as_numpy(schema.ITEM_IDS)[0, 0].decode() == ids[0]
    finally:
        client.close()


@pytest.mark.server
@pytest.mark.timeout(300)
def test_indexed_vectors_are_what_the_server_encodes(index_server, built_index, tux_catalog):
    """The in-process build and the server's item_encoder agree, so either can feed the index."""
    from mmrec.index_build import ServerEncoder

    ids, vectors = _catalog(built_index["folder"])
    items = {i.item_id: i for i in tux_catalog[1]}
    sample = ids[::48]
    encoder = ServerEncoder(index_server.urls["grpc"])
    try:
        got, errors = encoder.encode([items[i].caption for i in sample], [items[i].image_bytes() for i in sample])
    finally:
        encoder.close()
    assert not errors
    stored = vectors[[ids.index(i) for i in sample]]
    np.testing.assert_allclose(np.stack([got[j] for j in range(len(sample))]), stored, atol=1e-4, rtol=0)


@pytest.mark.server
@pytest.mark.timeout(300)
def test_recommend_cli(index_server, built_index, tux_catalog, tmp_path):
    from mmrec.client import MMRecClient

    ids, vectors = _catalog(built_index["folder"])
    history = tmp_path / "history.jsonl"
    picked = [i for i in tux_catalog[1] if i.category == tux_catalog[1][0].category][:3]
    history.write_text("".join(json.dumps({"text": i.caption, "image": str(i.image_path), "id": i.item_id}) + "\n"
                               for i in picked))
    done = _mmrec("recommend", "--history", str(history), "--k", "5", "--format", "jsonl",
                  "--url", index_server.urls["grpc"])
    out, err = done.communicate(timeout=120)
    assert done.returncode == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    with MMRecClient(index_server.urls["grpc"]) as client:
        user = client.user_vector([(i.caption, i.image_bytes()) for i in picked])
        want = client.recommend(user, 5, exclude=[i.item_id for i in picked])
    assert [r["id"] for r in rows] == [h.item_id for h in want] and [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert not {r["id"] for r in rows} & {i.item_id for i in picked}
    bad = _mmrec("recommend", "--user-vector", str(tmp_path / "none.npy"), "--url", index_server.urls["grpc"])
    assert bad.wait(timeout=120) == 2


@pytest.mark.server
@pytest.mark.timeout(900)
def test_catalog_swap_under_load_fails_nothing_and_never_mixes_versions(index_server, built_index, tux_catalog,
                                                                      tmp_path):
    """4 threads query catalog_scorer nonstop while `mmrec index remove` and then `mmrec index add`
    (one re-added item reuses its vector, one new item is encoded by the server, one is broken)
    publish and load versions 2 and 3. Every response must equal the exact top-k of the version
    that reports answering it."""
    repository, folder = built_index["repository"], built_index["folder"]
    url = index_server.urls["grpc"]
    ids1, vectors1 = _catalog(folder)
    users = _users(vectors1, 16, seed=3)
    k = 20
    truth: dict[str, list[list[str]]] = {}

    def record_truth(version: str) -> None:
        ids, vectors = _catalog(folder)
        truth[version] = [[ids[r] for r in exact_top_k(vectors, u, k)[0]] for u in users]

    record_truth("1")
    # remove what most users rank first, so the new version visibly answers differently
    removed = sorted({row[0] for row in truth["1"]} | set(ids1[5:45]))
    responses: list[tuple[str, int, list[str] | str]] = []  # (version, user, ids) or ("?", user, error)
    stop = threading.Event()
    lock = threading.Lock()

    def load(seed: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                u = int(rng.integers(len(users)))
                inputs = [grpcclient.InferInput(schema.USER_EMBEDDING, [1, users.shape[1]], "FP32"),
                          grpcclient.InferInput(schema.TOP_K, [1, 1], "INT32")]
                inputs[0].set_data_from_numpy(users[u:u + 1].astype(np.float32))
                inputs[1].set_data_from_numpy(np.array([[k]], np.int32))
                try:
                    result = client.infer(schema.CATALOG_SCORER, inputs)
                    answer = (result.get_response().model_version, u,
                              [i.decode() for i in result.as_numpy(schema.ITEM_IDS)[0]])
                except InferenceServerException as err:
                    answer = ("?", u, f"{err.status()}: {err.message()}")
                with lock:
                    responses.append(answer)
        finally:
            client.close()

    new_image = tux_catalog[1][1].image_path
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    additions = tmp_path / "additions.jsonl"
    additions.write_text("".join(json.dumps(r) + "\n" for r in (
        {"text": tux_catalog[1][[i.item_id for i in tux_catalog[1]].index(removed[0])].caption,
         "image": str(tux_catalog[1][[i.item_id for i in tux_catalog[1]].index(removed[0])].image_path),
         "id": removed[0]},
        {"text": "A frog wearing a tiny hat.", "image": str(new_image), "id": "new/frog-with-hat"},
        {"text": "Broken picture.", "image": str(broken), "id": "new/broken"})))
    threads = [threading.Thread(target=load, args=(seed,)) for seed in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(2)
        remove_args = [a for r in removed for a in ("--id", r)]
        done = _mmrec("index", "remove", *remove_args, "--repository", str(repository), "--url", url)
        out, err = done.communicate(timeout=600)
        assert done.returncode == 0, err
        record_truth("2")
        time.sleep(2)
        report = tmp_path / "add.json"
        done = _mmrec("index", "add", "--items", str(additions), "--repository", str(repository), "--url", url,
                      "--report", str(report))
        out, err = done.communicate(timeout=600)
        assert done.returncode == 0, err
        record_truth("3")
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    added = json.loads(report.read_text())
    assert (added["reused"], added["encoded"], added["published_version"]) == (1, 1, 3)
    assert [b["id"] for b in added["bad"]] == ["new/broken"]
    # judged after the fact, against the exact top-k of each version's catalog
    failures = [(v, u, got) for v, u, got in responses if v not in truth or got != truth[v][u]]
    by_version = {v: sum(1 for r in responses if r[0] == v) for v in ("1", "2", "3")}
    print(f"\nINDEX-SWAP {json.dumps({'requests': len(responses), 'failed': len(failures), 'by_version': by_version})}")
    assert not failures, failures[:3]
    assert all(by_version[v] > 0 for v in ("1", "2", "3")), by_version
    assert truth["1"] != truth["2"] != truth["3"] and versions(repository) == [2, 3]


# ---- the benchmark runs and checks itself ----------------------------------------------------------------

def test_bench_index_quick_run_checks_exactness_and_writes_its_report(tmp_path):
    from mmrec.benchmarks.index_scan import run

    report = run(sizes=(2000,), k=50, output=tmp_path, served=False, quick=True)
    entry = report["catalogs"][0]
    assert entry["fp32"]["exact_vs_numpy"] and entry["fp32"]["one_user_over_bound"] > 0
    assert report["bandwidth"]["copy_gbps_best"] > 0 and report["gemm"]["peak_gflops"] > 0
    assert entry["reduced_precision"]["int8"]["overlap_at_k_after_exact_rerank"] >= 0.99
    assert {p.name for p in tmp_path.iterdir()} >= {"index_scan.json", "index_scan.png", "summary.md"}
    assert report["machine"]["loadavg_start"] and report["cpu"]["model"]
    provenance = json.loads((tmp_path / "index_scan.json").read_text())["provenance"]  # commit, machine, load, times
    assert provenance["git"]["commit"] and provenance["loadavg"]["after"] and provenance["finished"]
