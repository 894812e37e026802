"""Triton Model Analyzer over the served `item_encoder`: a search of instance counts and queue
delays by NVIDIA's own tool (not a home-made tuner), run against the pip tritonserver in local
launch mode with real items as perf_analyzer input.

Model Analyzer lives in its own virtual environment (`make model-analyzer` creates it: its
pinned dependencies are not mmrec's); this module writes its config and input data, runs it,
and condenses its CSV results into `model_analyzer.json` + `model_analyzer.md` beside the
benchmark.

Model Analyzer copies only the profiled model's folder into its output repository, so it
profiles a copy of the repository in which the merged `item_encoder` names its members' graphs
by absolute path (it reads `../<member>/1/model.onnx` when served normally).

`python -m mmrec.benchmarks.model_analyzer --repository R --model-analyzer .venv-ma/bin/model-analyzer`
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import typer

from mmrec import schema
from mmrec.export.repository import parse, render
from mmrec.layout import RepositoryLayout
from mmrec.server import child_env, find_tritonserver, prepare_backend_dir

from .machine import RunStart, cpu_share, git_commit, loadavg, machine_info, write_results
from .perf_analyzer import locate, write_input_data
from .workload import Workload

MODEL = schema.ITEM_ENCODER
INSTANCE_COUNTS = (1, 2)
QUEUE_DELAYS_US = (0, 2000)
CONCURRENCY = (1, 4, 8, 16)
MEASUREMENT_WINDOW_MS = 3000
DATA_ITEMS = 32
RESULT_COLUMNS = {"Model Config Path": "config", "Concurrency": "concurrency",
                  "Throughput (infer/sec)": "throughput", "p99 Latency (ms)": "p99_ms"}


def profiling_copy(repository: Path, destination: Path) -> Path:
    """The repository with the merged item_encoder's member graphs named by absolute path."""
    if destination.exists():
        shutil.rmtree(destination)
    shutil.copytree(repository, destination)
    config_file = RepositoryLayout(destination).config_file(MODEL)
    config = parse(config_file.read_text())
    for key in config.parameters:
        if key.endswith(".model_file"):
            relative = config.parameters[key].string_value
            config.parameters[key].string_value = str((config_file.parent / relative).resolve())
    config_file.write_text(render(config))
    return destination


def write_config(repository: Path, workdir: Path, input_data: Path) -> Path:
    """Model Analyzer's YAML (JSON is valid YAML): local launch of the pip tritonserver."""
    install = find_tritonserver()
    perf = locate()
    if perf.tool is None:
        raise RuntimeError(perf.reason)
    env = child_env(install)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*map(str, perf.tool.lib_dirs), env["LD_LIBRARY_PATH"]])
    config = {
        "model_repository": str(repository),
        "output_model_repository_path": str(workdir / "output_repository"),
        "override_output_model_repository": True,
        "export_path": str(workdir / "results"),
        "checkpoint_directory": str(workdir / "checkpoints"),
        "triton_launch_mode": "local",
        "triton_server_path": str(install.binary),
        "triton_server_flags": {"backend_directory": str(prepare_backend_dir(install)),
                                "log_verbose": 0},
        "triton_server_environment": {k: env[k] for k in ("LD_LIBRARY_PATH", "PATH", "PYTHONPATH")},
        "perf_analyzer_path": str(perf.tool.binary),
        "perf_analyzer_flags": {"input-data": str(input_data), "measurement-interval": MEASUREMENT_WINDOW_MS},
        "run_config_search_mode": "brute",
        "run_config_search_disable": True,  # the manual grid below
        "collect_cpu_metrics": True,
        "inference_output_fields": ["model_name", "batch_size", "concurrency", "model_config_path",
                                    "instance_group", "satisfies_constraints", "perf_throughput",
                                    "perf_latency_p99"],
        "profile_models": {MODEL: {
            "cpu_only": True,
            "parameters": {"concurrency": list(CONCURRENCY)},
            "model_config_parameters": {
                "instance_group": [[{"kind": "KIND_CPU", "count": n}] for n in INSTANCE_COUNTS],
                "dynamic_batching": {"max_queue_delay_microseconds": list(QUEUE_DELAYS_US)},
            }}},
    }
    path = workdir / "config.yaml"
    path.write_text(json.dumps(config, indent=1))
    return path


def _variant_settings(output_repository: Path, variant: str) -> dict:
    config_file = output_repository / variant / "config.pbtxt"
    if not config_file.is_file():
        return {}
    config = parse(config_file.read_text())
    return {"instances": config.instance_group[0].count if config.instance_group else 1,
            "max_queue_delay_us": config.dynamic_batching.max_queue_delay_microseconds}


def collect(workdir: Path) -> list[dict]:
    """Rows of Model Analyzer's inference-metrics CSV, with each variant's settings."""
    table = next((workdir / "results").rglob("metrics-model-inference.csv"), None)
    if table is None:
        return []
    rows = []
    with table.open() as handle:
        for row in csv.DictReader(handle):
            picked = {name: row.get(column) for column, name in RESULT_COLUMNS.items()}
            for key in ("concurrency", "throughput", "p99_ms"):
                picked[key] = float(picked[key]) if picked.get(key) not in (None, "") else None
            picked.update(_variant_settings(workdir / "output_repository", picked["config"] or ""))
            rows.append(picked)
    return sorted(rows, key=lambda r: (r.get("instances") or 0, r.get("max_queue_delay_us") or 0,
                                       r["concurrency"] or 0))


def markdown(result: dict) -> str:
    lines = [f"# Model Analyzer: `{MODEL}` (instance count × queue delay × concurrency)", "",
             f"- machine: {result['machine']['cpu']['model']}, {result['machine']['cpu']['usable_cores']} "
             f"usable cores; load average start {result['loadavg_start']}, end {result['loadavg_end']}; "
             f"busy-probe share {result['cpu_share_start']}",
             f"- commit `{(result['git'].get('commit') or '?')[:12]}`{' (uncommitted changes)' if result['git'].get('dirty') else ''}",
             f"- command: `{result['command']}`; {result['duration_s']:.0f} s; perf_analyzer window "
             f"{MEASUREMENT_WINDOW_MS} ms on {DATA_ITEMS} real held-out items", "",
             "Model Analyzer profiles its default config and the grid: `item_encoder_config_default` and",
             "the grid's (1 instance, 0 µs) are the same settings, so their two rows show the run-to-run",
             "spread. p99 comes from one perf_analyzer window (a few hundred requests): a maximum-like tail.",
             "",
             "| config | instances | max queue delay µs | concurrency | items/s | p99 ms |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = [f"{r[k]:.1f}" if r.get(k) is not None else "–" for k in ("throughput", "p99_ms")]
        lines.append(f"| {r.get('config', '?')} | {r.get('instances', '?')} | {r.get('max_queue_delay_us', '?')} | {r['concurrency']:.0f} | "
                     + " | ".join(cells) + " |")
    if result.get("best"):
        best = result["best"]
        lines += ["", f"Highest throughput at concurrency {best['concurrency']:.0f}: {best['instances']} instance(s), "
                      f"queue delay {best['max_queue_delay_us']} µs ({best['throughput']:.1f} items/s)."]
    return "\n".join(lines) + "\n"


RESULTS_FILE = "model_analyzer.json"


def save(output: Path, result: dict, start: RunStart) -> Path:
    """model_analyzer.json with its provenance (commit, machine, load before/after, command, times)."""
    return write_results(Path(output) / RESULTS_FILE, result, start, indent=1)


def main(repository: Path = typer.Option(Path("artifacts/repository"), help="An exported portable repository."),
         output: Path = typer.Option(Path("benchmarks/results/model_analyzer"), help="Folder for the summary."),
         model_analyzer: Path = typer.Option(Path(".venv-ma/bin/model-analyzer"), help="model-analyzer executable."),
         workdir: Path = typer.Option(Path("/tmp/mmrec-model-analyzer"), help="Scratch folder (replaced).")) -> None:
    """Profile item_encoder with Model Analyzer and write model_analyzer.json/.md."""
    run_start = RunStart.now()
    started = time.perf_counter()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    copy = profiling_copy(repository, workdir / "repository")
    workload = Workload(repository)
    items = workload.pipeline_input(min(DATA_ITEMS, len(workload.items)))
    data = write_input_data(items.texts, items.images, workdir / "input_data.json")
    config = write_config(copy, workdir, data)
    result = {"command": " ".join(sys.argv), "git": git_commit(), "machine": machine_info(), "loadavg_start": loadavg(),
              "cpu_share_start": cpu_share()}
    print(f"model-analyzer profile: {len(INSTANCE_COUNTS) * len(QUEUE_DELAYS_US)} configs x "
          f"concurrency {list(CONCURRENCY)} (log: {workdir / 'model_analyzer.log'})", flush=True)
    with (workdir / "model_analyzer.log").open("w") as log:
        status = subprocess.run([str(model_analyzer), "profile", "-f", str(config)], stdout=log,
                                stderr=subprocess.STDOUT).returncode
    result.update({"returncode": status, "loadavg_end": loadavg(), "duration_s": time.perf_counter() - started,
                   "rows": collect(workdir)})
    if status != 0 or not result["rows"]:
        tail = (workdir / "model_analyzer.log").read_text()[-3000:]
        raise SystemExit(f"model-analyzer failed (exit {status}); log tail:\n{tail}")
    top = max(CONCURRENCY)
    at_top = [r for r in result["rows"] if r["concurrency"] == top and r["throughput"]]
    result["best"] = max(at_top, key=lambda r: r["throughput"]) if at_top else None
    output.mkdir(parents=True, exist_ok=True)
    for produced in (workdir / "results").rglob("*"):  # Model Analyzer's own CSVs and summary
        if produced.suffix in (".csv", ".pdf", ".html") and produced.is_file():
            shutil.copyfile(produced, output / produced.name)
    save(output, result, run_start)
    (output / "model_analyzer.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    typer.run(main)
