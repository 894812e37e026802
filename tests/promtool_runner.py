"""promtool (Prometheus' rule checker and unit-test runner) for the tests.

`python deploy/tools/install_promtool.py` puts it into the venv's bin/ from Debian's
`prometheus` package; `make test` runs that first. Without it the tests skip locally and fail
under CI (tests/hard_dependencies.py).
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from hard_dependencies import skip_unless
from mmrec.machine import tool_path

INSTALL_PROMTOOL = "python deploy/tools/install_promtool.py"


def find_promtool() -> str | None:
    return tool_path("promtool", "MMREC_PROMTOOL")


def require_promtool() -> str:
    path = find_promtool()
    skip_unless(None if path else f"promtool not installed: run `{INSTALL_PROMTOOL}` (Debian's prometheus package)")
    return path  # type: ignore[return-value]


def _run(promtool: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def check_rules(promtool: str, groups: list[dict], workdir: Path, name: str) -> subprocess.CompletedProcess:
    """`promtool check rules` on a rule file of `groups` (parses every expr, checks templates)."""
    path = workdir / f"{name}.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return _run(promtool, ["check", "rules", path.name], workdir)


def run_unit_tests(promtool: str, groups: list[dict], tests: list[dict], workdir: Path, name: str,
               interval: str) -> subprocess.CompletedProcess:
    """`promtool test rules`: `tests` (each with input_series and alert/expr tests) over `groups`."""
    rules = workdir / f"{name}.rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    unit = workdir / f"{name}.test.yaml"
    unit.write_text(yaml.safe_dump({"rule_files": [rules.name], "evaluation_interval": interval,
                                    "tests": tests}, sort_keys=False))
    return _run(promtool, ["test", "rules", unit.name], workdir)

