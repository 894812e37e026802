"""Several replicas behind one client: spread requests, eject failing endpoints, re-admit them.

Shared by the sync and asyncio clients and free of I/O: the clients send, sleep and probe;
this module decides where each attempt goes and keeps every endpoint's counters.

* An attempt goes to the healthy endpoint with the fewest requests in flight; ties rotate, so
  equal replicas take turns, and the sub-batches of one long call spread the same way. With
  `spill_over` it goes to the first healthy endpoint in the order given instead (a replica in
  the caller's own zone first), and the later ones take what it sheds or cannot take.
* A connection failure (UNAVAILABLE, refused or reset) ejects the endpoint it happened on, and
  the request moves at once to another healthy endpoint. Every move counts against the
  client's RetryPolicy; INVALID_ARGUMENT and other server answers are never retried. Only when
  every endpoint is ejected does a request back off and try the ejected ones in turn, which,
  with a single URL, is plain retry with exponential backoff.
* The clients' health checkers report each probe with `probed`: ready re-admits an endpoint,
  anything else ejects it. A request that succeeds on an ejected endpoint re-admits it too.
* A request the server shed (overloaded, `OverloadedError`) does not eject its endpoint: the
  server is up. It moves at once to another healthy endpoint that has not shed it: that spreads
  the load without adding any (each replica sees the request at most once, and a full queue's
  rejection costs the server no compute), so it needs no budget beyond the RetryPolicy's count.
  Once every healthy endpoint has shed it, it waits a jittered backoff and tries again: that adds
  load to replicas known to be overloaded, so each such retry needs the client's `RetryBudget`.
* A request's deadline (its call's `client_timeout`) covers all its attempts: each waits at most
  the time left, and tells the server that time as the request's `timeout` (unless the caller
  set one), so a queue with an admission policy drops the work once nobody waits for it. Triton
  lets that `timeout` replace the policy's queue budget even when it is longer, so it is capped
  at the budget the server's configs declare (`queue_budget_us`).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Collection, Generic, Iterator, Sequence, TypeVar

from ._errors import is_retryable, is_shed, server_message
from ._requests import CallOptions
from ._retry import RetryBudget, RetryPolicy
from ._shm import RegionPool

T = TypeVar("T")
logger = logging.getLogger("mmrec.client")


def parse_urls(url: str | Sequence[str]) -> tuple[str, ...]:
    """'host:port', 'a:8001,b:8001' or a list/tuple of 'host:port' -> the URLs, in order."""
    parts = url.split(",") if isinstance(url, str) else list(url)
    if not all(isinstance(p, str) for p in parts):
        raise TypeError(f"url must be a 'host:port' string or a list of them, got {url!r}")
    urls = tuple(p.strip() for p in parts)
    if not urls or not all(urls):
        raise ValueError(f"url must name one or more 'host:port' endpoints, got {url!r}")
    repeated = sorted({u for u in urls if urls.count(u) > 1})
    if repeated:
        raise ValueError(f"endpoint(s) listed more than once: {', '.join(repeated)}")
    return urls


@dataclass(frozen=True)
class EndpointStatus:
    """One endpoint as `client.endpoints` reports it (a snapshot)."""

    url: str
    healthy: bool
    in_flight: int  # attempts sent and not answered yet
    requests: int  # attempts sent so far
    failures: int  # attempts that failed to reach it (each one ejects it)
    shed: int = 0  # attempts it answered "overloaded" (queue full or queue timeout)


class Endpoint(Generic[T]):
    """One replica: its transport, its shared-memory regions and its counters.

    Health and counters change under the pool's lock only.
    """

    def __init__(self, url: str, transport: T) -> None:
        self.url = url
        self.transport = transport
        self.regions: RegionPool | None = None  # sync client with shared_memory=True
        self.healthy = True
        self.in_flight = 0
        self.requests = 0
        self.failures = 0
        self.shed = 0

    def status(self) -> EndpointStatus:
        return EndpointStatus(self.url, self.healthy, self.in_flight, self.requests, self.failures, self.shed)


class EndpointPool(Generic[T]):
    """The client's endpoints, one transport each; thread-safe, usable from asyncio too."""

    def __init__(self, urls: Sequence[str], transport: Callable[[str], T], spill_over: bool = False) -> None:
        self.endpoints = tuple(Endpoint(url, transport(url)) for url in urls)
        self.spill_over = spill_over
        self._lock = threading.Lock()  # never held across I/O, so asyncio can share it
        self._turns = itertools.count()

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(e.url for e in self.endpoints)

    def statuses(self) -> tuple[EndpointStatus, ...]:
        with self._lock:
            return tuple(e.status() for e in self.endpoints)

    def any_healthy(self) -> bool:
        with self._lock:
            return any(e.healthy for e in self.endpoints)

    @contextmanager
    def use(self, avoid: Collection[Endpoint[T]] = ()) -> Iterator[Endpoint[T]]:
        """The endpoint for one attempt, counted in flight until the block ends; one not in
        `avoid` (those that shed this request) while a healthy one is left.

        A connection failure raised in the block ejects the endpoint; a shed is only counted;
        success on an endpoint that was ejected when the attempt began re-admits it.
        """
        with self._lock:
            endpoint = self._pick(avoid)
            endpoint.in_flight += 1
            endpoint.requests += 1
            was_ejected = not endpoint.healthy
        try:
            yield endpoint
        except Exception as exc:
            if is_retryable(exc):
                with self._lock:
                    endpoint.failures += 1
                self.eject(endpoint, server_message(exc))
            elif is_shed(exc):
                with self._lock:
                    endpoint.shed += 1
            raise
        else:
            if was_ejected:
                self.readmit(endpoint, "a request succeeded")
        finally:
            with self._lock:
                endpoint.in_flight -= 1

    def _pick(self, avoid: Collection[Endpoint[T]] = ()) -> Endpoint[T]:
        """Fewest in flight among the healthy not in `avoid` (else among the healthy), ties in
        rotation (`spill_over`: the first of them in the order given); all in rotation when none
        is healthy."""
        start = next(self._turns) % len(self.endpoints)
        ring = self.endpoints[start:] + self.endpoints[:start]
        healthy = [e for e in (self.endpoints if self.spill_over else ring) if e.healthy]
        fresh = [e for e in healthy if e not in avoid]
        if not healthy:
            return ring[0]
        return (fresh or healthy)[0] if self.spill_over else min(fresh or healthy, key=lambda e: e.in_flight)

    def has_other(self, avoid: Collection[Endpoint[T]]) -> bool:
        """Is a healthy endpoint left outside `avoid`?"""
        with self._lock:
            return any(e.healthy and e not in avoid for e in self.endpoints)

    def probed(self, endpoint: Endpoint[T], ready: bool, why: str = "not ready") -> None:
        """A health probe's answer: ready re-admits the endpoint, anything else ejects it."""
        if ready:
            self.readmit(endpoint, "ready again")
        else:
            self.eject(endpoint, why)

    def eject(self, endpoint: Endpoint[T], why: str) -> None:
        with self._lock:
            was_healthy, endpoint.healthy = endpoint.healthy, False
            left = sum(e.healthy for e in self.endpoints)
        if endpoint.regions is not None:
            endpoint.regions.reset()  # a restarted server has forgotten its registrations
        if was_healthy:
            logger.warning("ejected %s (%s); %d of %d endpoints left", endpoint.url, why, left,
                           len(self.endpoints))

    def readmit(self, endpoint: Endpoint[T], why: str) -> None:
        with self._lock:
            was_ejected, endpoint.healthy = not endpoint.healthy, True
        if was_ejected:
            logger.warning("re-admitted %s (%s)", endpoint.url, why)


class Attempts:
    """One request's attempts across the pool (see the module docstring)."""

    def __init__(self, pool: EndpointPool, policy: RetryPolicy, budget: RetryBudget | None = None,
                 deadline_s: float | None = None, clock: Callable[[], float] = time.monotonic,
                 queue_budget_us: int | None = None) -> None:
        self.pool = pool
        self.queue_budget_us = queue_budget_us
        self.policy = policy
        self.budget = budget
        self.failed = 0
        self.waits = 0
        self.shed_by: list[Endpoint] = []  # endpoints that shed this request, in order
        self._clock = clock
        self._deadline = None if deadline_s is None else clock() + deadline_s
        self._next_wait = 0.0
        if budget is not None:
            budget.request()

    def remaining_s(self) -> float | None:
        """Seconds left before the request's deadline (None: no deadline)."""
        return None if self._deadline is None else self._deadline - self._clock()

    def options(self, options: CallOptions) -> CallOptions:
        """This attempt's options: wait at most the time left, and tell the server so."""
        left = self.remaining_s()
        if left is None:
            return options
        left = max(left, 1e-3)
        timeout = max(1, int(left * 1e6))
        if self.queue_budget_us:
            timeout = min(timeout, self.queue_budget_us)
        return replace(options, client_timeout=left,
                       timeout=options.timeout if options.timeout is not None else timeout)

    def again(self, exc: Exception, endpoint: Endpoint | None = None) -> bool:
        """After a failed attempt: is another one allowed? It also fixes the wait before it
        (`backoff_s`), so the deadline is checked against the wait that will be taken."""
        shed = is_shed(exc)
        if not (shed or is_retryable(exc)) or self.failed >= self.policy.retries:
            return False
        if shed and endpoint is not None:
            self.shed_by.append(endpoint)
        wait = self._wait(shed)
        left = self.remaining_s()
        if left is not None and wait >= left:
            return False  # the backoff alone would outlast the deadline: report the failure now
        moving = shed and self.pool.has_other(self.shed_by)  # to a replica that has not shed it: free
        if shed and not moving and self.budget is not None and not self.budget.try_retry():
            return False  # back to replicas that shed it (after a backoff, or none configured): budgeted
        if wait:
            self.waits += 1
        self._next_wait = wait
        self.failed += 1
        return True

    def _wait(self, shed: bool) -> float:
        """None while some endpoint is still healthy (after a shed: one that has not shed this
        request); else the next backoff step, jittered after a shed."""
        if shed:
            return 0.0 if self.pool.has_other(self.shed_by) else self.policy.jittered_delay(self.waits)
        return 0.0 if self.pool.any_healthy() else self.policy.delay(self.waits)

    def backoff_s(self) -> float:
        """Seconds to wait before the next attempt (0 before the first), as `again` decided."""
        wait, self._next_wait = self._next_wait, 0.0
        return wait
