"""The servers one bench section starts one after another, with their slow, unmeasured parts
overlapped.

A tritonserver with the python backend takes seconds to start (one stub per model) and seconds
to stop (Triton checks once a second whether its models are unloaded); the overload section
starts five of them. Nothing is measured while a server starts or stops, so: a stopped server
shuts down in the background while the next one starts, servers needed together start together
(each in its own thread, pinned to its own cores), and `settle()` waits until every stopped
server has exited. A measurement starts only after `settle()`, so it sees exactly the servers it
saw when they ran one at a time.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Sequence

RunningServer = Callable[[Path, Path], ContextManager]  # benchmarks.serving.running_server


@contextmanager
def pinned(cores: set[int] | None) -> Iterator[None]:
    """The calling thread on `cores` while the block runs (None: unchanged): a server started
    inside inherits them (and so do the python stubs it spawns)."""
    if cores is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)  # pid 0: this thread only, so threads can pin differently
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class OverlappedServers:
    """Start servers (`start`, several at once with `start_all`), stop them in the background
    (`stop`), wait for the stops (`settle`); leaving the block stops what is left, together."""

    def __init__(self, running_server: RunningServer) -> None:
        self._running_server = running_server
        self._live: dict[int, ContextManager] = {}  # id(server) -> its running_server context
        self._stopping: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()

    def start(self, repository: Path, log: Path, cores: set[int] | None = None):
        """A ready server over `repository` (on `cores`, if given)."""
        return self.start_all([(repository, log, cores)])[0]

    def start_all(self, specs: Sequence[tuple[Path, Path, set[int] | None]]) -> list:
        """Ready servers, one per (repository, log, cores), started at the same time; if one
        fails, the others are stopped and its error raised."""
        results: list = [None] * len(specs)

        def enter(i: int) -> None:
            repository, log, cores = specs[i]
            context = self._running_server(repository, log)
            try:
                with pinned(cores):
                    server = context.__enter__()
            except BaseException as err:  # noqa: BLE001 - raised below, in the caller's thread
                results[i] = err
                return
            with self._lock:
                self._live[id(server)] = context
            results[i] = server

        threads = [threading.Thread(target=enter, args=(i,), name=f"server-start-{i}") for i in range(len(specs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            self.stop(*[r for r in results if not isinstance(r, BaseException)])
            self.settle(raise_errors=False)
            raise failed[0]
        return results

    def stop(self, *servers) -> None:
        """Stop these servers in the background (`settle` waits for them)."""
        for server in servers:
            with self._lock:
                context = self._live.pop(id(server))
            self._stop_context(context)

    def _stop_context(self, context: ContextManager) -> None:
        thread = threading.Thread(target=self._exit, args=(context,), name="server-stop")
        thread.start()
        self._stopping.append(thread)

    def _exit(self, context: ContextManager) -> None:
        try:
            context.__exit__(None, None, None)
        except BaseException as err:  # noqa: BLE001 - reported by settle()
            with self._lock:
                self._errors.append(err)

    def settle(self, raise_errors: bool = True) -> None:
        """Wait until every stopped server has exited (before any measurement)."""
        while self._stopping:
            self._stopping.pop().join()
        if raise_errors and self._errors:
            errors, self._errors = self._errors, []
            raise errors[0]

    def __enter__(self) -> OverlappedServers:
        return self

    def __exit__(self, *exc_info) -> None:
        with self._lock:
            contexts = list(self._live.values())
            self._live.clear()
        for context in contexts:
            self._stop_context(context)
        self.settle(raise_errors=exc_info[0] is None)
