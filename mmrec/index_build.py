"""Encode a catalog into the index: only what is new, each content once, resumable.

The loop reads the catalog in batches, hashes each item's content, and sends to the encoder
only hashes the store has never seen (an unchanged item is skipped; an item whose content is
already stored under another id reuses that vector). Each batch is committed durably before
the next one starts, so a stop — requested (Ctrl-C, SIGTERM: the batch in flight finishes
first) or not (SIGKILL: that batch is lost and re-encoded) — resumes exactly where it left off.

Two encoders, same vectors: `ServerEncoder` sends items to a running server's `item_encoder`
through the mmrec client; `LocalEncoder` runs the served item engine in-process (the
reference pipeline's steps on a native target). Bad items (unreadable image, empty text,
rejected by the server) are reported by id and skipped; an id that had a good version keeps it.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from . import schema
from .index_store import (BadEntry, CatalogEntry, Commit, EncoderChanged, IndexStore, Probe)

DEFAULT_BATCH_SIZE = 64
# A re-exported or differently quantized encoder moves the probe item's vector far more than
# this; server vs in-process encoding of the same model agrees to ~1e-12.
ENCODER_MATCH_MIN_COSINE = 0.9999


class Encoder(Protocol):
    """Item texts + encoded images -> vectors by position, errors by position."""

    dim: int
    items_sent: int  # every item handed to the model, failures included (tests count re-encodes)

    def encode(self, texts: Sequence[str], images: Sequence[bytes]) -> tuple[dict[int, np.ndarray], dict[int, str]]:
        ...

    def close(self) -> None:
        ...


def _short_error(message: str) -> str:
    """'IMAGE[3] is not decodable' -> 'IMAGE is not decodable': positions are batch-internal."""
    return re.sub(r"\b(TEXT|IMAGE)\[\d+\]", r"\1", " ".join(str(message).split()))


class LocalEncoder:
    """The repository's item path in-process, as the server runs it: the served item engine
    (lib/item_engine.py: decode pool, text ∥ image, one fusion) on a portable repository, the
    reference pipeline's steps on a native target (where Triton runs the ensemble's steps)."""

    def __init__(self, repository: Path, batch_size: int = 32, intra_op_threads: int = 0) -> None:
        from .layout import RepositoryLayout
        from .reference import NotAnEngineRepository, ReferencePipeline, in_process_engine

        self.dim = RepositoryLayout(Path(repository)).read_contract().item_dim
        self.batch_size = batch_size
        self.items_sent = 0
        self.engine, self.pipeline = None, None
        try:
            self.engine = in_process_engine(repository)
        except NotAnEngineRepository:
            self.pipeline = ReferencePipeline(repository, intra_op_threads)

    def encode(self, texts: Sequence[str], images: Sequence[bytes]) -> tuple[dict[int, np.ndarray], dict[int, str]]:
        if self.engine is None:
            return self._encode_steps(texts, images)
        from .model_repository.lib.batching import Failure

        errors: dict[int, str] = {}
        requests: dict[int, object] = {}
        for i, (text, image) in enumerate(zip(texts, images)):
            try:  # the served model's own checks: same limits and messages as the server
                requests[i] = self.engine.items(np.array([[text.encode("utf-8")]], dtype=object),
                                                np.array([[image]], dtype=object))
            except ValueError as err:
                errors[i] = _short_error(str(err))
        good = sorted(requests)
        vectors: dict[int, np.ndarray] = {}
        embedding = schema.ITEM_OUTPUTS.index(schema.ITEM_EMBEDDING)
        for start in range(0, len(good), self.batch_size):
            chunk = good[start:start + self.batch_size]
            # one request per item, as the server batches them: a bad image fails only its own row
            results = self.engine.encode_batch([requests[i] for i in chunk])
            self.items_sent += len(chunk)
            for i, result in zip(chunk, results):
                if isinstance(result, Failure):
                    errors[i] = _short_error(result.message)
                else:
                    vectors[i] = result[embedding][0]
        return vectors, errors

    def _encode_steps(self, texts: Sequence[str], images: Sequence[bytes]) -> tuple[dict[int, np.ndarray], dict[int, str]]:
        errors: dict[int, str] = {}
        frames: dict[int, np.ndarray] = {}
        for i, (text, image) in enumerate(zip(texts, images)):
            try:  # the python models' own checks: same limits and messages as the server
                column = np.array([[text.encode("utf-8")]], dtype=object)
                self.pipeline.tokenizer.decode_texts(column)
                frames[i] = self.pipeline.decoder.decode(image, i)
            except ValueError as err:
                errors[i] = _short_error(str(err))
        good = sorted(frames)
        vectors: dict[int, np.ndarray] = {}
        for start in range(0, len(good), self.batch_size):
            chunk = good[start:start + self.batch_size]
            pixels = self.pipeline.decoder.normalize(np.stack([frames[i] for i in chunk]))
            out = self.pipeline.encode_items_pixels([texts[i] for i in chunk], pixels)[schema.ITEM_EMBEDDING]
            self.items_sent += len(chunk)
            vectors.update(zip(chunk, out))
        return vectors, errors

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine, self.pipeline = None, None


class ServerEncoder:
    """A running server's item_encoder through the mmrec client (batched, concurrent, retried)."""

    def __init__(self, url: str, protocol: str = "grpc", client_timeout: float = 120.0) -> None:
        from mmrec.client import MMRecClient

        self.client = MMRecClient(url, protocol, client_timeout=client_timeout)
        self.client.connect()
        self.dim = self.client.server_info.item_dim
        self.items_sent = 0

    def encode(self, texts: Sequence[str], images: Sequence[bytes]) -> tuple[dict[int, np.ndarray], dict[int, str]]:
        from mmrec.client import InvalidItemError, InvalidRequestError, Item

        positions = list(range(len(texts)))
        errors: dict[int, str] = {}
        while positions:
            items = [Item(texts[p], images[p]) for p in positions]
            try:
                self.items_sent += len(items)
                encoded = self.client.encode_items(items)
                return dict(zip(positions, encoded.item_embedding)), errors
            except (InvalidItemError, InvalidRequestError) as err:
                if err.index is None:  # the batch failed as a whole: go item by item
                    return self._one_by_one(positions, texts, images, errors)
                bad = positions.pop(err.index)
                errors[bad] = _short_error(getattr(err, "server_message", None) or getattr(err, "problem", str(err)))
        return {}, errors

    def _one_by_one(self, positions: list[int], texts: Sequence[str], images: Sequence[bytes],
                    errors: dict[int, str]) -> tuple[dict[int, np.ndarray], dict[int, str]]:
        from mmrec.client import InvalidItemError, InvalidRequestError, Item

        vectors = {}
        for p in positions:
            try:
                self.items_sent += 1
                vectors[p] = self.client.encode_items([Item(texts[p], images[p])]).item_embedding[0]
            except (InvalidItemError, InvalidRequestError) as err:
                errors[p] = _short_error(str(err))
        return vectors, errors

    def close(self) -> None:
        self.client.close()


@dataclass
class BuildReport:
    """What one run did; `encoded` counts contents encoded and stored by this run."""

    seen: int = 0
    encoded: int = 0
    reused: int = 0  # content already stored (another id, or an earlier version of this one)
    unchanged: int = 0
    removed: int = 0
    items: int = 0  # live items after the run
    bad: list[BadEntry] = field(default_factory=list)
    interrupted: bool = False
    encoder_items_sent: int = 0

    def to_json(self) -> dict:
        return {"seen": self.seen, "encoded": self.encoded, "reused": self.reused, "unchanged": self.unchanged,
                "removed": self.removed, "items": self.items, "interrupted": self.interrupted,
                "encoder_items_sent": self.encoder_items_sent,
                "bad": [{"id": b.item_id, "line": b.line, "error": b.error} for b in self.bad]}


def batched(entries: Iterable[CatalogEntry | BadEntry], size: int) -> Iterator[list[CatalogEntry | BadEntry]]:
    batch: list[CatalogEntry | BadEntry] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def check_encoder(store: IndexStore, encoder: Encoder) -> None:
    """Re-encode the stored probe item: a different encoder must not extend this index."""
    probe = store.probe
    if probe is None:
        return
    vectors, errors = encoder.encode([probe.text], [probe.image])
    if 0 not in vectors:
        raise EncoderChanged(f"the encoder rejects the index's probe item ({errors.get(0)}); "
                             "rebuild the index with `--rebuild`")
    stored = store.vectors()[probe.row].astype(np.float64)
    now = np.asarray(vectors[0], np.float64)
    cosine = float(stored @ now / max(np.linalg.norm(stored) * np.linalg.norm(now), 1e-30))
    if cosine < ENCODER_MATCH_MIN_COSINE:
        raise EncoderChanged(
            f"the encoder now gives different vectors than the ones in {store.folder} (cosine {cosine:.4f} "
            f"< {ENCODER_MATCH_MIN_COSINE} on its probe item): the models were re-exported or another "
            "variant is served. Rebuild the index with `--rebuild`, or encode with the models it was built with")


def build(store: IndexStore, entries: Iterable[CatalogEntry | BadEntry], encoder: Encoder, *,
          sync: bool, batch_size: int = DEFAULT_BATCH_SIZE, stop: threading.Event | None = None,
          advance: Callable[[int], None] | None = None) -> BuildReport:
    """Bring the store up to date with `entries`.

    sync=True (a full catalog): ids absent from it are removed at the end, but only after the
    whole catalog was read (an interrupted run removes nothing). sync=False: add/update only.
    """
    report = BadEntryCollector()
    result = BuildReport()
    first_line: dict[str, int] = {}
    sent_before = encoder.items_sent
    check_encoder(store, encoder)
    for batch in batched(entries, batch_size):
        commit = Commit()
        pending: dict[str, list[CatalogEntry]] = {}  # hash -> entries waiting for its vector
        for entry in batch:
            result.seen += 1
            if isinstance(entry, BadEntry):
                report.add(entry, commit)
                continue
            if entry.item_id in first_line:
                report.add(BadEntry(entry.line, entry.item_id,
                                    f"duplicate id (first at line {first_line[entry.item_id]}); skipped"), None)
                continue
            first_line[entry.item_id] = entry.line
            content = entry.hash
            if store.items.get(entry.item_id) == content:
                result.unchanged += 1
            elif content in store.rows:
                commit.assign[entry.item_id] = content
                result.reused += 1
            elif store.bad.get(entry.item_id, (None, ""))[0] == content:  # known bad, unchanged
                report.add(BadEntry(entry.line, entry.item_id, store.bad[entry.item_id][1]), None)
            elif content in pending:
                pending[content].append(entry)
                result.reused += 1
            else:
                pending[content] = [entry]
        if pending:
            firsts = [group[0] for group in pending.values()]
            vectors, errors = encoder.encode([e.text for e in firsts], [e.image for e in firsts])
            for i, (content, group) in enumerate(pending.items()):
                vector = vectors.get(i)
                if vector is not None and (vector.shape != (store.dim,) or not np.isfinite(vector).all()):
                    vector, errors[i] = None, f"the encoder returned an unusable vector (shape {vector.shape})"
                if vector is None:
                    for entry in group:
                        commit.bad_hashes[entry.item_id] = content
                        report.add(BadEntry(entry.line, entry.item_id, errors.get(i, "not encoded")), commit)
                    continue
                commit.vectors[content] = vector
                result.encoded += 1
                for entry in group:
                    commit.assign[entry.item_id] = content
        store.commit(commit)
        if store.probe is None and commit.vectors:
            content, entry = next((c, g[0]) for c, g in pending.items() if c in commit.vectors)
            store.set_probe(Probe(entry.text, entry.image, store.rows[content]))
        if advance is not None:
            advance(len(batch))
        if stop is not None and stop.is_set():
            result.interrupted = True
            break
    if sync and not result.interrupted:
        gone = [i for i in store.items if i not in first_line]
        if gone:
            store.commit(Commit(remove=gone))
        result.removed = len(gone)
    result.bad = report.entries
    result.items = len(store.items)
    result.encoder_items_sent = encoder.items_sent - sent_before
    return result


def remove(store: IndexStore, ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """Remove ids from the live catalog; returns (removed, unknown)."""
    removed = [i for i in dict.fromkeys(ids) if i in store.items]
    unknown = [i for i in dict.fromkeys(ids) if i not in store.items]
    if removed:
        store.commit(Commit(remove=removed))
    return removed, unknown


class BadEntryCollector:
    """Bad items of this run, in catalog order; those with an id are also journaled."""

    def __init__(self) -> None:
        self.entries: list[BadEntry] = []

    def add(self, entry: BadEntry, commit: Commit | None) -> None:
        self.entries.append(entry)
        if commit is not None and entry.item_id is not None:
            commit.bad.append(entry)
