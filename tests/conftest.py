"""Shared fixtures: one real default export per test session, reused by every test."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def exported_repository(tmp_path_factory) -> Path:
    """The default `mmrec export` (all precisions, portable target) into a temp folder.

    MMREC_TEST_REPOSITORY points at an existing export to skip the ~1 min build while iterating.
    """
    existing = os.environ.get("MMREC_TEST_REPOSITORY")
    if existing:
        return Path(existing)
    from mmrec.export.pipeline import ExportOptions, Exporter

    output = tmp_path_factory.mktemp("export") / "repository"
    # tune=False: ORT FP32 stays served, so the suite checks the same graphs on every CPU;
    # tests/test_runtimes.py tunes a copy and serves what tuning picks on this machine.
    Exporter(ExportOptions(output=output, tune=False)).run()
    return output


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
