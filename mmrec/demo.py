"""`mmrec demo`: the main job on the embedded default, end to end.

export default models (if the repository is missing) -> start tritonserver on 127.0.0.1 ->
score real sample items for a simulated user over gRPC with the mmrec client -> print results.
The simulated user is the mean embedding of items from one interest category that the user
"engaged with" (real Tux Paint stamps; the users themselves are simulated).
"""
from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .export_defaults import DEFAULT_REPOSITORY
from .layout import RepositoryLayout

console = Console()

DEMO_CANDIDATES = 16
DEMO_HISTORY = 6


def _ensure_export(repository: Path) -> None:
    if RepositoryLayout(repository).manifest_file.is_file():
        console.print(f"using the existing export in {repository} (delete it to re-export)")
        return
    from rich.progress import Progress
    from mmrec.export.cli import RichReporter, summarize
    from mmrec.export.pipeline import ExportOptions, Exporter

    console.rule("1/3 export default models")
    with Progress(console=console) as progress:
        manifest = Exporter(ExportOptions(output=repository), RichReporter(progress)).run()
    summarize(manifest)


def _pick_items(category: str):
    from mmrec.export.data import load_items, split

    parts = split(load_items())
    train, held_out = parts.train, parts.held_out
    history = [i for i in train if i.category == category][:DEMO_HISTORY]
    step = max(1, len(held_out) // DEMO_CANDIDATES)
    candidates = held_out[::step][:DEMO_CANDIDATES]
    return history, candidates


def demo_command(
    repository: Path = typer.Option(DEFAULT_REPOSITORY, help="Repository to serve (exported first if missing)."),
    category: str = typer.Option("animals", help="Interest category of the simulated user's history."),
    k: int = typer.Option(5, help="How many top items to show."),
) -> None:
    """Export (if needed), serve on Triton, and rank real items for a simulated user over gRPC."""
    from mmrec.client import Item, MMRecClient
    from mmrec.server import ServerConfig, TritonServer, free_ports

    _ensure_export(repository)
    console.rule("2/3 start tritonserver")
    http, grpc, metrics = free_ports(3)
    started = time.perf_counter()
    with TritonServer(ServerConfig(repository=repository, http_port=http, grpc_port=grpc,
                                   metrics_port=metrics)) as server:
        console.print(f"ready in {time.perf_counter() - started:.1f}s: gRPC {server.urls['grpc']}, "
                      f"HTTP {server.urls['http']}")
        console.rule("3/3 score sample items over gRPC")
        history, candidates = _pick_items(category)
        with MMRecClient(server.urls["grpc"]) as client:
            to_item = lambda i: Item(text=i.caption, image=i.image_path, item_id=i.item_id)  # noqa: E731
            user = client.user_vector([to_item(i) for i in history])
            encoded = client.encode_items([to_item(i) for i in candidates])
            ranked = client.rank(user, [to_item(i) for i in candidates], k=len(candidates))
        console.print(f"simulated user: engaged with {len(history)} '{category}' items: "
                      + ", ".join(i.caption.rstrip('.') for i in history))
        table = Table(title=f"{len(candidates)} candidate items ranked for this user (σ(item·user))")
        for column in ("rank", "score", "caption", "true category", "predicted interest", "alignment"):
            table.add_column(column)
        for position, hit in enumerate(ranked, start=1):
            item = candidates[hit.index]
            probs = encoded.interest_probs[hit.index]
            top = int(probs.argmax())
            table.add_row(str(position), f"{hit.score:.3f}", item.caption[:48], item.category,
                          f"{encoded.categories[top]} ({probs[top]:.2f})",
                          f"{encoded.alignment[hit.index]:.2f}",
                          style="bold green" if position <= k else None)
        console.print(table)
