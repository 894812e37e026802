"""The only code that calls tritonclient: sync and asyncio transports over gRPC or HTTP.

Transports raise tritonclient's own exceptions untouched; the clients decide what to retry
and how to word errors. tritonclient.http (gevent) must not be shared between threads, so
the sync transport keeps one HTTP client per thread; a gRPC client is shared.

gRPC calls are never cancelled. tritonserver 2.51 (the one nvidia-pytriton bundles) can crash
with SIGSEGV when a gRPC request is cancelled while its response is being sent (Triton
server#7368, fixed in 2.53): a client deadline or a closed channel is such a cancellation, and we
reproduced the crash within 10 requests. So `client_timeout` bounds how long we *wait*; a late
call is left to finish in the background (its result dropped), and close() waits for those.
"""
from __future__ import annotations

import asyncio
import threading
from contextlib import ExitStack
from typing import Any, Callable

import numpy as np
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from ._protocols import Connection, Protocol, protocol
from ._requests import CallOptions, InferRequest
from ._shm import RegionPool


def merged_headers(connection: Connection, options: CallOptions | None = None) -> dict[str, str] | None:
    """Client headers (e.g. auth) plus per-call ones; per-call wins."""
    headers = dict(connection.headers or {})
    if options is not None and options.headers:
        headers.update(options.headers)
    return headers or None


def build_inputs(module: Any, request: InferRequest, leases: dict[str, Any]) -> tuple[list, list]:
    """tritonclient InferInput/InferRequestedOutput objects; leased inputs go through shared memory."""
    inputs = []
    for name, array in request.inputs.items():
        tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        if name in leases:
            tensor.set_shared_memory(leases[name].name, leases[name].write(array))
        else:
            tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs, [module.InferRequestedOutput(name) for name in request.outputs]


def _infer_kwargs(connection: Connection, proto: Protocol, options: CallOptions) -> dict[str, Any]:
    return dict(request_id=options.request_id, priority=options.priority, timeout=options.timeout,
                headers=merged_headers(connection, options),
                **proto.call_kwargs(options.client_timeout if options.client_timeout is not None
                                    else connection.client_timeout))


def outputs_of(result: Any, request: InferRequest) -> dict[str, np.ndarray]:
    return {name: result.as_numpy(name) for name in request.outputs}


DRAIN_ON_CLOSE_S = 30.0


def timed_out(model: str, waited_s: float) -> InferenceServerException:
    """What a client deadline would have raised, without cancelling the server-side request."""
    return InferenceServerException(
        f"Deadline Exceeded: no answer from {model} within {waited_s:g}s (the request was left to "
        "finish, not cancelled: cancelling crashes tritonserver < 2.53, server#7368)",
        status="StatusCode.DEADLINE_EXCEEDED")


class InFlight:
    """Counts calls still running on the server so close() can wait for them."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = threading.Condition()

    def started(self) -> None:
        with self._idle:
            self._count += 1

    def finished(self) -> None:
        with self._idle:
            self._count -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout_s)


class SyncTransport:
    """Blocking calls; safe to use from the client's worker threads."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.proto = protocol(connection.protocol)
        self.module = self.proto.module()
        self._local = threading.local()
        self._shared: Any = None
        self._clients: list[Any] = []
        self._lock = threading.Lock()
        self._in_flight = InFlight()

    def client(self) -> Any:
        """The tritonclient client for this thread (one shared client where that is safe)."""
        if self.proto.thread_safe:
            with self._lock:
                if self._shared is None:
                    self._shared = self.proto.make_client(self.connection)
                    self._clients.append(self._shared)
                return self._shared
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self.proto.make_client(self.connection)
            with self._lock:
                self._clients.append(client)
        return client

    def _control_kwargs(self, timeout_s: float | None = None) -> dict[str, Any]:
        return dict(headers=merged_headers(self.connection),
                    **self.proto.call_kwargs(timeout_s or self.connection.client_timeout))

    def is_server_live(self) -> bool:
        return self.client().is_server_live(**self._control_kwargs())

    def is_server_ready(self, timeout_s: float | None = None) -> bool:
        """timeout_s (gRPC only; HTTP has the client's) bounds health probes."""
        return self.client().is_server_ready(**self._control_kwargs(timeout_s))

    def is_model_ready(self, model: str) -> bool:
        return self.client().is_model_ready(model, **self._control_kwargs())

    def get_model_config(self, model: str) -> dict:
        kwargs = self._control_kwargs()
        if self.proto.name == "grpc":
            kwargs["as_json"] = True
        return self.proto.config_json(self.client().get_model_config(model, **kwargs))

    def register_system_shared_memory(self, name: str, key: str, byte_size: int) -> None:
        self.client().register_system_shared_memory(name, key, byte_size, **self._control_kwargs())

    def unregister_system_shared_memory(self, name: str) -> None:
        self.client().unregister_system_shared_memory(name, **self._control_kwargs())

    def infer(self, request: InferRequest, options: CallOptions, regions: RegionPool | None = None
              ) -> dict[str, np.ndarray]:
        kwargs = _infer_kwargs(self.connection, self.proto, options)
        with ExitStack() as stack:
            leases = {name: stack.enter_context(regions.lease(self.register_system_shared_memory,
                                                              self.unregister_system_shared_memory))
                      for name in request.shared_memory_inputs if regions is not None}
            inputs, outputs = build_inputs(self.module, request, leases)
            if self.proto.name != "grpc":
                return outputs_of(self.client().infer(request.model, inputs, outputs=outputs, **kwargs), request)
            # the shared-memory leases live until the call ends, even if we stop waiting first
            release = stack.pop_all().close
        return outputs_of(self._grpc_infer(request.model, inputs, outputs, kwargs, release), request)

    def _grpc_infer(self, model: str, inputs: list, outputs: list, kwargs: dict[str, Any],
                    release: Callable[[], None]) -> Any:
        """async_infer without a deadline + a local wait bounded by client_timeout."""
        wait_s = kwargs.pop("client_timeout", None)
        done = threading.Event()
        box: dict[str, Any] = {}

        def on_complete(result: Any, error: Any) -> None:
            box["result"], box["error"] = result, error
            try:
                release()
            finally:
                self._in_flight.finished()
                done.set()

        self._in_flight.started()
        try:
            self.client().async_infer(model, inputs, on_complete, outputs=outputs, **kwargs)
        except BaseException:
            self._in_flight.finished()
            release()
            raise
        if not done.wait(wait_s):
            raise timed_out(model, wait_s)
        if box["error"] is not None:
            raise box["error"]
        return box["result"]

    def close(self) -> None:
        self._in_flight.wait_idle(DRAIN_ON_CLOSE_S)  # closing a channel cancels its calls
        with self._lock:
            clients, self._clients, self._shared = self._clients, [], None
        self._local = threading.local()
        for client in clients:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a broken connection must not mask the real error
                pass


class AsyncTransport:
    """asyncio calls through tritonclient.grpc.aio / tritonclient.http.aio (one client per loop)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.proto = protocol(connection.protocol)
        self.module = self.proto.module()
        self._client: Any = None
        self._pending: set[asyncio.Future] = set()

    def client(self) -> Any:
        if self._client is None:
            self._client = self.proto.make_async_client(self.connection)
        return self._client

    def _control_kwargs(self, timeout_s: float | None = None) -> dict[str, Any]:
        return dict(headers=merged_headers(self.connection),
                    **self.proto.call_kwargs(timeout_s or self.connection.client_timeout))

    async def is_server_live(self) -> bool:
        return await self.client().is_server_live(**self._control_kwargs())

    async def is_server_ready(self, timeout_s: float | None = None) -> bool:
        return await self.client().is_server_ready(**self._control_kwargs(timeout_s))

    async def is_model_ready(self, model: str) -> bool:
        return await self.client().is_model_ready(model, **self._control_kwargs())

    async def get_model_config(self, model: str) -> dict:
        kwargs = self._control_kwargs()
        if self.proto.name == "grpc":
            kwargs["as_json"] = True
        return self.proto.config_json(await self.client().get_model_config(model, **kwargs))

    async def infer(self, request: InferRequest, options: CallOptions) -> dict[str, np.ndarray]:
        kwargs = _infer_kwargs(self.connection, self.proto, options)
        inputs, outputs = build_inputs(self.module, request, {})
        if self.proto.name != "grpc":
            return outputs_of(await self.client().infer(request.model, inputs, outputs=outputs, **kwargs), request)
        wait_s = kwargs.pop("client_timeout", None)
        call = asyncio.ensure_future(self.client().infer(request.model, inputs, outputs=outputs, **kwargs))
        self._pending.add(call)
        call.add_done_callback(self._pending.discard)
        try:  # shield: our timeout must not cancel the RPC (see the module docstring)
            result = await asyncio.wait_for(asyncio.shield(call), wait_s)
        except asyncio.TimeoutError:
            call.add_done_callback(lambda c: c.cancelled() or c.exception())  # mark retrieved
            raise timed_out(request.model, wait_s) from None
        return outputs_of(result, request)

    async def close(self) -> None:
        if self._pending:  # closing the channel would cancel them
            await asyncio.wait(set(self._pending), timeout=DRAIN_ON_CLOSE_S)
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except Exception:  # noqa: BLE001 - see SyncTransport.close
                pass
