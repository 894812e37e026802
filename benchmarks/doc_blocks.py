"""Every measured number in README.md and docs/*.md is rendered here from a committed results file.

A *doc block* is a named region between two HTML-comment markers in a markdown file. The
registry `BLOCKS` maps each name to the results files it is rendered from (paths relative to the
repository root, committed under benchmarks/results/) and to its render function; blocks that a
test run writes (the bad-input matrix) are registered without one. Outside blocks, prose may
interpret numbers but carries none: `typed_numbers` flags measurement-looking numbers (ms, ×,
items/s, MiB, %, cosines, …) there, with a small explicit allow-list for settings that look like
measurements. tests/test_doc_blocks.py re-renders every block and runs the scan.

    python -m mmrec.benchmarks.doc_blocks render            # rewrite the blocks (README.md, docs/*.md,
                                                            # benchmarks/results/README.md); `make docs`
    python -m mmrec.benchmarks.doc_blocks check             # stale blocks and typed numbers; exit 1 if any
    python -m mmrec.benchmarks.doc_blocks record-export REPO  # commit an export's manifest as a result

New blocks: write a function from the parsed sources to markdown and register it with
`@doc_block(name, sources=..., regenerate=...)`; put `<!-- doc-block:NAME -->` and
`<!-- /doc-block:NAME -->` where it goes, then `render`.
"""
from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from mmrec.export import report as export_report
from mmrec.export.manifest import MANIFEST_FILE

from . import hpa_selectors, index_scan
from . import report as bench_report
from .machine import BUSY_MIN_SHARE, REPO_ROOT, RunStart, write_results

RESULTS = "benchmarks/results"
BENCH_JSON = f"{RESULTS}/bench.json"
REPEAT_JSON = f"{RESULTS}/repeat/bench.json"  # the second full run on the same commit and machine
EXPORT_RECORD = f"{RESULTS}/export/export_report.json"
ABLATION_JSON = f"{RESULTS}/fusion_ablation.json"
CROSS_CPU_JSON = f"{RESULTS}/cross_cpu_training.json"
RUNTIMES_JSON = f"{RESULTS}/runtimes/runtimes.json"
INDEX_JSON = f"{RESULTS}/index/index_scan.json"
MODEL_ANALYZER_JSON = f"{RESULTS}/model_analyzer/model_analyzer.json"
HPA_CALIBRATION_JSON = f"{RESULTS}/hpa_calibration/hpa_calibration.json"  # benchmarks/hpa_calibration.py
CHART_VALUES = "deploy/helm/mmrec/values-cpu.yaml"  # its items/s autoscaling target is a generated block
GPU_CHART_VALUES = "deploy/helm/mmrec/values.yaml"  # checked like values-cpu.yaml; ships no measured target
# every results file the docs render from, with the command that re-measures it
RESULTS_FILES = {
    BENCH_JSON: "make bench",
    REPEAT_JSON: "make bench-repeat",
    EXPORT_RECORD: "mmrec export; python -m mmrec.benchmarks.doc_blocks record-export REPOSITORY",
    ABLATION_JSON: "python -m mmrec.benchmarks.fusion_ablation",
    CROSS_CPU_JSON: "python -m mmrec.benchmarks.cross_cpu_training dump / train / compare",
    RUNTIMES_JSON: "python -m mmrec.benchmarks.runtimes --fp32 FP32_REPO --tuned TUNED_REPO",
    INDEX_JSON: "mmrec bench-index --output benchmarks/results/index",
    MODEL_ANALYZER_JSON: "make model-analyzer",
    HPA_CALIBRATION_JSON: ("python -m mmrec.benchmarks.hpa_calibration --serve --repository REPOSITORY "
                           f"--values deploy/helm/mmrec/values-cpu.yaml --output {HPA_CALIBRATION_JSON}"),
}


def config_files(root: Path = REPO_ROOT) -> list[Path]:
    """Configuration that carries a measured figure in a generated block (rendered and checked
    like the docs; not scanned for typed numbers: settings are numbers)."""
    return [root / CHART_VALUES, root / GPU_CHART_VALUES]


def doc_files(root: Path = REPO_ROOT) -> list[Path]:
    """The files whose numbers must trace to results: README.md, docs/*.md and the index of the
    results themselves (benchmarks/results/README.md)."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md")), root / RESULTS / "README.md"]


# ------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class DocBlock:
    """One generated region: its markers, the results files it is rendered from, and how."""

    name: str
    sources: tuple[str, ...]
    render: Callable[..., str] | None  # parsed sources (in order) -> markdown; None: written by a test run
    regenerate: str  # the command that rewrites it
    begin: str
    end: str

    def render_from(self, root: Path = REPO_ROOT) -> str:
        if self.render is None:
            raise ValueError(f"block {self.name!r} is written by `{self.regenerate}`, not rendered from results")
        missing = [s for s in self.sources if not (root / s).is_file()]
        if missing:
            raise FileNotFoundError(f"block {self.name!r}: results file(s) {missing} not found; "
                                    f"produce and commit them first ({self.regenerate})")
        return self.render(*(json.loads((root / s).read_text()) for s in self.sources)).strip("\n")


BLOCKS: dict[str, DocBlock] = {}


def doc_block(name: str, *, sources: Sequence[str], regenerate: str, begin: str | None = None,
              end: str | None = None) -> Callable[[Callable[..., str]], Callable[..., str]]:
    """Register a render function as block `name` (markers `<!-- doc-block:NAME -->` ...
    `<!-- /doc-block:NAME -->` unless the block predates the registry and keeps its own)."""
    def register(render: Callable[..., str]) -> Callable[..., str]:
        _register(DocBlock(name, tuple(sources), render, regenerate, begin or f"<!-- doc-block:{name} -->",
                           end or f"<!-- /doc-block:{name} -->"))
        return render
    return register


def _register(block: DocBlock) -> None:
    if block.name in BLOCKS:
        raise ValueError(f"doc block {block.name!r} registered twice")
    BLOCKS[block.name] = block


# The matrix of docs/reliability.md is written by the bad-input tests against a live server.
_register(DocBlock("bad-input-matrix", (), None, "MMREC_WRITE_RELIABILITY_DOC=1 pytest tests/test_bad_inputs.py",
                   "<!-- BEGIN bad-input matrix (generated) -->", "<!-- END bad-input matrix -->"))


@dataclass(frozen=True)
class Found:
    block: DocBlock
    body: str  # what lies between the markers now, without the newlines next to them
    start: int  # offsets of the body in the file's text
    stop: int


def blocks_in(text: str, where: str = "") -> list[Found]:
    """Every registered block in `text`; a begin marker without its end (or nested) is an error."""
    found = []
    for block in BLOCKS.values():
        offset = 0
        while (i := text.find(block.begin, offset)) >= 0:
            j = text.find(block.end, i + len(block.begin))
            if j < 0:
                raise ValueError(f"{where}: {block.begin} has no {block.end}")
            start, stop = i + len(block.begin), j
            line = text.rfind("\n", start, j) + 1
            if line and not text[line:j].strip(" \t"):  # an indented end marker (YAML) keeps its indentation
                stop = line
            found.append(Found(block, text[start:stop].strip("\n"), start, stop))
            offset = j + len(block.end)
    found.sort(key=lambda f: f.start)
    for a, b in zip(found, found[1:]):
        if b.start < a.stop:
            raise ValueError(f"{where}: blocks {a.block.name!r} and {b.block.name!r} overlap")
    return found


def stale_blocks(path: Path, root: Path = REPO_ROOT) -> list[tuple[str, str, str]]:
    """(name, in the file, rendered now) for every rendered block of `path` that differs."""
    text = Path(path).read_text()
    return [(f.block.name, f.body, rendered) for f in blocks_in(text, str(path)) if f.block.render is not None
            and (rendered := f.block.render_from(root)) != f.body]


def rewrite(path: Path, root: Path = REPO_ROOT) -> list[str]:
    """Re-render every rendered block of `path` from its committed results; the names changed."""
    path = Path(path)
    text = path.read_text()
    changed, pieces, last = [], [], 0
    for f in blocks_in(text, str(path)):
        if f.block.render is None:
            continue
        rendered = f.block.render_from(root)
        if rendered != f.body:
            changed.append(f.block.name)
        pieces += [text[last:f.start], f"\n{rendered}\n"]
        last = f.stop
    new = "".join(pieces) + text[last:]
    if new != text:
        path.write_text(new)
    return changed


# ------------------------------------------------------------------------- provenance lines


def origin(record: dict) -> dict:
    """Commit, dirty flag, CPU and time of a results file, from its `provenance` (or the fields
    files written before it carried one); for a recorded export, the commit its manifest's
    `build` names."""
    prov = record.get("provenance") or {}
    build = (record.get("manifest") or {}).get("build")  # an export: the tree that built it
    git = build or prov.get("git") or record.get("git") or record.get("commit") or {}
    machine = prov.get("machine") or record.get("machine") or {}
    cpu = machine.get("cpu") if isinstance(machine, dict) else None
    return {"commit": git.get("commit") if isinstance(git, dict) else None,
            "dirty": git.get("dirty") if isinstance(git, dict) else None,
            "cpu": (cpu or {}).get("model") or record.get("cpu"),
            "cores": (cpu or {}).get("usable_cores"),
            "when": prov.get("finished") or record.get("started_at")}


def _commit(git: dict) -> str:
    tree = {True: "uncommitted changes", False: "clean tree", None: "tree state unknown"}[git.get("dirty")]
    return f"commit `{git['commit'][:12]}` ({tree})" if git.get("commit") else "**commit not recorded**"


def source_line(path: str, record: dict) -> str:
    o = origin(record)
    commit = _commit(o)
    if "manifest" in record and not record["manifest"].get("build"):  # an export from before `build`
        recorded = (record.get("provenance") or {}).get("git") or {}
        commit = "**export commit not recorded** (its manifest predates `build`)" + (
            f"; recorded at {_commit(recorded)}" if recorded.get("commit") else "")
    cpu = ", ".join(str(x) for x in (o["cpu"], o["cores"] and f"{o['cores']} usable cores") if x) or "machine not recorded"
    return f"`{path}`: {commit}; {cpu}" + (f"; {o['when']}" if o["when"] else "")


def rendered_from(*sources: tuple[str, dict]) -> list[str]:
    lines = ["Rendered from committed results by `python -m mmrec.benchmarks.doc_blocks render`; do not edit by hand.", ""]
    return lines + [f"- {source_line(path, record)}" for path, record in sources] + [""]


def _ci(ci: Sequence[float] | None) -> str:
    return f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


# --------------------------------------------------------------------------------- renderers


@doc_block("bench", sources=(BENCH_JSON,), regenerate="make bench (mmrec bench --readme README.md)",
           begin=bench_report.README_START, end=bench_report.README_END)
def bench_block(results: dict) -> str:
    return bench_report.readme_block(results, BENCH_JSON)


@doc_block("overload", sources=(BENCH_JSON,), regenerate="make bench")
def overload_block(results: dict) -> str:
    """docs/reliability.md's overload figures: the admission policy, what 1.5x and 2x capacity
    did to the admitted, the shed and the recovery, and the overload targets."""
    detail = bench_report.overload_detail(results)
    if not detail:
        return "\n".join(rendered_from((BENCH_JSON, results))) + "\nThe committed run has no overload section."
    rows = [[t["description"], t["threshold"], t["measured"], t["verdict"]]
            for t in results.get("targets", []) if t["id"].startswith("overload.")]
    return "\n".join(rendered_from((BENCH_JSON, results)) + detail + [""] + bench_report._table(
        ["overload target", "threshold", "measured", "verdict"], rows))


@doc_block("bench-reproducibility", sources=(BENCH_JSON, REPEAT_JSON), regenerate="make bench; make bench-repeat")
def reproducibility_block(first: dict, second: dict) -> str:
    """Per headline figure, both runs' 95 % intervals and whether they overlap."""
    from . import reproducibility

    return "\n".join(rendered_from((BENCH_JSON, first), (REPEAT_JSON, second))) + "\n" + reproducibility.markdown(
        reproducibility.compare(first, second))


@doc_block("export-report", sources=(EXPORT_RECORD, ABLATION_JSON),
           regenerate="mmrec export; python -m mmrec.benchmarks.doc_blocks record-export REPOSITORY",
           begin=export_report.BEGIN, end=export_report.END)
def export_block(record: dict, ablation: dict) -> str:
    lines = rendered_from((EXPORT_RECORD, record), (ABLATION_JSON, ablation))
    return "\n".join(lines) + "\n" + export_report.render(record["manifest"], ablation)


@doc_block("cross-cpu-training", sources=(CROSS_CPU_JSON,),
           regenerate="python -m mmrec.benchmarks.cross_cpu_training train/compare (module docstring)")
def cross_cpu_block(result: dict) -> str:
    machines = [f"{m['cpu']}" + (" (AMX)" if m.get("amx") else "") for m in result["machines"]]
    seeds = len(result["machines"][0]["seeds"])
    loss = max((d["loss_rel_diff"] for d in result["per_seed_difference"]), default=float("nan"))
    return "\n".join([
        *rendered_from((CROSS_CPU_JSON, result)),
        f"Fusion training on {' and '.join(machines)}, same saved features, {seeds} seeds: largest held-out "
        f"macro-F1 difference {result['max_macro_f1_difference_points']:.2f} points, largest relative difference "
        f"of the final loss {loss:.0e}."])


RUNNER_TITLES = {"int8": "ORT INT8", "openvino-fp32": "OpenVINO FP32", "openvino-int8": "OpenVINO INT8",
                 "openvino-bf16": "OpenVINO BF16", "pytorch-fp32": "PyTorch FP32",
                 "pytorch-bf16-autocast": "PyTorch BF16 autocast"}
ARM_TITLES = {"ort-fp32-padded": "ORT FP32, batch padded to the longest text (before)",
              "ort-fp32": "ORT FP32, text rows at their own length bucket",
              "tuned": "tuned"}
FLAG_NAMES = ("avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def _not_run(reason: str) -> str:
    if reason.startswith("failed its gate"):
        return "gate failed at export"
    if "BF16" in reason:
        return "no native BF16 on this CPU"
    return reason


def _ratio_cell(case: dict) -> str:
    if "ratio_vs_ort_fp32" in case:  # a runtimes.json from before the paired speed-ups
        cell = f"{case['ratio_vs_ort_fp32']:.2f}{_ci(case.get('ci95'))}"
        return f"**{cell}**" if case.get("ci95") and case["ci95"][1] < 1 else cell
    cell = f"{case['speedup']:.2f}×{bench_report._ci(case['interval'])}"
    return f"**{cell}**" if case.get("faster") == "met" else cell


def _speedup_cell(s: dict) -> str:
    return f"{s['speedup']:.2f}×" + (_ci(s.get("ci95")) if "ci95" in s else bench_report._ci(s.get("interval")))


@doc_block("runtimes", sources=(RUNTIMES_JSON,),
           regenerate="python -m mmrec.benchmarks.runtimes --fp32 FP32_REPO --tuned TUNED_REPO")
def runtimes_block(result: dict) -> str:
    cpu = result["machine"]["cpu"]
    flags = ", ".join(f for f in FLAG_NAMES if cpu["flags"].get(f)) or "no AVX-512, VNNI, BF16 or AMX"
    start, end = result.get("start") or {}, result.get("end") or {}
    shares = [s for s in (start.get("cpu_share"), end.get("cpu_share")) if s is not None]
    lines = rendered_from((RUNTIMES_JSON, result))[:-1]
    lines += [f"- machine: {cpu['model']}, {cpu['usable_cores']} usable cores; {flags}; load average start "
              f"{start.get('loadavg')}, end {end.get('loadavg')}; busy-probe share start {start.get('cpu_share')}, "
              f"end {end.get('cpu_share')}"
              + (f" — **contended** (share below {BUSY_MIN_SHARE}): only the interleaved ratios mean anything"
                 if shares and min(shares) < BUSY_MIN_SHARE else ""), ""]
    offline = result["offline"]
    columns = [r for r in RUNNER_TITLES if any(r in m["runners"] or r in m.get("not_run", {}) for m in offline.values())]
    rows = []
    for member, m in offline.items():
        for case in m["runners"]["fp32"]["cases"]:
            label = f"{member} {case.replace('batch=', 'b=')}"
            if member == "text_encoder" and case != "batch=1":
                label += f" (≤ {result['text_tokens_batch']} tokens)"
            row = [label]
            for runner in columns:
                if runner in m["runners"]:
                    row.append(_ratio_cell(m["runners"][runner]["cases"][case]))
                else:
                    row.append(_not_run(m.get("not_run", {}).get(runner, "not run")))
            rows.append(row)
    rounds = {m["rounds"] for m in offline.values()}
    paired = any("aa" in m for m in offline.values())
    lines += ([f"Speed-up over ORT FP32 per encoder ({', '.join(map(str, sorted(rounds)))} interleaved rounds, "
               "paired by round, [95 % interval over rounds]; **bold**: the whole interval above 1):", ""] if paired else
              [f"Latency / ORT FP32 per encoder (median of {', '.join(map(str, sorted(rounds)))} interleaved rounds, "
               "[bootstrap 95 % interval]; **bold**: the whole interval below 1):", ""])
    lines += bench_report._table(["encoder, case", *[RUNNER_TITLES[c] for c in columns]], rows)
    cosines = [f"{member} {RUNNER_TITLES.get(runner, runner)} {r['cosine_vs_ort_fp32']['mean']:.4f} / "
               f"{r['cosine_vs_ort_fp32']['min']:.4f}"
               for member, m in offline.items() for runner, r in m["runners"].items()
               if r.get("cosine_vs_ort_fp32") and r["cosine_vs_ort_fp32"]["min"] < 1]
    if cosines:
        lines += ["Output cosine to ORT FP32 (mean / min) where it is not 1: " + "; ".join(cosines) + ".", ""]
    aa = [f"{view} {a['arm']}: {a['why']}" for view, a in
          [*((m, o.get("aa")) for m, o in offline.items()), *((v, (result.get(v) or {}).get("aa"))
                                                            for v in ("pipeline", "served"))] if a]
    if aa:
        lines += ["A/A arms (the reference against itself, interleaved like every arm): " + "; ".join(aa) + ".", ""]
    served = result.get("served")
    if served:
        choice = ", ".join(f"{k} {v}" for k, v in (result.get("tuned_choice") or {}).items())
        lines += [f"Served item path (`item_encoder`, one request of {served['batch']} items, "
                  f"{served['samples_per_arm']} requests per arm, each arm its own Triton, requests alternating):", ""]
        speedups = served["speedups"]
        rows = []
        for arm in ARM_TITLES:
            title = ARM_TITLES[arm] + (f" ({choice})" if arm == "tuned" and choice else "")
            if arm == "ort-fp32-padded":
                cell = "1"
            else:
                cell = _speedup_cell(speedups[f"{arm}_over_ort-fp32-padded"])
                if arm == "tuned" and "tuned_over_ort-fp32" in speedups:
                    cell += f" ({_speedup_cell(speedups['tuned_over_ort-fp32'])} over bucketed FP32)"
            rows.append([title, f"{served['median_ms'][arm]:.0f} ms", cell])
        lines += bench_report._table(["arm", "p50", "speed-up"], rows)
    padding = (result.get("pipeline") or {}).get("padding")
    if padding:
        lines += [f"Text tokens in that batch: {padding['real_tokens']} real; computed {padding['computed_padded']} "
                  f"when padded to the longest, {padding['computed_bucketed']} at their length buckets."]
    return "\n".join(lines)


@doc_block("catalog-scan", sources=(INDEX_JSON,), regenerate="mmrec bench-index --output benchmarks/results/index")
def catalog_scan_block(result: dict) -> str:
    cpu = result["cpu"]
    m = result["machine"]
    shares = [c.get("cpu_share_start") for c in result["catalogs"] if c.get("cpu_share_start") is not None]
    lines = rendered_from((INDEX_JSON, result))[:-1]
    lines += [f"- machine: {cpu['model']}, {result['threads']} threads; load average start {m.get('loadavg_start')}, "
              f"end {m.get('loadavg_end')}; busy-probe share before each catalog {shares}"
              + (f" — **contended** (share below {BUSY_MIN_SHARE}): the paired ratios are the fair ones"
                 if shares and min(shares) < BUSY_MIN_SHARE else ""),
              f"- {result['dim']}-d synthetic unit vectors, top-{result['k']}, served code (`catalog_scorer` model.py), "
              "exactness against numpy checked first", ""]
    return "\n".join(lines + index_scan.result_lines(result))


# The capacity model's worked example: the ramp and the peak are the reader's assumptions, named
# here once; the capacity is bench.json's open-loop figure (capacity at the p99 bound).
ASSUMED_SCALE_UP_MIN = 2.5  # T_up on a warm node
ASSUMED_GROWTH_PER_MIN = 0.10  # g: steepest load ramp, fraction per minute
ASSUMED_PEAK_ITEMS_S = 200  # λ
CAPACITY_SET = "jpeg_640x427"  # the payload set the items target is sized on (phone photos shown beside)


def headroom() -> float:
    """u ≤ 1 / (1 + g · T_up): the share of capacity a replica may run at while a new one starts."""
    return 1 / (1 + ASSUMED_GROWTH_PER_MIN * ASSUMED_SCALE_UP_MIN)


def planning_capacity(results: dict, payload_set: str = CAPACITY_SET) -> tuple[float, dict] | None:
    """X: the low end of the open-loop capacity interval over trials (the median with one
    trial), in items/s, and the set's record; None when the run has no capacity section."""
    section = (results["sections"].get("capacity") or {}).get("sets") or {}
    result = section.get(payload_set)
    if not result or not result.get("median_qps"):
        return None
    low = (result.get("interval") or {}).get("low")
    return (low if low is not None else result["median_qps"]), result


@doc_block("capacity-example", sources=(BENCH_JSON,), regenerate="make bench")
def capacity_block(results: dict) -> str:
    section = results["sections"].get("capacity") or {}
    lines = rendered_from((BENCH_JSON, results))
    planned = planning_capacity(results)
    if planned is None:
        return "\n".join(lines + ["The committed bench.json has no open-loop capacity section."])
    cpu = results["machine"]["cpu"]
    slo = section["slo_ms"]
    lines += [f"One replica of the {results.get('repository_manifest', {}).get('target', '?')} target "
              f"(`{section['model']}`, 1 item per request, gRPC) on {cpu['model']}, {cpu['usable_cores']} usable cores "
              "shared with the load generator; open-loop Poisson load from MLPerf LoadGen, capacity = the highest rate "
              f"whose p99 (from the scheduled send time) stays ≤ {slo:g} ms with no failed request"
              + (" — **contended run**" if results.get("contended") else "") + ":", ""]
    rows = []
    for name, r in section["sets"].items():
        iv = r.get("interval") or {}
        rows.append([f"{name} ({r.get('unit', 'items/s')})", ", ".join(f"{c:.1f}" for c in r["capacity_qps"]),
                     f"{r['median_qps']:.1f}",
                     f"[{iv['low']:.1f}, {iv['high']:.1f}] ({100 * iv['coverage']:.0f} %)"
                     if iv.get("low") is not None and iv.get("n", 0) > 1 else "one trial"])
    lines += bench_report._table(["payloads (unit)", "capacity per trial", "median", "interval over trials"], rows)
    x, _ = planned
    u = headroom()
    target = u * x
    replicas = math.ceil(ASSUMED_PEAK_ITEMS_S / target) + 1
    lines += [f"- `X_B` (items/s at p99 ≤ B = {slo:g} ms, {CAPACITY_SET}, low end of the interval): **{x:.1f}**.",
              f"- `u`: with `T_up` = {ASSUMED_SCALE_UP_MIN} min (warm node, assumed) and `g` = "
              f"{ASSUMED_GROWTH_PER_MIN:.0%}/min (assumed), `u ≤ 1 / (1 + g · T_up)` = **{u:.2f}**.",
              f"- HPA items target `u · X_B`: {u:.2f} × {x:.1f} ≈ **{target:.0f} items/s** (the chart's "
              "`values-cpu.yaml` carries it, generated from the same file).",
              f"- With an assumed peak `λ` = {ASSUMED_PEAK_ITEMS_S} items/s: `N = ceil(λ / (u · X_B)) + 1` = "
              f"**{replicas}** replicas."]
    return "\n".join(lines)


@doc_block("chart-items-target", sources=(BENCH_JSON,), regenerate="make bench",
           begin="# doc-block:chart-items-target", end="# /doc-block:chart-items-target")
def chart_items_target(results: dict) -> str:
    """The CPU chart's items/s autoscaling target: u · X from the committed open-loop capacity."""
    planned = planning_capacity(results)
    if planned is None:
        raise ValueError(f"{BENCH_JSON} has no open-loop capacity section: the chart's target cannot be rendered")
    x, _ = planned
    o = origin(results)
    slo = results["sections"]["capacity"]["slo_ms"]
    return "\n".join([
        "    # Generated by `python -m mmrec.benchmarks.doc_blocks render` from benchmarks/results/bench.json",
        f"    # (commit {(o['commit'] or '?')[:12]}, {o['cpu']}, {o['cores']} cores): u * X in items/s, X = {x:.1f} items/s",
        f"    # at p99 <= {slo:g} ms under open-loop load (low end of the interval over trials, {CAPACITY_SET},",
        f"    # one portable-target replica), u = {headroom():.2f} (docs/deployment.md, \"Capacity model\"). A lower",
        "    # bound for this 4-8 CPU onnxruntime pod: it scales out early, never late. Re-measure on your nodes:",
        "    # python -m mmrec.benchmarks.hpa_calibration against one of them prints u * X. The HPA acts",
        "    # past 1.1 x this target (its tolerance).",
        "    - name: triton_items_per_second",
        *_models_yaml(hpa_selectors.by_target(hpa_selectors.item_counters)),
        f"      averageValue: \"{max(1, round(headroom() * x))}\""])


def _models_yaml(by_target: dict[str, tuple[str, ...]]) -> list[str]:
    """A podsMetrics entry's `models` map (the chart picks the list of its model.target)."""
    return ["      models:", *(f"        {t}: [{', '.join(m)}]" for t, m in by_target.items())]


@doc_block("hpa-calibration", sources=(HPA_CALIBRATION_JSON,), regenerate=RESULTS_FILES[HPA_CALIBRATION_JSON])
def hpa_calibration_block(record: dict) -> str:
    """The reference calibration: each adapter signal at fractions of X, and the targets it gives."""
    lines = rendered_from((HPA_CALIBRATION_JSON, record))
    names = [r["name"] for r in record["recommendations"]]
    shares = [v for v in ((record.get("provenance") or {}).get("cpu_share") or {}).values() if v is not None]
    if shares and min(shares) < BUSY_MIN_SHARE:
        lines += [f"**Contended run** (this process got a {min(shares):.2f} share of the cores at one end, below "
                  f"{BUSY_MIN_SHARE}): other work shared the machine, so X is low; the curves are what the "
                  "defaults are read from, relative to that X.", ""]
    source = (record.get("capacity") or {}).get("from")
    variants = record["replica"].get("served_variants") or {}
    serving = (" serving " + ", ".join(f"{m} {v}" for m, v in variants.items())) if variants else ""
    lines += [f"One {record['replica']['target']}-target replica{serving}, open-loop Poisson load (MLPerf LoadGen) on "
              f"`{record['payload_set']}`: X = **{record['capacity_qps']:.1f} items/s** at p99 ≤ {record['slo_ms']:g} ms "
              f"(low end of the interval over trials{f', from `{source}`' if source else ''}), "
              f"u = {record['headroom_u']:.2f}; each signal as the adapter "
              "computes it over a window of steady load (`benchmarks/hpa_signals.py`), the busy fraction's exact "
              "value (statistics API, each batch once) beside it:", ""]
    busy_models = sorted({m for r in record["fractions"] for m in r["busy_per_model"]})

    def exact(row: dict) -> str:
        pairs = [row["busy_per_model"][m] for m in busy_models if m in row["busy_per_model"]]
        values = [p["exact"] for p in pairs if p["exact"] is not None]
        return f"{max(values):.2f}" if values else "n/a"

    rows = [["idle", "0", "—", *(f"{record['idle']['signals'].get(n, 0.0):.2f}" for n in names),
             exact(record["idle"])]]
    for r in record["fractions"]:
        p99 = r["latency_ms"].get("p99")
        rows.append([f"{r['fraction']:.2f} · X", f"{r['offered_qps']:.1f}", "n/a" if p99 is None else f"{p99:.0f}",
                     *(f"{r['signals'].get(n, 0.0):.2f}" for n in names), exact(r)])
    lines += bench_report._table(["load", "offered items/s", "p99 ms", *(f"`{n}`" for n in names),
                                  "busy, exact (max over models)"], rows)
    missed = [r["fraction"] for r in record["fractions"] if r["fraction"] < 1
              and (r["latency_ms"].get("p99") or 0) > record["slo_ms"]]
    if missed and source:
        lines += [f"At {', '.join(f'{f:.2f} · X' for f in missed)} this run's p99 was above the bound that X was "
                  f"measured at in `{source}`: the replica was slower in this run than in that one (other work on "
                  "the machine between the load-average probes, or a slower commit), so each signal at a "
                  "fraction of that X reads as a slower replica's would.", ""]
    lines += ["Targets it gives (the tool prints them as chart values):", ""]
    lines += bench_report._table(["metric", "target", "from"],
                                 [[f"`{r['name']}`", f"`{r['recommended'] or r['chart_value'] or '—'}`", r["why"]]
                                  for r in record["recommendations"]])
    return "\n".join(lines)


# A pod to scale the catalog numbers to: assumptions, not measurements (named once, shown in the block).
ASSUMED_POD = {"cores": 16, "bandwidth_gbps": 60.0, "peak_gflops": 500.0}
SHARD_BUDGET_MS = 10
BATCH_USERS = index_scan.BATCH_USERS


def _items(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


@doc_block("catalog-capacity", sources=(INDEX_JSON,), regenerate="mmrec bench-index --output benchmarks/results/index")
def catalog_capacity_block(result: dict) -> str:
    d, cats = result["dim"], result["catalogs"]
    bw = [c["bandwidth"]["copy_gbps_best"] for c in cats]
    peaks = [c["gemm"]["peak_gflops"] for c in cats]
    pod_bw, pod_peak = ASSUMED_POD["bandwidth_gbps"], ASSUMED_POD["peak_gflops"]
    one_user = "; ".join(f"{_items(c['items'])} → bound {c['fp32']['bound_one_user_ms']:.1f} ms, p50 "
                         f"{c['fp32']['one_user']['p50_ms']:.1f} ms (paired ×{c['fp32']['one_user_over_bound_paired']:.2f})"
                         for c in cats)
    users = "; ".join(f"{_items(c['items'])} → ~{BATCH_USERS / (c['fp32']['batch']['p50_ms'] / 1e3):.0f} users/s "
                      f"(paired ×{c['fp32']['batch_over_bound_paired']:.2f} of the GEMM bound)" for c in cats)
    largest = cats[-1]
    pss = largest["fp32"]["index_pss_mib"]
    pod_one = "; ".join(f"{_items(c['items'])} → {c['items'] * d * 4 / (pod_bw * 1e9) * 1e3:.1f} ms" for c in cats)
    pod_users = "; ".join(f"{_items(c['items'])} → ~{pod_peak * 1e9 / (2 * c['items'] * d):,.0f}/s" for c in cats)
    rows = [["one user, latency", "`N·D·4 B / bandwidth`",
             f"{min(bw):.0f}–{max(bw):.0f} GB/s copy bandwidth; {one_user}", pod_one],
            ["users/s at full batching", "`GEMM peak / (2·N·D)`",
             f"{min(peaks):.0f}–{max(peaks):.0f} GFLOP/s; batches of {BATCH_USERS}: {users}", pod_users],
            ["memory per replica", "Et (`N·D·4`) + the prepacked copy (`prepacking=auto`, ×2) + touched rows of E; "
             "×2 more for a moment during a swap",
             f"{_items(largest['items'])} items: {pss['Pss_Anon']:.0f} MiB heap + {pss['Pss_File']:.0f} MiB mapped (PSS)",
             "same"]]
    machine_shard = SHARD_BUDGET_MS * 1e-3 * max(bw) * 1e9 / (d * 4)
    pod_shard = SHARD_BUDGET_MS * 1e-3 * pod_bw * 1e9 / (d * 4)
    int8 = [(c["items"], c["reduced_precision"]["int8"]) for c in cats
            if "speedup_vs_fp32_served" in c["reduced_precision"].get("int8", {})]
    lines = rendered_from((INDEX_JSON, result))
    lines += bench_report._table(
        ["quantity", f"formula (D = {d}, fp32)", "this machine (measured)",
         f"a {ASSUMED_POD['cores']}-core pod (assumed: {pod_bw:.0f} GB/s, {pod_peak:.0f} GFLOP/s)"], rows)
    lines += [f"Items per shard at a {SHARD_BUDGET_MS} ms one-user budget (`N = budget · bandwidth / (D · 4 B)`): "
              f"this machine ~{_items(machine_shard)}, the assumed pod ~{_items(pod_shard)} "
              f"(~{_items(4 * pod_shard)} with an INT8 copy, a quarter of the bytes)."]
    if int8:
        lines += ["", "INT8 copy of Et + exact float64 re-rank of the best candidates (benchmark graphs, not served): "
                  + "; ".join(f"{_items(n)}: {r['speedup_vs_fp32_served']:.1f}× the served fp32 scan, raw top-"
                              f"{result['k']} overlap {r['overlap_at_k_raw']:.3f}, after re-rank "
                              f"{r['overlap_at_k_after_exact_rerank']:.3f}" for n, r in int8) + "."]
    return "\n".join(lines)


@doc_block("results-provenance", sources=tuple(RESULTS_FILES),
           regenerate="python -m mmrec.benchmarks.doc_blocks render")
def provenance_block(*records: dict) -> str:
    """Which commit, tree and machine each committed results file comes from."""
    rows = []
    for (path, command), record in zip(RESULTS_FILES.items(), records):
        o = origin(record)
        machines = [m.get("cpu") for m in record.get("machines", [])] or [o["cpu"]]
        if "provenance" in record or any("provenance" in m for m in record.get("machines", [])):
            recorded = "yes"
        elif "git" in record and "command" in record:
            recorded = "its own fields (git, machine, command)"
        else:
            recorded = "no (written before it)"
        rows.append([f"`{path.removeprefix(RESULTS + '/')}`", source_line(path, record).split(": ", 1)[1].split(";")[0],
                     ", ".join(str(m) for m in machines if m) or "not recorded", o["when"] or "not recorded",
                     recorded, f"`{command}`"])
    return "\n".join(bench_report._table(["file", "commit", "machine", "finished", "provenance record", "re-measure"],
                                         rows)).rstrip("\n")


# ------------------------------------------------------------------- record an export's manifest


def record_export(repository: Path, output: Path | None = None, root: Path = REPO_ROOT) -> Path:
    """Commit-ready record of an export: its manifest (with the `build` commit it names) and the
    provenance of this recording (machine, time, command): what README's export block renders."""
    start = RunStart.now()
    manifest = json.loads((Path(repository) / MANIFEST_FILE).read_text())
    return write_results(output or root / EXPORT_RECORD, {"manifest": manifest}, start, indent=1, sort_keys=True)


# ------------------------------------------------------------------------ typed numbers in prose

UNIT = r"(?:\s?(?:–|-|to)\s?\d[\d,.]*)?"  # an optional range: "3.5–4.9"
NUMBER = r"(?<![\w.])[~≈]?\d[\d,]*(?:\.\d+)?" + UNIT
MEASUREMENT_PATTERNS = {
    "latency": re.compile(NUMBER + r"\s?(?:ms|µs|us)\b"),
    # seconds and minutes: decimals, ranges and approximations (a whole "30 s" is usually a setting)
    "seconds": re.compile(r"(?<![\w.])[~≈]?\d+\.\d+\s?(?:s|min)\b|(?<![\w.])[~≈]?\d+\s?(?:–|-)\s?\d+(?:\.\d+)?\s?(?:s|min)\b"
                          r"|[~≈]\s?\d+\s?(?:s|min)\b"),
    "rate": re.compile(NUMBER + r"\s?(?:items|requests|req|users|samples|infer|calls|queries|inferences)/s\b"),
    "bandwidth": re.compile(NUMBER + r"\s?(?:GFLOP|TFLOP|GB|MB|GiB|MiB)/s\b"),
    "memory": re.compile(NUMBER + r"\s?(?:KB|MB|GB|TB|KiB|MiB|GiB|TiB)\b(?!/s)"),
    "speed-up": re.compile(NUMBER + r"\s?×(?!\s?\d)|×\s?\d+\.\d+|" + NUMBER + r"\s?x\s(?:faster|slower|speed)"),
    "percent": re.compile(NUMBER + r"\s?%(?!\s?(?:bootstrap|confidence|interval|CI))"),
    "quality": re.compile(r"\b(?:cosine|cos|F1|AUC|accuracy|R@1|top-10|agreement|overlap|recall)\s+(?:of\s+)?"
                          r"[~≈]?0\.\d+|\d\.\d+\s?→\s?\d\.\d+"),
    "table-value": re.compile(r"\|\s*[~≈]?\d+\.\d+(?:\s*/\s*\d+\.\d+)?\s*(?=\|)"),
}
# Numbers that look like measurements but are settings, thresholds or facts of the code; each
# entry names the file, the exact phrase, and why it may stay.
ALLOWED_PHRASES: dict[tuple[str, str], str] = {
    ("README.md", "at 1.5× and 2× capacity"): "the loads the overload section offers (settings.overload_factors)",
    ("docs/reliability.md", "(10 % of its requests"): "the client's RetryBudget default (a setting)",
    ("docs/deployment.md", "±10 % jitter"): "Triton's fixed jitter of the gRPC connection age",
    ("docs/deployment.md", "30–150 s"): "derived from the chart's scrape interval, rate window and HPA sync (configuration)",
    ("docs/reliability.md", "defaults 16 MiB, 40 M pixels, 16 KiB, 32"): "the export's default request limits",
    ("docs/reliability.md", "50 % item_encoder, 30 % interest_scorer, 20 % item_encoder_pixels"): "the load test's request mix",
    ("docs/reliability.md", "20 % long texts"): "the load test's request mix",
    ("docs/reliability.md", "at most 10 %"): "the load test's RSS-growth bound (a setting)",
    ("docs/reliability.md", "loosely (25 %)"): "the CI load test's RSS-growth bound (a setting)",
    ("docs/reliability.md", "25 KB per request"): "what the 10 % bound implies for a leak (arithmetic on settings)",
}


@dataclass(frozen=True)
class TypedNumber:
    file: str
    line: int
    kind: str
    text: str
    context: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.kind} {self.text!r} in: {self.context.strip()[:140]}"


CODE_SPAN = re.compile(r"``[^`]+``|`[^`]*`")
HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of the lines a person typed: outside doc blocks, fenced code and HTML
    comments, with inline code spans blanked (code and config values are literal, not measured)."""
    spans = [(f.start, f.stop) for f in blocks_in(text)]
    masked = list(text)
    for start, stop in spans:
        for i in range(start, stop):
            if masked[i] != "\n":
                masked[i] = " "
    masked_text = HTML_COMMENT.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), "".join(masked))
    fenced = False
    for number, line in enumerate(masked_text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield number, CODE_SPAN.sub(lambda m: " " * len(m.group()), line)


def typed_numbers(path: Path, root: Path = REPO_ROOT) -> list[TypedNumber]:
    """Measurement-looking numbers outside generated blocks, less ALLOWED_PHRASES."""
    path = Path(path)
    rel = path.resolve().relative_to(root.resolve()).as_posix() if path.resolve().is_relative_to(root.resolve()) else path.name
    allowed = [phrase for (file, phrase) in ALLOWED_PHRASES if file == rel]
    found = []
    for number, line in prose_lines(path.read_text()):
        covered = [(m.start(), m.end()) for phrase in allowed for m in re.finditer(re.escape(phrase), line)]
        for kind, pattern in MEASUREMENT_PATTERNS.items():
            for m in pattern.finditer(line):
                if any(a <= m.start() and m.end() <= b for a, b in covered):
                    continue
                found.append(TypedNumber(rel, number, kind, m.group().strip(), line))
    return found


# -------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("render", "check"):
        sub.add_parser(name).add_argument("files", type=Path, nargs="*", help="default: README.md and docs/*.md")
    rec = sub.add_parser("record-export")
    rec.add_argument("repository", type=Path)
    rec.add_argument("--output", type=Path, default=None, help=f"default: {EXPORT_RECORD}")
    args = parser.parse_args(argv)
    if args.command == "record-export":
        print(record_export(args.repository, args.output))
        return 0
    files = args.files or [*doc_files(), *config_files()]
    if args.command == "render":
        for path in files:
            changed = rewrite(path)
            print(f"{path}: {', '.join(changed) if changed else 'up to date'}")
        return 0
    problems = [f"{path}: block {name!r} differs from its results (run `render`)"
                for path in files for name, _, _ in stale_blocks(path)]
    problems += [str(t) for path in files if path.suffix == ".md" for t in typed_numbers(path)]
    print("\n".join(problems) or "every block is up to date and no typed number was found")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
