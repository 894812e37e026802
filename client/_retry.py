"""Exponential backoff for connection-level failures only (UNAVAILABLE, refused, reset).

INVALID_ARGUMENT and every other server answer is returned at once: resending a bad request
only repeats the error and delays the message the caller needs. The clients spend this budget
across their endpoints through `_endpoints.Attempts`; `call` retries one callable.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from ._errors import is_retryable

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` extra attempts after the first, waiting backoff_s * 2**attempt between them."""

    retries: int = 3
    backoff_s: float = 0.2

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0:
            raise ValueError(f"retries and backoff_s must be >= 0, got {self.retries}, {self.backoff_s}")

    def delay(self, attempt: int) -> float:
        return self.backoff_s * (2 ** attempt)

    def call(self, fn: Callable[[], T], sleep: Callable[[float], None] = time.sleep) -> T:
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as exc:
                if attempt >= self.retries or not is_retryable(exc):
                    raise
            sleep(self.delay(attempt))
            attempt += 1
