"""The machine and software every number was measured on: CPU, flags, load, versions, commit.

Every script that writes under benchmarks/results/ writes through `write_results`, which adds
one `provenance` record (`provenance()`): the commit and dirty flag, the host, the load and
busy-probe share before and after, the command line, the package versions, and when it started
and finished. A number in the docs is rendered from such a file (benchmarks/doc_blocks.py).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

BENCH_PACKAGES = ("mmrec", "torch", "onnx", "onnxruntime", "openvino", "onnxslim", "transformers", "tokenizers",
                  "numpy", "pillow", "nvidia-pytriton", "tritonclient", "grpcio", "aiohttp",
                  "geventhttpclient", "matplotlib", "rich", "typer")

from mmrec.machine import INTERESTING_FLAGS, REPO_ROOT, cpu_info, git_commit  # noqa: E402,F401  (re-exported: one definition)


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


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])


def host_info() -> dict:
    """The host itself (no load): CPU, platform, kernel, Python."""
    return {
        "cpu": cpu_info(),
        "platform": platform.platform(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
    }


def machine_info() -> dict:
    """Everything about the host that a reader needs to judge a number, with the load now."""
    return {**host_info(), "loadavg_start": loadavg(), "cpu_share_start": cpu_share()}


# ------------------------------------------------------------------------------ provenance

PROVENANCE_KEY = "provenance"
PROVENANCE_FIELDS = ("git", "machine", "loadavg", "cpu_share", "command", "packages", "started", "finished")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class RunStart:
    """What a results writer notes before it measures anything: the time, the load, the share of
    the cores this process gets (the busy probe) and the tree being measured. `RunStart.now()` at
    the top of a run: by its end the run has written its own outputs (a server log, results
    files), some of them tracked, and the tree would look dirty because of them."""

    started: str
    loadavg: list[float] = field(default_factory=list)
    cpu_share: float | None = None
    git: dict | None = None  # {commit, dirty} when the run started; None: read at the end

    @classmethod
    def now(cls) -> "RunStart":
        return cls(started=utc_now(), loadavg=loadavg(), cpu_share=cpu_share(), git=git_commit())


def provenance(start: RunStart) -> dict:
    """Where a results file came from: {git: {commit, dirty} of the tree when the run started,
    machine, loadavg: {before, after}, cpu_share: {before, after}, command, packages, started,
    finished}."""
    return {"git": start.git if start.git is not None else git_commit(), "machine": host_info(),
            "loadavg": {"before": list(start.loadavg), "after": loadavg()},
            "cpu_share": {"before": start.cpu_share, "after": cpu_share()},
            "command": command_line(), "packages": package_versions(),
            "started": start.started, "finished": utc_now()}


def write_results(path: Path, report: dict, start: RunStart, *, indent: int = 1, sort_keys: bool = False) -> Path:
    """Write a results JSON file with its provenance (the one way into benchmarks/results/)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**report, PROVENANCE_KEY: provenance(start)}
    path.write_text(json.dumps(record, indent=indent, sort_keys=sort_keys) + "\n")
    return path
