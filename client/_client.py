"""MMRecClient: the blocking client; long item lists go out as concurrent batches on threads."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Sequence

import numpy as np

from mmrec import schema
from mmrec.schema import user_vector as mean_embedding

from ._base import PROBE_TIMEOUT_S, ClientBase
from ._catalog import INDEX_HINT, CatalogInfo, catalog_info, ranked_from_chunks, recommend_requests
from ._endpoints import Attempts, Endpoint
from ._errors import InvalidRequestError, MMRecError, ModelNotReadyError, server_message
from ._items import Item, PreparedItems
from ._plan import PendingRequest, Planner, bisect_bad_item
from ._requests import CallOptions, InferRequest
from ._results import EncodedItems, RankedItem, empty_encoded, encoded_from_chunks, scores_from_chunks, top_k
from ._server_info import ServerInfo
from ._shm import RegionPool
from ._transport import SyncTransport


class MMRecClient(ClientBase):
    """Encode, score and rank items on an mmrec Triton server (gRPC or HTTP), blocking.

    Use as `with MMRecClient("127.0.0.1:8001") as client:`; entering connects (checks the
    server and models, reads their configs), leaving closes connections and shared memory.
    Several replicas: `MMRecClient(["10.0.0.1:8001", "10.0.0.2:8001"])` (or "a:8001,b:8001")
    spreads requests over them, fails over when one drops, and a health-check thread re-admits
    it every `health_interval_s` once it is ready again; `client.endpoints` shows their state.
    Per-call keywords keep tritonclient's names: request_id, priority, timeout (server-side,
    microseconds), client_timeout (seconds; per call on gRPC, per client on HTTP), headers
    (merged over the client's). A call split into several requests sends request_id + ":<n>".
    A request's client_timeout is its deadline over all its attempts, sent to the server as the
    request's timeout unless one is given; a request the server shed (overloaded) moves to a
    replica that has not shed it, then is retried within `retry_budget` (a share of recent
    requests) and then raises OverloadedError. `spill_over=True` sends every request to the first
    healthy URL given and only what it sheds or cannot take to the next (zone-local replica first).
    """

    _transport_class = SyncTransport

    def _init_io(self) -> None:
        self._workers: ThreadPoolExecutor | None = None
        self._workers_lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._stop_checks = threading.Event()
        self._checker: threading.Thread | None = None
        self._catalog_info: CatalogInfo | None = None

    @property
    def _regions(self) -> RegionPool | None:
        """The first endpoint's shared-memory regions (the only ones for a single URL)."""
        return self._pool.endpoints[0].regions

    # ---- lifecycle
    def connect(self) -> ServerInfo:
        """Check each endpoint is live and ready with the needed models, and read their configs.

        Succeeds when at least one endpoint is; the others are ejected until they are ready.
        """
        with self._connect_lock:  # threads sharing one client connect once
            return self._info if self._info is not None else self._connect()

    def _connect(self) -> ServerInfo:
        plan = self._connect_plan()
        step = next(plan)
        try:
            while True:
                if isinstance(step, Endpoint):
                    try:
                        answer = self._check(step)
                    except MMRecError as error:
                        answer = error
                else:
                    time.sleep(step)
                    answer = None
                step = plan.send(answer)
        except StopIteration as done:
            info = done.value
        if self._checks_health:
            self._checker = threading.Thread(target=self._check_health, name="mmrec-health", daemon=True)
            self._checker.start()
        return info

    def _check(self, endpoint: Endpoint) -> dict[str, dict]:
        """Is this endpoint live and ready, with every needed model? Returns the models' configs."""
        t = endpoint.transport
        try:
            live = t.is_server_live()
            ready = live and t.is_server_ready()
        except Exception as exc:
            raise self._error(exc, "server", endpoint.url) from exc
        if not ready:
            raise self._not_serving(endpoint.url, live)
        configs: dict[str, dict] = {}
        for model in self.needed_models:
            try:
                if not t.is_model_ready(model):
                    raise self._not_ready(endpoint.url, model)
                configs[model] = t.get_model_config(model)
            except MMRecError:
                raise
            except Exception as exc:
                raise self._error(exc, model, endpoint.url) from exc
        source = self.models.contract_model(configs, self.local_preprocessing)
        if source not in configs:  # an ensemble's first step: ready whenever the ensemble is
            try:
                configs[source] = t.get_model_config(source)
            except Exception as exc:
                raise self._error(exc, source, endpoint.url) from exc
        return configs

    def _check_health(self) -> None:
        """The health-check thread: probe every endpoint each health_interval_s until close()."""
        while not self._stop_checks.wait(self.health_interval_s):
            for endpoint in self._pool.endpoints:
                try:
                    ready, why = endpoint.transport.is_server_ready(PROBE_TIMEOUT_S), "not ready"
                except Exception as exc:  # noqa: BLE001 - any failed probe means "not ready"
                    ready, why = False, server_message(exc)
                if self._stop_checks.is_set():
                    return
                self._pool.probed(endpoint, ready, why)

    def close(self) -> None:
        """Stop the health checks and workers, remove shared memory, close connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop_checks.set()
        if self._checker is not None:
            self._checker.join(PROBE_TIMEOUT_S + 1)
        if self._workers is not None:
            self._workers.shutdown(wait=True, cancel_futures=True)
        for endpoint in self._pool.endpoints:
            if endpoint.regions is not None:
                endpoint.regions.close(endpoint.transport.unregister_system_shared_memory)
            endpoint.transport.close()

    def __enter__(self) -> "MMRecClient":
        try:
            self.connect()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- public calls
    def encode_items(self, items: Sequence[Item | tuple], *, request_id: str = "", priority: int = 0,
                     timeout: int | None = None, client_timeout: float | None = None,
                     headers: dict[str, str] | None = None) -> EncodedItems:
        """Item embeddings, interest probabilities and text-image alignment, in item order."""
        planner = self._ready()
        prepared = planner.items(items)
        options = self._options(request_id, priority, timeout, client_timeout, headers)
        return self._encode(planner, prepared, options)

    def user_vector(self, history: Sequence[Item | tuple] | np.ndarray, *, request_id: str = "",
                    priority: int = 0, timeout: int | None = None, client_timeout: float | None = None,
                    headers: dict[str, str] | None = None) -> np.ndarray:
        """A user = the mean embedding of the items they engaged with (items or an [N, D] array)."""
        planner = self._ready()
        history = self._history(history)
        if isinstance(history, PreparedItems):
            options = self._options(request_id, priority, timeout, client_timeout, headers)
            history = self._encode(planner, history, options).item_embedding
        return mean_embedding(history)

    def score(self, user: np.ndarray, items: Sequence[Item | tuple] | np.ndarray, *, request_id: str = "",
              priority: int = 0, timeout: int | None = None, client_timeout: float | None = None,
              headers: dict[str, str] | None = None) -> np.ndarray:
        """σ(item · user) per item: [N] float32. Items go through interest_scorer, arrays through scorer."""
        planner = self._ready()
        user_vec = planner.user(user)
        candidates = self._candidates(items)
        options = self._options(request_id, priority, timeout, client_timeout, headers)
        return self._score(planner, user_vec, candidates, options)

    def rank(self, user: np.ndarray, candidates: Sequence[Item | tuple] | np.ndarray, k: int | None = 10, *,
             request_id: str = "", priority: int = 0, timeout: int | None = None,
             client_timeout: float | None = None, headers: dict[str, str] | None = None) -> list[RankedItem]:
        """Top-k candidates as (index, item_id, score), best first; ties keep candidate order."""
        planner = self._ready()
        user_vec = planner.user(user)
        prepared = self._candidates(candidates)
        options = self._options(request_id, priority, timeout, client_timeout, headers)
        scores = self._score(planner, user_vec, prepared, options)
        return top_k(scores, k, prepared.item_ids if isinstance(prepared, PreparedItems) else ())

    def recommend(self, user: np.ndarray, k: int = 10, *, exclude: Sequence[str] = (), request_id: str = "",
                  priority: int = 0, timeout: int | None = None, client_timeout: float | None = None,
                  headers: dict[str, str] | None = None) -> list[RankedItem]:
        """The whole catalog's top-k for one user vector, best first, from the served index
        (`mmrec index build`): RankedItem(row in the index, item_id, σ(item·user)). Ties go to
        the lower row. `exclude` drops ids (e.g. the user's history) from the answer."""
        planner = self._ready()
        users = planner.user(user)[None, :]
        options = self._options(request_id, priority, timeout, client_timeout, headers)
        return self._recommend(users, k, exclude, options)[0]

    def recommend_batch(self, users: np.ndarray, k: int = 10, *, exclude: Sequence[str] = (),
                        request_id: str = "", priority: int = 0, timeout: int | None = None,
                        client_timeout: float | None = None, headers: dict[str, str] | None = None
                        ) -> list[list[RankedItem]]:
        """recommend() for [B, D] user vectors at once (one request per max_batch_size users)."""
        planner = self._ready()
        matrix = planner.embeddings(users, "user vectors")
        options = self._options(request_id, priority, timeout, client_timeout, headers)
        return self._recommend(matrix, k, exclude, options)

    # ---- internals
    def _recommend(self, users: np.ndarray, k: int, exclude: Sequence[str], options: CallOptions
                   ) -> list[list[RankedItem]]:
        requests = recommend_requests(users, k, exclude, self._catalog())
        if not requests:
            return []
        pending = [PendingRequest(lambda r=r: r) for r in requests]
        return ranked_from_chunks(self._run(pending, options), k, exclude)

    def _catalog(self) -> CatalogInfo:
        """catalog_scorer's config, read on first use (a server without an index still serves rank())."""
        if self._catalog_info is None:
            name = self.models.catalog_scorer
            with self._pool.use() as endpoint:
                try:
                    ready = endpoint.transport.is_model_ready(name)
                    config = endpoint.transport.get_model_config(name) if ready else {}
                except Exception as exc:
                    raise self._error(exc, name, endpoint.url) from exc
            if not ready:
                raise ModelNotReadyError(f"model {name!r} is not ready on {endpoint.url}: {INDEX_HINT}")
            self._catalog_info = catalog_info(config, name)
        return self._catalog_info

    def _ready(self) -> Planner:
        if self._closed:
            raise MMRecError("this client is closed; create a new one")
        self.connect()
        return self._planner_or_fail()

    def _encode(self, planner: Planner, prepared: PreparedItems, options: CallOptions) -> EncodedItems:
        if not len(prepared):
            return empty_encoded(self.server_info.item_dim, self.categories)
        chunks = self._run(planner.encode(prepared), options)
        return encoded_from_chunks(chunks, self.categories, prepared.item_ids)

    def _score(self, planner: Planner, user: np.ndarray, candidates: PreparedItems | np.ndarray,
               options: CallOptions) -> np.ndarray:
        if isinstance(candidates, PreparedItems):
            if not self.local_preprocessing:
                return scores_from_chunks(self._run(planner.score_items(candidates, user), options),
                                          schema.SCORE)
            # item_encoder_pixels has no scoring step: encode, then score the embeddings.
            candidates = self._encode(planner, candidates, options).item_embedding
        return scores_from_chunks(self._run(planner.score_embeddings(candidates, user), options),
                                  schema.SCORE_MEMBER)

    def _executor(self) -> ThreadPoolExecutor:
        with self._workers_lock:
            if self._workers is None:
                self._workers = ThreadPoolExecutor(self.concurrency, thread_name_prefix="mmrec-client")
            return self._workers

    def _run(self, pending: list[PendingRequest], options: CallOptions) -> list[dict[str, np.ndarray]]:
        """Send every request (concurrently when there are several); results in request order."""
        if len(pending) == 1:
            return [self._execute(pending[0], options)]
        pool = self._executor()
        futures = [pool.submit(self._execute, p, options.for_chunk(i, len(pending)))
                   for i, p in enumerate(pending)]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def _send(self, request: InferRequest, options: CallOptions) -> dict[str, np.ndarray]:
        """One request on some endpoint, failing over within the retry budget; typed errors."""
        attempts = Attempts(self._pool, self.retry, self.retry_budget, self._deadline_s(options),
                            queue_budget_us=self._info.queue_budget_us if self._info else None)
        while True:
            wait = attempts.backoff_s()
            if wait:
                time.sleep(wait)
            try:
                with self._pool.use(attempts.shed_by) as endpoint:
                    return endpoint.transport.infer(request, attempts.options(options), endpoint.regions)
            except Exception as exc:
                if not attempts.again(exc, endpoint):
                    raise self._request_error(exc, request.model, endpoint) from exc

    def _execute(self, pending: PendingRequest, options: CallOptions) -> dict[str, np.ndarray]:
        request = pending.build()
        try:
            return self._send(request, options)
        except InvalidRequestError as error:
            raise self._locate(error, request, options) from error.__cause__

    def _locate(self, error: InvalidRequestError, request: InferRequest, options: CallOptions
                ) -> InvalidRequestError:
        """The server rejected a batch: bisect it to name the offending item."""
        probes = bisect_bad_item(request)
        message = None
        try:
            probe = next(probes)
            while True:
                try:
                    self._send(probe, options)
                    rejected = False
                except InvalidRequestError as probe_error:
                    rejected, message = True, probe_error.server_message
                probe = probes.send(rejected)
        except StopIteration as located:
            index = located.value
        return InvalidRequestError(message or error.server_message, index)
