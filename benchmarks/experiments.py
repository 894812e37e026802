"""A/B experiments behind the benchmark report's recommendations (run on demand, not by `mmrec bench`).

    python -m mmrec.benchmarks.experiments ort-options   --repository R [--seconds 2]
    python -m mmrec.benchmarks.experiments server-config --repository R [--variants base,nospin,...]
    python -m mmrec.benchmarks.experiments serving-targets --repository R --variants base,nodelay+nospin

ort-options: the portable runner's ORT session as shipped vs the same session with intra-op
thread spinning disabled, per encoder and for the three-session item pipeline, in this process.
server-config: copies of the repository (never the original) with one change each, served by the
real tritonserver and loaded by plain tritonclient at each concurrency:
  nospin   the copied runtime.py of the ort_runner sets session.intra_op.allow_spinning=0
  nodelay  max_queue_delay_microseconds: 0 on every member
  intra1   intra_op_threads "1" on the ORT members
Variants combine with '+', e.g. nodelay+nospin. Rounds alternate the variants, so a change in
background load hits all of them alike.
serving-targets: Triton (mmrec client, gRPC) vs the in-process ReferencePipeline at each
concurrency, per variant; for nospin the in-process sessions get the same option.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from mmrec import schema
from mmrec.export.repository import parse, render, runner_settings, set_runner_settings
from mmrec.layout import SOURCES, RepositoryLayout
from mmrec.model_repository.lib import runtime
from mmrec.model_repository.lib.runner_settings import RunnerSettings

from .settings import FULL, Budget
from .timing import time_calls
from .workload import Workload

SPIN_KEY = "session.intra_op.allow_spinning"
RUNNER_ANCHOR = "options.inter_op_num_threads = 1"
ORT_MEMBERS = (schema.TEXT_ENCODER, schema.IMAGE_ENCODER, schema.FUSION, schema.SCORER)
# models whose config and runtime.py set ORT sessions: the members, and the portable target's
# merged item_encoder (one python model running the members' graphs)
RUNNER_MODELS = ORT_MEMBERS + (schema.ITEM_ENCODER,)


def _session(path: Path, threads: int, spinning: bool):
    """The runner's own session; with spinning=False the one config entry added."""
    import onnxruntime as ort

    if spinning:
        return runtime.make_session(path, threads)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry(SPIN_KEY, "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_options(repository: Path, seconds: float, rounds: int, threads: int) -> list[dict]:
    workload = Workload(repository)
    budget = Budget(warmup_s=0.3, measure_s=seconds, min_reps=3)
    cases = {"image_encoder b=1": (schema.IMAGE_ENCODER, workload.pixel_feed(1)),
             "image_encoder b=32": (schema.IMAGE_ENCODER, workload.pixel_feed(32)),
             "text_encoder b=1 s=16": (schema.TEXT_ENCODER, workload.text_feed(1, 16)),
             "text_encoder b=32 s=128": (schema.TEXT_ENCODER, workload.text_feed(32, 128))}
    rows = []
    for rnd in range(rounds):
        for label, (model, feed) in cases.items():
            for spinning in (True, False):
                session = _session(RepositoryLayout(repository).model_file(model), threads, spinning)
                t = time_calls(lambda: session.run(None, feed), 1, budget)
                rows.append({"round": rnd, "case": label, "spinning": spinning,
                             "p50_ms": float(np.median(t.latencies_ms)), "loadavg": os.getloadavg()[0]})
        inputs = workload.pipeline_input(1)
        for spinning in (True, False):
            s = {m: _session(RepositoryLayout(repository).model_file(m), threads, spinning) for m in ORT_MEMBERS[:3]}

            def pipeline():
                ids, mask = workload.tokenizer(inputs.texts)
                text = s[schema.TEXT_ENCODER].run(None, {schema.INPUT_IDS: ids, schema.ATTENTION_MASK: mask})[0]
                image = s[schema.IMAGE_ENCODER].run(None, {schema.PIXEL_VALUES: workload.decoder(inputs.images)})[0]
                return s[schema.FUSION].run(None, {schema.TEXT_EMBEDDING: text, schema.IMAGE_EMBEDDING: image})

            t = time_calls(pipeline, 1, budget)
            rows.append({"round": rnd, "case": "pipeline b=1 (3 sessions)", "spinning": spinning,
                         "p50_ms": float(np.median(t.latencies_ms)), "loadavg": os.getloadavg()[0]})
    return rows


def repository_variant(base: Path, name: str, root: Path) -> Path:
    """A copy of the repository with the changes `name` asks for."""
    target = root / name.replace("+", "_")
    shutil.copytree(base, target)
    changes = set(name.split("+")) - {"base"}
    unknown = changes - {"nospin", "nodelay", "intra1"}
    if unknown:
        raise SystemExit(f"unknown variant part(s) {sorted(unknown)}; use nospin, nodelay, intra1")
    for config_file in RepositoryLayout(target).config_files():
        config = parse(config_file.read_text())
        if "nodelay" in changes and config.HasField("dynamic_batching"):
            config.dynamic_batching.max_queue_delay_microseconds = 0
        if "intra1" in changes and config.name in RUNNER_MODELS:
            own = config.name in ORT_MEMBERS and config.backend == "python"  # the portable runner's own keys
            for member in ((None,) if own else ORT_MEMBERS):  # else a merged item_encoder's <member>.* keys
                if member is None or any(key in config.parameters for key in RunnerSettings.keys(member)):
                    set_runner_settings(config, runner_settings(config, member).with_(intra_op_threads=1), member)
        config_file.unlink()  # copytree may have linked it: never write through to the source
        config_file.write_text(render(config))
    if "nospin" in changes:
        copies = [RepositoryLayout(target).version_dir(m) / SOURCES.lib_file("runtime").name for m in RUNNER_MODELS]
        for runner in (c for c in copies if c.is_file()):
            # the runner's session options live in the runtime library copied beside its model.py
            code = runner.read_text()
            if RUNNER_ANCHOR not in code:
                raise SystemExit(f"{runner}: cannot find `{RUNNER_ANCHOR}` to add {SPIN_KEY}=0 after")
            runner.write_text(code.replace(
                RUNNER_ANCHOR, f'{RUNNER_ANCHOR}\n    options.add_session_config_entry("{SPIN_KEY}", "0")', 1))
    return target


def server_config(repository: Path, variants: list[str], concurrency: list[int], seconds: float,
                  rounds: int) -> list[dict]:
    from .serving import Cursor, raw_level, running_server

    workload = Workload(repository)
    settings = FULL.with_overrides(level_s=seconds, level_warmup_s=1.0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmrec-ab-") as tmp:
        copies = {v: repository_variant(repository, v, Path(tmp)) for v in variants}
        for rnd in range(rounds):
            for name, copy in copies.items():
                with running_server(copy, Path(tmp) / f"{name}.log") as server:
                    for c in concurrency:
                        r = asyncio.run(raw_level(server.urls["grpc"], Cursor(workload, 1), c, settings))
                        rows.append({"round": rnd, "variant": name, "concurrency": c,
                                     "throughput_items_s": r["throughput_items_s"], "p50_ms": r["latency_ms"]["p50"],
                                     "p99_ms": r["latency_ms"]["p99"], "errors": r["errors"],
                                     "loadavg": os.getloadavg()[0]})
                        print(json.dumps(rows[-1]), flush=True)
    return rows


def serving_targets(repository: Path, variants: list[str], concurrency: list[int], seconds: float,
                    rounds: int, threads: int) -> list[dict]:
    """The two serving targets (Triton vs in-process: throughput at c=8, p50 at c=1) per variant,
    with the in-process pipeline given the same ORT change (nospin) as the served copy."""
    from mmrec.reference import ReferencePipeline

    from .serving import client_level, Cursor, reference_level, running_server

    workload = Workload(repository)
    settings = FULL.with_overrides(level_s=seconds, level_warmup_s=1.0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmrec-ab-") as tmp:
        for rnd in range(rounds):
            for name in variants:
                copy = repository_variant(repository, name, Path(tmp) / f"r{rnd}")
                pipeline = ReferencePipeline(repository, intra_op_threads=threads)
                if "nospin" in name:
                    files = {m: RepositoryLayout(repository).model_file(m) for m in pipeline.sessions}
                    pipeline.sessions.update({  # in place: the engine holds this dict
                        m: runtime.OrtSession(path, session=_session(path, threads, False)) for m, path in files.items()})
                with running_server(copy, Path(tmp) / f"{name}-{rnd}.log") as server:
                    for c in concurrency:
                        ref = reference_level(pipeline, workload, settings, c)
                        tri = asyncio.run(client_level(server.urls["grpc"], server.urls["grpc"], "grpc",
                                                        Cursor(workload, 1), c, settings))
                        rows.append({"round": rnd, "variant": name, "concurrency": c,
                                     "triton_items_s": tri["throughput_items_s"], "triton_p50_ms": tri["latency_ms"]["p50"],
                                     "inprocess_items_s": ref["throughput_items_s"], "inprocess_p50_ms": ref["latency_ms"]["p50"],
                                     "throughput_ratio": tri["throughput_items_s"] / ref["throughput_items_s"],
                                     "p50_diff_ms": tri["latency_ms"]["p50"] - ref["latency_ms"]["p50"],
                                     "loadavg": os.getloadavg()[0]})
                        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=("ort-options", "server-config", "serving-targets"))
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--variants", default="base,nospin,nodelay,nodelay+nospin,nodelay+nospin+intra1")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.experiment == "ort-options":
        rows = ort_options(args.repository, args.seconds, args.rounds, args.threads)
        for row in rows:
            print(json.dumps(row))
    elif args.experiment == "server-config":
        rows = server_config(args.repository, args.variants.split(","),
                             [int(c) for c in args.concurrency.split(",")], args.seconds, args.rounds)
    else:
        rows = serving_targets(args.repository, args.variants.split(","),
                               [int(c) for c in args.concurrency.split(",")], args.seconds, args.rounds, args.threads)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
