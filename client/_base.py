"""What the sync and asyncio clients share: settings, connect-time checks, input dispatch.

Only the waiting differs between the two clients (threads vs. asyncio); every decision —
which models must be ready, what their configs mean, how a call is validated and split,
which endpoint a request goes to — lives here, in the planner or in the endpoint pool, once.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Generator, Sequence

import numpy as np

from mmrec import schema

from ._endpoints import Endpoint, EndpointPool, EndpointStatus, parse_urls
from ._errors import (InvalidItemError, MMRecError, ModelNotReadyError, ServerUnavailableError,
                      SERVE_HINT, is_retryable, server_message, translate)
from ._items import Item, PreparedItems
from ._plan import Planner
from ._protocols import DEFAULT_CLIENT_TIMEOUT_S, Connection
from ._protocols import protocol as lookup_protocol
from ._requests import CallOptions
from ._retry import RetryBudget, RetryPolicy
from ._server_info import ModelNames, ServerInfo, server_info
from ._shm import RegionPool

PIXEL_BYTES = 4  # FP32
PROBE_TIMEOUT_S = 5.0  # a health probe slower than this counts as "not ready" (gRPC)


class ClientBase:
    """Constructor and shared logic of MMRecClient and AsyncMMRecClient."""

    def __init__(
        self,
        url: str | Sequence[str],
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
        retry_budget: RetryBudget | None = None,
        spill_over: bool = False,
        concurrency: int = 4,
        local_preprocessing: bool = False,
        shared_memory: bool = False,
        max_batch_size: int | None = None,
        models: ModelNames | None = None,
        health_interval_s: float = 1.0,
        verbose: bool = False,
    ) -> None:
        lookup_protocol(protocol)  # fail on a typo before anything else
        urls = parse_urls(url)
        if health_interval_s <= 0:
            raise ValueError(f"health_interval_s must be > 0, got {health_interval_s}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if shared_memory and not local_preprocessing:
            raise ValueError("shared_memory carries PIXEL_VALUES, which only local_preprocessing=True sends")
        self.connection = Connection(  # settings shared by every endpoint; url = the first one
            url=urls[0], protocol=protocol, ssl=ssl, root_certificates=root_certificates,
            private_key=private_key, certificate_chain=certificate_chain, ssl_options=ssl_options,
            insecure=insecure, client_timeout=client_timeout, headers=dict(headers or {}),
            concurrency=concurrency, verbose=verbose)
        self.retry = RetryPolicy(retries, backoff_s)
        # shed retries of this client, as a share of its requests (see _retry.RetryBudget)
        self.retry_budget = retry_budget if retry_budget is not None else RetryBudget()
        self.concurrency = concurrency
        self.local_preprocessing = local_preprocessing
        self.shared_memory = shared_memory
        self.max_batch_size_override = max_batch_size
        self.models = models or ModelNames()
        self.health_interval_s = health_interval_s
        self._info: ServerInfo | None = None
        self._planner: Planner | None = None
        self._closed = False
        self._init_io()
        self._pool = EndpointPool(urls, lambda u: self._transport_class(replace(self.connection, url=u)), spill_over)

    _transport_class: Callable[[Connection], Any]  # SyncTransport or AsyncTransport, one per endpoint

    def _init_io(self) -> None:
        """Subclasses set up their I/O (threads or asyncio) here."""
        raise NotImplementedError

    # ---- public, protocol-independent
    @property
    def url(self) -> str:
        """The endpoint URL; several are joined with commas, as the constructor accepts them."""
        return ",".join(self._pool.urls)

    @property
    def urls(self) -> tuple[str, ...]:
        return self._pool.urls

    @property
    def endpoints(self) -> tuple[EndpointStatus, ...]:
        """Per endpoint: url, healthy, in_flight, requests and failures (a snapshot)."""
        return self._pool.statuses()

    @property
    def protocol(self) -> str:
        return self.connection.protocol

    @property
    def _transport(self) -> Any:
        """The first endpoint's transport (the only one for a single URL)."""
        return self._pool.endpoints[0].transport

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

    def _error(self, exc: BaseException, what: str, url: str) -> MMRecError:
        return translate(exc, url, self.protocol, what)

    def _request_error(self, exc: BaseException, model: str, endpoint: Endpoint) -> MMRecError:
        """A request's final error: a connection failure names every endpoint, since the request
        may have tried them all; a server's answer names the endpoint that gave it."""
        several = len(self.urls) > 1 and is_retryable(exc)
        return self._error(exc, model, f"any of {', '.join(self.urls)}" if several else endpoint.url)

    def _not_serving(self, url: str, live: bool) -> ServerUnavailableError:
        state = "not live" if not live else "live but not ready (still loading models?)"
        return ServerUnavailableError(f"Triton at {url} ({self.protocol}) is {state}; {SERVE_HINT}")

    def _not_ready(self, url: str, model: str) -> ModelNotReadyError:
        return ModelNotReadyError(
            f"model {model!r} is not ready on {url} ({self.protocol}); this client needs "
            f"{', '.join(self.needed_models)}: check the server log, or re-export and restart "
            "with `mmrec serve --repository <exported repository>`")

    def _connect_plan(self) -> Generator[Endpoint | float, dict | MMRecError | None, ServerInfo]:
        """connect() for both clients. Yields an endpoint to check (send back its model configs
        or the MMRecError the check raised) or seconds to sleep (send None); returns ServerInfo.

        Every endpoint is checked once. While none is ready, the ones that could not be reached
        are checked again after the retry policy's backoff, up to `retries` more times.
        """
        results: dict[Endpoint, dict | MMRecError] = {}
        for attempt in range(self.retry.retries + 1):
            if attempt:
                yield self.retry.delay(attempt - 1)
            for endpoint in self._pool.endpoints:
                if endpoint not in results or _unreachable(results[endpoint]):
                    results[endpoint] = yield endpoint
            if any(isinstance(r, dict) for r in results.values()):
                break
            if not any(_unreachable(r) for r in results.values()):
                break
        return self._connected(results)

    def _connected(self, results: dict[Endpoint, dict | MMRecError]) -> ServerInfo:
        """Eject endpoints that failed their check, read the configs of the first ready one and
        build the planner; with no endpoint ready, raise (naming every endpoint and its problem)."""
        failed = {e: r for e, r in results.items() if isinstance(r, MMRecError)}
        ready = [r for r in results.values() if not isinstance(r, MMRecError)]
        if not ready:
            if len(failed) == 1:
                raise next(iter(failed.values()))
            problems = "; ".join(f"{e.url}: {_reason(r)}" for e, r in failed.items())
            raise ServerUnavailableError(f"none of the {len(failed)} endpoints is ready ({self.protocol}): "
                                         f"{problems}; {SERVE_HINT}") from list(failed.values())[-1]
        for endpoint, error in failed.items():  # the health checker re-admits them when ready
            self._pool.eject(endpoint, str(error))
        info = server_info(self.url, self.protocol, ready[0], self.models, self.max_batch_size_override)
        self._planner = Planner(info, self.models, self.local_preprocessing, self.shared_memory)
        if self.shared_memory:
            p = info.preprocess
            for endpoint in self._pool.endpoints:
                endpoint.regions = RegionPool(
                    info.max_batch_size * schema.IMAGE_CHANNELS * p.image_size * p.image_size * PIXEL_BYTES)
        self._info = info
        return info

    @property
    def _checks_health(self) -> bool:
        """A health checker runs only with several endpoints: one URL has nowhere else to go."""
        return len(self.urls) > 1

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

    def _deadline_s(self, options: CallOptions) -> float | None:
        """A request's deadline, covering all its attempts: the call's client_timeout, else the
        client's (a call split into several requests gives each its own)."""
        return options.client_timeout if options.client_timeout is not None else self.connection.client_timeout

    def _planner_or_fail(self) -> Planner:
        if self._planner is None:
            raise MMRecError("not connected yet: call connect() or use the client as a context manager")
        return self._planner


def _unreachable(result: dict | MMRecError) -> bool:
    """Did this connect-time check fail to reach the server at all (worth checking again)?"""
    return isinstance(result, ServerUnavailableError) and result.__cause__ is not None \
        and is_retryable(result.__cause__)


def _reason(error: MMRecError) -> str:
    """Why one endpoint failed its check (without the serve hint, for a connection failure)."""
    return f"unreachable ({server_message(error.__cause__)})" if _unreachable(error) else str(error)
