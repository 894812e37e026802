"""`mmrec serve`: run the real tritonserver on an exported repository."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from .export_defaults import DEFAULT_REPOSITORY
from .server import ADMIN_KEY_ENV, ServerConfig, ServerError, TritonServer, serve_forever, validate_repository

console = Console(stderr=True)


def print_endpoints(server: TritonServer) -> None:
    urls = server.urls
    console.print(f"[green]tritonserver ready[/green] (pid {server.pid}) serving {server.config.repository}")
    tls = " (TLS)" if server.config.grpc_tls else ""
    console.print(f"  gRPC     {urls['grpc']}{tls}\n  HTTP     http://{urls['http']}\n"
                  f"  metrics  http://{urls['metrics']}/metrics")
    if server.config.repository_api_closed:
        console.print(f"  load/unload closed: a non-loopback host without --admin-key (or {ADMIN_KEY_ENV})")
    console.print("Ctrl-C stops it.")


def serve_command(
    repository: Path = typer.Option(DEFAULT_REPOSITORY, help="Model repository written by `mmrec export`."),
    host: str = typer.Option("127.0.0.1", help="Bind address. 127.0.0.1 unless you mean to expose it."),
    http_port: int = typer.Option(8000, help="HTTP/REST port."),
    grpc_port: int = typer.Option(8001, help="gRPC port."),
    metrics_port: int = typer.Option(8002, help="Prometheus metrics port."),
    model_control: str = typer.Option("explicit", help="explicit | none | poll (Triton model control mode). "
                                      "explicit loads --load-model; none and poll load every model."),
    load_model: Optional[list[str]] = typer.Option(
        None, "--load-model", help="explicit mode: a model to load at start (repeat it; '*' for all). "
        "Default: the models clients call (item_encoder, item_encoder_pixels, interest_scorer, scorer, "
        "tokenizer, image_preprocess, catalog_scorer where published) and what their ensembles compose."),
    log_verbose: int = typer.Option(0, help="Triton --log-verbose level."),
    ready_timeout: float = typer.Option(180.0, help="Seconds to wait for readiness."),
    grpc_tls_cert: Optional[Path] = typer.Option(None, help="PEM server certificate: serve gRPC over TLS (needs --grpc-tls-key). HTTP stays plaintext."),
    grpc_tls_key: Optional[Path] = typer.Option(None, help="PEM private key of --grpc-tls-cert."),
    grpc_tls_root_cert: Optional[Path] = typer.Option(None, help="PEM CA certificate: require client certificates signed by it (mutual TLS)."),
    admin_key: Optional[str] = typer.Option(None, envvar=ADMIN_KEY_ENV, help="Key callers must send (header "
                                            "mmrec-admin-key) to load or unload models. Without it, a non-loopback "
                                            "--host closes that API; 127.0.0.1 leaves it open to local tools."),
) -> None:
    """Serve a model repository with the tritonserver bundled in nvidia-pytriton; logs are
    forwarded here and SIGINT/SIGTERM shut it down cleanly."""
    try:
        validate_repository(repository)
        config = ServerConfig(repository=repository, host=host, http_port=http_port,
                              grpc_port=grpc_port, metrics_port=metrics_port,
                              model_control=model_control, log_verbose=log_verbose,
                              load_models=tuple(load_model) if load_model else None,
                              grpc_tls_cert=grpc_tls_cert, grpc_tls_key=grpc_tls_key,
                              grpc_tls_root_cert=grpc_tls_root_cert, admin_key=admin_key)
        code = serve_forever(config, print_endpoints, ready_timeout_s=ready_timeout)
    except (ServerError, ValueError) as err:
        console.print(f"[red]serve failed:[/red] {escape(str(err))}")
        raise typer.Exit(2)
    raise typer.Exit(code)
