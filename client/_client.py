"""MMRecClient: the blocking client; long item lists go out as concurrent batches on threads."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Sequence

import numpy as np

from mmrec import schema
from mmrec.reference import user_vector as mean_embedding

from ._base import ClientBase
from ._errors import Failure, InvalidRequestError, MMRecError, classify, server_message
from ._items import Item, PreparedItems
from ._plan import PendingRequest, Planner, bisect_bad_item
from ._requests import CallOptions, InferRequest
from ._results import EncodedItems, RankedItem, empty_encoded, encoded_from_chunks, scores_from_chunks, top_k
from ._server_info import ServerInfo
from ._transport import SyncTransport


class MMRecClient(ClientBase):
    """Encode, score and rank items on an mmrec Triton server (gRPC or HTTP), blocking.

    Use as `with MMRecClient("127.0.0.1:8001") as client:`; entering connects (checks the
    server and models, reads their configs), leaving closes connections and shared memory.
    Per-call keywords keep tritonclient's names: request_id, priority, timeout (server-side,
    microseconds), client_timeout (seconds; per call on gRPC, per client on HTTP), headers
    (merged over the client's). A call split into several requests sends request_id + ":<n>".
    """

    def _init_io(self) -> None:
        self._transport = SyncTransport(self.connection)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._connect_lock = threading.Lock()

    # ---- lifecycle
    def connect(self) -> ServerInfo:
        """Check the server is live/ready and the needed models are ready; read their configs."""
        with self._connect_lock:  # threads sharing one client connect once
            return self._info if self._info is not None else self._connect()

    def _connect(self) -> ServerInfo:
        t = self._transport
        try:
            live = self.retry.call(t.is_server_live)
            ready = live and self.retry.call(t.is_server_ready)
        except Exception as exc:
            raise self._error(exc, "server") from exc
        if not ready:
            raise self._not_serving(live)
        configs: dict[str, dict] = {}
        for model in self.needed_models:
            try:
                if not self.retry.call(lambda: t.is_model_ready(model)):
                    raise self._not_ready(model)
                configs[model] = self.retry.call(lambda: t.get_model_config(model))
            except MMRecError:
                raise
            except Exception as exc:
                raise self._error(exc, model) from exc
        return self._connected(configs)

    def close(self) -> None:
        """Stop workers, unregister and destroy shared memory, close connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._regions is not None:
            self._regions.close(self._transport.unregister_system_shared_memory)
        self._transport.close()

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

    # ---- internals
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
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="mmrec-client")
            return self._pool

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
        return self.retry.call(lambda: self._transport.infer(request, options, self._regions))

    def _execute(self, pending: PendingRequest, options: CallOptions) -> dict[str, np.ndarray]:
        request = pending.build()
        try:
            return self._send(request, options)
        except Exception as exc:
            raise self._failure(exc, request, options) from exc

    def _failure(self, exc: Exception, request: InferRequest, options: CallOptions) -> MMRecError:
        """The typed error; for INVALID_ARGUMENT, bisect to name the offending item."""
        error = self._error(exc, request.model)
        if not isinstance(error, InvalidRequestError):
            return error
        probes = bisect_bad_item(request)
        message = None
        try:
            probe = next(probes)
            while True:
                try:
                    self._send(probe, options)
                    rejected = False
                except Exception as probe_exc:
                    if classify(probe_exc) is not Failure.invalid:
                        raise self._error(probe_exc, probe.model) from probe_exc
                    rejected, message = True, server_message(probe_exc)
                probe = probes.send(rejected)
        except StopIteration as located:
            index = located.value
        return InvalidRequestError(message or error.server_message, index)
