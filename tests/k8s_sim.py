"""The two pieces of Kubernetes a pod's drain depends on, for tests against the real tritonserver.

Not mocks of Triton: real TCP forwarding and real argument expansion, reduced to what decides
whether calls are lost when a pod stops.

* `ServiceProxy` behaves like kube-proxy for one Service port: each *new* TCP connection goes to
  a ready endpoint (round-robin); an established connection stays on its backend until either
  side closes it (conntrack), also after the endpoint was removed. That is why removing a pod
  from the Service does not move gRPC clients off it: only a closed connection does.
* `expand_kubelet_vars` applies the kubelet's `$(VAR)` expansion to a container's args from its
  env (plain values and `resourceFieldRef` CPU quantities rounded up by the divisor).
"""
from __future__ import annotations

import itertools
import math
import re
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class _Connection:
    backend: str
    opened: float
    closed: float | None = None


@dataclass
class ServiceProxy:
    """A ClusterIP port on 127.0.0.1 in front of named backends {name: (host, port)}."""

    backends: dict[str, tuple[str, int]]
    ready: list[str] = field(default_factory=list)
    connections: list[_Connection] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ready = list(self.backends)
        self._lock = threading.Lock()
        self._rr = itertools.count()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._closing = False
        threading.Thread(target=self._accept, name="service-proxy", daemon=True).start()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def remove_endpoint(self, name: str) -> None:
        """The EndpointSlice update reaching kube-proxy: no new connections to `name`."""
        with self._lock:
            self.ready.remove(name)

    def open_connections(self, name: str) -> int:
        with self._lock:
            return sum(1 for c in self.connections if c.backend == name and c.closed is None)

    def close(self) -> None:
        self._closing = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if not self.ready:
                    client.close()
                    continue
                name = self.ready[next(self._rr) % len(self.ready)]
                conn = _Connection(name, time.monotonic())
                self.connections.append(conn)
            try:
                upstream = socket.create_connection(self.backends[name], timeout=5)
            except OSError:  # like a DNAT to a dead pod: the client sees the connection drop
                client.close()
                conn.closed = time.monotonic()
                continue
            upstream.settimeout(None)
            done = threading.Barrier(2, action=lambda c=conn, a=client, b=upstream: self._finish(c, a, b))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst, done), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, done: threading.Barrier) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)  # pass the FIN on; the other direction may still run
        except OSError:
            pass
        done.wait()

    def _finish(self, conn: _Connection, a: socket.socket, b: socket.socket) -> None:
        a.close()
        b.close()
        with self._lock:
            conn.closed = time.monotonic()


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_CPU = re.compile(r"^(\d+(?:\.\d+)?)(m?)$")


def _cpu_cores(quantity: str) -> float:
    m = _CPU.match(str(quantity))
    if not m:
        raise ValueError(f"unsupported CPU quantity {quantity!r}")
    return float(m.group(1)) / (1000 if m.group(2) else 1)


def expand_kubelet_vars(container: dict, extra: dict[str, str] | None = None) -> list[str]:
    """The container's args as the kubelet passes them: `$(VAR)` replaced from its env.

    resourceFieldRef cpu values are the container's limit (or request) divided by the divisor and
    rounded up, as the downward API does; secretKeyRef values come from `extra` (name -> value).
    """
    env: dict[str, str] = {}
    resources = container.get("resources", {})
    for var in container.get("env", []):
        name = var["name"]
        if "value" in var:
            env[name] = _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), var["value"])
        elif "resourceFieldRef" in var["valueFrom"]:
            ref = var["valueFrom"]["resourceFieldRef"]
            kind, _, resource = ref["resource"].partition(".")
            value = _cpu_cores(resources[kind][resource]) / _cpu_cores(ref.get("divisor", "1"))
            env[name] = str(math.ceil(value))
        elif extra and name in extra:
            env[name] = extra[name]
    return [_VAR.sub(lambda m: env.get(m.group(1), m.group(0)), arg) for arg in container.get("args", [])]
