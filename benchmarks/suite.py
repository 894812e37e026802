"""One benchmark run: every selected section in order, each isolated (a failing section is
recorded and the others still run), then targets, JSON, Markdown and plots.

Order: offline → roofline (uses offline's timings) → quality → serving, whose sweep also runs
perf_analyzer level by level right after our own client (same server, same minute, same
background load); the perf_analyzer section then reports those runs and the comparison; then
photos (real 640x427 vs 12 MP phone JPEGs through the same server and in-process); then
capacity (open-loop Poisson load from MLPerf LoadGen: the highest rate whose p99 stays under
the SLO). The server is started once, lazily, and stopped at the end.
"""
from __future__ import annotations

import datetime as dt
import json
import tempfile
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import machine, perf_analyzer, photo_latency, plots, quality, report, roofline, served_engine, serving, targets
from .offline import add_ratios, run_offline
from .settings import SECTIONS, Settings
from .workload import Workload

SCHEMA_VERSION = 1
Tick = Callable[[int], None]
Step = Callable[[str, int], Tick]


def silent_step(title: str, total: int) -> Tick:
    return lambda n=1: None


class PlainSteps:
    """Progress as plain timestamped lines, one when a step starts and one when it ends: what a
    log, `tee` or CI shows (progress bars render nothing there)."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self.write = write
        self.started = time.monotonic()
        self.current: tuple[str, float] | None = None

    def _line(self, text: str) -> None:
        now = dt.datetime.now().strftime("%H:%M:%S")
        self.write(f"[{now} +{time.monotonic() - self.started:6.0f} s] {text}")

    def finish(self) -> None:
        if self.current is not None:
            title, t0 = self.current
            self._line(f"done: {title} ({time.monotonic() - t0:.0f} s)")
            self.current = None

    def __call__(self, title: str, total: int) -> Tick:
        self.finish()
        self._line(f"start: {title}")
        self.current = (title, time.monotonic())
        return lambda n=1: None


@dataclass
class BenchOptions:
    repository: Path
    output: Path
    settings: Settings
    threads: int
    sections: tuple[str, ...] = SECTIONS
    perf_analyzer: Path | None = None
    busy_check: dict | None = None  # machine.busy_check() before measuring (+ "allowed")


class SectionSkipped(Exception):
    """A section that cannot run here, with the reason (not an error)."""


def _run_section(results: dict, name: str, selected: tuple[str, ...], fn: Callable[[], dict]) -> None:
    if name not in selected:
        results["sections"][name] = {"status": "skipped", "reason": "not selected", "duration_s": 0.0}
        return
    start, load, share = time.perf_counter(), machine.loadavg(), machine.cpu_share()
    try:
        data = {"status": "ok", **fn()}
    except SectionSkipped as skip:
        data = {"status": "skipped", "reason": str(skip)}
    except Exception as err:  # noqa: BLE001 - one section failing must not lose the others
        data = {"status": "error", "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc()[-4000:]}
    data["duration_s"] = time.perf_counter() - start
    data["loadavg"] = {"start": load, "end": machine.loadavg()}
    # the busy probe between sections: our server idles then, so a low share is other work
    data["cpu_share"] = {"start": share, "end": machine.cpu_share()}
    results["sections"][name] = data


SERVER_SECTIONS = ("serving", "perf_analyzer", "photos", "capacity")  # run with our own tritonserver up
# sections whose load average counts their own servers and load (the overload section starts
# its own, and its soak ends with two cores saturated): they cannot speak for other work
SELF_LOADED_SECTIONS = (*SERVER_SECTIONS, "engine", "overload")


def _contended(results: dict) -> bool:
    """Was other work competing for the CPUs (busy before measuring, 1-min load above the usable
    cores + 0.5, or this process getting less than 80% of them in the start/end probe)?"""
    if (results.get("busy_check") or {}).get("busy"):
        return True
    cores = results["machine"]["cpu"]["usable_cores"] or 1
    shares = [results["machine"].get(k) for k in ("cpu_share_start", "cpu_share_end")]
    shares += [s.get("cpu_share", {}).get(k) for s in results["sections"].values() for k in ("start", "end")]
    if any(s is not None and s < 0.8 for s in shares):
        return True
    # The load average counts this run's own tritonserver, stubs and client workers (at
    # concurrency 32 it passes 4 on 2 cores with nothing else running), so it only speaks for
    # other work before the server starts: the start and the sections measured in-process.
    # For them the busy probe (share of the cores this process gets) taken before and after each
    # section, while our server idles, is the judge; outside load that comes and goes within a
    # section goes unseen.
    loads = [results["machine"]["loadavg_start"]]
    loads += [s.get("loadavg", {}).get(k) or [] for name, s in results["sections"].items()
              if name not in SELF_LOADED_SECTIONS for k in ("start", "end")]
    return any(load and load[0] > cores + 0.5 for load in loads)


def run_bench(options: BenchOptions, step: Step = silent_step) -> dict:
    """Run the selected sections and write bench.json, summary.md and the plots."""
    started = time.perf_counter()
    start = machine.RunStart.now()
    settings = options.settings
    output = Path(options.output)
    output.mkdir(parents=True, exist_ok=True)
    selected = tuple(s for s in SECTIONS if s in options.sections)
    manifest_info = _manifest_info(options.repository)
    results = {
        "schema_version": SCHEMA_VERSION,
        "command": machine.command_line(),
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "repository": str(Path(options.repository).resolve()),
        "repository_manifest": manifest_info,
        "settings": settings.to_dict(),
        "threads": options.threads,
        "machine": machine.machine_info(),
        "versions": machine.package_versions(),
        "git": machine.git_commit(),
        "busy_check": options.busy_check,
        "sections": {},
    }
    workload = Workload(options.repository)

    _run_section(results, "offline", selected, lambda: run_offline(workload, settings, options.threads, step))
    offline_records = (results["sections"]["offline"] or {}).get("records", [])

    def roofline_section() -> dict:
        tick = step("roofline: sgemm peak, encoder GFLOP/s, paired peak/encoder rounds, padding waste", 1)
        b, seq = max(settings.batches), max(settings.seq_lens)
        data = roofline.run_roofline(offline_records, options.repository, settings.gemm_sizes,
                                     settings.gemm_s, options.threads, workload,
                                     [("image_encoder", b, None), ("text_encoder", b, seq)],
                                     settings.roofline_rounds)
        try:
            data["padding"] = roofline.padding_waste(workload)
        except Exception as err:  # noqa: BLE001 - the roofline numbers stand without it
            data["padding"] = {"error": f"{type(err).__name__}: {err}"}
        tick(1)
        return data

    _run_section(results, "roofline", selected, roofline_section)
    _run_section(results, "quality", selected, lambda: quality.run_quality(
        workload, settings, options.threads, step("quality drift vs FP32", quality.quality_steps(workload))))

    with ExitStack() as stack:
        holder: dict = {}

        def server():
            if "error" in holder:  # failed once: do not wait for another start timeout
                raise holder["error"]
            if "server" not in holder:
                try:
                    holder["server"] = stack.enter_context(
                        serving.running_server(Path(options.repository), output / "tritonserver.log"))
                except Exception as err:
                    holder["error"] = err
                    raise
            return holder["server"]

        pa_session, pa_reason = None, "not selected"
        if "perf_analyzer" in selected:
            located = perf_analyzer.locate(options.perf_analyzer)
            pa_reason = located.reason
            if located.tool is not None:
                workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mmrec-perf-analyzer-")))
                pa_session = perf_analyzer.Session(located.tool, workload, settings, workdir)

        _run_section(results, "serving", selected, lambda: serving.run_serving(
            workload, settings, options.threads, step, server, pa_session.level if pa_session else None))

        def pa_section() -> dict:
            if pa_session is None:
                raise SectionSkipped(pa_reason)
            if not pa_session.runs:  # the serving sweep did not run: measure on our own
                tick = step("perf_analyzer cross-check", len(settings.pa_concurrency))
                for c in settings.pa_concurrency:
                    pa_session.level(server(), c)
                    tick(1)
            own = ((results["sections"].get("serving") or {}).get("triton") or {}).get("grpc") or []
            return pa_session.result(own)

        _run_section(results, "perf_analyzer", selected, pa_section)
        _run_section(results, "photos", selected, lambda: photo_latency.run_photos(
            workload, settings, options.threads, step, server))
        _run_section(results, "capacity", selected, lambda: capacity_section(options, server, step))
        _run_section(results, "overload", selected, lambda: overload_section(options, results, step))

    # after the suite's server is gone: `mmrec serve` of its own, alone on the cores
    _run_section(results, "engine", selected, lambda: served_engine.run_engine(workload, settings, output, step))
    results["machine"]["loadavg_end"] = machine.loadavg()
    results["machine"]["cpu_share_end"] = machine.cpu_share()
    results["contended"] = _contended(results)
    results["duration_s"] = time.perf_counter() - started
    results[machine.PROVENANCE_KEY] = machine.provenance(start)
    return write_reports(results, output)


def capacity_section(options: BenchOptions, server: Callable, step: Step) -> dict:
    """Open-loop capacity at the p99 bound (benchmarks/open_loop.py) through the suite's server,
    with one PNG per payload set beside bench.json."""
    from . import open_loop

    settings = options.settings
    output = Path(options.output)
    tick = step(f"capacity: open loop (LoadGen Server), p99 <= {settings.slo_ms:g} ms, "
                f"{', '.join(settings.capacity_sets)}", len(settings.capacity_sets))
    lines: list[str] = []

    def progress(line: str) -> None:
        lines.append(line)
        if not line.startswith("  "):
            tick(0)

    with tempfile.TemporaryDirectory(prefix="mmrec-capacity-") as workdir:
        data = open_loop.run_capacity(Path(options.repository), settings, server().urls["grpc"], Path(workdir),
                                      progress)
    for name, result in data["sets"].items():
        result["plot"] = open_loop.plot_capacity(result, output / f"capacity_{name}.png",
                                                 f"item_encoder open loop, {name}").name
    data["log"] = lines
    return data


def overload_section(options: BenchOptions, results: dict, step: Step) -> dict:
    """Admission under overload (benchmarks/overload.py) on a server of its own, from the
    capacity section's first payload set."""
    from . import open_loop, overload

    settings = options.settings
    capacity = results["sections"].get("capacity") or {}
    if capacity.get("status") != "ok":
        raise SectionSkipped("needs the capacity section (the policy and the load derive from it)")
    name = settings.capacity_sets[0]
    tick = step(f"overload: {', '.join(f'{f:g}x' for f in settings.overload_factors)} capacity ({name}) with "
                "admission, soak, spill-over pair", len(settings.overload_factors) * settings.overload_rounds + 2
                + (settings.overload_pair_rounds + 2 if settings.overload_pair_rounds else 0))
    lines: list[str] = []

    def progress(line: str) -> None:
        lines.append(line)
        if "round" in line or line.startswith(("recovery", "soak", "replica")):
            tick(1)

    pair = {"rounds": settings.overload_pair_rounds, "round_s": settings.overload_pair_round_s,
            "search_step_s": settings.overload_pair_search_step_s,
            "search_steps": settings.overload_pair_search_steps} if settings.overload_pair_rounds else None

    with tempfile.TemporaryDirectory(prefix="mmrec-overload-") as workdir:
        data = overload.overload_section(
            Path(options.repository), capacity["sets"][name], settings.slo_ms,
            open_loop.payload_sets(Path(options.repository))[name], Path(workdir),
            factors=settings.overload_factors, rounds=settings.overload_rounds, round_s=settings.overload_round_s,
            recovery_s=settings.overload_recovery_s, running_server=serving.running_server, progress=progress,
            soak_s=settings.overload_soak_s, pair=pair)
    data["payloads"] = name
    data["log"] = lines
    return data


def write_reports(results: dict, output: Path) -> dict:
    """Targets, plots, bench.json and summary.md from measured results."""
    results["targets"] = targets.evaluate(results)
    results["plots"] = plots.write_plots(results, output)
    results["files"] = {"json": report.JSON_FILE, "markdown": report.MARKDOWN_FILE}
    report.write_json(results, output)
    report.write_markdown(results, output)
    return results


def rerender(output: Path) -> dict:
    """Rebuild the reports of an earlier run (after a change to how numbers are judged or
    shown) from its bench.json, without measuring anything again; the file records it."""
    output = Path(output)
    results = json.loads((output / report.JSON_FILE).read_text())
    add_ratios((results["sections"].get("offline") or {}).get("records", []))
    results["rerendered"] = {"at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                             "git": machine.git_commit()}
    if "machine" in results:  # re-judged from the recorded loads and busy probes
        results["contended"] = _contended(results)
    return write_reports(results, output)


def _manifest_info(repository: Path) -> dict:
    from .engines import load_manifest

    manifest = load_manifest(repository)
    if manifest is None:  # a hand-made repository: nothing recorded
        return {"target": None, "served_variants": {}, "dataset_sha256": None, "export_versions": None}
    return {"target": manifest.target, "served_variants": manifest.served_variants(),
            "dataset_sha256": manifest.inputs.dataset.sha256, "export_versions": manifest.versions}
