"""`mmrec tune`: choose each encoder's runtime and precision on the machine that will serve it.

Which of ORT FP32, ORT INT8, OpenVINO FP32/BF16/INT8 is fastest depends on the CPU (AMX, AVX-512
VNNI/BF16, or plain AVX2) and on the batch size, so it is measured, not assumed. Only variants
that passed their quality gates at export are candidates, and the pair served together must have
passed the combination gate the export recorded (`manifest["combinations"]`).

Method, per encoder: every candidate runs the same inputs at batch 1 and at batch 32 (text: 16
and 64 tokens), interleaved in shuffled order for `rounds` rounds after a warm-up, with the
thread count it will be served with. A candidate's score is the geometric mean over the cases of
(its median / ORT FP32's median); its 95 % interval comes from a bootstrap over the rounds. The
fastest candidate whose interval lies wholly below 1 is served; otherwise ORT FP32 stays. Dense
kernels' latency does not depend on the values, so the inputs are deterministic synthetic
tensors of the served shapes (token ids inside the vocabulary, normalized pixels).
"""
from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from mmrec import schema
from mmrec.machine import cpu_info
from mmrec.stats import score_interval  # noqa: F401  (re-exported: tests and benchmarks import it here)
from mmrec.model_repository.lib import runtime
from .errors import ExportError
from .manifest import MANIFEST_FILE, package_versions, write_manifest
from mmrec.layout import RepositoryLayout
from .repository import CPU_SHARES, OPENVINO_BF16_KEY, Target, merged_ensembles, parse, render, set_member_runtime
from .variants import VARIANTS

TUNED_MEMBERS = (schema.TEXT_ENCODER, schema.IMAGE_ENCODER)
CASES = {schema.TEXT_ENCODER: ((1, 16), (32, 64)), schema.IMAGE_ENCODER: ((1,), (32,))}
DEFAULT_ROUNDS = 7
TARGET_RUNTIMES = {Target.portable: runtime.RUNTIMES, Target.onnxruntime: ("onnxruntime",),
                   Target.openvino: ("openvino",)}
REFERENCE = "fp32"


class TuneError(ExportError):
    """The repository cannot be tuned (no manifest, a GPU target, nothing to choose from)."""


def case_feed(member: str, case: tuple[int, ...], image_size: int) -> dict[str, np.ndarray]:
    """Deterministic inputs of a served shape."""
    rng = np.random.default_rng(0)
    if member == schema.TEXT_ENCODER:
        batch, tokens = case
        ids = rng.integers(1000, 20000, (batch, tokens), dtype=np.int64)
        return {schema.INPUT_IDS: ids, schema.ATTENTION_MASK: np.ones_like(ids)}
    return {schema.PIXEL_VALUES: rng.standard_normal((case[0], 3, image_size, image_size)).astype(np.float32)}


def case_label(member: str, case: tuple[int, ...]) -> str:
    return f"batch={case[0]} seq={case[1]}" if member == schema.TEXT_ENCODER else f"batch={case[0]}"


def time_interleaved(sessions: dict[str, runtime.Session], feed: dict[str, np.ndarray],
                     rounds: int) -> dict[str, list[float]]:
    """Seconds per run of each session, one run each per round in shuffled order."""
    for session in sessions.values():  # warm-up: first runs allocate and pick kernels
        session.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    order = list(sessions)
    shuffler = random.Random(0)
    for _ in range(rounds):
        shuffler.shuffle(order)
        for name in order:
            start = time.perf_counter()
            sessions[name].run(None, feed)
            times[name].append(time.perf_counter() - start)
    return times


def candidates_of(manifest: dict, member: str, runtimes: tuple[str, ...]) -> dict[str, dict]:
    """Admitted CPU variants of a member that can run here, by variant name."""
    found = {}
    for name, entry in manifest["models"][member]["variants"].items():
        spec = VARIANTS.get(name)
        if (spec is None or not spec.cpu or spec.runtime not in runtimes or not entry.get("path")
                or not (entry.get("written") or name == REFERENCE)):
            continue
        if runtime.unavailable_reason(spec.runtime, spec.precision) is None:
            found[name] = entry
    return found


def measure_member(root: Path, manifest: dict, member: str, runtimes: tuple[str, ...], rounds: int,
                   progress: Callable[[str], None]) -> dict:
    """Latency of every candidate of one member, and its score against ORT FP32."""
    candidates = candidates_of(manifest, member, runtimes)
    if REFERENCE not in candidates:
        raise TuneError(f"{member}: the FP32 graph is missing from the repository; re-export it")
    threads = runtime.thread_budget(0, CPU_SHARES.get(member, 1))
    sessions = {}
    for name, entry in candidates.items():
        spec = VARIANTS[name]
        sessions[name] = runtime.open_session(root / entry["path"], spec.runtime, threads, spec.precision)
    image_size = manifest["preprocess"]["image_size"]
    per_case: dict[str, dict[str, list[float]]] = {}
    for case in CASES[member]:
        label = case_label(member, case)
        progress(f"{member}: timing {len(sessions)} variants at {label} ({rounds} rounds)")
        per_case[label] = time_interleaved(sessions, case_feed(member, case, image_size), rounds)
    result = {"threads": threads, "rounds": rounds, "variants": {}}
    for name in sessions:
        point, low, high = score_interval([per_case[c][name] for c in per_case],
                                          [per_case[c][REFERENCE] for c in per_case])
        result["variants"][name] = {
            "median_ms": {c: round(1e3 * float(np.median(t[name])), 3) for c, t in per_case.items()},
            "score_vs_fp32": round(point, 4), "interval_95": [round(low, 4), round(high, 4)]}
    return result


def rank(measured: dict, fallback: str = REFERENCE) -> list[str]:
    """Variants significantly faster than ORT FP32 (interval below 1), fastest first, then the
    fallback (ORT FP32; OpenVINO FP32 on the openvino target, whose backend runs OpenVINO only)."""
    if fallback not in measured["variants"]:
        raise TuneError(f"{fallback} was not measured (not admitted at export, or its runtime left out): "
                        "nothing is left to serve on this target")
    faster = [v for v, m in measured["variants"].items()
              if v not in (REFERENCE, fallback) and m["interval_95"][1] < 1.0]
    if fallback != REFERENCE:  # the fallback is a real candidate: it competes on speed too
        return sorted(faster + [fallback], key=lambda v: measured["variants"][v]["score_vs_fp32"])
    return sorted(faster, key=lambda v: measured["variants"][v]["score_vs_fp32"]) + [fallback]


def choose_pair(measured: dict[str, dict], combinations: list[dict],
                fixed: dict[str, str] | None = None, fallback: str = REFERENCE) -> tuple[dict[str, str], dict | None]:
    """The fastest per-member choice whose combination (with the `fixed` members' variants)
    passed its gate, by product of scores; returns it with that combination's record (None
    when everything served stays ORT FP32)."""
    fixed = fixed or {}
    gated = sorted({m for c in combinations for m in c["variants"]})
    passed = {_key(c["variants"], gated): c for c in combinations if c["passed"]}

    def score(choice: dict[str, str]) -> float:
        return float(np.prod([measured[m]["variants"][v]["score_vs_fp32"] for m, v in choice.items()]))

    options: list[dict[str, str]] = [{}]
    for member in measured:
        options = [{**o, member: v} for o in options for v in rank(measured[member], fallback)]
    for choice in sorted(options, key=score):
        if all(v == REFERENCE for v in {**fixed, **choice}.values()):
            return choice, None
        combination = passed.get(_key({**fixed, **choice}, gated))
        if combination is not None:
            return choice, combination
    return {m: fallback for m in measured}, None


def _key(choice: dict[str, str], members: list[str]) -> tuple:
    """A choice over `members`, members not chosen being FP32."""
    return tuple((m, choice.get(m, REFERENCE)) for m in members)


def serve_variant(root: Path, manifest: dict, member: str, variant: str, target: Target) -> None:
    """Make `variant` the served one: its graph becomes `<member>/1/model.onnx` (the previous
    graph moves to variants/), and the member's config names its runtime and precision."""
    info = manifest["models"][member]
    old_graph = info["variants"][info["served_variant"]]["graph"]
    spec = VARIANTS[variant]
    layout = RepositoryLayout(root)
    served_path = layout.model_file(member).relative_to(root).as_posix()
    if spec.graph != old_graph:
        parked = layout.variant_file(member, old_graph).relative_to(root).as_posix()
        incoming = info["variants"][variant]["path"]
        (root / parked).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(root / served_path, root / parked)
        shutil.move(root / incoming, root / served_path)
        for entry in info["variants"].values():
            if entry.get("path") == served_path:
                entry["path"] = parked
            elif entry.get("path") == incoming:
                entry["path"] = served_path
    config_file = layout.config_file(member)
    config = parse(config_file.read_text())
    if target is Target.openvino:
        if spec.precision == "bf16":
            config.parameters[OPENVINO_BF16_KEY].string_value = "YES"
        else:
            config.parameters.pop(OPENVINO_BF16_KEY, None)
    elif target is Target.portable:
        set_member_runtime(config, member, spec.runtime, spec.precision)
        for merged in merged_ensembles(target):  # a merged item_encoder runs the member too
            merged_file = layout.config_file(merged)
            merged_config = parse(merged_file.read_text())
            set_member_runtime(merged_config, member, spec.runtime, spec.precision)
            merged_file.write_text(render(merged_config))
    config_file.write_text(render(config))
    info["served_variant"] = variant


def tune_repository(root: Path, runtimes: tuple[str, ...] | None = None, rounds: int = DEFAULT_ROUNDS,
                    progress: Callable[[str], None] = lambda message: None,
                    fixed: dict[str, str] | None = None) -> dict:
    """Measure, choose and serve the fastest admitted variant of each encoder (members in
    `fixed`, chosen by the user, keep their variant); returns the manifest's `tuning` record
    (also written into manifest.json)."""
    fixed = dict(fixed or {})
    root = Path(root)
    manifest_file = root / MANIFEST_FILE
    if not manifest_file.is_file():
        raise TuneError(f"{manifest_file} not found: tune a repository written by `mmrec export`")
    manifest = json.loads(manifest_file.read_text())
    target = Target(manifest["target"])
    if not fixed:  # a re-tune keeps what the user pinned at export (--serve-variant)
        fixed = dict(manifest.get("tuning", {}).get("fixed_by_user", {}))
    if target not in TARGET_RUNTIMES:
        raise TuneError(f"target {target.value} is built for a GPU; tuning chooses CPU runtimes")
    allowed = tuple(r for r in (runtimes or runtime.RUNTIMES) if r in TARGET_RUNTIMES[target])
    if target is Target.openvino:
        allowed = ("onnxruntime",) + allowed  # the FP32 reference is timed with ORT
    members = [m for m in TUNED_MEMBERS if m in manifest["models"] and m not in fixed]
    measured = {m: measure_member(root, manifest, m, allowed, rounds, progress) for m in members}
    fallback = REFERENCE
    if target is Target.openvino:  # the OpenVINO backend serves OpenVINO variants only
        fallback = "openvino-fp32"
        for m in measured:
            measured[m]["variants"] = {v: r for v, r in measured[m]["variants"].items()
                                       if VARIANTS[v].runtime == "openvino" or v == REFERENCE}
    choice, combination = choose_pair(measured, manifest.get("combinations", []), fixed, fallback)
    for member, variant in choice.items():
        if variant != manifest["models"][member]["served_variant"]:
            serve_variant(root, manifest, member, variant, target)
    if combination is not None:
        manifest["served_combination"] = {"variants": {m: v for m, v in {**fixed, **choice}.items()
                                                       if v != REFERENCE}, "gate": combination}
    elif not any(v != REFERENCE for v in fixed.values()):
        manifest.pop("served_combination", None)
    cpu = cpu_info()
    manifest["tuning"] = {
        "machine": {"cpu": cpu["model"], "usable_cores": runtime.usable_cores(),
                    "flags": sorted(f for f, present in cpu["flags"].items() if present),
                    "openvino_capabilities": list(runtime.openvino_capabilities())},
        "versions": {k: v for k, v in package_versions().items() if k in ("onnxruntime", "openvino")},
        "runtimes": list(allowed), "rule": "fastest admitted variant whose 95% interval of the "
        "geometric-mean latency ratio vs ORT FP32 (batch 1 and 32) lies below 1, among pairs whose "
        "combination gate passed", "members": measured, "chosen": choice, "fixed_by_user": fixed}
    write_manifest(root, manifest)
    return manifest["tuning"]
