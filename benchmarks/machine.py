"""The machine and software every number was measured on: CPU, flags, load, versions, commit."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

BENCH_PACKAGES = ("mmrec", "torch", "onnx", "onnxruntime", "openvino", "onnxslim", "transformers", "tokenizers",
                  "numpy", "pillow", "nvidia-pytriton", "tritonclient", "grpcio", "aiohttp",
                  "geventhttpclient", "matplotlib", "rich", "typer")
REPO_ROOT = Path(__file__).resolve().parent.parent

from mmrec.machine import INTERESTING_FLAGS, cpu_info  # noqa: E402  (re-exported: one definition)


def loadavg() -> list[float]:
    """1/5/15-minute load averages (other work on the machine skews every timing)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpu_share(seconds: float = 0.5) -> float | None:
    """Fraction of the usable cores this process actually got while keeping them all busy
    (multi-threaded sgemm): ~1.0 on an idle machine, lower when other work competes."""
    import time

    import numpy as np

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = os.cpu_count() or 1
    a = np.ones((768, 768), np.float32)
    a @ a
    wall, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        a @ a
    used = time.process_time() - cpu
    return round(used / ((time.perf_counter() - wall) * cores), 3)


BUSY_LOAD_MARGIN = 0.5  # 1-min load above usable cores + this: other work competes
BUSY_MIN_SHARE = 0.8  # busy probe: this process got less than this share of the cores


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def busy_check(cores: int | None = None) -> dict:
    """Is the machine busy right now (1-min load average above the usable cores + 0.5, or this
    process getting < 80 % of the cores in the busy probe)? `reasons` says which."""
    cores = cores or usable_cores()
    load, share = loadavg(), cpu_share()
    reasons = []
    if load and load[0] > cores + BUSY_LOAD_MARGIN:
        reasons.append(f"1-min load average {load[0]} > {cores} usable cores + {BUSY_LOAD_MARGIN}")
    if share is not None and share < BUSY_MIN_SHARE:
        reasons.append(f"busy probe: this process got {100 * share:.0f}% of the cores (< {100 * BUSY_MIN_SHARE:.0f}%)")
    return {"loadavg": load, "cpu_share": share, "cores": cores, "busy": bool(reasons), "reasons": reasons}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in BENCH_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(root: Path = REPO_ROOT) -> dict:
    """HEAD and whether the working tree had uncommitted changes when the numbers were taken."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])


def machine_info() -> dict:
    """Everything about the host that a reader needs to judge a number."""
    return {
        "cpu": cpu_info(),
        "platform": platform.platform(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "loadavg_start": loadavg(),
        "cpu_share_start": cpu_share(),
    }
