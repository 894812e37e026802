"""recommend(): the served catalog index (catalog_scorer), shared by the sync and async clients.

The catalog model is optional on a server (it exists once `mmrec index build` published one),
so connect() does not require it; the first recommend() checks it and reads its config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mmrec import schema
from mmrec.model_repository.lib.runner_settings import CatalogSettings

from ._errors import InvalidItemError, MMRecError
from ._requests import InferRequest, chunk_slices
from ._results import RankedItem

CATALOG_OUTPUTS = (schema.ITEM_IDS, schema.ITEM_ROWS, schema.SCORE)
INDEX_HINT = ("publish a catalog index first: `mmrec index build --items CATALOG.jsonl --repository R "
              "--url HOST:PORT` (server started with `mmrec serve --model-control explicit`)")


@dataclass(frozen=True)
class CatalogInfo:
    """What the catalog_scorer config tells the client: width, K limits, batch limit."""

    model: str
    dim: int
    max_k: int
    default_k: int
    max_batch_size: int


def catalog_info(config: dict, model: str) -> CatalogInfo:
    """Parse the catalog_scorer config (JSON form, as tritonclient returns it)."""
    dims = next((t["dims"] for t in config.get("input", []) if t["name"] == schema.USER_EMBEDDING), None)
    try:
        settings = CatalogSettings.from_parameters(config.get("parameters", {}))
        return CatalogInfo(model, int(dims[0]), settings.max_k, settings.default_k,
                           int(config.get("max_batch_size", 0)) or 1)
    except (TypeError, KeyError, ValueError, IndexError):
        raise MMRecError(f"model {model!r} is not an mmrec catalog_scorer (config lacks {schema.USER_EMBEDDING} "
                         "or max_k/default_k); republish it with `mmrec index build`") from None


def check_k(k: int, exclude: Sequence[str], info: CatalogInfo) -> int:
    """How many to ask the server for: k plus room for the excluded ids."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    want = int(k) + len(exclude)
    if want > info.max_k:
        raise ValueError(f"k={k} plus {len(exclude)} excluded ids asks for {want} items, over the server's "
                         f"max_k of {info.max_k} (`mmrec index build --max-k` raises it)")
    return want


def catalog_requests(model: str, users: np.ndarray, k: int, batch: int) -> list[InferRequest]:
    """One catalog_scorer request per `batch` users; every row asks for the same K."""
    return [InferRequest(model, {schema.USER_EMBEDDING: np.ascontiguousarray(users[s]),
                                 schema.TOP_K: np.full((s.stop - s.start, 1), k, dtype=np.int32)},
                         CATALOG_OUTPUTS, s.start)
            for s in chunk_slices(len(users), batch)]


def recommend_requests(users: np.ndarray, k: int, exclude: Sequence[str], info: CatalogInfo
                       ) -> list[InferRequest]:
    """Check k and the user width against the index, then the requests: what the sync and
    async clients' recommend() send (none for zero users)."""
    want = check_k(k, exclude, info)
    if users.shape[1] != info.dim:
        raise InvalidItemError(None, f"user vectors have {users.shape[1]} values; the index holds {info.dim}-d items")
    return catalog_requests(info.model, users, want, info.max_batch_size) if len(users) else []


def ranked_from_chunks(chunks: Sequence[dict[str, np.ndarray]], k: int,
                       exclude: Sequence[str] = ()) -> list[list[RankedItem]]:
    """Per user, RankedItem(row in the served index, item id, σ(item·user)), best first."""
    skip = set(exclude)
    ranked: list[list[RankedItem]] = []
    for chunk in chunks:
        ids, rows, scores = (chunk[name] for name in CATALOG_OUTPUTS)
        for user_ids, user_rows, user_scores in zip(ids, rows, scores):
            hits = [RankedItem(int(r), i.decode("utf-8") if isinstance(i, bytes) else str(i), float(s))
                    for i, r, s in zip(user_ids, user_rows, user_scores)]
            ranked.append([h for h in hits if h.item_id not in skip][:k])
    return ranked
