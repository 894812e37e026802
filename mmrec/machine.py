"""The CPU a number was measured on (model, usable cores, the SIMD flags that pick kernels), and
the source tree that produced it (commit, uncommitted changes).

Export's runtime tuning records the CPU in the manifest and the export records the tree; the
benchmarks record both with every result.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
GIT_TIMEOUT_S = 10

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


def git_commit(root: Path = REPO_ROOT) -> dict:
    """HEAD and whether tracked files had uncommitted changes: {"commit": sha | None, "dirty":
    bool | None}; None where there is no git or `root` is no checkout (an installed wheel: an
    enclosing repository, e.g. of a venv inside a checkout, must not be taken for ours)."""
    if not (Path(root) / ".git").exists():
        return {"commit": None, "dirty": None}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def tool_path(name: str, env_var: str) -> str | None:
    """An executable the benchmarks and tests call (helm, promtool): `env_var`'s path, else the
    venv's bin/ (where `make` installs them from deploy/tools/), else PATH; None when none is."""
    import shutil
    import sys

    candidates = [os.environ.get(env_var), str(Path(sys.executable).parent / name), shutil.which(name)]
    return next((c for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


def default_cache_dir() -> Path:
    """mmrec's cache root (python backend copies, perf_analyzer, export's feature pass):
    $MMREC_CACHE_DIR, else ~/.cache/mmrec."""
    env = os.environ.get("MMREC_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mmrec"
