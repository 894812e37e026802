"""System shared memory for PIXEL_VALUES: one registered region per in-flight request.

A pixel batch is 0.6 MB per item; on the same host, shared memory skips serializing it into
the request. Regions are created and registered lazily (as many as requests in flight, each
sized for a full batch), reused across requests, and unregistered + destroyed on close.
Each endpoint of a client has its own pool; `reset()` (when the endpoint is ejected: it may
come back as a restarted server) makes every region register again on its next lease.
"""
from __future__ import annotations

import os
import queue
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np


@dataclass(frozen=True)
class Region:
    name: str
    key: str
    byte_size: int
    handle: Any

    def write(self, array: np.ndarray) -> int:
        """Copy `array` into the region; returns its byte size for InferInput.set_shared_memory."""
        import tritonclient.utils.shared_memory as shm

        if array.nbytes > self.byte_size:
            raise ValueError(f"{array.nbytes} bytes do not fit region {self.name} ({self.byte_size} bytes)")
        shm.set_shared_memory_region(self.handle, [np.ascontiguousarray(array)])
        return array.nbytes


class RegionPool:
    """Hands out free regions, creating one when none is free; registers each on its first lease."""

    def __init__(self, byte_size: int) -> None:
        self.byte_size = byte_size
        self._prefix = f"mmrec_client_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self._free: queue.SimpleQueue[Region] = queue.SimpleQueue()
        self._all: list[Region] = []
        self._registered: set[str] = set()  # with the server as it is now
        self._stale: set[str] = set()  # registered before reset(): the server may still hold them
        self._lock = threading.Lock()

    def _create(self) -> Region:
        import tritonclient.utils.shared_memory as shm

        with self._lock:
            name = f"{self._prefix}_{len(self._all)}"
            handle = shm.create_shared_memory_region(name, f"/{name}", self.byte_size)
            region = Region(name, f"/{name}", self.byte_size, handle)
            self._all.append(region)
        return region

    @contextmanager
    def lease(self, register: Callable[[str, str, int], None],
              unregister: Callable[[str], None]) -> Iterator[Region]:
        """A region for one request, registered with the server; returned to the pool afterwards."""
        try:
            region = self._free.get_nowait()
        except queue.Empty:
            region = self._create()
        try:
            if region.name not in self._registered:
                self._register(region, register, unregister)
            yield region
        finally:
            self._free.put(region)

    def _register(self, region: Region, register: Callable[[str, str, int], None],
                  unregister: Callable[[str], None]) -> None:
        with self._lock:
            stale = region.name in self._stale
        if stale:  # the same server may still hold it: drop that registration first
            try:
                unregister(region.name)
            except Exception:  # noqa: BLE001 - a restarted server does not know it, as expected
                pass
        register(region.name, region.key, region.byte_size)
        with self._lock:
            self._stale.discard(region.name)
            self._registered.add(region.name)

    def reset(self) -> None:
        """Forget which regions the server knows; each registers again on its next lease."""
        with self._lock:
            self._stale |= self._registered
            self._registered.clear()

    def _destroy(self, region: Region) -> None:
        import tritonclient.utils.shared_memory as shm

        with self._lock:
            if region in self._all:
                self._all.remove(region)
        shm.destroy_shared_memory_region(region.handle)

    def close(self, unregister: Callable[[str], None]) -> None:
        """Unregister (best effort: the server may be gone) and destroy every region."""
        for region in list(self._all):
            try:
                unregister(region.name)
            except Exception:  # noqa: BLE001 - the region is destroyed below either way
                pass
            self._destroy(region)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self._all)
