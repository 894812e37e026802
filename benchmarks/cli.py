"""`mmrec bench`: the benchmark suite (issue 5), with rich progress and a targets table at the end."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mmrec.export_defaults import DEFAULT_REPOSITORY
from mmrec.layout import RepositoryLayout

from . import report, targets
from .settings import MODELS, MODES, PROTOCOLS, SECTIONS

console = Console(stderr=True)
DEFAULT_OUTPUT = Path("benchmarks") / "results"
EXIT_SECTION_ERROR = 1  # a section raised, or judging a target did
EXIT_TARGET_MISSED = 3
EXIT_BUSY = 4  # the machine was busy before measuring and --allow-busy was not given


class RichSteps:
    """One progress bar per step, kept on screen as a log of what ran and how long it took."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.current = None

    def finish(self) -> None:
        if self.current is not None:
            self.progress.update(self.current, completed=self.progress.tasks[self.current].total)

    def __call__(self, title: str, total: int) -> Callable[[int], None]:
        self.finish()
        self.current = self.progress.add_task(title, total=max(total, 1))
        task_id = self.current
        return lambda n=1: self.progress.advance(task_id, n)


def _usable_cores() -> int:
    from .machine import usable_cores

    return usable_cores()


def _check_choices(values: list[str], allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise typer.BadParameter(f"{option}: unknown {unknown}; choose from {', '.join(allowed)}")
    return tuple(values)


def _print_targets(results: dict) -> None:
    table = Table(title="targets", show_lines=False)
    for column in ("target", "threshold", "measured", "status"):
        table.add_column(column)
    colour = {"met": "green", "missed": "red", "error": "red"}
    for t in results["targets"]:
        verdict = t.get("verdict", "?")
        status = f"[{colour.get(verdict, 'yellow')}]{escape(verdict)}[/{colour.get(verdict, 'yellow')}]"
        table.add_row(escape(t["description"]), escape(t["threshold"]), escape(t["measured"]), status)
    console.print(table)
    for t in targets.errors(results):
        console.print(f"[red]error judging {escape(t['id'])}:[/red]\n{escape(t['error'])}")


def _exit_on_target_errors(results: dict) -> None:
    """A target whose judging raised is a failure of the run, whatever --strict says."""
    if targets.errors(results):
        raise typer.Exit(EXIT_SECTION_ERROR)


def bench_command(
    repository: Path = typer.Option(DEFAULT_REPOSITORY, help="Model repository written by `mmrec export` (target portable or onnxruntime)."),
    output: Path = typer.Option(DEFAULT_OUTPUT, "--output", "-o", help="Folder for bench.json, summary.md, plots and the server log."),
    quick: bool = typer.Option(False, "--quick", help="CI mode (< 3 min): fewer sizes and levels, short time budgets, every section that can run; implies --allow-busy."),
    threads: int = typer.Option(0, help="Threads for PyTorch and ORT intra-op (same for both); 0 = usable cores."),
    only: list[str] = typer.Option([], "--only", help=f"Run only these sections: {', '.join(SECTIONS)}."),
    skip: list[str] = typer.Option([], "--skip", help="Skip these sections."),
    model: list[str] = typer.Option([], "--model", help=f"Offline models to compare: {', '.join(MODELS)} (default all)."),
    protocol: list[str] = typer.Option([], "--protocol", help="Serving protocols: grpc, http (default both)."),
    concurrency: list[int] = typer.Option([], "--concurrency", "-c", help="Serving concurrency levels (default 1 2 4 8 32; quick 1 4)."),
    level_seconds: Optional[float] = typer.Option(None, help="Measured seconds per serving level (default 6; quick 0.8)."),
    slo_ms: Optional[float] = typer.Option(None, "--slo-ms", help="p99 bound (ms) for the open-loop capacity section "
                                           "(default 100)."),
    perf_analyzer: Optional[Path] = typer.Option(None, help="perf_analyzer binary (default: $MMREC_PERF_ANALYZER, the cache, PATH)."),
    strict: bool = typer.Option(False, help=f"Exit {EXIT_TARGET_MISSED} if a measured target is missed."),
    rerender: bool = typer.Option(False, "--rerender", help="Measure nothing: rebuild targets, summary.md and plots from --output/bench.json."),
    readme: Optional[Path] = typer.Option(None, "--readme", help="Measure nothing: rewrite the block between <!-- bench:start --> and <!-- bench:end --> in this README from --output/bench.json (after --rerender if both are given)."),
    allow_busy: bool = typer.Option(False, "--allow-busy", help="Measure even when the machine is busy (load average above the usable cores + 0.5, or < 80% of the cores in the busy probe); the results are marked contended. Implied by --quick."),
) -> None:
    """Benchmark the exported models and the server: offline backends, roofline, serving sweep,
    perf_analyzer cross-check, real photos, quality drift; reports in --output."""
    from .suite import BenchOptions, PlainSteps, run_bench

    if rerender or readme is not None:
        import json

        from .suite import rerender as rerender_reports

        if not (output / "bench.json").is_file():
            console.print(f"[red]error:[/red] {escape(str(output / 'bench.json'))} not found: nothing to re-render")
            raise typer.Exit(2)
        if rerender:
            results = rerender_reports(output)
            _print_targets(results)
            console.print(f"re-rendered {escape(str(output))} from bench.json")
        else:
            results = json.loads((output / "bench.json").read_text())
        if readme is not None:
            try:
                changed = report.update_readme(readme, results, str(output / "bench.json"))
            except (OSError, ValueError) as err:
                console.print(f"[red]error:[/red] {escape(str(err))}")
                raise typer.Exit(2) from err
            console.print(f"{escape(str(readme))}: benchmark block {'rewritten' if changed else 'already up to date'} "
                          f"from {escape(str(output / 'bench.json'))}")
        _exit_on_target_errors(results)
        return

    sections = _check_choices(only, SECTIONS, "--only") or SECTIONS
    sections = tuple(s for s in sections if s not in _check_choices(skip, SECTIONS, "--skip"))
    settings = MODES["quick" if quick else "full"].with_overrides(
        models=_check_choices(model, MODELS, "--model") or None,
        protocols=_check_choices(protocol, PROTOCOLS, "--protocol") or None,
        concurrency=tuple(sorted(set(concurrency))) or None,
        level_s=level_seconds, slo_ms=slo_ms)
    if concurrency:
        settings = settings.with_overrides(pa_concurrency=tuple(c for c in settings.pa_concurrency if c in concurrency)
                                           or settings.concurrency)
    contract_file = RepositoryLayout(repository).contract_file
    if not contract_file.is_file():
        console.print(f"[red]error:[/red] {escape(str(repository))} is not a repository written by "
                      f"`mmrec export` (no {contract_file.name}); run `mmrec export` first")
        raise typer.Exit(2)
    from .machine import busy_check

    busy = busy_check(_usable_cores())
    busy["allowed"] = allow_busy or quick
    if busy["busy"]:
        reasons = "; ".join(busy["reasons"])
        if not busy["allowed"]:
            console.print(f"[red]error:[/red] the machine is busy ({escape(reasons)}): numbers taken now would "
                          "measure the other work. Wait for a quiet machine, or pass --allow-busy to measure anyway "
                          "(the results are then marked contended).")
            raise typer.Exit(EXIT_BUSY)
        console.print(f"[yellow]warning:[/yellow] the machine is busy ({escape(reasons)}); measuring anyway "
                      f"({'--quick' if quick and not allow_busy else '--allow-busy'}): results marked contended")
    options = BenchOptions(repository=repository, output=output, settings=settings,
                           threads=threads or _usable_cores(), sections=sections, perf_analyzer=perf_analyzer,
                           busy_check=busy)
    if not console.is_terminal:  # logs, tee, CI: bars render nothing there, timestamped lines do
        steps = PlainSteps(lambda line: console.print(escape(line), highlight=False, soft_wrap=True))
        results = run_bench(options, steps)
        steps.finish()
    else:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            steps = RichSteps(progress)
            results = run_bench(options, steps)
            steps.finish()
    for name, section in results["sections"].items():
        if section["status"] != "ok":
            colour = "red" if section["status"] == "error" else "yellow"
            console.print(f"[{colour}]{name}: {section['status']}[/{colour}] "
                          f"{escape(section.get('reason') or section.get('error', ''))}")
    _print_targets(results)
    for line in report.capacity_summary(results):
        console.print(escape(line.lstrip("- ").replace("**", "")), highlight=False)
    console.print(f"reports: {escape(str(output / results['files']['json']))}, "
                  f"{escape(str(output / results['files']['markdown']))}; plots: "
                  + ", ".join(v for v in results["plots"].values() if v.endswith(".png")))
    if any(s["status"] == "error" for s in results["sections"].values()):
        raise typer.Exit(EXIT_SECTION_ERROR)
    _exit_on_target_errors(results)
    if strict and any(t["met"] is False for t in results["targets"]):
        raise typer.Exit(EXIT_TARGET_MISSED)
