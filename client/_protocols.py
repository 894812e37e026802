"""gRPC vs HTTP: how to build each tritonclient client, registered by name (no if/elif).

Everything tritonclient does differently per protocol is here: constructor arguments (TLS,
timeouts), whether one client may be shared across threads, where `client_timeout` goes,
and the shape of get_model_config's answer.
"""
from __future__ import annotations

import ssl as ssl_lib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

DEFAULT_CLIENT_TIMEOUT_S = 60.0
# gRPC waits up to 120 s between reconnection attempts by default, so a replica restarted after
# a long outage would stay unreachable (and ejected) long after it is back.
GRPC_MAX_RECONNECT_BACKOFF_MS = 2000


@dataclass(frozen=True)
class Connection:
    """Where and how to connect; names and meanings follow tritonclient's constructors."""

    url: str
    protocol: str = "grpc"
    ssl: bool = False
    root_certificates: str | None = None  # PEM file (gRPC; mapped to ssl_options["ca_certs"] for HTTP)
    private_key: str | None = None  # PEM file (gRPC; HTTP: ssl_options["keyfile"])
    certificate_chain: str | None = None  # PEM file (gRPC; HTTP: ssl_options["certfile"])
    ssl_options: dict[str, Any] | None = None  # HTTP: options for ssl.wrap_socket, as tritonclient.http
    insecure: bool = False  # HTTP: skip certificate verification
    client_timeout: float | None = DEFAULT_CLIENT_TIMEOUT_S  # seconds, end to end
    headers: dict[str, str] | None = None
    concurrency: int = 4
    verbose: bool = False

    def http_ssl_options(self) -> dict[str, Any]:
        """ssl_options for tritonclient.http, filled from the PEM paths when not given."""
        if self.ssl_options is not None:
            return dict(self.ssl_options)
        pairs = (("ca_certs", self.root_certificates), ("keyfile", self.private_key),
                 ("certfile", self.certificate_chain))
        return {k: v for k, v in pairs if v is not None}

    def ssl_context(self) -> ssl_lib.SSLContext:
        """An SSLContext equivalent to http_ssl_options(), for tritonclient.http.aio."""
        options = self.http_ssl_options()
        context = ssl_lib.create_default_context(cafile=options.get("ca_certs"))
        if options.get("certfile"):
            context.load_cert_chain(options["certfile"], options.get("keyfile"))
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl_lib.CERT_NONE
        return context


@dataclass(frozen=True)
class Protocol:
    """One protocol's tritonclient modules and quirks."""

    name: str
    module: Callable[[], ModuleType]
    aio_module: Callable[[], ModuleType]
    make_client: Callable[[Connection], Any]
    make_async_client: Callable[[Connection], Any]
    thread_safe: bool  # may one sync client serve several threads?
    per_call_timeout: bool  # does infer() take client_timeout?

    def call_kwargs(self, client_timeout: float | None) -> dict[str, Any]:
        return {"client_timeout": client_timeout} if self.per_call_timeout else {}

    @staticmethod
    def config_json(raw: Any) -> dict:
        """get_model_config's answer as a plain dict (gRPC's JSON wraps it in "config")."""
        return raw.get("config", raw) if isinstance(raw, dict) else raw


def _grpc() -> ModuleType:
    import tritonclient.grpc as module

    return module


def _grpc_aio() -> ModuleType:
    import tritonclient.grpc.aio as module

    return module


def _http() -> ModuleType:
    import tritonclient.http as module

    return module


def _http_aio() -> ModuleType:
    import tritonclient.http.aio as module

    return module


def _grpc_channel_args() -> list[tuple[str, Any]]:
    """tritonclient's own channel options (message sizes, keepalive) plus a reconnect backoff cap."""
    module = _grpc()
    keepalive = module.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", module.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", module.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.max_reconnect_backoff_ms", GRPC_MAX_RECONNECT_BACKOFF_MS),
    ]


def _grpc_kwargs(c: Connection) -> dict[str, Any]:
    return dict(url=c.url, verbose=c.verbose, ssl=c.ssl, root_certificates=c.root_certificates,
                private_key=c.private_key, certificate_chain=c.certificate_chain,
                channel_args=_grpc_channel_args())


def _http_timeout(c: Connection) -> float:
    return c.client_timeout if c.client_timeout is not None else DEFAULT_CLIENT_TIMEOUT_S


def _make_http(c: Connection) -> Any:
    return _http().InferenceServerClient(
        c.url, verbose=c.verbose, connection_timeout=_http_timeout(c), network_timeout=_http_timeout(c),
        ssl=c.ssl, ssl_options=c.http_ssl_options() if c.ssl else None, insecure=c.insecure)


def _make_http_aio(c: Connection) -> Any:
    return _http_aio().InferenceServerClient(
        c.url, verbose=c.verbose, conn_limit=max(1, c.concurrency), conn_timeout=_http_timeout(c),
        ssl=c.ssl, ssl_context=c.ssl_context() if c.ssl else None)


PROTOCOLS: dict[str, Protocol] = {
    "grpc": Protocol("grpc", _grpc, _grpc_aio,
                     make_client=lambda c: _grpc().InferenceServerClient(**_grpc_kwargs(c)),
                     make_async_client=lambda c: _grpc_aio().InferenceServerClient(**_grpc_kwargs(c)),
                     thread_safe=True, per_call_timeout=True),
    "http": Protocol("http", _http, _http_aio, make_client=_make_http, make_async_client=_make_http_aio,
                     thread_safe=False, per_call_timeout=False),
}


def protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {name!r}") from None
