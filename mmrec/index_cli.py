"""`mmrec index build|add|remove|load|rollback|status`: the catalog index from the shell.

Exit codes: 0 done (bad items are listed, not fatal), 2 bad arguments or an unusable index or
catalog, 3 a server is unavailable or did not load the new version (the rollout stopped there;
the table says which replica serves which version), or after the rollout a replica still named
by --url/--replicas does not serve it (a pod that left DNS meanwhile is "gone", not a failure), 130 interrupted (run the same command again
to continue).
"""
from __future__ import annotations

import json
import shutil
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Iterator, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mmrec.client import MMRecError

from .export_defaults import DEFAULT_REPOSITORY
from .index_build import DEFAULT_BATCH_SIZE, BuildReport, LocalEncoder, ServerEncoder, build, remove
from .index_publish import (DEFAULT_K, DEFAULT_KEEP, DEFAULT_MAX_K, PublishError, Published, ReplicaSet, ReplicaState,
                            Rollout, RolloutStopped, ServeOptions, check_not_behind, check_replicas, publish, republish,
                            roll_out, tls_hint, version_bytes, versions)
from .index_store import META_FILE, CatalogIndexError, IndexStore, count_lines, default_build_dir, read_catalog

EXIT_BAD_INPUT, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 2, 3, 130
console = Console(stderr=True)
index_app = typer.Typer(help="Build, update and serve a catalog index (top-k over every item for a user).",
                        no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

RepositoryOpt = Annotated[Path, typer.Option("--repository", help="Model repository written by `mmrec export`; "
                                             "the index is published into it as catalog_scorer/<version>.")]
BuildDirOpt = Annotated[Optional[Path], typer.Option(
    "--build-dir", help="Where vectors and the resume journal live (default: <repository>.index beside it).")]
ItemsOpt = Annotated[Path, typer.Option(
    "--items", help='JSON lines {"text": ..., "image": path, "id": ...}, as for `mmrec score --items`.')]
UrlOpt = Annotated[Optional[List[str]], typer.Option(
    "--url", help="gRPC host:port of a server serving this repository; repeat it for each replica. Items are "
                  "encoded on the first; the new version is loaded on each in turn, each checked to serve it "
                  "before the next (needs explicit model control; MMREC_ADMIN_KEY if the servers restrict "
                  "load/unload).")]
ReplicasOpt = Annotated[Optional[List[str]], typer.Option(
    "--replicas", help="NAME:PORT resolving to every replica, e.g. a Kubernetes headless Service "
                       "(mmrec-headless:8001): each address counts as one more --url.")]
LoadOpt = Annotated[bool, typer.Option(
    "--load/--no-load", help="Load the new version on the servers. --no-load only encodes on the first one "
                             "(publish, upload the repository, then `mmrec index load`).")]
LocalOpt = Annotated[bool, typer.Option("--local", help="Encode in-process even when --url is given.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Items per committed batch.")]
PublishOpt = Annotated[bool, typer.Option("--publish/--no-publish", help="Write a new catalog_scorer version.")]
MaxKOpt = Annotated[int, typer.Option("--max-k", min=1, help="Largest K a request may ask for.")]
DefaultKOpt = Annotated[int, typer.Option("--default-k", min=1, help="K when a request sends none.")]
KeepOpt = Annotated[int, typer.Option("--keep", min=1, help="Versions kept on disk (served + rollback).")]
PrepackOpt = Annotated[str, typer.Option(
    "--prepacking", help="auto: one user unpacked + batches prepacked (index twice in RAM); on: batches fast, "
                         "one copy; off: least memory, batches slower (see docs/catalog_index.md).")]
ReportOpt = Annotated[Optional[Path], typer.Option("--report", help="Also write the run's summary as JSON here.")]


class _Stop:
    """First SIGINT/SIGTERM: finish and commit the batch in flight, then stop. Second: now."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, signum: int, frame: object) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()
        console.print("[yellow]stopping after the batch in flight (again to abort now)…[/yellow]")


@contextmanager
def _graceful_stop() -> Iterator[threading.Event]:
    handler = _Stop()
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield handler.event
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _fail(message: str, code: int) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(' '.join(message.split()))}")
    return typer.Exit(code)


def _encoder(repository: Path, url: str | None, local: bool):
    if url and not local:
        try:
            return ServerEncoder(url)
        except MMRecError as err:
            from .tls_probe import answers_tls

            reason = tls_hint(url, "encode items").strip() if answers_tls(url) else str(err)
            raise _fail(reason, EXIT_UNAVAILABLE) from None
    try:
        return LocalEncoder(repository)
    except (FileNotFoundError, ValueError) as err:
        raise _fail(str(err), EXIT_BAD_INPUT) from None


def _progress():
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=False)


def _print_bad(report: BuildReport) -> None:
    if not report.bad:
        return
    table = Table("id / line", "problem", title=f"{len(report.bad)} item(s) skipped", title_style="yellow")
    for bad in report.bad:
        table.add_row(escape(bad.label), escape(bad.error))
    console.print(table)


def _summary(report: BuildReport, published: Published | None, rollout: Rollout | None) -> None:
    console.print(f"encoded {report.encoded}, reused {report.reused}, unchanged {report.unchanged}, "
                  f"removed {report.removed}, bad {len(report.bad)} -> {report.items} items in the index")
    if published is not None:
        state = "unchanged, still" if published.unchanged else "wrote"
        console.print(f"{state} catalog_scorer version {published.version} ({published.items} items) in "
                      f"{published.folder.parent}" + _loaded_by(rollout))


def _loaded_by(rollout: Rollout | None) -> str:
    if rollout is None:
        return ""
    serving = [s.url for s in rollout.replicas if s.outcome != "gone"]  # gone: left DNS (scale-in) meanwhile
    return " — served by " + (serving[0] if len(serving) == 1 else f"all {len(serving)} replicas")


def _print_replicas(states: tuple[ReplicaState, ...] | list[ReplicaState], version: int | None = None) -> None:
    title = f"catalog_scorer version {version} rollout" if version is not None else "catalog_scorer replicas"
    table = Table("replica", "serves version", "this run", "error", title=title)
    for state in states:
        serves = ", ".join(map(str, state.serves)) or "-"
        table.add_row(escape(state.url), serves, state.outcome, escape(" ".join(state.error.split())[:200]))
    console.print(table)


@dataclass(frozen=True)
class _Targets:
    """The servers to load on: `urls` each --url and each address --replicas resolved to at the
    start (the rollout resolves the names again: `replicas`), and the arguments that named them,
    repeated in the commands a stopped rollout suggests."""

    urls: tuple[str, ...] = ()
    args: str = ""
    replicas: ReplicaSet = ReplicaSet()


def _targets(urls: list[str] | None, replicas: list[str] | None) -> _Targets:
    wanted = ReplicaSet(tuple(urls or ()), tuple(replicas or ()))
    try:
        found = wanted.addresses()
    except PublishError as err:
        raise _fail(str(err), EXIT_BAD_INPUT) from None
    return _Targets(tuple(found), " ".join([*(f"--url {u}" for u in urls or ()),
                                            *(f"--replicas {r}" for r in replicas or ())]), wanted)


def _roll_out(targets: _Targets, version: int, repository: Path) -> Rollout:
    """Load `version` replica by replica; on a failure print who serves what, say how to go on, exit 3."""
    try:
        rollout = roll_out(targets.replicas, version)
    except RolloutStopped as err:
        _print_replicas(err.rollout.replicas, version)
        raise _fail(f"{err} The replicas marked loaded or already serving serve version {version}; the others keep "
                    f"the version shown. Fix that replica and run the same command again (replicas on version "
                    f"{version} are left alone), or put every replica back on the previous catalog: "
                    f"`mmrec index rollback --repository {repository} --no-load`, upload the repository to the "
                    f"bucket the replicas read (if they read one), then `mmrec index load --repository {repository} "
                    f"{targets.args}`", EXIT_UNAVAILABLE) from None
    except PublishError as err:
        raise _fail(str(err), EXIT_UNAVAILABLE) from None
    if len(rollout.replicas) > 1:
        _print_replicas(rollout.replicas, version)
    return rollout


def _write_report(path: Path | None, report: BuildReport, published: Published | None) -> None:
    if path is None:
        return
    data = report.to_json()
    data["published_version"] = published.version if published else None
    data["published_unchanged"] = published.unchanged if published else None
    path.write_text(json.dumps(data, indent=1) + "\n")


def _publish_and_load(store: IndexStore, repository: Path, targets: _Targets, options: ServeOptions,
                      keep: int, load: bool = True) -> tuple[Published, Rollout | None]:
    """Publish, then roll out to every target, an unchanged catalog too: running a stopped
    rollout's command again finishes it (replicas already serving the version are left alone).
    Refuses first when a replica serves a newer version than the local copy holds (stale copy),
    with --no-load too: that is the bucket flow, where a stale copy is likeliest."""
    try:
        check_not_behind(repository, targets.urls)
        published = publish(store, repository, options, keep=keep)
    except (PublishError, FileNotFoundError, ValueError) as err:
        raise _fail(str(err), EXIT_BAD_INPUT) from None
    if not targets.urls or not load:
        return published, None
    return published, _roll_out(targets, published.version, repository)


def _run_build(items: Path, repository: Path, build_dir: Path | None, targets: _Targets, load: bool, local: bool,
               batch_size: int, do_publish: bool, options: ServeOptions, keep: int, report_path: Path | None,
               sync: bool, rebuild: bool) -> None:
    folder = build_dir or default_build_dir(repository)
    if not items.is_file():
        raise _fail(f"--items {items} is not a readable file", EXIT_BAD_INPUT)
    if rebuild and folder.exists():
        shutil.rmtree(folder)
    encoder = _encoder(repository, targets.urls[0] if targets.urls else None, local)  # one server encodes
    try:
        with IndexStore.open(folder, encoder.dim) as store, _graceful_stop() as stop, _progress() as bar:
            task = bar.add_task("encoding catalog", total=count_lines(items))
            report = build(store, read_catalog(items), encoder, sync=sync, batch_size=batch_size, stop=stop,
                           advance=lambda n: bar.advance(task, n))
            bar.stop()
            _print_bad(report)
            if report.interrupted:
                _summary(report, None, None)
                _write_report(report_path, report, None)
                console.print(f"[yellow]interrupted[/yellow]: {report.seen} catalog lines done and committed; "
                              "run the same command again to continue")
                raise typer.Exit(EXIT_INTERRUPTED)
            published, rollout = (_publish_and_load(store, repository, targets, options, keep, load)
                                  if do_publish else (None, None))
            _summary(report, published, rollout)
            _write_report(report_path, report, published)
    except CatalogIndexError as err:
        raise _fail(str(err), EXIT_BAD_INPUT) from None
    except MMRecError as err:  # the encoding server failed mid-build: committed batches are kept
        raise _fail(f"{err} — every batch committed so far is kept: run the same command again to continue",
                    EXIT_UNAVAILABLE) from None
    except OSError as err:
        raise _fail(f"{err.filename or ''}: {err.strerror or err}", EXIT_BAD_INPUT) from None
    finally:
        encoder.close()


@index_app.command("build")
def build_command(items: ItemsOpt, repository: RepositoryOpt = DEFAULT_REPOSITORY, build_dir: BuildDirOpt = None,
                  url: UrlOpt = None, replicas: ReplicasOpt = None, load: LoadOpt = True, local: LocalOpt = False,
                  batch_size: BatchOpt = DEFAULT_BATCH_SIZE,
                  do_publish: PublishOpt = True, max_k: MaxKOpt = DEFAULT_MAX_K, default_k: DefaultKOpt = DEFAULT_K,
                  keep: KeepOpt = DEFAULT_KEEP, report: ReportOpt = None, prepacking: PrepackOpt = "auto",
                  rebuild: Annotated[bool, typer.Option("--rebuild", help="Forget stored vectors and "
                                                        "re-encode everything (after re-exporting models).")] = False,
                  ) -> None:
    """Make the index hold exactly this catalog: encode new/changed items (resumable, each content
    once), drop ids not in it, publish a new catalog_scorer version and load it on each --url/--replicas."""
    _run_build(items, repository, build_dir, _targets(url, replicas), load, local, batch_size, do_publish,
               _options(max_k, default_k, prepacking), keep, report, sync=True, rebuild=rebuild)


@index_app.command("add")
def add_command(items: ItemsOpt, repository: RepositoryOpt = DEFAULT_REPOSITORY, build_dir: BuildDirOpt = None,
                url: UrlOpt = None, replicas: ReplicasOpt = None, load: LoadOpt = True, local: LocalOpt = False,
                batch_size: BatchOpt = DEFAULT_BATCH_SIZE,
                do_publish: PublishOpt = True, max_k: MaxKOpt = DEFAULT_MAX_K, default_k: DefaultKOpt = DEFAULT_K,
                keep: KeepOpt = DEFAULT_KEEP, report: ReportOpt = None, prepacking: PrepackOpt = "auto") -> None:
    """Add or update these items (others stay), publish and load a new version."""
    _run_build(items, repository, build_dir, _targets(url, replicas), load, local, batch_size, do_publish,
               _options(max_k, default_k, prepacking), keep, report, sync=False, rebuild=False)


@index_app.command("remove")
def remove_command(ids: Annotated[Optional[List[str]], typer.Option("--id", help="An item id (repeatable).")] = None,
                   ids_file: Annotated[Optional[Path], typer.Option("--ids-file", help="One id per line.")] = None,
                   repository: RepositoryOpt = DEFAULT_REPOSITORY, build_dir: BuildDirOpt = None, url: UrlOpt = None,
                   replicas: ReplicasOpt = None, load: LoadOpt = True, do_publish: PublishOpt = True,
                   max_k: MaxKOpt = DEFAULT_MAX_K, default_k: DefaultKOpt = DEFAULT_K, keep: KeepOpt = DEFAULT_KEEP,
                   prepacking: PrepackOpt = "auto") -> None:
    """Remove items by id, publish and load a new version."""
    wanted = list(ids or [])
    targets = _targets(url, replicas)
    try:
        if ids_file is not None:
            wanted += [line.strip() for line in ids_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not wanted:
            raise _fail("give --id ID (repeatable) or --ids-file FILE", EXIT_BAD_INPUT)
        with IndexStore.open(build_dir or default_build_dir(repository)) as store:
            removed, unknown = remove(store, wanted)
            if unknown:
                console.print(f"[yellow]not in the index[/yellow]: {escape(', '.join(unknown[:20]))}"
                              + (f" (+{len(unknown) - 20})" if len(unknown) > 20 else ""))
            console.print(f"removed {len(removed)} -> {len(store.items)} items in the index")
            if do_publish and removed:
                published, rollout = _publish_and_load(store, repository, targets,
                                                       _options(max_k, default_k, prepacking), keep, load)
                _summary(BuildReport(removed=len(removed), items=len(store.items)), published, rollout)
    except (CatalogIndexError, FileNotFoundError) as err:
        raise _fail(str(err), EXIT_BAD_INPUT) from None
    except OSError as err:
        raise _fail(f"{err.filename or ''}: {err.strerror or err}", EXIT_BAD_INPUT) from None


@index_app.command("load")
def load_command(repository: RepositoryOpt = DEFAULT_REPOSITORY, url: UrlOpt = None,
                 replicas: ReplicasOpt = None) -> None:
    """Load the newest catalog_scorer version on disk on each replica, one at a time: after
    uploading a published (or rolled-back) repository to the bucket the replicas read, or to
    finish a rollout that stopped."""
    targets = _targets(url, replicas)
    on_disk = versions(repository)
    if not on_disk:
        raise _fail(f"{repository} holds no catalog_scorer version: publish one with `mmrec index build`",
                    EXIT_BAD_INPUT)
    rollout = _roll_out(targets, on_disk[-1], repository)
    serving = sum(1 for s in rollout.replicas if s.outcome != "gone")
    console.print(f"catalog_scorer version {on_disk[-1]} is served by {serving} replica(s)")


@index_app.command("rollback")
def rollback_command(repository: RepositoryOpt = DEFAULT_REPOSITORY, build_dir: BuildDirOpt = None,
                     to: Annotated[Optional[int], typer.Option("--to", min=1, help="Version to serve again "
                                                               "(default: the one before the newest).")] = None,
                     url: UrlOpt = None, replicas: ReplicasOpt = None, load: LoadOpt = True,
                     keep: KeepOpt = DEFAULT_KEEP) -> None:
    """Serve an older version again: copy it as the next version (versions only grow, so restarted
    replicas and bucket syncs agree) and load that on each --url/--replicas. With replicas reading a
    bucket: --no-load, upload the repository, then `mmrec index load`."""
    targets = _targets(url, replicas)
    folder = build_dir or default_build_dir(repository)
    try:
        # hold the build folder's lock (when there is one) so no publish races for the version number
        store = IndexStore.open(folder) if (folder / META_FILE).is_file() else None
        try:
            check_not_behind(repository, targets.urls)
            published, source = republish(repository, to, keep)
            if store is not None:
                store.record_publish({"version": published.version, "items": published.items,
                                      "fingerprint": published.fingerprint, "rollback_of": source,
                                      "repository": str(Path(repository).resolve())})
        finally:
            if store is not None:
                store.close()
    except (CatalogIndexError, FileNotFoundError, ValueError) as err:
        raise _fail(str(err), EXIT_BAD_INPUT) from None
    except OSError as err:
        raise _fail(f"{err.filename or ''}: {err.strerror or err}", EXIT_BAD_INPUT) from None
    rollout = _roll_out(targets, published.version, repository) if targets.urls and load else None
    console.print(f"wrote catalog_scorer version {published.version}, a copy of version {source} "
                  f"({published.items} items), in {published.folder.parent}" + _loaded_by(rollout))


@index_app.command("status")
def status_command(repository: RepositoryOpt = DEFAULT_REPOSITORY, build_dir: BuildDirOpt = None,
                   url: UrlOpt = None, replicas: ReplicasOpt = None) -> None:
    """Items, stored vectors, bad items and published versions (JSON on stdout); with
    --url/--replicas also the version each replica serves."""
    folder = build_dir or default_build_dir(repository)
    targets = _targets(url, replicas)
    try:
        with IndexStore.open(folder) as store:
            data = {"build_dir": str(folder), "items": len(store.items), "vectors": store.vector_rows,
                    "dim": store.dim, "bad": [{"id": i, "error": e} for i, (_, e) in store.bad.items()],
                    "published": store.published[-5:], "versions_on_disk": versions(repository),
                    # sizes a pod's cache (modelRepository.cacheSizeLimit): docs/deployment.md
                    "version_bytes": {str(v): n for v, n in version_bytes(repository).items()}}
    except (CatalogIndexError, FileNotFoundError) as err:
        raise _fail(str(err), EXIT_BAD_INPUT) from None
    if targets.urls:
        data["replicas"] = [{"url": s.url, "serves": list(s.serves), "error": s.error}
                            for s in check_replicas(targets.urls)]
    typer.echo(json.dumps(data, indent=1))


def _options(max_k: int, default_k: int, prepacking: str) -> ServeOptions:
    try:
        return ServeOptions(max_k=max_k, default_k=default_k, prepacking=prepacking)
    except ValueError as err:
        raise _fail(str(err), EXIT_BAD_INPUT) from None
