"""Exact top-k over one catalog index version: the fp32 scan graph, then a certificate.

Each version folder holds model.onnx (fp32 scan -> TopK -> exact float64 re-rank -> ids), its
external data (embeddings_t.f32 [D, N] for the scan, embeddings.f32 [N, D] for the re-rank,
both mmapped) and index.json (size, width, graph tensor names, the largest item norm). When the
fp32 scan's last candidate is too close to the exact K-th score for the rounding bound to rule
out a missed row, that user is re-run with 4x the candidates (up to the whole catalog).

Plain Python (numpy + onnxruntime): `mmrec index` copies this file beside the `catalog_scorer`
model.py of every version; tests and the benchmark import it as
`mmrec.model_repository.lib.catalog_scan`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np

try:  # a sibling library module: `from .` in the package, flat beside model.py in Triton's stub
    from .runner_settings import PREPACKING_MODES
except ImportError:
    from runner_settings import PREPACKING_MODES

if TYPE_CHECKING:  # the session comes from the caller's factory (runtime.make_session)
    import onnxruntime as ort

INDEX_FILE = "index.json"
FP32_UNIT_ROUNDOFF = 2.0 ** -24
CANDIDATE_GROWTH = 4  # an uncertified user is re-run with this many times the candidates


class BadRequest(ValueError):
    """A request this index cannot answer (its message goes back as INVALID_ARG)."""


def dot_error_bound(dim: int) -> float:
    """γ_D = D·u / (1 - D·u): relative error bound of an fp32 dot product, any summation order."""
    du = dim * FP32_UNIT_ROUNDOFF
    return du / (1.0 - du)


def certified(kth_logit: np.ndarray, floor: np.ndarray, user_norm: np.ndarray, max_item_norm: float,
              dim: int, candidates: int, items: int) -> np.ndarray:
    """Per user: is the exact top-K over the candidates the exact top-K over the whole catalog?

    A row left out has an fp32 logit <= floor, so its true logit is at most
    floor + γ_D·|u|·|e|; it cannot reach the top K while that stays below the exact K-th logit
    (strictly: an equal one might hold a lower row). A factor 2 covers rounding of the bound
    itself. A zero user scores every row exactly 0 in fp32 too, and TopK keeps the lowest rows
    among ties (ONNX TopK's rule, tested), so its candidates are exact as they are.
    """
    if candidates >= items:
        return np.ones(len(kth_logit), dtype=bool)
    slack = 2.0 * dot_error_bound(dim) * np.asarray(user_norm, np.float64).reshape(-1) * max_item_norm
    gap = np.asarray(kth_logit, np.float64).reshape(-1) - np.asarray(floor, np.float64).reshape(-1)
    return (gap > slack) | ((slack == 0) & (gap >= 0))


# Why prepacking is a choice here: MLAS copies the [D, N] matrix into its GEMM panel layout (heap,
# one copy per session), so a batch of users runs near the sgemm peak, while unpacked every batch
# > 1 repacks the whole matrix per call (measured 2-3x slower). One user is the exception:
# unpacked, M=1 takes MLAS's GEMV path, which streams the mmapped file once (measured 1.0-1.5x
# faster than the packed kernel).
SessionFactory = Callable[..., "ort.InferenceSession"]  # runtime.make_session(path, threads, prepacking=)


class Ranked(NamedTuple):
    """Top-k per user: ids (bytes), rows in this index version, σ(item·user)."""

    ids: np.ndarray  # [B, k] object (bytes)
    rows: np.ndarray  # [B, k] int64
    scores: np.ndarray  # [B, k] float32
    reruns: int = 0  # users re-run with more candidates (certificate failed)


class CatalogScan:
    """One index version: load its graph, validate queries, answer exact top-k."""

    def __init__(self, folder: Path, make_session: SessionFactory, intra_op_threads: int = 0,
                 prepacking: str | bool = "auto") -> None:
        """make_session: runtime.make_session (the one ORT session recipe; a benchmark may pass
        another). prepacking: "off" (one mmapped copy: least
        memory, batches slower), "on" (one packed heap copy: batches fast, one user slower),
        "auto" (both sessions: one user unpacked, batches packed; the index twice in memory)."""
        folder = Path(folder)
        mode = {True: "on", False: "off"}.get(prepacking, prepacking) if isinstance(prepacking, bool) else prepacking
        if mode not in PREPACKING_MODES:
            raise ValueError(f"prepacking must be one of {PREPACKING_MODES}, got {prepacking!r}")
        self.meta = json.loads((folder / INDEX_FILE).read_text())
        self.items = int(self.meta["items"])
        self.dim = int(self.meta["dim"])
        self.max_item_norm = float(self.meta["max_item_norm"])
        self.margin = int(self.meta["rerank_margin"])
        self.tensors = self.meta["tensors"]  # graph input/output names, written from mmrec.schema
        model = folder / self.meta["model_file"]
        self.batched = make_session(model, intra_op_threads, prepacking=mode != "off")
        self.single = make_session(model, intra_op_threads, prepacking=False) if mode == "auto" else self.batched
        self.prepacking = mode
        self.outputs = [self.tensors[k] for k in ("ids", "rows", "scores", "kth_logit", "candidate_floor")]

    def check_users(self, users: np.ndarray, where: str) -> None:
        if users.ndim != 2 or users.shape[1] != self.dim:
            raise BadRequest(f"{where}: {self.tensors['user']} must be [batch, {self.dim}] (this index's "
                             f"width), got {list(users.shape)}")
        if users.size and not np.isfinite(users).all():
            row = int(np.flatnonzero(~np.isfinite(users).all(axis=1))[0])
            raise BadRequest(f"{where}: {self.tensors['user']} row {row} has NaN or infinite values; "
                             "send finite numbers")

    def check_k(self, k: int, max_k: int, where: str) -> None:
        limit = min(max_k, self.items)
        if not 1 <= k <= limit:
            raise BadRequest(f"{where}: {self.tensors['k']}={k} is out of range: this index has "
                             f"{self.items} items and answers 1 <= {self.tensors['k']} <= {limit} "
                             f"(max_k {max_k})")

    def _run(self, users: np.ndarray, k: int, candidates: int) -> list[np.ndarray]:
        feed = {self.tensors["user"]: users,
                self.tensors["k"]: np.array([k], np.int64),
                self.tensors["candidates"]: np.array([candidates], np.int64)}
        session = self.single if len(users) == 1 else self.batched
        return session.run(self.outputs, feed)

    def search(self, users: np.ndarray, k: int) -> Ranked:
        """Exact top-k of every user (rows ranked by σ(item·user) desc, then row asc)."""
        users = np.ascontiguousarray(users, dtype=np.float32)
        candidates = min(self.items, k + self.margin)
        ids, rows, scores, kth, floor = self._run(users, k, candidates)
        norms = np.linalg.norm(users.astype(np.float64), axis=1)
        pending = np.flatnonzero(~certified(kth, floor, norms, self.max_item_norm, self.dim,
                                            candidates, self.items))
        reruns = len(pending)
        while len(pending):
            candidates = min(self.items, candidates * CANDIDATE_GROWTH)
            again = self._run(users[pending], k, candidates)
            ids[pending], rows[pending], scores[pending] = again[0], again[1], again[2]
            ok = certified(again[3], again[4], norms[pending], self.max_item_norm, self.dim,
                           candidates, self.items)
            pending = pending[~ok]
        return Ranked(_as_bytes(ids), rows, scores, reruns)


def _as_bytes(ids: np.ndarray) -> np.ndarray:
    """ORT returns str objects; Triton BYTES tensors carry bytes."""
    out = np.empty(ids.shape, dtype=object)
    out.flat[:] = [s.encode("utf-8") if isinstance(s, str) else s for s in ids.flat]
    return out
