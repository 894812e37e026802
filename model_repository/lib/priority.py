"""The python models' compute yields the CPU to Triton's own threads.

A python model runs in its own stub process; Triton's gRPC/HTTP frontends, the dynamic batcher
and its health and metrics endpoints run in the server process. When the encoders keep every
core busy (overload), those threads wait for a time slice behind the compute: a request that
the queue policy sheds at once still learns it late, and a readiness probe times out. Running
the stubs at a lower priority (a higher nice value) lets the server's short tasks preempt the
long ones; idle cores still go to the compute, so throughput on a quiet machine is unchanged.

Measured (2-core AMD EPYC, admitted item_encoder at 2x capacity, 6 s, Triton 2.51): shed answers
p99 7.0 -> 4.6 ms, admitted p99 121 -> 81 ms at nice 10 (benchmarks/overload.py's setting).
"""
from __future__ import annotations

import os

COMPUTE_NICE = 10
NICE_ENV = "MMREC_COMPUTE_NICE"  # an operator's override; 0 keeps the server's priority


def yield_to_server(nice: int | None = None) -> int:
    """Raise this stub's nice value to `nice` (default COMPUTE_NICE or $MMREC_COMPUTE_NICE) on
    every thread it has; threads it starts later inherit it. Linux keeps nice per thread, so
    one call on the calling thread would miss the stub's others. Never lowers a nice value
    (that needs privileges); returns the value in effect."""
    if nice is None:
        try:
            nice = int(os.environ.get(NICE_ENV, COMPUTE_NICE) or 0)
        except ValueError:  # a typo in the environment must not stop the model from loading
            nice = COMPUTE_NICE
    target = nice
    if not hasattr(os, "setpriority"):  # pragma: no cover - not Linux/Unix
        return 0
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # pragma: no cover - no procfs
        threads = [0]
    for thread in threads:
        try:
            if os.getpriority(os.PRIO_PROCESS, thread) < target:
                os.setpriority(os.PRIO_PROCESS, thread, target)
        except OSError:  # a thread that ended meanwhile, or a container that forbids it
            continue
    return os.getpriority(os.PRIO_PROCESS, 0)
