"""What the client returns: encoded items, ranked candidates, and how chunks are stitched back."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from mmrec import schema


@dataclass(frozen=True)
class EncodedItems:
    """Per-item outputs of `item_encoder`, in the order the items were given."""

    item_embedding: np.ndarray  # [N, D] float32, L2-normalized
    interest_probs: np.ndarray  # [N, C] float32
    alignment: np.ndarray  # [N] float32, cosine(text, image) in the shared space
    categories: tuple[str, ...]
    item_ids: tuple[str | None, ...] = ()

    def __len__(self) -> int:
        return len(self.item_embedding)

    def top_interests(self, k: int = 3) -> list[list[tuple[str, float]]]:
        """Per item, the k most probable interest categories as (name, probability), best first."""
        k = max(0, min(k, len(self.categories)))
        order = np.argsort(-self.interest_probs, axis=1, kind="stable")[:, :k]
        return [[(self.categories[j], float(self.interest_probs[i, j])) for j in row]
                for i, row in enumerate(order)]


class RankedItem(NamedTuple):
    """One ranked candidate: its position in the candidate list (recommend: its row in the served
    catalog index), its id, and its score σ(item·user)."""

    index: int
    item_id: str | None
    score: float


def empty_encoded(dim: int, categories: tuple[str, ...]) -> EncodedItems:
    return EncodedItems(np.zeros((0, dim), np.float32), np.zeros((0, len(categories)), np.float32),
                        np.zeros((0,), np.float32), categories, ())


def encoded_from_chunks(chunks: Sequence[dict[str, np.ndarray]], categories: tuple[str, ...],
                        item_ids: tuple[str | None, ...]) -> EncodedItems:
    """Concatenate per-request outputs (in request order) into one EncodedItems."""
    def cat(name: str) -> np.ndarray:
        return np.concatenate([c[name] for c in chunks], axis=0)

    return EncodedItems(cat(schema.ITEM_EMBEDDING), cat(schema.INTEREST_PROBS),
                        cat(schema.ALIGNMENT).reshape(-1), categories, item_ids)


def scores_from_chunks(chunks: Sequence[dict[str, np.ndarray]], name: str) -> np.ndarray:
    if not chunks:
        return np.zeros((0,), np.float32)
    return np.concatenate([c[name] for c in chunks], axis=0).reshape(-1)


def top_k(scores: np.ndarray, k: int | None, item_ids: Sequence[str | None]) -> list[RankedItem]:
    """Best k by score, descending; equal scores keep candidate order (stable)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    if k is not None:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        order = order[:k]
    ids = list(item_ids) or [None] * len(scores)
    return [RankedItem(int(i), ids[i], float(scores[i])) for i in order]
