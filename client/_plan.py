"""Turns a client call into batch-sized requests; shared by the sync and asyncio clients.

No I/O here: the planner validates input, cuts it into requests of at most the server's
max_batch_size, and (with local preprocessing) decodes images with the server's own decoder
when a request is built, so only `concurrency` decoded batches are alive at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator, Sequence

import numpy as np

from ._errors import InvalidItemError
from ._items import Item, PreparedItems, embedding_matrix, prepare_items, user_embedding
from ._requests import InferRequest, chunk_slices, item_request, pixel_request, scorer_request
from ._server_info import ModelNames, ServerInfo


@dataclass(frozen=True)
class PendingRequest:
    """A request built on demand; `cpu_bound` builds run off the event loop in asyncio."""

    build: Callable[[], InferRequest]
    cpu_bound: bool = False


class Planner:
    def __init__(self, info: ServerInfo, names: ModelNames, local_preprocessing: bool,
                 shared_memory: bool) -> None:
        self.info = info
        self.names = names
        self.local_preprocessing = local_preprocessing
        self.shared_memory = shared_memory
        self.decoder = None
        if local_preprocessing:
            from mmrec.model_repository.lib.image_preprocessing import ImageDecoder

            self.decoder = ImageDecoder.for_contract(info.preprocess)

    # ---- validation
    def items(self, items: Sequence[Item | tuple]) -> PreparedItems:
        return prepare_items(items, self.info.limits)

    def user(self, user: object) -> np.ndarray:
        return user_embedding(user, self.info.item_dim)

    def embeddings(self, values: object, what: str) -> np.ndarray:
        return embedding_matrix(values, self.info.item_dim, what)

    # ---- request plans
    def _slices(self, count: int) -> list[slice]:
        return chunk_slices(count, self.info.max_batch_size)

    def encode(self, items: PreparedItems) -> list[PendingRequest]:
        """item_encoder requests, or item_encoder_pixels with client-side decoding."""
        if self.local_preprocessing:
            return [PendingRequest(self._pixel_builder(items, s), cpu_bound=True)
                    for s in self._slices(len(items))]
        return [PendingRequest(lambda s=s: item_request(self.names.item_encoder, items.texts[s],
                                                        items.images[s], s.start))
                for s in self._slices(len(items))]

    def score_items(self, items: PreparedItems, user: np.ndarray) -> list[PendingRequest]:
        """interest_scorer requests (server-side preprocessing only)."""
        return [PendingRequest(lambda s=s: item_request(self.names.interest_scorer, items.texts[s],
                                                        items.images[s], s.start, user))
                for s in self._slices(len(items))]

    def score_embeddings(self, embeddings: np.ndarray, user: np.ndarray) -> list[PendingRequest]:
        """scorer member requests on precomputed item embeddings."""
        return [PendingRequest(lambda s=s: scorer_request(self.names.scorer, embeddings[s], user, s.start))
                for s in self._slices(len(embeddings))]

    def _pixel_builder(self, items: PreparedItems, s: slice) -> Callable[[], InferRequest]:
        def build() -> InferRequest:
            return pixel_request(self.names.item_encoder_pixels, items.texts[s],
                                 self.decode(items.images[s], s.start), s.start, self.shared_memory)
        return build

    def decode(self, images: Sequence[bytes], offset: int) -> np.ndarray:
        """The server's decoder, client-side; a bad image is an InvalidItemError with its index."""
        frames = []
        for i, data in enumerate(images):
            try:
                frames.append(self.decoder.decode(data, offset + i))
            except ValueError as err:  # the decoder's InvalidImage
                raise InvalidItemError(offset + i, f"image rejected by the server's decoder: {err}") from None
        return self.decoder.normalize(np.stack(frames))


def bisect_bad_item(request: InferRequest) -> Generator[InferRequest, bool, int | None]:
    """Locate the first item a failed request was rejected for.

    Yields sub-requests to try; send back True if the server rejects that one with
    INVALID_ARGUMENT. Returns the item's index in the caller's list, or None when every
    half passes on its own (the batch as a whole was the problem). log2(N) probes.
    """
    while len(request) > 1:
        left, right = request.halves()
        if (yield left):
            request = left
        elif (yield right):
            request = right
        else:
            return None
    return request.offset
