"""Typed client errors, and the one place that reads tritonclient's exceptions.

gRPC reports `StatusCode.X` strings, HTTP reports status numbers, and connection failures
surface as plain OSErrors (geventhttpclient, aiohttp); `classify` folds all three into one
vocabulary so retry and error decisions are written once.
"""
from __future__ import annotations

import asyncio
from enum import Enum

from tritonclient.utils import InferenceServerException

from mmrec.admission import is_shed_message

SERVE_HINT = "start it with `mmrec serve --repository <exported repository>` or point --url at a running server"


class MMRecError(Exception):
    """Base of every error this client raises on purpose."""


class InvalidItemError(MMRecError, ValueError):
    """Bad input caught on the client before any inference request was sent."""

    def __init__(self, index: int | None, problem: str) -> None:
        self.index = index
        self.problem = problem
        where = f"item {index}: " if index is not None else ""
        super().__init__(f"{where}{problem}")


class ServerUnavailableError(MMRecError, ConnectionError):
    """Nothing answers at the URL (at any of the URLs), or the server is not live/ready."""


class ModelNotReadyError(MMRecError):
    """The server is up, but a model this client needs is missing or not loaded."""


class InvalidRequestError(MMRecError, ValueError):
    """The server rejected a request (INVALID_ARGUMENT); `index` is the offending item if found."""

    def __init__(self, server_message: str, index: int | None = None) -> None:
        self.server_message = server_message
        self.index = index
        where = f"item {index}: " if index is not None else ""
        super().__init__(f"{where}server rejected the request: {server_message}")


class OverloadedError(MMRecError):
    """The server shed the request (its queue was full, or the request waited its whole queue
    budget): it is overloaded, not down. Retried on another replica or after a jittered
    backoff while the client's retry budget allows; then raised. Back off, or degrade."""


class RequestTimeoutError(MMRecError, TimeoutError):
    """A request outlived its client_timeout (or the server-side timeout)."""


class Failure(str, Enum):
    """What kind of failure a tritonclient exception is, whatever the protocol."""

    unavailable = "unavailable"
    invalid = "invalid"
    not_found = "not_found"
    timeout = "timeout"
    shed = "shed"  # overloaded: the server's admission policy rejected it
    other = "other"


_STATUS = {
    "StatusCode.UNAVAILABLE": Failure.unavailable,
    "503": Failure.unavailable,
    "StatusCode.INVALID_ARGUMENT": Failure.invalid,
    "400": Failure.invalid,
    "StatusCode.NOT_FOUND": Failure.not_found,
    "404": Failure.not_found,
    "StatusCode.DEADLINE_EXCEEDED": Failure.timeout,
    "408": Failure.timeout,
}


def classify(exc: BaseException) -> Failure:
    """Map a tritonclient / socket / aiohttp exception to a Failure kind."""
    if isinstance(exc, InferenceServerException):
        if is_shed_message(exc.message() or ""):  # UNAVAILABLE, but from a live server
            return Failure.shed
        status = _STATUS.get(str(exc.status()))
        if status is not None:
            return status
        if "timed out" in (exc.message() or "").lower():  # HTTP client-side timeouts
            return Failure.timeout
        return Failure.other
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return Failure.timeout
    if isinstance(exc, OSError):  # refused/reset connections; aiohttp's ClientOSError too
        return Failure.unavailable
    if _is_aiohttp_connection_error(exc) or _is_closed_connection(exc):
        return Failure.unavailable
    return Failure.other


def _is_aiohttp_connection_error(exc: BaseException) -> bool:
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - aiohttp ships with tritonclient[http]
        return False
    return isinstance(exc, aiohttp.ClientConnectionError)


def _is_closed_connection(exc: BaseException) -> bool:
    """geventhttpclient's "connection closed before the response" (a server that died mid-request).

    It does not resend POSTs itself (they may not be idempotent); inference requests are.
    """
    try:
        from geventhttpclient.response import HTTPConnectionClosed
    except ImportError:  # pragma: no cover - geventhttpclient ships with tritonclient[http]
        return False
    return isinstance(exc, HTTPConnectionClosed)


def is_retryable(exc: BaseException) -> bool:
    """Connection-level failures: the endpoint is down (ejected) and the request moves on."""
    return classify(exc) is Failure.unavailable


def is_shed(exc: BaseException) -> bool:
    """The server is up but shed the request (retried within the retry budget, never ejected)."""
    return classify(exc) is Failure.shed


def server_message(exc: BaseException) -> str:
    """The server's own words, without tritonclient's `[status]` prefix."""
    if isinstance(exc, InferenceServerException):
        return exc.message() or str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def unavailable(url: str, protocol: str, exc: BaseException | None = None) -> ServerUnavailableError:
    detail = f" ({server_message(exc)})" if exc is not None else ""
    return ServerUnavailableError(f"no Triton server answers {protocol} at {url}{detail}; {SERVE_HINT}")


def translate(exc: BaseException, url: str, protocol: str, model: str) -> MMRecError:
    """The typed error for a failed call; callers raise it `from exc`."""
    kind = classify(exc)
    if kind is Failure.unavailable:
        return unavailable(url, protocol, exc)
    if kind is Failure.invalid:
        return InvalidRequestError(server_message(exc))
    if kind is Failure.not_found:
        return ModelNotReadyError(f"model {model!r} is not available on {url}: {server_message(exc)}")
    if kind is Failure.shed:
        return OverloadedError(f"{model} on {url} is overloaded and shed the request: {server_message(exc)}")
    if kind is Failure.timeout:
        return RequestTimeoutError(f"{model} on {url} timed out: {server_message(exc)}")
    return MMRecError(f"{model} on {url} failed: {server_message(exc)}")
