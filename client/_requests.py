"""Protocol-free inference requests: model, named batch-first arrays, outputs, item offset.

The batching, retry and bisection logic works on these; only the transport turns them into
tritonclient InferInput objects, so gRPC/HTTP and sync/async share every other line.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from mmrec import schema

ITEM_OUTPUTS = (schema.ITEM_EMBEDDING, schema.INTEREST_PROBS, schema.ALIGNMENT)


@dataclass(frozen=True)
class CallOptions:
    """tritonclient's per-request options, with its names and units."""

    request_id: str = ""
    priority: int = 0
    timeout: int | None = None  # server-side, microseconds
    client_timeout: float | None = None  # end to end, seconds
    headers: dict[str, str] | None = None

    def for_chunk(self, chunk: int, chunks: int) -> "CallOptions":
        """One call may become several requests; suffix the id so server logs can tell them apart."""
        if not self.request_id or chunks == 1:
            return self
        return replace(self, request_id=f"{self.request_id}:{chunk}")


@dataclass(frozen=True)
class InferRequest:
    """One request; `offset` is the index of its first row in the caller's item list."""

    model: str
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...]
    offset: int = 0
    shared_memory_inputs: frozenset[str] = field(default_factory=frozenset)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def halves(self) -> tuple["InferRequest", "InferRequest"]:
        """Split rows in two, keeping offsets, for locating a bad item by bisection."""
        mid = len(self) // 2
        left = {k: v[:mid] for k, v in self.inputs.items()}
        right = {k: v[mid:] for k, v in self.inputs.items()}
        return (replace(self, inputs=left), replace(self, inputs=right, offset=self.offset + mid))


def chunk_slices(count: int, size: int) -> list[slice]:
    """[0, count) cut into consecutive slices of at most `size` rows."""
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def bytes_column(values: Sequence[bytes]) -> np.ndarray:
    """A BYTES tensor [N, 1] as tritonclient wants it (object array)."""
    column = np.empty((len(values), 1), dtype=object)
    column[:, 0] = list(values)
    return column


def item_request(model: str, texts: Sequence[bytes], images: Sequence[bytes], offset: int,
                 user: np.ndarray | None = None) -> InferRequest:
    """item_encoder (or interest_scorer when `user` is given) over encoded images."""
    inputs = {schema.TEXT: bytes_column(texts), schema.IMAGE: bytes_column(images)}
    outputs = ITEM_OUTPUTS
    if user is not None:
        inputs[schema.USER_EMBEDDING] = np.ascontiguousarray(np.broadcast_to(user, (len(texts), user.shape[0])))
        outputs = ITEM_OUTPUTS + (schema.SCORE,)
    return InferRequest(model, inputs, outputs, offset)


def pixel_request(model: str, texts: Sequence[bytes], pixels: np.ndarray, offset: int,
                  shared_memory: bool = False) -> InferRequest:
    """item_encoder_pixels over client-decoded pixel_values [N, 3, S, S]."""
    return InferRequest(model, {schema.TEXT: bytes_column(texts),
                                schema.PIXELS: np.ascontiguousarray(pixels, dtype=np.float32)},
                        ITEM_OUTPUTS, offset,
                        frozenset({schema.PIXELS}) if shared_memory else frozenset())


def scorer_request(model: str, items: np.ndarray, user: np.ndarray, offset: int) -> InferRequest:
    """The scorer member on precomputed item embeddings."""
    users = np.ascontiguousarray(np.broadcast_to(user, items.shape))
    return InferRequest(model, {schema.ITEM_EMBEDDING_MEMBER: np.ascontiguousarray(items),
                                schema.USER_EMBEDDING_MEMBER: users},
                        (schema.SCORE_MEMBER,), offset)
