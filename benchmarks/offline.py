"""Offline backend comparison: PyTorch eager vs ONNX Runtime FP32/INT8/FP16, per submodel and
for the whole item pipeline, at every batch size (and text length) of the run.

All engines of a model are loaded side by side; then, case by case, PyTorch runs first and
its outputs become the reference, every other engine is checked against them (see checks.py)
before it is timed, and an engine that fails its check is reported as such, never timed. The
engines of one case are timed in alternating rounds (A B C D, D C B A), so the ratios against
PyTorch (and against ORT FP32 for the variants) compare numbers taken in the same minute,
under the same background load — what makes them trustworthy on a shared machine.
Memory: `load_rss_rise_mb` is what loading the engine added to this process's RSS; `memory`
is the process peak while that engine was timed.
"""
from __future__ import annotations

import gc
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from mmrec import schema
from mmrec.layout import RepositoryLayout

from . import checks
from .engines import (PIPELINE, PYTORCH, Engine, TorchSources, build_runner, engines_for, onnx_files, ort_member,
                      skipped_variants)
from .settings import Budget, Settings
from mmrec.stats import round_medians

from .timing import PeakRSS, Timing, frozen_heap, time_calls
from .workload import Workload

Tick = Callable[[int], None]


@dataclass
class Case:
    model: str
    batch: int
    seq_len: int | None
    inputs: object  # feed dict, or PipelineInput for the pipeline

    @property
    def label(self) -> str:
        return f"batch={self.batch}" + (f" seq={self.seq_len}" if self.seq_len else "")

    @property
    def key(self) -> tuple:
        return (self.batch, self.seq_len)


AA_REFERENCE = "ort-fp32"  # the engine every variant is compared with, timed twice per round
AA_ARM = f"{AA_REFERENCE} (A/A)"

SPIN_KEYS = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")


def ort_session_settings(probe_model: Path, threads: int) -> dict:
    """The options the portable runner's make_session really sets (read back from a session)."""
    from mmrec.model_repository.lib import runtime

    options = runtime.make_session(probe_model, threads).get_session_options()
    out = {"ort_intra_op_threads": options.intra_op_num_threads, "ort_inter_op_threads": options.inter_op_num_threads,
           "ort_execution_mode": str(options.execution_mode), "ort_graph_optimization": str(options.graph_optimization_level)}
    for key in SPIN_KEYS:
        try:
            out[key] = options.get_session_config_entry(key)
        except Exception:  # noqa: BLE001 - ORT raises when the entry was never set
            out[key] = "unset (ORT default: spinning on)"
    return out


def thread_settings(threads: int, probe_model: Path) -> dict:
    """Pin PyTorch to `threads` and record what both runtimes will use."""
    import torch

    torch.set_num_threads(threads)
    return {"threads": threads, "torch_num_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            **ort_session_settings(probe_model, threads),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}


def fusion_inputs(workload: Workload, repository: Path, batch: int, threads: int) -> dict[str, np.ndarray]:
    """Real text/image embeddings (from the repository's FP32 encoders) for the fusion head."""
    text = ort_member(onnx_files(repository, schema.TEXT_ENCODER)["fp32"], threads)(workload.caption_feed(batch))[0]
    image = ort_member(onnx_files(repository, schema.IMAGE_ENCODER)["fp32"], threads)(workload.pixel_feed(batch))[0]
    return {schema.TEXT_EMBEDDING: text, schema.IMAGE_EMBEDDING: image}


def build_cases(model: str, workload: Workload, settings: Settings, threads: int) -> list[Case]:
    if model == schema.TEXT_ENCODER:
        return [Case(model, b, s, workload.text_feed(b, s)) for b in settings.batches for s in settings.seq_lens]
    if model == schema.IMAGE_ENCODER:
        return [Case(model, b, None, workload.pixel_feed(b)) for b in settings.batches]
    if model == schema.FUSION:
        full = fusion_inputs(workload, workload.repository, max(settings.batches), threads)
        return [Case(model, b, None, {k: v[:b].copy() for k, v in full.items()}) for b in settings.batches]
    if model == PIPELINE:
        return [Case(model, b, None, workload.pipeline_input(b)) for b in settings.batches]
    raise ValueError(f"unknown model {model!r}")


def _record(case: Case, engine: Engine, **fields) -> dict:
    return {"model": case.model, "engine": engine.name, "backend": engine.kind.backend,
            "precision": engine.kind.precision, "batch": case.batch, "seq_len": case.seq_len,
            "label": case.label, "composition": engine.composition or None, **fields}


@dataclass
class Loaded:
    engine: Engine
    runner: Callable[[object], list]
    load_s: float
    load_rss_rise_mb: float | None


def load_engines(engines: list[Engine], cases: list[Case], sources: TorchSources, workload: Workload,
                 threads: int) -> tuple[list[Loaded], list[dict]]:
    """Build every engine of a model; one that fails to load is recorded for every case."""
    loaded, failed = [], []
    for engine in engines:
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            try:
                runner = build_runner(engine, sources, threads, workload.tokenizer, workload.decoder)
            except Exception as err:  # noqa: BLE001 - one engine failing to load must not end the run
                failed += [_record(c, engine, status="error", error=f"load failed: {type(err).__name__}: {err}")
                           for c in cases]
                continue
            load_s = time.perf_counter() - t0
        loaded.append(Loaded(engine, runner, load_s, mem.to_dict()["rss_rise_mb"]))
    return loaded, failed


def _round_budget(budget: Budget, rounds: int) -> Budget:
    return replace(budget, measure_s=budget.measure_s / rounds, min_reps=math.ceil(budget.min_reps / rounds),
                   max_s=budget.max_s / rounds, floor_reps=math.ceil(budget.floor_reps / rounds))


def sample_rule_met(reps: int, measured_s: float, budget: Budget) -> bool:
    """The case has the samples the method asks for: `min_reps` of them, or `max_s` of measurement."""
    return reps >= budget.min_reps or measured_s >= budget.max_s


def run_case(case: Case, loaded: list[Loaded], settings: Settings) -> list[dict]:
    """Check every engine on one case (PyTorch first: its outputs are the reference), then time
    the ones that passed in `offline_rounds` rounds of alternating order, so every engine of
    the case is measured in the same minute, under the same background load."""
    records, passed = [], []
    reference = None
    for item in loaded:
        engine = item.engine
        base = dict(load_s=item.load_s, load_rss_rise_mb=item.load_rss_rise_mb)
        try:
            t0 = time.perf_counter()
            outputs = item.runner(case.inputs)  # first call: the check, and the start of the warm-up
            first_call_s = time.perf_counter() - t0
            if engine.name == PYTORCH:
                reference, check = outputs, None
            elif reference is None:
                raise RuntimeError("no PyTorch reference for this case (PyTorch failed on it), so "
                                   "this engine cannot be checked and is not timed")
            else:
                check = checks.compare(engine.kind.precision, outputs, reference)
            if check is not None and not check.passed:
                records.append(_record(case, engine, status="check_failed", check=check.to_dict(), **base))
                continue
            passed.append((item, check, first_call_s, base))
        except Exception as err:  # noqa: BLE001 - recorded, the other engines still run
            records.append(_record(case, engine, status="error", error=f"{type(err).__name__}: {err}", **base))
    rounds = max(1, settings.offline_rounds)
    budget = _round_budget(settings.offline, rounds)
    # later rounds only re-warm caches (one call): the engine's arena and threads are warm already
    rewarm = replace(budget, warmup_s=0.0, min_warmup_reps=1)
    # The A/A arm: the A/A reference engine timed a second time in every round, as if it were
    # another engine; its ratio to itself must show no difference (mmrec.stats.aa_check).
    arms = [(item, item.engine.name) for item, *_ in passed]
    arms += [(item, AA_ARM) for item, *_ in passed if item.engine.name == AA_REFERENCE]
    first_call = {item.engine.name: first_call_s for item, _, first_call_s, _ in passed}
    timings: dict[str, list[Timing]] = {name: [] for _, name in arms}
    peaks: dict[str, list[dict]] = {name: [] for _, name in arms}
    for r in range(rounds):
        for item, name in (arms if r % 2 == 0 else arms[::-1]):
            if timings[name] is None:
                continue
            try:
                with PeakRSS() as mem:
                    timings[name].append(time_calls(
                        lambda: item.runner(case.inputs), case.batch, budget if r == 0 else rewarm,
                        first_call[item.engine.name] if r == 0 and name != AA_ARM else 0.0))
                peaks[name].append(mem.to_dict())
            except Exception as err:  # noqa: BLE001
                timings[name] = None
                peaks[name] = [{"error": f"{type(err).__name__}: {err}"}]
    for item, check, _, base in passed:
        parts = timings[item.engine.name]
        if not parts:
            records.append(_record(case, item.engine, status="error", error=peaks[item.engine.name][0]["error"], **base))
            continue
        timing = Timing([x for t in parts for x in t.latencies_ms], case.batch, sum(t.wall_s for t in parts),
                        sum(t.warmup_reps for t in parts))
        peak = max(peaks[item.engine.name], key=lambda m: m["peak_rss_mb"] or 0)
        extra = {}
        if item.engine.name == AA_REFERENCE and timings.get(AA_ARM):
            extra["aa_p50_ms_per_round"] = round_medians([t.latencies_ms for t in timings[AA_ARM]])
        records.append(_record(case, item.engine, status="ok",
                               check=check.to_dict() if check else {"rule": "reference"},
                               rounds=rounds, **base, **timing.summary(), memory=peak,
                               sample_rule_met=sample_rule_met(timing.reps, timing.wall_s, settings.offline),
                               p50_ms_per_round=round_medians([t.latencies_ms for t in parts]), **extra))
    return records


def add_ratios(records: list[dict]) -> None:
    """Ratios vs PyTorch and vs ORT FP32 at the same model/batch/seq, same run.

    `speedup_vs_*`: from throughput (items over the measured time, i.e. the mean latency), as
    measured; `speedup_vs_*_p50`: the p50-latency ratio paired by round (geometric mean of the
    per-round ratios reference p50 / engine p50; same batch, so it is the median-rate ratio), and
    `speedup_vs_*_p50_interval` its interval over rounds (mmrec.stats). The targets are judged on
    it. Works on a re-render too: the per-round medians stay in the records."""
    from mmrec.stats import paired_ratio

    def key(r: dict, engine: str) -> tuple:
        return (r["model"], engine, r["batch"], r["seq_len"])

    by_key = {key(r, r["engine"]): r for r in records if r["status"] == "ok"}
    for r in records:
        if r["status"] != "ok":
            continue
        for base, field in ((PYTORCH, "speedup_vs_pytorch"), (AA_REFERENCE, "speedup_vs_ort_fp32")):
            ref = by_key.get(key(r, base))
            r[field] = (r["throughput_items_s"] / ref["throughput_items_s"]) if ref else None
            ours, theirs = r.get("p50_ms_per_round"), (ref or {}).get("p50_ms_per_round")
            if ref is None or ref is r or not ours or not theirs or len(ours) != len(theirs):
                r[f"{field}_p50"] = (ref["latency_ms"]["p50"] / r["latency_ms"]["p50"]) if ref else None
                r[f"{field}_p50_interval"] = None
                continue
            interval = paired_ratio(theirs, ours)
            r[f"{field}_p50"] = interval.point
            r[f"{field}_p50_interval"] = interval.to_dict()
        r.pop(f"speedup_vs_pytorch_p50_ci95", None)  # the former (unpaired) interval
        r.pop(f"speedup_vs_ort_fp32_p50_ci95", None)


def offline_aa(records: list[dict]) -> dict:
    """The section's A/A verdict: the A/A reference engine against its own second arm, per-round
    p50s pooled over every case (mmrec.stats.pooled_ratio, aa_check)."""
    from mmrec.stats import aa_check, pooled_ratio

    cases = [(r["p50_ms_per_round"], r["aa_p50_ms_per_round"]) for r in records
             if r["status"] == "ok" and r.get("aa_p50_ms_per_round")
             and len(r["aa_p50_ms_per_round"]) == len(r["p50_ms_per_round"])]
    return {**aa_check(pooled_ratio(cases) if cases else None), "arm": f"{AA_REFERENCE} twice per round",
            "cases": len(cases)}


def run_offline(workload: Workload, settings: Settings, threads: int,
                step: Callable[[str, int], Tick]) -> dict:
    """The whole section: {threads, records, skipped_variants}."""
    repository = workload.repository
    sources = TorchSources(repository)
    threads_info = thread_settings(threads, RepositoryLayout(repository).model_file(schema.FUSION))
    records: list[dict] = []
    skipped: dict[str, dict[str, str]] = {}
    for model in settings.models:
        engines = engines_for(repository, model, sources.manifest)
        cases = build_cases(model, workload, settings, threads)
        tick = step(f"offline {model}: {len(engines)} engines x {len(cases)} cases", len(cases) + 1)
        loaded, failed = load_engines(engines, cases, sources, workload, threads)
        records += failed
        tick(1)
        with frozen_heap():  # the engines stay; each timed arm's collection walks only its own garbage
            for case in cases:
                records += run_case(case, loaded, settings)
                tick(1)
        loaded = None  # release the engines (ORT sessions and their threads) before the next model
        gc.collect()
        if model != PIPELINE:
            skipped[model] = skipped_variants(repository, model, sources.manifest)
    add_ratios(records)
    return {"threads": threads_info, "budget": settings.offline.__dict__, "rounds": settings.offline_rounds,
            "records": records, "aa": offline_aa(records), "skipped_variants": skipped}

