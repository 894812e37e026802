"""The catalog index on disk: content-addressed item vectors plus an append-only journal.

Why a journal: a build over a big catalog is interrupted sooner or later (Ctrl-C, a deploy, a
killed pod). Every committed batch appends its vectors to `vectors.f32` (fsync) and then one
journal line per fact to `journal.jsonl` (fsync). Reopening replays the journal: a torn last
line is dropped and vector rows the journal never acknowledged are truncated, so the state is
exactly "every committed batch, nothing else", and a restarted build encodes only what is left.

Vectors are keyed by content hash (text bytes + image bytes), not by id: an unchanged item is
never re-encoded, two ids with the same content share one vector, and an id whose content
changed gets a new vector. Ids map to hashes; the published catalog is the live ids in the
order they were first added.

Folder layout (the "build folder", next to the repository by default):
    meta.json       {"format", "dim", "probe"}: written once; the probe item detects an encoder
                    change (a re-exported model makes every stored vector stale)
    vectors.f32     raw float32 rows [R, D], append-only
    journal.jsonl   {"op": "vec"|"set"|"del"|"bad"|"publish", ...} per line, append-only
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

FORMAT = 1
META_FILE = "meta.json"
VECTORS_FILE = "vectors.f32"
JOURNAL_FILE = "journal.jsonl"
HASH_PREFIX = b"mmrec-item-v1\0"
BUILD_SUFFIX = ".index"  # default build folder: <repository>.index beside the repository


class CatalogIndexError(Exception):
    """Base of the catalog index's errors."""


class IndexCorrupt(CatalogIndexError):
    """The build folder contradicts itself (e.g. journal rows missing from vectors.f32)."""


class EncoderChanged(CatalogIndexError):
    """The encoder now gives different vectors than the ones stored: mixing them is wrong."""


def default_build_dir(repository: Path) -> Path:
    """`<repository>.index` beside the repository: never inside it, where Triton would take
    every folder for a model."""
    repository = Path(repository).resolve()
    return repository.with_name(repository.name + BUILD_SUFFIX)


def content_hash(text: str, image: bytes) -> str:
    """sha256 of the item's content: text bytes (length-prefixed, so no two splits collide) +
    image bytes. The id is not part of it: it identifies content, not the item."""
    data = text.encode("utf-8")
    h = hashlib.sha256(HASH_PREFIX)
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)
    h.update(image)
    return h.hexdigest()


# ------------------------------------------------------------------------------------- catalog

@dataclass(frozen=True)
class CatalogEntry:
    """One line of a catalog JSONL that could be read: its id, text and image bytes."""

    line: int
    item_id: str
    text: str
    image: bytes

    @property
    def hash(self) -> str:
        return content_hash(self.text, self.image)


@dataclass(frozen=True)
class BadEntry:
    """A line that cannot be indexed, and why; reported by id (or line number when it has none)."""

    line: int
    item_id: str | None
    error: str

    @property
    def label(self) -> str:
        return self.item_id if self.item_id is not None else f"line {self.line}"


def count_lines(path: Path) -> int:
    """Non-empty lines (for the progress bar's total)."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def read_catalog(path: Path) -> Iterator[CatalogEntry | BadEntry]:
    """Lines of {"text": str, "image": path, "id": str} (as `mmrec score --items`); image paths
    are relative to the file. Unusable lines come back as BadEntry instead of stopping the read."""
    path = Path(path)
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            yield _entry(path, number, line)


def _entry(path: Path, number: int, line: str) -> CatalogEntry | BadEntry:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return BadEntry(number, None, f"not JSON ({err.msg})")
    if not isinstance(record, dict):
        return BadEntry(number, None, 'expected an object {"text": str, "image": path, "id": str}')
    raw_id = record.get("id")
    item_id = None if raw_id is None or isinstance(raw_id, (dict, list)) else str(raw_id)
    if item_id is None or not item_id.strip():
        return BadEntry(number, None, 'no "id": an indexed item needs an id (it is what recommend returns)')
    text, image = record.get("text"), record.get("image")
    if not isinstance(text, str) or not text.strip():
        return BadEntry(number, item_id, '"text" is missing or empty')
    if not isinstance(image, str) or not image:
        return BadEntry(number, item_id, '"image" must be a file path')
    image_path = Path(image) if Path(image).is_absolute() else path.parent / image
    try:
        data = image_path.read_bytes()
    except OSError as err:
        return BadEntry(number, item_id, f"image {image_path} cannot be read ({err.strerror or err})")
    if not data:
        return BadEntry(number, item_id, f"image {image_path} is empty (0 bytes)")
    return CatalogEntry(number, item_id, text, data)


# ---------------------------------------------------------------------------------------- store

@dataclass
class Probe:
    """One stored item kept with its content, re-encoded at every build to detect encoder drift."""

    text: str
    image: bytes
    row: int

    def to_json(self) -> dict:
        return {"text": self.text, "image_b64": base64.b64encode(self.image).decode(), "row": self.row}

    @classmethod
    def from_json(cls, data: dict) -> "Probe":
        return cls(data["text"], base64.b64decode(data["image_b64"]), int(data["row"]))


@dataclass
class Commit:
    """What one batch adds: new vectors (by hash), id assignments, removals, bad items."""

    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    assign: dict[str, str] = field(default_factory=dict)  # id -> hash
    remove: list[str] = field(default_factory=list)
    bad: list[BadEntry] = field(default_factory=list)
    bad_hashes: dict[str, str] = field(default_factory=dict)  # id -> hash of the bad content

    def __bool__(self) -> bool:
        return bool(self.vectors or self.assign or self.remove or self.bad)


class IndexStore:
    """An open build folder: replayed state plus append-only writers. One writer at a time."""

    def __init__(self, folder: Path, dim: int, meta: dict) -> None:
        self.folder = Path(folder)
        self.dim = dim
        self.meta = meta
        self.rows: dict[str, int] = {}  # content hash -> row in vectors.f32
        self.items: dict[str, str] = {}  # id -> content hash, in first-added order
        self.bad: dict[str, tuple[str | None, str]] = {}  # id -> (content hash or None, error)
        self.published: list[dict] = []
        self._lock_fd: int | None = None

    # ---- opening
    @classmethod
    def open(cls, folder: Path, dim: int | None = None) -> "IndexStore":
        """Open (or, given `dim`, create) a build folder and replay its journal."""
        folder = Path(folder)
        meta_path = folder / META_FILE
        if not meta_path.is_file():
            if dim is None:
                raise FileNotFoundError(f"no catalog index at {folder}: build one with "
                                        "`mmrec index build --items CATALOG.jsonl --repository R`")
            folder.mkdir(parents=True, exist_ok=True)
            meta = {"format": FORMAT, "dim": int(dim), "probe": None}
            _atomic_write(meta_path, json.dumps(meta, indent=1))
            (folder / VECTORS_FILE).touch()
            (folder / JOURNAL_FILE).touch()
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise IndexCorrupt(f"{meta_path} has format {meta.get('format')}, this mmrec reads {FORMAT}")
        if dim is not None and int(meta["dim"]) != int(dim):
            raise EncoderChanged(f"the index at {folder} holds {meta['dim']}-d vectors but the encoder "
                                 f"gives {dim}-d: rebuild it (`mmrec index build --rebuild`)")
        store = cls(folder, int(meta["dim"]), meta)
        store._lock()
        store._replay()
        return store

    def _lock(self) -> None:
        """An exclusive advisory lock: two builds appending to one journal would interleave."""
        import fcntl

        fd = os.open(self.folder / JOURNAL_FILE, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CatalogIndexError(f"another `mmrec index` command is writing {self.folder}; wait for it") from None
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> "IndexStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _replay(self) -> None:
        journal = self.folder / JOURNAL_FILE
        data = journal.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):  # a torn last line: that batch never committed
            with open(journal, "rb+") as f:
                f.truncate(complete)
                os.fsync(f.fileno())
        rows = 0
        for number, line in enumerate(data[:complete].splitlines(), start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise IndexCorrupt(f"{journal}:{number} is not JSON; the build folder was edited by hand?") from None
            op = record.get("op")
            if op == "vec":
                if record["row"] != rows:
                    raise IndexCorrupt(f"{journal}:{number}: row {record['row']} out of order (expected {rows})")
                self.rows[record["hash"]] = rows
                rows += 1
            elif op == "set":
                self.items[record["id"]] = record["hash"]
                self.bad.pop(record["id"], None)
            elif op == "del":
                self.items.pop(record["id"], None)
                self.bad.pop(record["id"], None)
            elif op == "bad":
                self.bad[record["id"]] = (record.get("hash"), record["error"])
            elif op == "publish":
                self.published.append(record)
        vectors = self.folder / VECTORS_FILE
        size, want = vectors.stat().st_size, rows * self.dim * 4
        if size < want:
            raise IndexCorrupt(f"{vectors} holds {size // (self.dim * 4)} rows but the journal commits {rows}; "
                               "rebuild the index (`mmrec index build --rebuild`)")
        if size > want:  # vectors written by a batch whose journal lines never landed
            with open(vectors, "rb+") as f:
                f.truncate(want)
                os.fsync(f.fileno())

    # ---- reading
    @property
    def vector_rows(self) -> int:
        return len(self.rows)

    def vectors(self) -> np.ndarray:
        """All stored rows [R, D] (memory-mapped, read-only)."""
        if not self.rows:
            return np.zeros((0, self.dim), np.float32)
        return np.memmap(self.folder / VECTORS_FILE, dtype=np.float32, mode="r",
                         shape=(len(self.rows), self.dim))

    def catalog(self) -> tuple[list[str], np.ndarray]:
        """The live catalog: ids in first-added order and their vectors [N, D] (a copy)."""
        ids = list(self.items)
        if not ids:
            return ids, np.zeros((0, self.dim), np.float32)
        stored = self.vectors()
        return ids, np.ascontiguousarray(stored[[self.rows[self.items[i]] for i in ids]])

    @property
    def probe(self) -> Probe | None:
        data = self.meta.get("probe")
        return Probe.from_json(data) if data else None

    # ---- writing
    def commit(self, commit: Commit) -> None:
        """Append a batch durably: vectors first (fsync), then its journal lines (fsync)."""
        if not commit:
            return
        lines: list[dict] = []
        new = [(h, v) for h, v in commit.vectors.items() if h not in self.rows]
        if new:
            block = np.stack([np.asarray(v, np.float32).reshape(self.dim) for _, v in new])
            with open(self.folder / VECTORS_FILE, "ab") as f:
                f.write(block.tobytes())
                f.flush()
                os.fsync(f.fileno())
            start = len(self.rows)
            lines += [{"op": "vec", "hash": h, "row": start + i} for i, (h, _) in enumerate(new)]
        lines += [{"op": "set", "id": i, "hash": h} for i, h in commit.assign.items()]
        lines += [{"op": "del", "id": i} for i in commit.remove]
        lines += [{"op": "bad", "id": b.label, "hash": commit.bad_hashes.get(b.label), "error": b.error}
                  for b in commit.bad]
        self._append(lines)
        for i, (h, _) in enumerate(new):
            self.rows[h] = start + i
        for record in lines[len(new):]:
            if record["op"] == "set":
                self.items[record["id"]] = record["hash"]
                self.bad.pop(record["id"], None)
            elif record["op"] == "del":
                self.items.pop(record["id"], None)
                self.bad.pop(record["id"], None)
            else:
                self.bad[record["id"]] = (record["hash"], record["error"])

    def record_publish(self, info: dict) -> None:
        record = {"op": "publish", **info}
        self._append([record])
        self.published.append(record)

    def set_probe(self, probe: Probe) -> None:
        self.meta["probe"] = probe.to_json()
        _atomic_write(self.folder / META_FILE, json.dumps(self.meta, indent=1))

    def _append(self, records: Iterable[dict]) -> None:
        text = "".join(json.dumps(r, separators=(",", ":"), ensure_ascii=False) + "\n" for r in records)
        if not text:
            return
        with open(self.folder / JOURNAL_FILE, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
