"""Launch the real tritonserver bundled with nvidia-pytriton, without Docker.

`mmrec serve` needs a Triton that runs from a plain pip install. nvidia-pytriton ships the
binary, its shared libraries, the python backend and one python-backend stub per Python
version; this module assembles those into a backend directory, builds the child's
environment, and owns the server process (start, readiness, clean shutdown).

Two facts about the bundled build shape the environment (see `child_env`):
  * The binary and the stub find their libraries through an $ORIGIN-relative RPATH that breaks
    once the stub is copied, so LD_LIBRARY_PATH must name `nvidia_pytriton.libs`.
  * The stub embeds the system libpython and ignores PYTHON* variables; the embedded
    interpreter locates its prefix by finding `python3` on PATH. Putting the running
    interpreter's bin directory first on PATH is what makes the stub see this venv's
    site-packages (numpy, mmrec...). PYTHONPATH is still set, for stubs that honour it.
"""
from __future__ import annotations

import collections
import errno
import importlib.metadata
import importlib.util
import json
import os
import secrets
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Callable

from .layout import RepositoryLayout
from .machine import default_cache_dir

PYTRITON_FIX = "pip install nvidia-pytriton==0.7.0"
MODEL_CONTROL_MODES = ("none", "explicit", "poll")
LOG_TAIL_LINES = 40
STUB_NAME = "triton_python_backend_stub"
SHM_DIR = Path("/dev/shm")


class ServerError(RuntimeError):
    """A problem starting or running tritonserver, worded for the person at the terminal."""


# --------------------------------------------------------------------------- install discovery


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of the pip-installed tritonserver live."""

    binary: Path
    libs_dir: Path
    python_backend_dir: Path
    stub: Path
    python_version: str
    pytriton_version: str
    caches_dir: Path | None = None


def running_python_version() -> str:
    """'3.11' for the running interpreter: the stub must match the site-packages it loads."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _pytriton_root() -> Path:
    """The installed `pytriton` package directory, found without importing it (import is slow)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(f"nvidia-pytriton is not installed (it bundles tritonserver); run `{PYTRITON_FIX}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _pytriton_version() -> str:
    try:
        return importlib.metadata.version("nvidia-pytriton")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise ServerError(f"{what} not found at {path}; reinstall with `{PYTRITON_FIX}`")
    return path


def find_tritonserver(python_version: str | None = None) -> TritonInstall:
    """Locate the tritonserver bundled with nvidia-pytriton and the stub for this Python."""
    version = python_version or running_python_version()
    root = _pytriton_root()
    dist = root / "tritonserver"
    libs = root.parent / "nvidia_pytriton.libs"
    if not libs.is_dir() and (dist / "external_libs").is_dir():  # editable pytriton checkout
        libs = dist / "external_libs"
    binary = _require(dist / "bin" / "tritonserver", "tritonserver binary")
    if not os.access(binary, os.X_OK):
        raise ServerError(f"{binary} is not executable; reinstall with `{PYTRITON_FIX}`")
    stub = dist / "python_backend_stubs" / version / STUB_NAME
    if not stub.is_file():
        available = sorted(p.name for p in (dist / "python_backend_stubs").glob("*") if p.is_dir())
        raise ServerError(
            f"nvidia-pytriton has no python backend stub for Python {version} "
            f"(available: {', '.join(available) or 'none'}); use one of those Python versions "
            f"and `{PYTRITON_FIX}`"
        )
    caches = dist / "caches"
    return TritonInstall(
        binary=binary,
        libs_dir=_require(libs, "nvidia_pytriton.libs"),
        python_backend_dir=_require(dist / "backends" / "python", "python backend"),
        stub=stub,
        python_version=version,
        pytriton_version=_pytriton_version(),
        caches_dir=caches if caches.is_dir() else None,
    )


# --------------------------------------------------------------------------- backend directory


def _backend_sources(install: TritonInstall) -> dict[str, Path]:
    """File name in <backend-dir>/python/ -> source; the stub sits beside libtriton_python.so."""
    sources = {p.name: p for p in install.python_backend_dir.iterdir() if p.is_file()}
    sources[STUB_NAME] = install.stub
    return sources


def _stamp(install: TritonInstall, sources: dict[str, Path]) -> dict:
    """What the cached copy was built from, so a pytriton upgrade triggers a rebuild."""
    files = {name: [src.stat().st_size, src.stat().st_mtime_ns] for name, src in sorted(sources.items())}
    return {"pytriton": install.pytriton_version, "python": install.python_version, "files": files}


def _is_current(backend_dir: Path, stamp: dict) -> bool:
    stamp_file = backend_dir / "stamp.json"
    try:
        if json.loads(stamp_file.read_text()) != stamp:
            return False
    except (OSError, ValueError):
        return False
    return all((backend_dir / "python" / name).is_file() for name in stamp["files"])


def prepare_backend_dir(install: TritonInstall, cache_dir: Path | None = None) -> Path:
    """Build (once) a --backend-directory holding python/ = backend files + this Python's stub.

    Returns <cache_dir>/backends/<python-version>. Rebuilt atomically (build aside, rename) when
    the source files change, so concurrent `mmrec serve` runs never see a half-copied backend.
    """
    target = Path(cache_dir or default_cache_dir()) / "backends" / install.python_version
    sources = _backend_sources(install)
    stamp = _stamp(install, sources)
    if _is_current(target, stamp):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared
        (staging / "python").mkdir()
        for name, src in sources.items():
            shutil.copy2(src, staging / "python" / name)  # copy2 keeps the stub's exec bit
        (staging / "stamp.json").write_text(json.dumps(stamp, indent=1))
        _swap_into_place(staging, target, stamp)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _swap_into_place(staging: Path, target: Path, stamp: dict) -> None:
    """Rename staging onto target; losing a race to another process building the same is fine."""
    if target.exists():
        if _is_current(target, stamp):  # someone else finished first
            return
        stale = target.with_name(f".{target.name}-stale-{uuid.uuid4().hex[:8]}")
        target.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not _is_current(target, stamp):
            raise


# --------------------------------------------------------------------------- ports & repository


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now (tests and `--port 0` style use)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports; sockets are held until all are picked so none repeats."""
    sockets = [socket.socket(_family(host), socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def check_port_free(host: str, port: int) -> None:
    """Fail early and clearly: tritonserver's own bind error is buried in its log."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        # SO_REUSEADDR: only an active listener (not TIME_WAIT leftovers) counts as "in use",
        # matching what tritonserver itself can bind.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServerError(
                    f"port {port} on {host} is already in use (another tritonserver or `mmrec serve`?); "
                    "stop it or choose other --http-port/--grpc-port/--metrics-port"
                ) from None
            raise ServerError(f"cannot bind {host}:{port}: {exc.strerror}") from None


def validate_repository(path: Path | str) -> Path:
    """Return the absolute repository path, or explain why Triton would refuse it."""
    repo = Path(path).expanduser().resolve()
    if not repo.exists():
        raise ServerError(f"model repository {repo} does not exist; run `mmrec export` first")
    if not repo.is_dir():
        raise ServerError(f"model repository {repo} is not a directory; run `mmrec export` first")
    if not RepositoryLayout(repo).has_models():
        raise ServerError(f"model repository {repo} has no model with a config.pbtxt; run `mmrec export` first")
    return repo


# --------------------------------------------------------------------------- config & command


ADMIN_HEADER = "mmrec-admin-key"  # the chart's default header (gRPC metadata: triton-grpc-protocol-mmrec-admin-key)
ADMIN_HEADER_ENV = "MMREC_ADMIN_HEADER"  # set it when the chart's triton.restrictedApis.header is another name


def admin_header() -> str:
    """The admin header's name: MMREC_ADMIN_HEADER, else ADMIN_HEADER. Read here only, so the
    server's restricted-API flags and every client sending the key agree on it."""
    name = os.environ.get(ADMIN_HEADER_ENV, "").strip() or ADMIN_HEADER
    if not all(c.islower() or c.isdigit() or c in "-_" for c in name):
        raise ServerError(f"{ADMIN_HEADER_ENV}={name!r} is not a header name (lowercase letters, digits, '-', '_')")
    return name


ADMIN_KEY_ENV = "MMREC_ADMIN_KEY"  # `mmrec serve --admin-key`'s variable; `mmrec index` sends it when set
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass
class ServerConfig:
    """What `mmrec serve` can tune; everything else goes through extra_args verbatim."""

    repository: Path
    host: str = "127.0.0.1"  # bind address for HTTP, gRPC and metrics; Triton's own default is 0.0.0.0
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_verbose: int = 0
    # explicit: load the models a client calls (and what their ensembles compose) and nothing else;
    # on the portable target that leaves the member models unloaded (the item engine runs their
    # graphs): half the memory. "none" loads every model in the repository.
    model_control: str = "explicit"
    # explicit mode's models to load at start: None for the repository's entry models and what
    # their ensembles compose (RepositoryLayout.served_models), ("*",) for all of them
    load_models: tuple[str, ...] | None = None
    extra_args: list[str] = field(default_factory=list)
    # Triton's default drain timeout (30 s) outlives TritonServer.stop()'s SIGKILL deadline.
    exit_timeout_s: int = 10
    # gRPC TLS (Triton's HTTP endpoint has no TLS: keep it on loopback or behind a proxy).
    # cert + key turn TLS on; a root cert additionally requires client certificates (mutual TLS).
    grpc_tls_cert: Path | None = None
    grpc_tls_key: Path | None = None
    grpc_tls_root_cert: Path | None = None
    # explicit model control opens load/unload to whoever reaches the ports: on a non-loopback
    # bind the model-repository API needs this key (header admin_header()); without one it is closed
    admin_key: str | None = None

    def __post_init__(self) -> None:
        self.repository = Path(self.repository)
        if self.model_control not in MODEL_CONTROL_MODES:
            raise ServerError(f"model_control must be one of {MODEL_CONTROL_MODES}, got {self.model_control!r}")
        if self.load_models is not None:
            self.load_models = tuple(self.load_models)
            if self.model_control != "explicit":
                raise ServerError(f"models to load name what explicit model control loads; with "
                                  f"{self.model_control!r} Triton loads every model (got {list(self.load_models)})")
            if "*" in self.load_models and len(self.load_models) > 1:
                raise ServerError("'*' (every model) must be the only model to load; tritonserver rejects it "
                                  "combined with names")
        ports = self.ports
        if len(set(ports)) != len(ports):
            raise ServerError(f"http, grpc and metrics ports must differ, got {ports}")
        for name in ("grpc_tls_cert", "grpc_tls_key", "grpc_tls_root_cert"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value))
        if (self.grpc_tls_cert is None) != (self.grpc_tls_key is None):
            raise ServerError("gRPC TLS needs both a certificate and its private key "
                              "(--grpc-tls-cert and --grpc-tls-key)")
        if self.grpc_tls_root_cert is not None and self.grpc_tls_cert is None:
            raise ServerError("--grpc-tls-root-cert (mutual TLS) also needs --grpc-tls-cert and --grpc-tls-key")

    @property
    def ports(self) -> tuple[int, int, int]:
        return (self.http_port, self.grpc_port, self.metrics_port)

    @property
    def grpc_tls(self) -> bool:
        return self.grpc_tls_cert is not None

    def check_tls_files(self) -> None:
        """Fail clearly before launch: tritonserver's own error for a missing PEM is terse."""
        for flag, path in (("--grpc-tls-cert", self.grpc_tls_cert), ("--grpc-tls-key", self.grpc_tls_key),
                           ("--grpc-tls-root-cert", self.grpc_tls_root_cert)):
            if path is not None and not path.is_file():
                raise ServerError(f"{flag} {path} is not a readable file")

    @property
    def repository_api_closed(self) -> bool:
        """Explicit mode on a non-loopback bind without an admin key: nobody may load or unload."""
        return self.model_control == "explicit" and self.host not in LOOPBACK and not self.admin_key

    def restricted_api_args(self) -> list[str]:
        """Close the model-repository API (load/unload) on a non-loopback bind in explicit mode
        unless callers send the admin key; a loopback bind keeps it open to local tools."""
        if self.model_control != "explicit" or (self.host in LOOPBACK and not self.admin_key):
            return []
        key = self.admin_key or secrets.token_hex(16)  # no key given: nobody may load or unload
        header = admin_header()
        return [f"--grpc-restricted-protocol=model-repository:{header}={key}",
                f"--http-restricted-api=model-repository:{header}={key}"]

    def tls_args(self) -> list[str]:
        """tritonserver flags for gRPC TLS (empty without a certificate)."""
        if not self.grpc_tls:
            return []
        args = ["--grpc-use-ssl=true",
                f"--grpc-server-cert={self.grpc_tls_cert.resolve()}",
                f"--grpc-server-key={self.grpc_tls_key.resolve()}"]
        if self.grpc_tls_root_cert is not None:
            args += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={self.grpc_tls_root_cert.resolve()}"]
        return args


def client_host(bind_host: str) -> str:
    """The address a local client should dial for a server bound to `bind_host`."""
    if bind_host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if bind_host == "::":
        return "::1"
    return bind_host


def host_port(host: str, port: int) -> str:
    """'host:port', bracketing IPv6 literals as URLs and gRPC targets require."""
    host = client_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def build_command(
    install: TritonInstall, backend_dir: Path, repository: Path, config: ServerConfig, shm_prefix: str
) -> list[str]:
    """The tritonserver argv. Explicit mode loads `load_models` (default: the repository's entry
    models and what they compose, or every model of a repository that has none) unless
    extra_args says otherwise."""
    cmd = [
        str(install.binary),
        f"--model-repository={repository}",
        f"--backend-directory={backend_dir}",
        f"--http-address={config.host}",
        f"--http-port={config.http_port}",
        f"--grpc-address={config.host}",
        f"--grpc-port={config.grpc_port}",
        f"--metrics-address={config.host}",
        f"--metrics-port={config.metrics_port}",
        f"--model-control-mode={config.model_control}",
        f"--log-verbose={config.log_verbose}",
        f"--exit-timeout-secs={config.exit_timeout_s}",
        # Named shm regions let stop() clean up after a SIGKILL (stubs can't, once killed).
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
    ]
    cmd += config.tls_args() + config.restricted_api_args()
    if install.caches_dir is not None:
        cmd.append(f"--cache-directory={install.caches_dir}")
    if config.model_control == "explicit" and not any(a.startswith("--load-model") for a in config.extra_args):
        models = config.load_models or RepositoryLayout(repository).served_models() or ("*",)
        cmd += [f"--load-model={model}" for model in models]
    return cmd + list(config.extra_args)


def _prepend(path: str, current: str | None) -> str:
    return f"{path}{os.pathsep}{current}" if current else path


def child_env(install: TritonInstall, base: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ plus what the bundled server and python stub need (see module docstring)."""
    env = dict(os.environ if base is None else base)
    env["LD_LIBRARY_PATH"] = _prepend(str(install.libs_dir), env.get("LD_LIBRARY_PATH"))
    # Not resolved: a venv's bin/python3 is a symlink, and the venv is found from the link's location.
    env["PATH"] = _prepend(str(Path(sys.executable).parent), env.get("PATH"))
    env["PYTHONPATH"] = os.pathsep.join([*site.getsitepackages(), *filter(None, [env.get("PYTHONPATH")])])
    return env


# --------------------------------------------------------------------------- the server process


class _LogPump(threading.Thread):
    """Copies the server's merged stdout/stderr to the log file, optionally stderr, and a tail."""

    def __init__(self, stream: IO[bytes], log_file: IO[bytes], echo: bool) -> None:
        super().__init__(name="tritonserver-log", daemon=True)
        self._stream, self._log_file, self._echo = stream, log_file, echo
        self._tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._lock = threading.Lock()

    def run(self) -> None:
        try:
            for raw in iter(self._stream.readline, b""):
                self._log_file.write(raw)
                self._log_file.flush()
                line = raw.decode("utf-8", "replace")
                with self._lock:
                    self._tail.append(line.rstrip("\n"))
                if self._echo:
                    try:
                        sys.stderr.write(line)
                        sys.stderr.flush()
                    except (OSError, ValueError):
                        self._echo = False
        finally:
            self._stream.close()
            self._log_file.close()

    def tail(self) -> str:
        with self._lock:
            return "\n".join(self._tail)


class TritonServer:
    """One tritonserver child process, in its own process group so Ctrl-C and stop() reach it all.

    `with TritonServer(config) as server:` starts it and waits until /v2/health/ready answers.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        log_path: Path | str | None = None,
        echo: bool = False,
        install: TritonInstall | None = None,
        cache_dir: Path | None = None,
        ready_timeout_s: float = 120.0,
    ) -> None:
        self.config = config
        self.echo = echo
        self.ready_timeout_s = ready_timeout_s
        self._requested_log_path = Path(log_path) if log_path is not None else None
        self._install = install
        self._cache_dir = cache_dir
        self._log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pump: _LogPump | None = None
        self._shm_prefix = f"mmrec_{os.getpid()}_{uuid.uuid4().hex[:8]}_"

    # ---- properties

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        """Exit code once the server has exited (negative: killed by that signal), else None."""
        if self._proc is None:
            return None
        if self._proc.returncode is not None:
            return self._proc.returncode
        return _peek_exit(self._proc.pid)

    @property
    def log_path(self) -> Path | None:
        """Where the server's output goes; a temp file unless one was given."""
        return self._log_path

    @property
    def urls(self) -> dict[str, str]:
        """'host:port' per protocol, as tritonclient.grpc / tritonclient.http expect them."""
        c = self.config
        return {
            "http": host_port(c.host, c.http_port),
            "grpc": host_port(c.host, c.grpc_port),
            "metrics": host_port(c.host, c.metrics_port),
        }

    def is_running(self) -> bool:
        return self._proc is not None and self.returncode is None

    # ---- lifecycle

    def start(self) -> None:
        """Validate, then launch tritonserver. Returns at once; see wait_ready()."""
        if self._proc is not None:
            raise ServerError("this TritonServer was already started; create a new one")
        repository = validate_repository(self.config.repository)
        self.config.check_tls_files()
        for port in self.config.ports:
            check_port_free(self.config.host, port)
        install = self._install or find_tritonserver()
        backend_dir = prepare_backend_dir(install, self._cache_dir)
        cmd = build_command(install, backend_dir, repository, self.config, self._shm_prefix)
        log_file = self._open_log()
        try:
            self._proc = subprocess.Popen(
                cmd,
                env=child_env(install),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            log_file.close()
            raise ServerError(f"could not launch {install.binary}: {exc}") from exc
        assert self._proc.stdout is not None
        self._pump = _LogPump(self._proc.stdout, log_file, self.echo)
        self._pump.start()

    def _open_log(self) -> IO[bytes]:
        if self._requested_log_path is not None:
            self._log_path = self._requested_log_path
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            return self._log_path.open("wb")
        fd, name = tempfile.mkstemp(prefix="mmrec-tritonserver-", suffix=".log")
        self._log_path = Path(name)
        return os.fdopen(fd, "wb")

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until /v2/health/ready says yes; raise with the log tail if it dies or times out."""
        if not self._wait_ready(self.ready_timeout_s if timeout_s is None else timeout_s):
            raise ServerError("interrupted while waiting for tritonserver")

    def _wait_ready(self, timeout_s: float, cancel: threading.Event | None = None) -> bool:
        """True when ready, False when `cancel` was set first."""
        if self._proc is None:
            raise ServerError("tritonserver was not started")
        url = f"http://{self.urls['http']}/v2/health/ready"
        # Triton starts its metrics service after HTTP says ready: a scrape right after ready was
        # refused (seen in the bench's overload section); ready here means both answer
        metrics = f"http://{self.urls['metrics']}/metrics"
        deadline = time.monotonic() + timeout_s
        while True:
            if cancel is not None and cancel.is_set():
                return False
            code = self.returncode
            if code is not None:
                self._fail(f"tritonserver exited with code {code} before becoming ready")
            if _http_ok(url) and _http_ok(metrics):
                return True
            if time.monotonic() > deadline:
                self._fail(f"tritonserver was not ready (health and metrics) after {timeout_s:.0f} s")
            time.sleep(0.1)

    def _fail(self, why: str) -> None:
        self.stop(timeout_s=5)
        raise ServerError(f"{why}; last {LOG_TAIL_LINES} log lines ({self.log_path}):\n{self.log_tail()}")

    def log_tail(self) -> str:
        """The last lines the server printed (waits briefly for the pump to drain after an exit)."""
        if self._pump is None:
            return ""
        if self._proc is not None and self.returncode is not None:
            self._pump.join(timeout=2)
        return self._pump.tail()

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after timeout_s; returns the server's exit code.

        The leader is waited on without reaping, so its process-group id stays reserved while
        leftover stubs are killed, then reaped.
        """
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is None:
            _signal_group(proc.pid, signal.SIGTERM)
            if not _wait_exit_unreaped(proc.pid, timeout_s):
                _signal_group(proc.pid, signal.SIGKILL)
                _wait_exit_unreaped(proc.pid, 10)
            _signal_group(proc.pid, signal.SIGKILL)  # stragglers only; usually none are left
            proc.wait()
            # Regions are unique to this instance; any left belonged to stubs killed mid-flight.
            _remove_shm_regions(self._shm_prefix)
        if self._pump is not None:
            self._pump.join(timeout=5)
        return proc.returncode

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _http_ok(url: str) -> bool:
    """GET url, ignoring any *_proxy settings (a proxy cannot reach our loopback server)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=1.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _peek_exit(pid: int) -> int | None:
    """The child's exit code if it has exited, without reaping it (Popen.returncode convention).

    Not reaping keeps the process-group id reserved, so stop() can still signal leftover
    stubs in that group without any risk of hitting a recycled pid.
    """
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped elsewhere; we cannot know the code
        return -1
    if info is None or info.si_pid != pid:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _wait_exit_unreaped(pid: int, timeout_s: float) -> bool:
    """Wait for `pid` to exit but leave it a zombie; True if it exited in time."""
    deadline = time.monotonic() + timeout_s
    while _peek_exit(pid) is None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _remove_shm_regions(prefix: str) -> None:
    """Delete python-backend shared memory left behind by SIGKILLed stubs."""
    for region in SHM_DIR.glob(f"{prefix}*"):
        region.unlink(missing_ok=True)


# --------------------------------------------------------------------------- serve_forever


def _exit_code(returncode: int | None) -> int:
    """Shell-style exit status for a server that died on its own (never 0: that was unexpected)."""
    if returncode is None:
        return 1
    if returncode < 0:
        return 128 - returncode
    return returncode or 1


def _install_stop_handlers(stop: threading.Event) -> dict[int, object]:
    """SIGINT/SIGTERM set `stop`; returns the previous handlers (empty off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, object] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, lambda *_: stop.set())
    return previous


def _restore_handlers(previous: dict[int, object]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)  # type: ignore[arg-type]


def serve_forever(
    config: ServerConfig,
    on_ready: Callable[[TritonServer], None] | None = None,
    *,
    log_path: Path | str | None = None,
    echo: bool = True,
    ready_timeout_s: float = 120.0,
    install: TritonInstall | None = None,
) -> int:
    """Run tritonserver until SIGINT/SIGTERM or its own death; return the process exit code.

    0 after a requested shutdown; the server's code (or 128+signal) if it died by itself.
    ServerError propagates for startup failures, so the CLI can print the message.
    """
    stop = threading.Event()
    previous = _install_stop_handlers(stop)
    server = TritonServer(config, log_path=log_path, echo=echo, install=install, ready_timeout_s=ready_timeout_s)
    try:
        server.start()
        if not server._wait_ready(ready_timeout_s, cancel=stop):
            return 0
        if on_ready is not None:
            on_ready(server)
        while not stop.wait(0.5):
            if not server.is_running():
                return _exit_code(server.returncode)
        return 0
    finally:
        server.stop()
        _restore_handlers(previous)
