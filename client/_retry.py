"""Retries: exponential backoff for connection-level failures (UNAVAILABLE, refused, reset)
and for requests the server shed (queue full or queue timeout), under a retry budget.

INVALID_ARGUMENT and every other server answer is returned at once: resending a bad request
only repeats the error and delays the message the caller needs. The clients spend this budget
across their endpoints through `_endpoints.Attempts`; `call` retries one callable.

A shed request means the server is overloaded: retrying it at once, from every client, is the
retry storm that keeps a server overloaded. So a shed retry waits a jittered backoff (unless
another replica can take it), and all shed retries of one client share a `RetryBudget`: at most
`ratio` of its recent requests (plus a small floor per second), as gRPC's retry throttling and
Finagle's RetryBudget do, so retries cannot multiply the offered load.
"""
from __future__ import annotations

import random
import threading
import time
from collections import deque
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

    def jittered_delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Between half and all of `delay(attempt)` ("equal jitter"): clients shed together do not
        come back together."""
        full = self.delay(attempt)
        return full * (0.5 + 0.5 * (rng or random).random())

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


class RetryBudget:
    """Shed retries allowed as a share of recent requests: over the last `window_s` seconds,
    retries <= `ratio` x first attempts + `min_per_s` x `window_s`. Thread-safe; one per client."""

    def __init__(self, ratio: float = 0.1, min_per_s: float = 1.0, window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ratio < 0 or min_per_s < 0 or window_s <= 0:
            raise ValueError(f"ratio and min_per_s must be >= 0 and window_s > 0, got {ratio}, {min_per_s}, "
                             f"{window_s}")
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.window_s = window_s
        self._clock = clock
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()
        self._lock = threading.Lock()
        self.denied = 0  # retries refused so far (the caller got the shed error instead)

    def _prune(self, now: float) -> None:
        for times in (self._requests, self._retries):
            while times and times[0] <= now - self.window_s:
                times.popleft()

    def request(self) -> None:
        """Count a request's first attempt (what the budget is a share of)."""
        now = self._clock()
        with self._lock:
            self._prune(now)
            self._requests.append(now)

    def try_retry(self) -> bool:
        """Spend one retry if the budget has one left; False means: give up now."""
        now = self._clock()
        with self._lock:
            self._prune(now)
            if len(self._retries) + 1 > self.ratio * len(self._requests) + self.min_per_s * self.window_s:
                self.denied += 1
                return False
            self._retries.append(now)
            return True
