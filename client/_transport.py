"""The only code that calls tritonclient: sync and asyncio transports over gRPC or HTTP.

Transports raise tritonclient's own exceptions untouched; the clients decide what to retry
and how to word errors. tritonclient.http (gevent) must not be shared between threads, so
the sync transport keeps one HTTP client per thread; a gRPC client is shared.
"""
from __future__ import annotations

import threading
from contextlib import ExitStack
from typing import Any

import numpy as np
from tritonclient.utils import np_to_triton_dtype

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

    def _control_kwargs(self) -> dict[str, Any]:
        return dict(headers=merged_headers(self.connection),
                    **self.proto.call_kwargs(self.connection.client_timeout))

    def is_server_live(self) -> bool:
        return self.client().is_server_live(**self._control_kwargs())

    def is_server_ready(self) -> bool:
        return self.client().is_server_ready(**self._control_kwargs())

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
            leases = {name: stack.enter_context(regions.lease(self.register_system_shared_memory))
                      for name in request.shared_memory_inputs if regions is not None}
            inputs, outputs = build_inputs(self.module, request, leases)
            result = self.client().infer(request.model, inputs, outputs=outputs, **kwargs)
            return outputs_of(result, request)

    def close(self) -> None:
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

    def client(self) -> Any:
        if self._client is None:
            self._client = self.proto.make_async_client(self.connection)
        return self._client

    def _control_kwargs(self) -> dict[str, Any]:
        return dict(headers=merged_headers(self.connection),
                    **self.proto.call_kwargs(self.connection.client_timeout))

    async def is_server_live(self) -> bool:
        return await self.client().is_server_live(**self._control_kwargs())

    async def is_server_ready(self) -> bool:
        return await self.client().is_server_ready(**self._control_kwargs())

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
        result = await self.client().infer(request.model, inputs, outputs=outputs, **kwargs)
        return outputs_of(result, request)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except Exception:  # noqa: BLE001 - see SyncTransport.close
                pass
