"""Skips that cannot hide a broken install in CI.

openvino, nncf, mlperf_loadgen and kubernetes_validate are dependencies of the full install
(`make setup`), not optional features: a test that needs one may skip on a developer's partial
environment, but under CI (`CI=true`, set by .ci/run) a missing one fails the test instead, so a
packaging regression cannot pass as "skipped".
"""
from __future__ import annotations

import importlib
import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(module: str):
    """The imported module; when it is missing: skip locally, fail under CI."""
    if IN_CI:
        return importlib.import_module(module)
    return pytest.importorskip(module)


def skip_unless(reason: str | None) -> None:
    """Skip with `reason` (a runtime that cannot run here), except under CI, which fails."""
    if reason is None:
        return
    if IN_CI:
        pytest.fail(f"a hard dependency is unusable under CI: {reason}")
    pytest.skip(reason)
