"""Shared fixtures: one real default export per test session, reused by every test.

The export is built in a background process from the start of the session while the tests that
do not need it run first (tests/session_export.py says why and how).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from session_export import REPOSITORY_ENV, BackgroundExport, ExportFailed, export_into, needs_export, order_for_export

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

BACKGROUND_EXPORT = pytest.StashKey[BackgroundExport]()


@pytest.hookimpl(trylast=True)  # after -k/-m deselection and pytest's own fixture-scope ordering
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.environ.get(REPOSITORY_ENV):
        items[:] = order_for_export(items)


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session: pytest.Session):
    """Start the session export before the first test when a selected test needs it; stop it
    however the session ends (done, -x, Ctrl-C)."""
    export = None
    if (not os.environ.get(REPOSITORY_ENV) and not session.config.option.collectonly
            and not session.config.option.setupplan and any(needs_export(item) for item in session.items)):
        # the object behind the `tmp_path_factory` fixture (which a hook cannot request)
        folder = session.config._tmp_path_factory.mktemp("export")
        export = BackgroundExport(folder / "repository", folder / "export.log")
        export.start()
        session.config.stash[BACKGROUND_EXPORT] = export
    try:
        return (yield)
    finally:
        if export is not None:
            export.stop()


@pytest.fixture(scope="session")
def exported_repository(request) -> Path:
    """The default `mmrec export` (all precisions, portable target, FP32 served) in a temp folder.

    MMREC_TEST_REPOSITORY points at an existing export to skip the build while iterating.
    """
    existing = os.environ.get(REPOSITORY_ENV)
    if existing:
        return Path(existing)
    export = request.config.stash.get(BACKGROUND_EXPORT, None)
    if export is None:  # no selected test named it (a getfixturevalue call): build it here
        return export_into(request.config._tmp_path_factory.mktemp("export") / "repository")
    try:
        return export.wait()
    except ExportFailed as err:
        pytest.fail(str(err), pytrace=False)


@pytest.fixture(scope="session")
def reference(exported_repository):
    """In-process ground truth over the same repository."""
    from mmrec.reference import ReferencePipeline

    return ReferencePipeline(exported_repository)


@pytest.fixture(scope="session")
def triton_server(exported_repository, tmp_path_factory):
    """The real tritonserver (nvidia-pytriton wheel) serving the default export on 127.0.0.1.

    Yields the running `mmrec.server.TritonServer`; `server.urls["grpc"]` / `["http"]` are
    "127.0.0.1:PORT" strings for tritonclient.
    """
    from mmrec.server import ServerConfig, TritonServer, free_ports

    http, grpc, metrics = free_ports(3)
    config = ServerConfig(repository=exported_repository, http_port=http, grpc_port=grpc,
                          metrics_port=metrics)
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    with TritonServer(config, log_path=log, ready_timeout_s=180) as server:
        yield server


@pytest.fixture(scope="session")
def sample_items():
    """Real captioned images (held-out Tux Paint stamps): list of (caption, png bytes, category)."""
    from mmrec.export.data import load_items, split

    held_out = split(load_items()).held_out
    return [(i.caption, i.image_bytes(), i.category) for i in held_out[:48]]
