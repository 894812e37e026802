"""mmrec.server: launching the pip-bundled tritonserver, on a throwaway one-model repository."""
from __future__ import annotations

import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mmrec import server as srv
from mmrec.server import ServerConfig, ServerError, TritonServer
from toy_models import DOUBLE_CONFIG, DOUBLE_MODEL, write_model


# a temp folder: cheap to build twice, so the export-free tests may run before the session export
# is ready (tests/session_export.py)
SPLIT_SAFE_FIXTURES = ("cache_dir",)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One backend cache for the module, so tests never write to ~/.cache."""
    return tmp_path_factory.mktemp("mmrec-cache")


@pytest.fixture(autouse=True)
def _isolated_cache(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMREC_CACHE_DIR", str(cache_dir))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return write_model(tmp_path / "repo", "double", DOUBLE_CONFIG, DOUBLE_MODEL)


@pytest.fixture
def config(repo: Path) -> ServerConfig:
    http, grpc, metrics = srv.free_ports(3)
    return ServerConfig(repository=repo, http_port=http, grpc_port=grpc, metrics_port=metrics)


def group_alive(pgid: int, grace_s: float = 5.0) -> bool:
    """Whether any process of the server's group is left after grace_s.

    SIGKILLed stubs are orphans reaped by init, so they can linger for a moment after stop().
    """
    deadline = time.monotonic() + grace_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.05)


# --------------------------------------------------------------------------- install & helpers


def test_find_tritonserver_matches_running_python() -> None:
    install = srv.find_tritonserver()
    assert os.access(install.binary, os.X_OK)
    assert install.stub.parent.name == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert (install.python_backend_dir / "libtriton_python.so").is_file()
    assert any(install.libs_dir.glob("libtritonserver*.so"))


def test_missing_stub_names_the_fix() -> None:
    with pytest.raises(ServerError, match="pip install nvidia-pytriton==0.7.0") as info:
        srv.find_tritonserver(python_version="2.7")
    assert "2.7" in str(info.value)


def test_missing_pytriton_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(srv.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ServerError, match="pip install nvidia-pytriton==0.7.0"):
        srv.find_tritonserver()


def test_prepare_backend_dir_is_idempotent_and_rebuilds_when_stale(tmp_path: Path) -> None:
    install = srv.find_tritonserver()
    backend = srv.prepare_backend_dir(install, tmp_path)
    assert backend == tmp_path / "backends" / install.python_version
    stub = backend / "python" / srv.STUB_NAME
    assert stub.stat().st_mode & stat.S_IXUSR
    assert (backend / "python" / "libtriton_python.so").is_file()
    built_at = stub.stat().st_mtime_ns, stub.stat().st_ino

    assert srv.prepare_backend_dir(install, tmp_path) == backend
    assert (stub.stat().st_mtime_ns, stub.stat().st_ino) == built_at  # untouched

    (backend / "stamp.json").write_text("{}")  # e.g. pytriton upgraded
    srv.prepare_backend_dir(install, tmp_path)
    assert stub.stat().st_ino != built_at[1]
    assert [p.name for p in backend.parent.iterdir()] == [backend.name]  # no staging leftovers


def test_child_env_points_stub_at_this_interpreter() -> None:
    install = srv.find_tritonserver()
    env = srv.child_env(install, {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/x", "KEEP": "1"})
    assert env["LD_LIBRARY_PATH"] == f"{install.libs_dir}{os.pathsep}/opt/x"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["PYTHONPATH"].split(os.pathsep)[0] in srv.site.getsitepackages()
    assert env["KEEP"] == "1"


def test_command_binds_configured_host(repo: Path) -> None:
    install = srv.find_tritonserver()
    config = ServerConfig(repository=repo, model_control="explicit", extra_args=["--strict-readiness=false"])
    cmd = srv.build_command(install, Path("/b"), repo, config, "p_")
    for flag in ("--http-address", "--grpc-address", "--metrics-address"):
        assert f"{flag}=127.0.0.1" in cmd
    assert "--load-model=*" in cmd and cmd[-1] == "--strict-readiness=false"


def test_explicit_mode_loads_what_clients_call_and_what_it_composes(exported_repository: Path) -> None:
    """The default (explicit) loads the entry models and, named one by one, every model their
    ensembles compose; on the portable target no member model is among them."""
    from mmrec import schema
    from mmrec.layout import RepositoryLayout

    install = srv.find_tritonserver()
    cmd = srv.build_command(install, Path("/b"), exported_repository, ServerConfig(repository=exported_repository), "p_")
    loaded = {a.split("=", 1)[1] for a in cmd if a.startswith("--load-model=")}
    assert "--model-control-mode=explicit" in cmd and loaded == set(RepositoryLayout(exported_repository).served_models())
    assert {schema.ITEM_ENCODER, schema.ITEM_ENCODER_PIXELS, schema.INTEREST_SCORER, schema.SCORER} <= loaded
    assert not loaded & {schema.TEXT_ENCODER, schema.IMAGE_ENCODER, schema.FUSION}  # the item engine runs them
    named = ServerConfig(repository=exported_repository, load_models=("*",))
    assert [a for a in srv.build_command(install, Path("/b"), exported_repository, named, "p_")
            if a.startswith("--load-model")] == ["--load-model=*"]


def test_load_and_unload_need_the_admin_key_off_loopback(repo: Path) -> None:
    install = srv.find_tritonserver()

    def restricted(**options) -> list[str]:
        cmd = srv.build_command(install, Path("/b"), repo, ServerConfig(repository=repo, **options), "p_")
        return [a for a in cmd if "restricted" in a]

    assert restricted() == []  # 127.0.0.1: local tools (mmrec index publish) load and unload
    assert restricted(model_control="none") == restricted(host="0.0.0.0", model_control="none") == []
    closed = restricted(host="0.0.0.0")
    assert len(closed) == 2 and all(a.split(":", 1)[1].startswith("mmrec-admin-key=") for a in closed)
    assert closed != restricted(host="0.0.0.0")  # no key given: a random one, nobody may load or unload
    assert restricted(host="0.0.0.0", admin_key="k3y") == [
        "--grpc-restricted-protocol=model-repository:mmrec-admin-key=k3y",
        "--http-restricted-api=model-repository:mmrec-admin-key=k3y"]


def test_config_rejects_bad_values(repo: Path) -> None:
    with pytest.raises(ServerError, match="model_control"):
        ServerConfig(repository=repo, model_control="auto")
    with pytest.raises(ServerError, match="differ"):
        ServerConfig(repository=repo, http_port=9000, grpc_port=9000)
    with pytest.raises(ServerError, match="explicit model control loads"):
        ServerConfig(repository=repo, model_control="none", load_models=("item_encoder",))
    with pytest.raises(ServerError, match="must be the only model"):
        ServerConfig(repository=repo, load_models=("*", "item_encoder"))


# --------------------------------------------------------------------------- refusals before launch


def test_port_in_use_is_reported(config: ServerConfig) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServerError, match=f"port {port} on 127.0.0.1 is already in use"):
            srv.check_port_free("127.0.0.1", port)
        config.grpc_port = port
        server = TritonServer(config)
        with pytest.raises(ServerError, match=str(port)):
            server.start()
        assert server.pid is None


def test_free_port_is_bindable() -> None:
    srv.check_port_free("127.0.0.1", srv.free_port())


def test_missing_repository(tmp_path: Path) -> None:
    with pytest.raises(ServerError, match="does not exist.*mmrec export"):
        srv.validate_repository(tmp_path / "nope")
    with pytest.raises(ServerError, match="does not exist"):
        TritonServer(ServerConfig(repository=tmp_path / "nope")).start()


def test_repository_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ServerError, match="not a directory"):
        srv.validate_repository(tmp_path / "file")


def test_repository_without_config_pbtxt(tmp_path: Path) -> None:
    (tmp_path / "repo" / "double" / "1").mkdir(parents=True)
    with pytest.raises(ServerError, match="no model with a config.pbtxt.*mmrec export"):
        srv.validate_repository(tmp_path / "repo")
    with pytest.raises(ServerError, match="config.pbtxt"):
        TritonServer(ServerConfig(repository=tmp_path / "repo")).start()


# --------------------------------------------------------------------------- the real server


@pytest.mark.server
@pytest.mark.timeout(60)
def test_real_server_serves_inference(config: ServerConfig, tmp_path: Path) -> None:
    import tritonclient.grpc as grpcclient

    log = tmp_path / "triton.log"
    with TritonServer(config, log_path=log, ready_timeout_s=45) as server:
        pid = server.pid
        assert pid is not None and server.is_running()
        assert server.urls["grpc"] == f"127.0.0.1:{config.grpc_port}"
        assert server.urls["http"] == f"127.0.0.1:{config.http_port}"

        client = grpcclient.InferenceServerClient(server.urls["grpc"])
        assert client.is_server_ready() and client.is_model_ready("double")
        x = np.array([[1.5, -2.0, 3.25], [0.0, 4.0, -0.5]], dtype=np.float32)
        inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("double", [inp], outputs=[grpcclient.InferRequestedOutput("OUTPUT0")])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x * 2)
        client.close()

    assert not server.is_running()
    assert server.returncode == 0
    assert not group_alive(pid)  # server and its python stubs are gone
    assert "successfully loaded 'double'" in log.read_text()


@pytest.mark.server
@pytest.mark.timeout(60)
def test_stop_sends_sigterm_and_exits_cleanly(config: ServerConfig, tmp_path: Path) -> None:
    server = TritonServer(config, log_path=tmp_path / "triton.log")
    server.start()
    server.wait_ready(45)
    pid = server.pid
    assert pid is not None
    started = time.monotonic()
    code = server.stop(timeout_s=15)
    assert time.monotonic() - started < 15  # SIGTERM sufficed, no SIGKILL escalation
    assert code == 0 == server.returncode
    assert not group_alive(pid)
    assert server.stop() == 0  # idempotent


@pytest.mark.server
@pytest.mark.timeout(60)
def test_stop_escalates_to_sigkill_and_cleans_shm(config: ServerConfig, tmp_path: Path) -> None:
    server = TritonServer(config, log_path=tmp_path / "triton.log")
    server.start()
    server.wait_ready(45)
    pid = server.pid
    assert pid is not None
    assert list(srv.SHM_DIR.glob(f"{server._shm_prefix}*"))  # the python stub's region
    code = server.stop(timeout_s=0.1)  # Triton's graceful unload takes seconds; force the kill
    assert code == -signal.SIGKILL
    assert not group_alive(pid)
    assert not list(srv.SHM_DIR.glob(f"{server._shm_prefix}*"))


@pytest.mark.server
@pytest.mark.timeout(60)
def test_startup_failure_raises_with_log_tail(tmp_path: Path) -> None:
    broken = write_model(tmp_path / "repo", "broken", DOUBLE_CONFIG.replace("double", "broken"),
                         "raise ImportError('model_py_is_broken_on_purpose')\n")
    http, grpc, metrics = srv.free_ports(3)
    config = ServerConfig(broken, http_port=http, grpc_port=grpc, metrics_port=metrics)
    server = TritonServer(config, log_path=tmp_path / "triton.log")
    server.start()
    with pytest.raises(ServerError, match="exited with code") as info:
        server.wait_ready(45)
    assert "model_py_is_broken_on_purpose" in str(info.value)
    assert not server.is_running()


@pytest.mark.server
@pytest.mark.timeout(60)
def test_serve_forever_stops_on_sigterm(config: ServerConfig, tmp_path: Path) -> None:
    """`kill <mmrec serve pid>`: run in a fresh interpreter, as `mmrec serve` runs. (In the test
    process the SIGTERM arrived after earlier tests had loaded OpenVINO's native thread pool, and
    the whole suite segfaulted there twice; `mmrec serve` never loads OpenVINO itself.)"""
    import json
    import subprocess

    script = f"""
import json, os, signal, sys
from pathlib import Path
from mmrec import server as srv
config = srv.ServerConfig(Path({str(config.repository)!r}), http_port={config.http_port},
                          grpc_port={config.grpc_port}, metrics_port={config.metrics_port})
seen = {{}}
def on_ready(server):
    seen["urls"], seen["pid"] = server.urls, server.pid
    os.kill(os.getpid(), signal.SIGTERM)
before = signal.getsignal(signal.SIGTERM)
code = srv.serve_forever(config, on_ready, log_path={str(tmp_path / "serve.log")!r}, echo=False, ready_timeout_s=45)
print(json.dumps({{"code": code, "urls": seen["urls"], "pid": seen["pid"],
                  "restored": signal.getsignal(signal.SIGTERM) is before}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=55)
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["code"] == 0 and seen["restored"]  # handlers restored
    assert seen["urls"] == {"http": f"127.0.0.1:{config.http_port}", "grpc": f"127.0.0.1:{config.grpc_port}",
                            "metrics": f"127.0.0.1:{config.metrics_port}"}
    assert not group_alive(seen["pid"])


@pytest.mark.server
@pytest.mark.timeout(60)
def test_serve_forever_returns_when_server_dies(
    config: ServerConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: dict[str, TritonServer] = {}

    def on_ready(server: TritonServer) -> None:
        seen["server"] = server
        os.kill(server.pid, signal.SIGKILL)  # crash: OOM killer, segfault...

    code = srv.serve_forever(config, on_ready, log_path=tmp_path / "serve.log", echo=True, ready_timeout_s=45)
    assert code == 128 + signal.SIGKILL
    server = seen["server"]
    assert not group_alive(server.pid)
    assert not list(srv.SHM_DIR.glob(f"{server._shm_prefix}*"))  # stubs' leftovers removed
    assert "successfully loaded 'double'" in capsys.readouterr().err  # echo=True forwards the log
