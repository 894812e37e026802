"""System shared memory for PIXEL_VALUES: one registered region per in-flight request.

A pixel batch is 0.6 MB per item; on the same host, shared memory skips serializing it into
the request. Regions are created and registered lazily (as many as requests in flight, each
sized for a full batch), reused across requests, and unregistered + destroyed on close.
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
    """Hands out free regions; creates one (and registers it with the server) when none is free."""

    def __init__(self, byte_size: int) -> None:
        self.byte_size = byte_size
        self._prefix = f"mmrec_client_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self._free: queue.SimpleQueue[Region] = queue.SimpleQueue()
        self._all: list[Region] = []
        self._lock = threading.Lock()

    def _create(self, register: Callable[[str, str, int], None]) -> Region:
        import tritonclient.utils.shared_memory as shm

        with self._lock:
            name = f"{self._prefix}_{len(self._all)}"
            handle = shm.create_shared_memory_region(name, f"/{name}", self.byte_size)
            region = Region(name, f"/{name}", self.byte_size, handle)
            self._all.append(region)
        try:
            register(region.name, region.key, region.byte_size)
        except BaseException:
            self._destroy(region)
            raise
        return region

    @contextmanager
    def lease(self, register: Callable[[str, str, int], None]) -> Iterator[Region]:
        """A region for one request; returned to the pool afterwards."""
        try:
            region = self._free.get_nowait()
        except queue.Empty:
            region = self._create(register)
        try:
            yield region
        finally:
            self._free.put(region)

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
