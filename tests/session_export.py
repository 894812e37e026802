"""The session's default export, built in a background process while the tests that do not need
it run first.

Why: the export takes minutes, much of it on one thread (fusion training), while more than half
of the suite's tests never touch it; on a 2-core machine the other core would idle. So the session starts
the export as a subprocess before the first test (only when a collected test needs it), runs the
tests that do not need it first (`order_for_export`), and the `exported_repository` fixture waits
for the subprocess (`BackgroundExport.wait`). Run as a script, this file is that subprocess.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # the export subprocess runs this file without pytest
    import pytest

EXPORT_FIXTURE = "exported_repository"
REPOSITORY_ENV = "MMREC_TEST_REPOSITORY"  # an existing export: nothing is built
EXPORT_TIMEOUT_S = 1800.0  # far above the few minutes an export takes on 2 cores: a hang, not a slow run
LOG_TAIL_LINES = 40
# fixtures of these scopes live across tests: moving some of a module's tests away from the others
# would set such a fixture up twice
SHARED_SCOPES = ("package", "module", "class")
# a test module's tuple of such fixtures that are cheap to build twice (a temp folder, a tool
# lookup): its export-free tests may then run first even though they share them
SPLIT_SAFE = "SPLIT_SAFE_FIXTURES"


class ExportFailed(RuntimeError):
    """The background export exited non-zero or hung; the message carries its log's tail."""


# --------------------------------------------------------------------------- order


def needs_export(item: pytest.Item) -> bool:
    """Whether the test uses the session export, directly or through another fixture
    (`fixturenames` is the closure)."""
    return EXPORT_FIXTURE in getattr(item, "fixturenames", ())


def _shared_fixtures(item: pytest.Item) -> set[str]:
    """The item's fixtures that outlive one test (module, class or package scope), less those its
    module lists in SPLIT_SAFE_FIXTURES (cheap enough to build once per group)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return set()
    cheap = set(getattr(getattr(item, "module", None), SPLIT_SAFE, ()))
    return {name for name, defs in info.name2fixturedefs.items()
            if defs and defs[-1].scope in SHARED_SCOPES and name not in cheap}


def order_for_export(items: Sequence[pytest.Item]) -> list[pytest.Item]:
    """Tests that need no export first, the others after, each group in its given order.

    A test of a module that also has export tests moves ahead only when it shares no module-,
    class- or package-scoped fixture with them (such a fixture would be built twice, once per
    group) beyond the module's SPLIT_SAFE_FIXTURES; whole modules that need no export always
    move."""
    late_shared: dict[str, set[str]] = defaultdict(set)
    for item in items:
        if needs_export(item):
            late_shared[item.nodeid.split("::")[0]] |= _shared_fixtures(item)
    early, late = [], []
    for item in items:
        module = item.nodeid.split("::")[0]
        stays = needs_export(item) or bool(_shared_fixtures(item) & late_shared[module])
        (late if stays else early).append(item)
    return early + late


# --------------------------------------------------------------------------- the subprocess


class BackgroundExport:
    """`Exporter(ExportOptions(output, tune=False)).run()` in a subprocess of its own session
    (process group), so stopping it also stops any worker it starts."""

    def __init__(self, output: Path, log: Path, command: Sequence[str] | None = None) -> None:
        """`command` replaces the export (tests of this class run something small instead)."""
        self.output, self.log = Path(output), Path(log)
        self.command = list(command) if command is not None else [
            sys.executable, str(Path(__file__).resolve()), str(self.output)]
        self._proc: subprocess.Popen | None = None
        self._started = 0.0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:  # the child keeps its own descriptor
            self._proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        self._started = time.monotonic()

    def wait(self, timeout_s: float = EXPORT_TIMEOUT_S) -> Path:
        """The repository once the export has finished; ExportFailed (with the log's tail) if it
        failed or is still running after `timeout_s`."""
        if self._proc is None:
            raise ExportFailed("the background export was never started")
        try:
            code = self._proc.wait(timeout=max(0.0, self._started + timeout_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.stop()
            raise ExportFailed(f"the session export ran past {timeout_s:.0f} s and was stopped; "
                               f"{self._tail()}") from None
        if code != 0:
            raise ExportFailed(f"the session export exited with code {code}; {self._tail()}")
        return self.output

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the export's process group, SIGKILL what is left after `grace_s` (a no-op once
        `wait` has seen it finish). The leader stays unreaped until its group is killed, so the
        group id cannot have passed to another process."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        _exited_unreaped(proc.pid, grace_s)
        _signal_group(proc.pid, signal.SIGKILL)  # the leader if it lingers, and any worker it left
        proc.wait()

    def _tail(self) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.is_file() else []
        return f"last {LOG_TAIL_LINES} lines of {self.log}:\n" + "\n".join(lines[-LOG_TAIL_LINES:])


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _exited_unreaped(pid: int, timeout_s: float) -> bool:
    """Whether our child `pid` exited within `timeout_s`, leaving it for `Popen.wait` to reap."""
    deadline = time.monotonic() + timeout_s
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when pytest dies without stopping it (kill -9, a crash)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux: the parent's finally stops it
        pass


def export_into(output: Path) -> Path:
    """The session's export: the default one, FP32 served.

    tune=False: ORT FP32 stays served, so the suite checks the same graphs on every CPU;
    tests/test_runtimes.py tunes a copy and serves what tuning picks on this machine."""
    from mmrec.export.pipeline import ExportOptions, Exporter

    Exporter(ExportOptions(output=Path(output), tune=False)).run()
    return Path(output)


def main(argv: Sequence[str]) -> int:
    """The subprocess: `export_into(argv[0])`."""
    _die_with_parent()
    export_into(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
