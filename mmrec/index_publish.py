"""Publish a catalog index as the next version of the `catalog_scorer` model, and swap it live.

A version is written into a hidden staging folder inside the model folder and renamed into
place, so Triton (or a poller, or an object-store sync) never sees half a version. With explicit
model control, `load_model` makes Triton load the new version while the old one keeps answering;
`version_policy: latest 1` then retires the old one after its in-flight requests. Each response
comes from one version (one model instance runs the whole scan).

Several replicas each load from their own copy of the repository (a pod's copy of the bucket):
`roll_out` loads a version on each in turn, checks each serves it, and stops at the first that
does not, reporting which replica serves which version. Replicas named by a headless Service come
and go while it runs: it resolves the name again at the end (until two resolutions agree), loads
on any new pod, counts a pod that left DNS as "gone" (scale-in, not a failure), and succeeds only
when every remaining replica serves the version. Stopping (not undoing) is deliberate: a
half-rolled fleet still answers, each response from one version, and the person decides whether
to finish (run the same command again: a replica already on the version loads nothing new) or
roll back (`republish` an older version as the next one, then roll that out).
"""
from __future__ import annotations

import errno
import hashlib
import ipaddress
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from . import schema
from .index_graph import MODEL_FILE, RERANK_MARGIN, write_scan_graph
from .index_store import CatalogIndexError, IndexStore
from .layout import RepositoryLayout
from .model_repository.lib.catalog_scan import INDEX_FILE
from .model_repository.lib.runner_settings import DEFAULT_K, DEFAULT_MAX_K, CatalogSettings  # noqa: F401
from .tls_probe import answers_tls

STAGING_PREFIX = ".staging-"
DEFAULT_KEEP = 2  # versions kept on disk: the served one and one to roll back to


class PublishError(CatalogIndexError):
    """A version could not be written, or the server did not load it."""


class ServerSpeaksTls(PublishError):
    """The server answers gRPC over TLS, which `mmrec index` does not speak: no replica can be
    loaded this way, so a rollout ends here rather than reporting one failed replica."""


# catalog_scorer's config parameters; their owner is lib/runner_settings.py (the served model reads them there)
ServeOptions = CatalogSettings


@dataclass(frozen=True)
class Published:
    version: int
    folder: Path
    items: int
    fingerprint: str
    unchanged: bool = False  # nothing changed since `version`: no new version was written


def model_dir(repository: Path) -> Path:
    return RepositoryLayout(repository).model_dir(schema.CATALOG_SCORER)


def versions(repository: Path) -> list[int]:
    """Version folders of catalog_scorer on disk, ascending."""
    folder = model_dir(repository)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def version_bytes(repository: Path) -> dict[int, int]:
    """Bytes of each version folder: what a bucket holds per version and what Triton copies into a
    pod's cache on each load (hard links from `rollback` count in full: a bucket copy does)."""
    folder = model_dir(repository)
    return {v: sum(p.stat().st_size for p in (folder / str(v)).rglob("*") if p.is_file()) for v in versions(repository)}


def fingerprint(ids: list[str], vectors: np.ndarray) -> str:
    """sha256 over ids and vector bytes: equal fingerprints serve identical answers."""
    h = hashlib.sha256()
    for item_id in ids:
        data = item_id.encode("utf-8")
        h.update(len(data).to_bytes(8, "little") + data)
    h.update(memoryview(np.ascontiguousarray(vectors, np.float32)).cast("B"))  # no 1 GB copy at 1M items
    return h.hexdigest()


def max_norm(vectors: np.ndarray, block: int = 65536) -> float:
    """Largest row norm, in float64 blocks (a float64 copy of 1M x 256 would be 2 GB)."""
    best = 0.0
    for start in range(0, len(vectors), block):
        part = np.asarray(vectors[start:start + block], np.float64)
        best = max(best, float(np.sqrt(np.einsum("ij,ij->i", part, part).max())))
    return best


def scorer_config_text(dim: int, max_batch_size: int, options: ServeOptions) -> str:
    from mmrec.export.repository import catalog_scorer_config, render

    return render(catalog_scorer_config(schema.catalog_scorer_spec(dim), max_batch_size, options.to_parameters()))


def graph_tensors() -> dict[str, str]:
    """The graph's tensor names for model.py, from the one schema."""
    return {"user": schema.USER_EMBEDDING, "k": schema.TOP_K, "candidates": schema.CANDIDATES,
            "ids": schema.ITEM_IDS, "rows": schema.ITEM_ROWS, "scores": schema.SCORE,
            "kth_logit": schema.KTH_LOGIT, "candidate_floor": schema.CANDIDATE_FLOOR}


def write_version_files(folder: Path, ids: list[str], vectors: np.ndarray, fp: str) -> None:
    """One complete version folder: graph + external data, index.json, the python model."""
    graph = write_scan_graph(vectors, ids, folder)
    meta = {"items": graph.items, "dim": graph.dim, "model_file": MODEL_FILE,
            # an upper bound for the certificate: nudged up so rounding cannot make it smaller
            "max_item_norm": float(np.nextafter(max_norm(vectors), np.inf)),
            "rerank_margin": RERANK_MARGIN, "tensors": graph_tensors(), "fingerprint": fp}
    (folder / INDEX_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    from mmrec.export.repository import CATALOG_SCORER_SOURCES, copy_python_model

    copy_python_model(*CATALOG_SCORER_SOURCES, folder)


def publish(store: IndexStore, repository: Path, options: ServeOptions = ServeOptions(),
            force: bool = False, keep: int = DEFAULT_KEEP) -> Published:
    """Write the store's live catalog as catalog_scorer/<next version>; atomic per version."""
    repository = Path(repository)
    ids, vectors = store.catalog()
    if not ids:
        raise PublishError(f"the index at {store.folder} has no items: nothing to serve "
                           "(add items with `mmrec index build` / `mmrec index add`)")
    if not np.isfinite(vectors).all():
        raise PublishError(f"the index at {store.folder} holds non-finite vectors; rebuild it")
    fp = fingerprint(ids, vectors)
    existing = versions(repository)
    last = store.published[-1] if store.published else None
    # unchanged only while the last publish is still the newest version: after a rollback
    # (`republish`) the same catalog must be published again to be served again
    if (not force and last is not None and last.get("fingerprint") == fp and existing
            and last.get("version") == existing[-1] and Path(last.get("repository", "")) == repository.resolve()):
        return Published(last["version"], model_dir(repository) / str(last["version"]), len(ids), fp, True)
    layout = RepositoryLayout(repository)
    preprocess = layout.read_contract()
    if preprocess.item_dim != store.dim:
        raise PublishError(f"{repository} serves {preprocess.item_dim}-d item embeddings but the index holds "
                           f"{store.dim}-d vectors: build the index with this repository's encoder")
    folder = model_dir(repository)
    folder.mkdir(parents=True, exist_ok=True)
    _write_if_changed(layout.config_file(schema.CATALOG_SCORER), scorer_config_text(store.dim, preprocess.max_batch_size, options))
    version = (existing[-1] if existing else 0) + 1
    target = _install_version(folder, version, lambda staging: write_version_files(staging, ids, vectors, fp))
    store.record_publish({"version": version, "items": len(ids), "fingerprint": fp,
                          "repository": str(repository.resolve())})
    prune(repository, keep)
    return Published(version, target, len(ids), fp)


def republish(repository: Path, source: int | None = None, keep: int = DEFAULT_KEEP) -> tuple[Published, int]:
    """Roll back by rolling forward: copy version `source` (default: the one before the newest)
    as the next version. Versions only grow, so `version_policy: latest 1`, a restarted replica,
    a poller and a bucket sync all serve the copy, with no per-server override to remember.
    Returns the new version and the version it copies."""
    repository = Path(repository)
    existing = versions(repository)
    if source is None:
        if len(existing) < 2:
            raise PublishError(f"{model_dir(repository)} holds version(s) {existing}: nothing older to roll back "
                               "to (`--keep` sets how many versions publishing leaves on disk)")
        source = existing[-2]
    if source not in existing:
        raise PublishError(f"catalog_scorer has no version {source} on disk (it holds {existing}); "
                           "`mmrec index status` lists them")
    folder = model_dir(repository)
    meta = json.loads((folder / str(source) / INDEX_FILE).read_text())
    version = existing[-1] + 1
    target = _install_version(folder, version, lambda staging: _link_tree(folder / str(source), staging))
    prune(repository, keep)
    return Published(version, target, int(meta["items"]), str(meta["fingerprint"])), source


def _install_version(folder: Path, version: int, fill: Callable[[Path], None]) -> Path:
    """Fill a hidden staging folder, fsync it, rename it to `<folder>/<version>`: a version
    folder is complete or absent, for Triton, a poller or an object-store sync."""
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
    try:
        staging.chmod(0o755)
        fill(staging)
        _fsync_tree(staging)
        target = folder / str(version)
        try:
            os.rename(staging, target)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise PublishError(f"{target} already exists: the local copy is stale: sync it down first (another "
                               "publish, or the bucket, is ahead of it; e.g. `aws s3 sync --delete "
                               "s3://BUCKET/PATH ./repository`), then publish again") from None
        _fsync_dir(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link a published version's files (never written again once published) into
    `target`, copying where links are impossible (another file system)."""
    for path in source.iterdir():
        if path.is_file():
            try:
                os.link(path, target / path.name)
            except OSError:
                shutil.copy2(path, target / path.name)


def prune(repository: Path, keep: int = DEFAULT_KEEP) -> list[int]:
    """Delete all but the newest `keep` versions (a loaded version's mmapped files stay valid)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    old = versions(repository)[:-keep]
    for version in old:
        shutil.rmtree(model_dir(repository) / str(version), ignore_errors=True)
    return old



def load_on_server(url: str, version: int, timeout_s: float = 600.0) -> None:
    """Ask Triton (explicit model control) to load catalog_scorer; check `version` is what serves."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from .server import ADMIN_HEADER_ENV, ADMIN_KEY_ENV, ServerError, admin_header

    try:
        header = admin_header()
    except ServerError as err:
        raise PublishError(str(err)) from None
    client = grpcclient.InferenceServerClient(url)
    key = os.environ.get(ADMIN_KEY_ENV)  # a server that restricts load/unload (mmrec serve --admin-key, the chart)
    headers = {f"triton-grpc-protocol-{header}": key} if key else None
    try:
        try:
            client.load_model(schema.CATALOG_SCORER, headers=headers, client_timeout=timeout_s)
        except InferenceServerException as err:
            message = err.message() or str(err)
            lowered = message.lower()
            hint = (" Live swaps need explicit model control (`mmrec serve`'s default; not --model-control "
                    "none or poll)." if "explicit" in lowered or "not allowed" in lowered else
                    f" The server restricts load/unload: set {ADMIN_KEY_ENV} to the key it was started with "
                    "(`mmrec serve --admin-key`; a non-loopback server started without one allows no load at all), "
                    f"and {ADMIN_HEADER_ENV} when its header is not {header!r} (the chart's "
                    "triton.restrictedApis.header)."
                    if "restricted" in lowered or "unavailable" in lowered and "protocol" in lowered else "")
            if "unavailable" in str(err.status()).lower() and answers_tls(url):
                raise ServerSpeaksTls(tls_hint(url).strip()) from None
            raise PublishError(f"{url} did not load catalog_scorer version {version}: {message}.{hint}") from None
        if not client.is_model_ready(schema.CATALOG_SCORER, str(version)):
            served = list(client.get_model_metadata(schema.CATALOG_SCORER).versions)
            raise PublishError(f"{url} loaded catalog_scorer but serves version(s) {served}, not {version}: "
                               "is it serving this repository?")
    finally:
        client.close()


# ---- several replicas ------------------------------------------------------------------------------

PROBE_TIMEOUT_S = 10.0  # asking a replica which version it serves; a dead one must not stall the report


def resolve_replicas(address: str) -> list[str]:
    """'name:port' -> 'ip:port' for every address the name resolves to: a Kubernetes headless
    Service (`<fullname>-headless`) resolves to each ready pod, which a load must reach one by one
    (through the normal Service it would reach a random pod). One address family only (IPv4 when
    there is any): a dual-stack pod has one address of each, and is one replica."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise PublishError(f"--replicas {address!r} is not NAME:PORT (e.g. mmrec-headless.mmrec.svc:8001)")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise PublishError(f"--replicas {address}: {host!r} does not resolve ({err}); a headless Service's name "
                           "resolves inside the cluster only: run this from a pod or a Job there") from None
    addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
    family = 4 if any(a.version == 4 for a in addresses) else 6
    chosen = sorted(a for a in addresses if a.version == family)
    return [f"[{a}]:{port}" if a.version == 6 else f"{a}:{port}" for a in chosen]


Resolver = Callable[[str], list[str]]  # 'name:port' -> its addresses (resolve_replicas; tests inject theirs)
RESOLVE_PAUSE_S = 2.0  # between resolutions that must agree: DNS follows the endpoints with a delay
MAX_RESOLVES = 10  # resolutions (and rounds of loading new addresses) before calling the fleet unsettled


def replica_urls(urls: Iterable[str] = (), replicas: Iterable[str] = (),
                 resolve: Resolver = resolve_replicas) -> list[str]:
    """Every server to load on, in order: the given URLs, then each resolved replica; once each."""
    found: list[str] = []
    for url in [*urls, *(u for name in replicas for u in resolve(name))]:
        if not url or not url.strip():
            raise PublishError("an empty --url: give host:port")
        if url.strip() not in found:
            found.append(url.strip())
    return found


@dataclass(frozen=True)
class ReplicaSet:
    """The servers a rollout loads on: fixed --url addresses, and --replicas names whose addresses
    change while it runs (a pod becomes ready, scale-in removes one), so they are resolved again."""

    urls: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    resolve: Resolver = resolve_replicas
    pause_s: float = RESOLVE_PAUSE_S

    def addresses(self) -> list[str]:
        return replica_urls(self.urls, self.names, self.resolve)

    def settled(self) -> list[str]:
        """The names' addresses once two resolutions in a row agree."""
        current = replica_urls((), self.names, self.resolve)
        for _ in range(MAX_RESOLVES - 1):
            time.sleep(self.pause_s)
            again = replica_urls((), self.names, self.resolve)
            if set(again) == set(current):
                return again
            current = again
        raise PublishError(f"--replicas {' '.join(self.names)} resolved to different addresses {MAX_RESOLVES} times "
                           "in a row: the Deployment is still scaling; run the same command again once it settles")

    def left(self, url: str) -> bool:
        """True when `url` came from a name that no longer resolves to it (its pod is gone)."""
        if not self.names or url in self.urls:
            return False
        try:
            return url not in replica_urls((), self.names, self.resolve)
        except PublishError:
            return False  # DNS trouble is not evidence that the pod left


@dataclass(frozen=True)
class ReplicaState:
    """One replica after a rollout: the catalog_scorer versions it serves and what happened."""

    url: str
    serves: tuple[int, ...]  # ready versions; () when it serves none or could not be asked
    outcome: str  # "loaded" | "already serving" | "failed" | "not tried" | "checked" | "gone" (left DNS)
    error: str = ""  # why its versions could not be read


@dataclass(frozen=True)
class Rollout:
    version: int
    replicas: tuple[ReplicaState, ...]


class RolloutStopped(PublishError):
    """A replica did not load the version: the rollout stopped there; `rollout` says who serves what."""

    def __init__(self, message: str, rollout: Rollout) -> None:
        super().__init__(message)
        self.rollout = rollout


def served_versions(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[tuple[int, ...], str]:
    """The catalog_scorer versions `url` serves now (ready ones), or () and why not."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url)
    try:
        metadata = client.get_model_metadata(schema.CATALOG_SCORER, client_timeout=timeout_s)
        return tuple(sorted(int(v) for v in metadata.versions)), ""
    except InferenceServerException as err:
        why = " ".join((err.message() or str(err)).split())
        if "unavailable" in str(err.status()).lower() and answers_tls(url):
            why = tls_hint(url).strip()
        return (), why
    finally:
        client.close()


def tls_hint(url: str, what: str = "load or check versions") -> str:
    """Why a call to `url` failed when the port speaks TLS, and what to do instead."""
    return (f" {url} serves gRPC over TLS, and `mmrec index` speaks plaintext gRPC only (it has no TLS "
            f"options), so it cannot {what} there: run it against servers with gRPC TLS off "
            "(chart: triton.grpc.tls.enabled=false), or publish with --no-load and restart the replicas.")


def check_not_behind(repository: Path, urls: Sequence[str]) -> None:
    """Refuse to publish from a stale local copy: the next version number comes from the folders on
    disk, so a copy behind the bucket would write a version the replicas already serve (or older)."""
    newest = (versions(repository) or [0])[-1]
    ahead = {url: max(serves) for url in urls if (serves := served_versions(url)[0]) and max(serves) > newest}
    if ahead:
        listing = ", ".join(f"{url} serves version {v}" for url, v in ahead.items())
        raise PublishError(f"{listing}, but the newest catalog_scorer version in {model_dir(repository)} is "
                           f"{newest or 'none'}: the local copy is stale: sync it down first (e.g. `aws s3 sync "
                           "--delete s3://BUCKET/PATH ./repository`), then publish again")


def roll_out(replicas: ReplicaSet, version: int) -> Rollout:
    """Load `version` on each replica in turn (each checked to serve it before the next is asked).
    A replica already serving exactly `version` is left alone (Triton would load it again, seen in
    its log), so running a stopped rollout again only loads the rest. The first failure stops the
    rollout: RolloutStopped, with every replica's versions. Then the names are resolved again until
    they agree, new addresses loaded, and every replica must serve `version` (else RolloutStopped)."""
    queue = replicas.addresses()
    if not queue:
        raise PublishError("no replica to load on: give --url HOST:PORT (repeatable) or --replicas NAME:PORT")
    done: dict[str, ReplicaState] = {}
    for _ in range(MAX_RESOLVES):
        for index, url in enumerate(queue):
            try:
                done[url] = _load_one(replicas, url, version)
            except ServerSpeaksTls:
                raise
            except PublishError as err:
                total = len(done) + len(queue) - index
                position = len(done) + 1
                rest = [_state(u, "not tried") for u in queue[index + 1:]]
                rollout = Rollout(version, (*done.values(), _state(url, "failed"), *rest))
                raise RolloutStopped(f"{err} The rollout stopped at replica {position} of {total}.",
                                     rollout) from None
        if not replicas.names:
            break
        current = replicas.settled()
        queue = [u for u in current if u not in done]
        if not queue:
            break
    else:
        raise PublishError(f"--replicas {' '.join(replicas.names)} kept resolving to new addresses: the Deployment "
                           "is still scaling; run the same command again once it settles")
    return _verify(replicas, version, done, set(current) if replicas.names else set())


def _load_one(replicas: ReplicaSet, url: str, version: int) -> ReplicaState:
    serves, why = served_versions(url)
    if serves == (version,):
        return ReplicaState(url, serves, "already serving")
    if why and replicas.left(url):  # unreachable because scale-in removed its pod
        return ReplicaState(url, (), "gone", why)
    try:
        load_on_server(url, version)
    except PublishError as err:
        if replicas.left(url):
            return ReplicaState(url, (), "gone", str(err))
        raise
    return ReplicaState(url, (version,), "loaded")


def _verify(replicas: ReplicaSet, version: int, done: dict[str, ReplicaState], resolved: set[str]) -> Rollout:
    """Ask every replica still there which versions it serves; each must serve `version`."""
    states = []
    for url, state in done.items():
        if state.outcome == "gone" or (replicas.names and url not in replicas.urls and url not in resolved):
            states.append(ReplicaState(url, (), "gone", state.error))
            continue
        serves, why = served_versions(url)
        states.append(ReplicaState(url, serves, state.outcome if version in serves else "failed", why))
    rollout = Rollout(version, tuple(states))
    missing = [s.url for s in states if s.outcome == "failed"]
    if missing:
        raise RolloutStopped(f"after the rollout, {', '.join(missing)} do(es) not serve catalog_scorer version "
                             f"{version} (restarted meanwhile, or serving another copy of the repository?).", rollout)
    return rollout


def check_replicas(urls: Sequence[str]) -> list[ReplicaState]:
    """Which version each replica serves (`mmrec index status --url/--replicas`)."""
    return [_state(url, "checked") for url in urls]


def _state(url: str, outcome: str) -> ReplicaState:
    serves, why = served_versions(url)
    return ReplicaState(url, serves, outcome, why)


def _write_if_changed(path: Path, text: str) -> None:
    """Rewriting an identical config would be harmless, but a changed one makes Triton reload
    every version rather than swap: only write when it differs."""
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
