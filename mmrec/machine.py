"""The CPU a number was measured on (model, usable cores, the SIMD flags that pick kernels).

Export's runtime tuning records it in the manifest; the benchmarks record it with every result.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

# CPU features that decide which GEMM / INT8 / FP16 kernels ORT and PyTorch can use.
INTERESTING_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                     "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                     "amx_int8", "amx_bf16")

def _cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo as a dict ('' values where absent)."""
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def cpu_info() -> dict:
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        usable = os.cpu_count()
    return {
        "model": info.get("model name") or platform.processor() or "unknown",
        "vendor": info.get("vendor_id", ""),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "flags": {f: f in flags for f in INTERESTING_FLAGS},
        "memory_gib": _memory_gib(),
        "hypervisor": "hypervisor" in flags,
    }
