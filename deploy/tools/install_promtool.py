#!/usr/bin/env python3
"""Install `promtool` from Debian's `prometheus` package, for evaluating the chart's alert and
dashboard PromQL and the prometheus-adapter rules in tests and CI.

promtool is the rule checker and unit-test runner of Prometheus itself (`promtool check rules`,
`promtool test rules`), so tests evaluate the queries with Prometheus' own PromQL engine. It is
not on PyPI; Debian bookworm's `prometheus` package (2.42) ships it as /usr/bin/promtool, a Go
binary that needs only libc. Installing the package would run its maintainer scripts (a system
user, a systemd service, a running server), so this script does what `apt-get install` would
not: `apt-get download prometheus` (apt checks the .deb against the signed archive index),
`dpkg-deb -x` into a temporary folder, and copies `usr/bin/promtool` alone to --dest (default:
the running interpreter's bin folder, i.e. the venv, where tests/test_observability.py looks
first). On a machine where `apt-get update` never ran, the package is unknown: it runs that
first (root needed, as for the Makefile's other apt steps).

    python deploy/tools/install_promtool.py                 # -> <venv>/bin/promtool
    python deploy/tools/install_promtool.py --dest /usr/local/bin/promtool

Idempotent: an existing promtool of at least MIN_VERSION is left alone.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _installer import InstallError, run_cli

PACKAGE = "prometheus"
MEMBER = Path("usr/bin/promtool")
# bookworm's version; `promtool test rules` with alert_rule_test/promql_expr_test as used here
# has been stable since 2.x, the floor only rejects something much older found at --dest
MIN_VERSION = (2, 42)
VERSION_RE = re.compile(r"^promtool, version (\d+)\.(\d+)\.(\d+)")


def version_of(binary: Path) -> tuple[int, int, int] | None:
    """(major, minor, patch) that `binary --version` prints, or None when it does not run."""
    try:
        result = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    match = VERSION_RE.match(result.stdout + result.stderr)
    if result.returncode != 0 or match is None:
        return None
    return tuple(int(g) for g in match.groups())  # type: ignore[return-value]


def is_installed(dest: Path) -> bool:
    version = version_of(dest) if dest.is_file() and os.access(dest, os.X_OK) else None
    return version is not None and version[:2] >= MIN_VERSION


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise InstallError(f"`{cmd[0]}` not found: this installer needs a Debian/Ubuntu system "
                           f"(apt-get and dpkg-deb)") from exc


def package_known() -> bool:
    """Whether apt's index lists the package (not the case before the first `apt-get update`)."""
    return _run(["apt-cache", "show", "--no-all-versions", PACKAGE]).returncode == 0


def download_deb(workdir: Path) -> Path:
    """apt-get download the candidate .deb into workdir, refreshing the index if needed."""
    if not package_known():
        update = _run(["apt-get", "update", "-qq"])
        if update.returncode != 0:
            raise InstallError(f"`apt-get update` failed (run as root?):\n{update.stderr.strip()}")
        if not package_known():
            raise InstallError(f"apt knows no package {PACKAGE!r} even after `apt-get update`: "
                               f"enable Debian bookworm main (or newer) in the apt sources")
    # the temp folder is private to root, so apt's _apt sandbox user cannot write there: stay root
    result = _run(["apt-get", "download", "-o", "APT::Sandbox::User=root", PACKAGE], cwd=workdir)
    if result.returncode != 0:
        raise InstallError(f"`apt-get download {PACKAGE}` failed:\n{result.stderr.strip()}")
    debs = sorted(workdir.glob(f"{PACKAGE}_*.deb"))
    if len(debs) != 1:
        raise InstallError(f"expected one {PACKAGE}_*.deb in {workdir}, found {[d.name for d in debs]}")
    return debs[0]


def extract_promtool(deb: Path, workdir: Path) -> Path:
    """Unpack the .deb's files (no maintainer scripts run) and return its promtool."""
    root = workdir / "root"
    result = _run(["dpkg-deb", "-x", str(deb), str(root)])
    if result.returncode != 0:
        raise InstallError(f"dpkg-deb -x {deb.name} failed:\n{result.stderr.strip()}")
    promtool = root / MEMBER
    if not promtool.is_file():
        raise InstallError(f"{deb.name} has no /{MEMBER}")
    return promtool


def install(dest: Path) -> Path:
    if is_installed(dest):
        return dest
    with tempfile.TemporaryDirectory(prefix="mmrec-promtool-") as tmp:
        work = Path(tmp)
        promtool = extract_promtool(download_deb(work), work)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.with_name(f".{dest.name}.partial")
        shutil.copyfile(promtool, staging)
    staging.chmod(0o755)
    version = version_of(staging)
    if version is None or version[:2] < MIN_VERSION:
        staging.unlink()
        raise InstallError(f"the packaged promtool reports version {version}, need >= "
                           f"{'.'.join(map(str, MIN_VERSION))}; refusing to install it")
    staging.replace(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    return run_cli(argv, __doc__, "promtool", install, lambda path: '.'.join(map(str, version_of(path) or ())))


if __name__ == "__main__":
    sys.exit(main())
