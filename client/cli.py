"""`mmrec score`, `mmrec encode` and `mmrec recommend`: the client library from the shell.

Exit codes: 0 ok, 1 other server error, 2 bad input (arguments, files, items the client or
the server rejects), 3 server unavailable, model not ready, or timed out. Errors print one
line on stderr.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, List, Optional

import numpy as np
import typer

from ._cli_io import (BadInput, OutputFormat, collect_items, encoded_rows, ranked_rows, read_items_jsonl,
                      read_user_vector, recommended_rows, resolve_format, write_encode_table, write_jsonl,
                      write_recommend_table, write_score_table)

EXIT_OTHER, EXIT_BAD_INPUT, EXIT_UNAVAILABLE, EXIT_OVERLOADED = 1, 2, 3, 4
DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}  # `mmrec serve` defaults


class Protocol(str, Enum):
    grpc = "grpc"
    http = "http"


TextOpt = Annotated[Optional[List[str]], typer.Option("--text", help="Item caption; pair with --image.")]
ImageOpt = Annotated[Optional[List[Path]], typer.Option("--image", help="Item image file (JPEG/PNG/WebP).")]
ItemsOpt = Annotated[Optional[Path], typer.Option(
    "--items", help='JSON lines {"text": ..., "image": path, "id": ...}; paths relative to the file.')]
UrlOpt = Annotated[Optional[str], typer.Option(
    "--url", help="host:port of Triton, or several replicas comma-separated "
                  "(default 127.0.0.1:8001 for gRPC, :8000 for HTTP).")]
ProtocolOpt = Annotated[Protocol, typer.Option("--protocol", help="Transport to Triton.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="client_timeout per request, seconds.")]
FormatOpt = Annotated[Optional[OutputFormat], typer.Option(
    "--format", help="Output format (default: table on a terminal, jsonl otherwise).")]


def _exit_code(exc: Exception) -> int:
    from . import (InvalidItemError, InvalidRequestError, ModelNotReadyError, OverloadedError,
                   RequestTimeoutError, ServerUnavailableError)

    if isinstance(exc, (BadInput, InvalidItemError, InvalidRequestError)):
        return EXIT_BAD_INPUT
    if isinstance(exc, (ServerUnavailableError, ModelNotReadyError, RequestTimeoutError)):
        return EXIT_UNAVAILABLE
    if isinstance(exc, OverloadedError):  # up but shedding: worth retrying later, unlike 1
        return EXIT_OVERLOADED
    return EXIT_OTHER


def _run(body: Callable[[], None]) -> None:
    """Run a command body; MMRecError/BadInput become one line on stderr and an exit code."""
    from . import MMRecError

    try:
        body()
    except (BadInput, MMRecError) as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(_exit_code(exc)) from None


def _client(url: str | None, protocol: Protocol, timeout: float):
    from . import MMRecClient

    if timeout <= 0:
        raise BadInput(f"--timeout must be positive, got {timeout}")
    try:
        return MMRecClient(url or DEFAULT_URLS[protocol.value], protocol.value, client_timeout=timeout)
    except ValueError as err:  # e.g. an empty or repeated entry in a comma-separated --url
        raise BadInput(f"--url: {err}") from None


def score_command(
    text: TextOpt = None,
    image: ImageOpt = None,
    items: ItemsOpt = None,
    history: Annotated[Optional[Path], typer.Option(
        "--history", help="The user's history as items (JSON lines, like --items).")] = None,
    user_vector: Annotated[Optional[Path], typer.Option(
        "--user-vector", help=".npy user vector [D], or item embeddings [N, D] to average.")] = None,
    k: Annotated[Optional[int], typer.Option("--k", min=1, help="Show the top k only.")] = None,
    url: UrlOpt = None,
    protocol: ProtocolOpt = Protocol.grpc,
    timeout: TimeoutOpt = 60.0,
    output_format: FormatOpt = None,
) -> None:
    """Rank items for a user: σ(item · user), best first."""
    def body() -> None:
        if (history is None) == (user_vector is None):
            raise BadInput("give exactly one of --history FILE.jsonl or --user-vector FILE.npy")
        candidates = collect_items(text, image, items)
        vector = read_user_vector(user_vector) if user_vector is not None else None
        past = read_items_jsonl(history) if history is not None else None
        with _client(url, protocol, timeout) as client:
            user = vector if vector is not None else client.user_vector(past)
            ranked = client.rank(user, candidates, k)
        rows = ranked_rows(ranked, candidates)
        if resolve_format(output_format) is OutputFormat.jsonl:
            write_jsonl(rows)
        else:
            write_score_table(rows, candidates)

    _run(body)


def encode_command(
    text: TextOpt = None,
    image: ImageOpt = None,
    items: ItemsOpt = None,
    save: Annotated[Optional[Path], typer.Option(
        "--save", help="Also write the item embeddings [N, D] to this .npy (a --user-vector input).")] = None,
    url: UrlOpt = None,
    protocol: ProtocolOpt = Protocol.grpc,
    timeout: TimeoutOpt = 60.0,
    output_format: FormatOpt = None,
) -> None:
    """Encode items: top interests, text-image alignment and (jsonl) the item embedding."""
    def body() -> None:
        chosen = collect_items(text, image, items)
        with _client(url, protocol, timeout) as client:
            encoded = client.encode_items(chosen)
        if save is not None:
            try:
                np.save(save, encoded.item_embedding)
            except OSError as err:
                raise BadInput(f"cannot write {save}: {err.strerror or err}") from None
        rows = encoded_rows(encoded, chosen)
        if resolve_format(output_format) is OutputFormat.jsonl:
            write_jsonl(rows)
        else:
            write_encode_table(rows, chosen)

    _run(body)


def recommend_command(
    history: Annotated[Optional[Path], typer.Option(
        "--history", help="The user's history as items (JSON lines, like --items).")] = None,
    user_vector: Annotated[Optional[Path], typer.Option(
        "--user-vector", help=".npy user vector [D], or item embeddings [N, D] to average.")] = None,
    k: Annotated[int, typer.Option("--k", min=1, help="How many items to return.")] = 10,
    exclude_history: Annotated[bool, typer.Option(
        "--exclude-history/--include-history", help="Leave the history's own ids out of the answer.")] = True,
    url: UrlOpt = None,
    protocol: ProtocolOpt = Protocol.grpc,
    timeout: TimeoutOpt = 60.0,
    output_format: FormatOpt = None,
) -> None:
    """Recommend from the whole catalog index (`mmrec index build`): the user's top-k items, best first."""
    from . import MMRecError

    def body() -> None:
        if (history is None) == (user_vector is None):
            raise BadInput("give exactly one of --history FILE.jsonl or --user-vector FILE.npy")
        vector = read_user_vector(user_vector) if user_vector is not None else None
        past = read_items_jsonl(history) if history is not None else []
        exclude = [i.item_id for i in past if i.item_id is not None] if exclude_history else []
        with _client(url, protocol, timeout) as client:
            user = vector if vector is not None else client.user_vector(past)
            try:
                ranked = client.recommend(user, k, exclude=exclude)
            except ValueError as err:  # k over the server's max_k (client errors pass through as they are)
                if isinstance(err, MMRecError):
                    raise
                raise BadInput(str(err)) from None
        rows = recommended_rows(ranked)
        if resolve_format(output_format) is OutputFormat.jsonl:
            write_jsonl(rows)
        else:
            write_recommend_table(rows)

    _run(body)

