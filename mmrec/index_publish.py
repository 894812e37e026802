"""Publish a catalog index as the next version of the `catalog_scorer` model, and swap it live.

A version is written into a hidden staging folder inside the model folder and renamed into
place, so Triton (or a poller, or an object-store sync) never sees half a version. With explicit
model control, `load_model` makes Triton load the new version while the old one keeps answering;
`version_policy: latest 1` then retires the old one after its in-flight requests. Each response
comes from one version (one model instance runs the whole scan).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import schema
from .index_graph import MODEL_FILE, RERANK_MARGIN, write_scan_graph
from .index_store import CatalogIndexError, IndexStore
from .layout import RepositoryLayout
from .model_repository.lib.catalog_scan import INDEX_FILE
from .model_repository.lib.runner_settings import DEFAULT_K, DEFAULT_MAX_K, CatalogSettings  # noqa: F401

STAGING_PREFIX = ".staging-"
DEFAULT_KEEP = 2  # versions kept on disk: the served one and one to roll back to


class PublishError(CatalogIndexError):
    """A version could not be written, or the server did not load it."""


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
    if (not force and last is not None and last.get("fingerprint") == fp
            and last.get("version") in existing and Path(last.get("repository", "")) == repository.resolve()):
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
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
    try:
        staging.chmod(0o755)
        write_version_files(staging, ids, vectors, fp)
        _fsync_tree(staging)
        target = folder / str(version)
        os.rename(staging, target)  # atomic: a version folder is complete or absent
        _fsync_dir(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    store.record_publish({"version": version, "items": len(ids), "fingerprint": fp,
                          "repository": str(repository.resolve())})
    prune(repository, keep)
    return Published(version, target, len(ids), fp)


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

    from .server import ADMIN_HEADER, ADMIN_KEY_ENV

    client = grpcclient.InferenceServerClient(url)
    key = os.environ.get(ADMIN_KEY_ENV)  # a server that restricts load/unload (mmrec serve --admin-key, the chart)
    headers = {f"triton-grpc-protocol-{ADMIN_HEADER}": key} if key else None
    try:
        try:
            client.load_model(schema.CATALOG_SCORER, headers=headers, client_timeout=timeout_s)
        except InferenceServerException as err:
            message = err.message() or str(err)
            lowered = message.lower()
            hint = (" Live swaps need explicit model control (`mmrec serve`'s default; not --model-control "
                    "none or poll)." if "explicit" in lowered or "not allowed" in lowered else
                    f" The server restricts load/unload: set {ADMIN_KEY_ENV} to the key it was started with "
                    "(`mmrec serve --admin-key`; a non-loopback server started without one allows no load at all)."
                    if "restricted" in lowered or "unavailable" in lowered and "protocol" in lowered else "")
            raise PublishError(f"wrote catalog_scorer version {version}, but {url} did not load it: "
                               f"{message}.{hint}") from None
        if not client.is_model_ready(schema.CATALOG_SCORER, str(version)):
            served = list(client.get_model_metadata(schema.CATALOG_SCORER).versions)
            raise PublishError(f"{url} loaded catalog_scorer but serves version(s) {served}, not {version}: "
                               "is it serving this repository?")
    finally:
        client.close()


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
