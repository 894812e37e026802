"""AsyncMMRecClient: the asyncio twin of MMRecClient (same method names, awaited).

Batches are sent with asyncio tasks bounded by a semaphore of `concurrency`; client-side
image decoding runs in a worker thread so the event loop keeps serving other requests.
"""
from __future__ import annotations

import asyncio
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
from ._transport import AsyncTransport


class AsyncMMRecClient(ClientBase):
    """Encode, score and rank items with asyncio (tritonclient.grpc.aio / tritonclient.http.aio).

    Use as `async with AsyncMMRecClient("127.0.0.1:8001") as client:`. Same constructor and
    method names as MMRecClient, several URLs included (the health checks run as a task on the
    loop that connected); shared_memory is not offered here (sync clients only).
    """

    _transport_class = AsyncTransport

    def _init_io(self) -> None:
        if self.shared_memory:
            raise ValueError("shared_memory is available in MMRecClient (sync) only")
        self._semaphore: asyncio.Semaphore | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._checker: asyncio.Task | None = None
        self._catalog_info: CatalogInfo | None = None

    # ---- lifecycle
    async def connect(self) -> ServerInfo:
        """Check each endpoint is live and ready with the needed models, and read their configs.

        Succeeds when at least one endpoint is; the others are ejected until they are ready.
        """
        if self._info is not None:
            return self._info
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:  # concurrent first calls connect once
            if self._info is None:
                await self._connect()
        return self.server_info

    async def _connect(self) -> None:
        plan = self._connect_plan()
        step = next(plan)
        try:
            while True:
                if isinstance(step, Endpoint):
                    try:
                        answer = await self._check(step)
                    except MMRecError as error:
                        answer = error
                else:
                    await asyncio.sleep(step)
                    answer = None
                step = plan.send(answer)
        except StopIteration:
            pass
        if self._checks_health:
            self._checker = asyncio.ensure_future(self._check_health())

    async def _check(self, endpoint: Endpoint) -> dict[str, dict]:
        """Is this endpoint live and ready, with every needed model? Returns the models' configs."""
        t = endpoint.transport
        try:
            live = await t.is_server_live()
            ready = live and await t.is_server_ready()
        except Exception as exc:
            raise self._error(exc, "server", endpoint.url) from exc
        if not ready:
            raise self._not_serving(endpoint.url, live)
        configs: dict[str, dict] = {}
        for model in self.needed_models:
            try:
                if not await t.is_model_ready(model):
                    raise self._not_ready(endpoint.url, model)
                configs[model] = await t.get_model_config(model)
            except MMRecError:
                raise
            except Exception as exc:
                raise self._error(exc, model, endpoint.url) from exc
        source = self.models.contract_model(configs, self.local_preprocessing)
        if source not in configs:  # an ensemble's first step: ready whenever the ensemble is
            try:
                configs[source] = await t.get_model_config(source)
            except Exception as exc:
                raise self._error(exc, source, endpoint.url) from exc
        return configs

    async def _check_health(self) -> None:
        """The health-check task: probe every endpoint each health_interval_s until close()."""
        while True:
            await asyncio.sleep(self.health_interval_s)
            for endpoint in self._pool.endpoints:
                try:
                    ready = await asyncio.wait_for(endpoint.transport.is_server_ready(PROBE_TIMEOUT_S),
                                                   PROBE_TIMEOUT_S)
                    why = "not ready"
                except Exception as exc:  # noqa: BLE001 - any failed probe means "not ready"
                    ready, why = False, server_message(exc)
                self._pool.probed(endpoint, ready, why)

    async def close(self) -> None:
        """Stop the health checks and close the connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._checker is not None:
            self._checker.cancel()
            await asyncio.gather(self._checker, return_exceptions=True)
        for endpoint in self._pool.endpoints:
            await endpoint.transport.close()

    async def __aenter__(self) -> "AsyncMMRecClient":
        try:
            await self.connect()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # ---- public calls (see MMRecClient for the contracts)
    async def encode_items(self, items: Sequence[Item | tuple], *, request_id: str = "", priority: int = 0,
                           timeout: int | None = None, client_timeout: float | None = None,
                           headers: dict[str, str] | None = None) -> EncodedItems:
        """Item embeddings, interest probabilities and text-image alignment, in item order."""
        planner = await self._ready()
        prepared = planner.items(items)
        options = self._options(request_id, priority, timeout, client_timeout, headers)
        return await self._encode(planner, prepared, options)

    async def user_vector(self, history: Sequence[Item | tuple] | np.ndarray, *, request_id: str = "",
                          priority: int = 0, timeout: int | None = None, client_timeout: float | None = None,
                          headers: dict[str, str] | None = None) -> np.ndarray:
        """A user = the mean embedding of the items they engaged with (items or an [N, D] array)."""
        planner = await self._ready()
        history = self._history(history)
        if isinstance(history, PreparedItems):
            options = self._options(request_id, priority, timeout, client_timeout, headers)
            history = (await self._encode(planner, history, options)).item_embedding
        return mean_embedding(history)

    async def score(self, user: np.ndarray, items: Sequence[Item | tuple] | np.ndarray, *,
                    request_id: str = "", priority: int = 0, timeout: int | None = None,
                    client_timeout: float | None = None, headers: dict[str, str] | None = None) -> np.ndarray:
        """σ(item · user) per item: [N] float32."""
        planner = await self._ready()
        user_vec = planner.user(user)
        candidates = self._candidates(items)
        options = self._options(request_id, priority, timeout, client_timeout, headers)
        return await self._score(planner, user_vec, candidates, options)

    async def rank(self, user: np.ndarray, candidates: Sequence[Item | tuple] | np.ndarray,
                   k: int | None = 10, *, request_id: str = "", priority: int = 0, timeout: int | None = None,
                   client_timeout: float | None = None, headers: dict[str, str] | None = None
                   ) -> list[RankedItem]:
        """Top-k candidates as (index, item_id, score), best first; ties keep candidate order."""
        planner = await self._ready()
        user_vec = planner.user(user)
        prepared = self._candidates(candidates)
        options = self._options(request_id, priority, timeout, client_timeout, headers)
        scores = await self._score(planner, user_vec, prepared, options)
        return top_k(scores, k, prepared.item_ids if isinstance(prepared, PreparedItems) else ())

    async def recommend(self, user: np.ndarray, k: int = 10, *, exclude: Sequence[str] = (),
                        request_id: str = "", priority: int = 0, timeout: int | None = None,
                        client_timeout: float | None = None, headers: dict[str, str] | None = None
                        ) -> list[RankedItem]:
        """The whole catalog's top-k for one user vector, best first (see MMRecClient.recommend)."""
        planner = await self._ready()
        users = planner.user(user)[None, :]
        options = self._options(request_id, priority, timeout, client_timeout, headers)
        return (await self._recommend(users, k, exclude, options))[0]

    async def recommend_batch(self, users: np.ndarray, k: int = 10, *, exclude: Sequence[str] = (),
                              request_id: str = "", priority: int = 0, timeout: int | None = None,
                              client_timeout: float | None = None, headers: dict[str, str] | None = None
                              ) -> list[list[RankedItem]]:
        """recommend() for [B, D] user vectors at once."""
        planner = await self._ready()
        matrix = planner.embeddings(users, "user vectors")
        options = self._options(request_id, priority, timeout, client_timeout, headers)
        return await self._recommend(matrix, k, exclude, options)

    # ---- internals
    async def _recommend(self, users: np.ndarray, k: int, exclude: Sequence[str], options: CallOptions
                         ) -> list[list[RankedItem]]:
        requests = recommend_requests(users, k, exclude, await self._catalog())
        if not requests:
            return []
        pending = [PendingRequest(lambda r=r: r) for r in requests]
        return ranked_from_chunks(await self._run(pending, options), k, exclude)

    async def _catalog(self) -> CatalogInfo:
        """catalog_scorer's config, read on first use (a server without an index still serves rank())."""
        if self._catalog_info is None:
            name = self.models.catalog_scorer
            with self._pool.use() as endpoint:
                try:
                    ready = await endpoint.transport.is_model_ready(name)
                    config = await endpoint.transport.get_model_config(name) if ready else {}
                except Exception as exc:
                    raise self._error(exc, name, endpoint.url) from exc
            if not ready:
                raise ModelNotReadyError(f"model {name!r} is not ready on {endpoint.url}: {INDEX_HINT}")
            self._catalog_info = catalog_info(config, name)
        return self._catalog_info

    async def _ready(self) -> Planner:
        if self._closed:
            raise MMRecError("this client is closed; create a new one")
        await self.connect()
        return self._planner_or_fail()

    async def _encode(self, planner: Planner, prepared: PreparedItems, options: CallOptions) -> EncodedItems:
        if not len(prepared):
            return empty_encoded(self.server_info.item_dim, self.categories)
        chunks = await self._run(planner.encode(prepared), options)
        return encoded_from_chunks(chunks, self.categories, prepared.item_ids)

    async def _score(self, planner: Planner, user: np.ndarray, candidates: PreparedItems | np.ndarray,
                     options: CallOptions) -> np.ndarray:
        if isinstance(candidates, PreparedItems):
            if not self.local_preprocessing:
                return scores_from_chunks(await self._run(planner.score_items(candidates, user), options),
                                          schema.SCORE)
            candidates = (await self._encode(planner, candidates, options)).item_embedding
        return scores_from_chunks(await self._run(planner.score_embeddings(candidates, user), options),
                                  schema.SCORE_MEMBER)

    async def _run(self, pending: list[PendingRequest], options: CallOptions) -> list[dict[str, np.ndarray]]:
        """Send every request, at most `concurrency` at a time; results in request order."""
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.concurrency)
        semaphore = self._semaphore

        async def bounded(p: PendingRequest, o: CallOptions) -> dict[str, np.ndarray]:
            async with semaphore:
                return await self._execute(p, o)

        tasks = [asyncio.ensure_future(bounded(p, options.for_chunk(i, len(pending))))
                 for i, p in enumerate(pending)]
        try:
            return [await t for t in tasks]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _send(self, request: InferRequest, options: CallOptions) -> dict[str, np.ndarray]:
        """One request on some endpoint, failing over within the retry budget; typed errors."""
        attempts = Attempts(self._pool, self.retry, self.retry_budget, self._deadline_s(options),
                            queue_budget_us=self._info.queue_budget_us if self._info else None)
        while True:
            wait = attempts.backoff_s()
            if wait:
                await asyncio.sleep(wait)
            try:
                with self._pool.use(attempts.shed_by) as endpoint:
                    return await endpoint.transport.infer(request, attempts.options(options))
            except Exception as exc:
                if not attempts.again(exc, endpoint):
                    raise self._request_error(exc, request.model, endpoint) from exc

    async def _execute(self, pending: PendingRequest, options: CallOptions) -> dict[str, np.ndarray]:
        request = await asyncio.to_thread(pending.build) if pending.cpu_bound else pending.build()
        try:
            return await self._send(request, options)
        except InvalidRequestError as error:
            raise await self._locate(error, request, options) from error.__cause__

    async def _locate(self, error: InvalidRequestError, request: InferRequest, options: CallOptions
                      ) -> InvalidRequestError:
        """The server rejected a batch: bisect it to name the offending item."""
        probes = bisect_bad_item(request)
        message = None
        try:
            probe = next(probes)
            while True:
                try:
                    await self._send(probe, options)
                    rejected = False
                except InvalidRequestError as probe_error:
                    rejected, message = True, probe_error.server_message
                probe = probes.send(rejected)
        except StopIteration as located:
            index = located.value
        return InvalidRequestError(message or error.server_message, index)
