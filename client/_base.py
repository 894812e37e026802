"""What the sync and asyncio clients share: settings, connect-time checks, input dispatch.

Only the waiting differs between the two clients (threads vs. asyncio); every decision —
which models must be ready, what their configs mean, how a call is validated and split —
lives here or in the planner, once.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mmrec import schema

from ._errors import (InvalidItemError, MMRecError, ModelNotReadyError, ServerUnavailableError,
                      SERVE_HINT, translate)
from ._items import Item, PreparedItems
from ._plan import Planner
from ._protocols import DEFAULT_CLIENT_TIMEOUT_S, Connection
from ._protocols import protocol as lookup_protocol
from ._requests import CallOptions
from ._retry import RetryPolicy
from ._server_info import ModelNames, ServerInfo, server_info
from ._shm import RegionPool

PIXEL_BYTES = 4  # FP32


class ClientBase:
    """Constructor and shared logic of MMRecClient and AsyncMMRecClient."""

    def __init__(
        self,
        url: str,
        protocol: str = "grpc",
        *,
        ssl: bool = False,
        root_certificates: str | None = None,
        private_key: str | None = None,
        certificate_chain: str | None = None,
        ssl_options: dict[str, Any] | None = None,
        insecure: bool = False,
        headers: dict[str, str] | None = None,
        client_timeout: float | None = DEFAULT_CLIENT_TIMEOUT_S,
        retries: int = 3,
        backoff_s: float = 0.2,
        concurrency: int = 4,
        local_preprocessing: bool = False,
        shared_memory: bool = False,
        max_batch_size: int | None = None,
        models: ModelNames | None = None,
        verbose: bool = False,
    ) -> None:
        lookup_protocol(protocol)  # fail on a typo before anything else
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if shared_memory and not local_preprocessing:
            raise ValueError("shared_memory carries PIXEL_VALUES, which only local_preprocessing=True sends")
        self.connection = Connection(
            url=url, protocol=protocol, ssl=ssl, root_certificates=root_certificates,
            private_key=private_key, certificate_chain=certificate_chain, ssl_options=ssl_options,
            insecure=insecure, client_timeout=client_timeout, headers=dict(headers or {}),
            concurrency=concurrency, verbose=verbose)
        self.retry = RetryPolicy(retries, backoff_s)
        self.concurrency = concurrency
        self.local_preprocessing = local_preprocessing
        self.shared_memory = shared_memory
        self.max_batch_size_override = max_batch_size
        self.models = models or ModelNames()
        self._info: ServerInfo | None = None
        self._planner: Planner | None = None
        self._regions: RegionPool | None = None
        self._closed = False
        self._init_io()

    def _init_io(self) -> None:
        """Subclasses create their transport (threads or asyncio) here."""
        raise NotImplementedError

    # ---- public, protocol-independent
    @property
    def url(self) -> str:
        return self.connection.url

    @property
    def protocol(self) -> str:
        return self.connection.protocol

    @property
    def server_info(self) -> ServerInfo:
        """Categories, max batch size and limits read from the server at connect()."""
        if self._info is None:
            raise MMRecError("not connected yet: call connect() or use the client as a context manager")
        return self._info

    @property
    def categories(self) -> tuple[str, ...]:
        return self.server_info.categories

    # ---- connect-time helpers
    @property
    def needed_models(self) -> tuple[str, ...]:
        return self.models.needed(self.local_preprocessing)

    def _error(self, exc: BaseException, what: str) -> MMRecError:
        return translate(exc, self.url, self.protocol, what)

    def _not_serving(self, live: bool) -> ServerUnavailableError:
        state = "not live" if not live else "live but not ready (still loading models?)"
        return ServerUnavailableError(f"Triton at {self.url} ({self.protocol}) is {state}; {SERVE_HINT}")

    def _not_ready(self, model: str) -> ModelNotReadyError:
        return ModelNotReadyError(
            f"model {model!r} is not ready on {self.url} ({self.protocol}); this client needs "
            f"{', '.join(self.needed_models)}: check the server log, or re-export and restart "
            "with `mmrec serve --repository <exported repository>`")

    def _connected(self, configs: dict[str, dict]) -> ServerInfo:
        """Record what connect() learned and build the planner."""
        info = server_info(self.url, self.protocol, configs, self.models, self.max_batch_size_override)
        self._planner = Planner(info, self.models, self.local_preprocessing, self.shared_memory)
        if self.shared_memory:
            p = info.preprocess
            self._regions = RegionPool(
                info.max_batch_size * schema.IMAGE_CHANNELS * p.image_size * p.image_size * PIXEL_BYTES)
        self._info = info
        return info

    # ---- input dispatch
    @staticmethod
    def _is_items(values: object) -> bool:
        """Items (Item or (text, image) tuples) rather than an embedding array?"""
        if isinstance(values, np.ndarray) or not isinstance(values, Sequence) or not len(values):
            return False
        first = values[0]
        return isinstance(first, Item) or (isinstance(first, tuple) and bool(first) and isinstance(first[0], str))

    def _candidates(self, values: object) -> PreparedItems | np.ndarray:
        """Validated candidates: prepared items, or an [N, D] embedding array."""
        planner = self._planner_or_fail()
        if self._is_items(values):
            return planner.items(values)  # type: ignore[arg-type]
        if isinstance(values, Sequence) and not isinstance(values, (str, bytes)) and not len(values):
            return np.zeros((0, self.server_info.item_dim), np.float32)
        return planner.embeddings(values, "item embeddings")

    def _history(self, history: object) -> PreparedItems | np.ndarray:
        """Like _candidates, but a user needs at least one item."""
        if history is None:
            raise InvalidItemError(None, "user history is missing")
        candidates = self._candidates(history)
        if not len(candidates):
            raise InvalidItemError(None, "user history is empty: a user vector is the mean of at least "
                                         "one item embedding")
        return candidates

    def _options(self, request_id: str, priority: int, timeout: int | None, client_timeout: float | None,
                 headers: dict[str, str] | None) -> CallOptions:
        """Per-call tritonclient options, checked before anything is sent."""
        if client_timeout is not None and not lookup_protocol(self.protocol).per_call_timeout:
            raise ValueError("tritonclient.http sets client_timeout once per client (its network timeout): "
                             "pass client_timeout to the constructor instead of per call")
        return CallOptions(request_id=request_id, priority=priority, timeout=timeout,
                           client_timeout=client_timeout, headers=headers)

    def _planner_or_fail(self) -> Planner:
        if self._planner is None:
            raise MMRecError("not connected yet: call connect() or use the client as a context manager")
        return self._planner
