"""`mmrec tune`: choose each encoder's runtime and precision on the machine that will serve it.

Which of ORT FP32, ORT INT8, OpenVINO FP32/BF16/INT8 is fastest depends on the CPU (AMX, AVX-512
VNNI/BF16, or plain AVX2) and on the batch size, so it is measured, not assumed. Only variants
that passed their quality gates are candidates, and the pair served together must pass the
combination gate. The gates run again here (`regate`, on the held-out inputs export saved in
the repository): INT8 and BF16 numerics differ between CPUs, so a variant that passed on the
export machine is refused where it fails (recorded in the manifest's `tuning.gates`).

Method, per encoder (mmrec.stats): every candidate runs the same inputs at batch 1 and at batch
32 (text: 16 and 64 tokens) with the thread count it will be served with, in `rounds` short
rounds after a warm-up, in shuffled order each round; each round gives one value per candidate
(the median of its calls in that round: a few calls where a call is quick, one where it is not).
A candidate's speed-up over ORT FP32 is the geometric mean over the cases of the per-round
ratios ORT FP32 / candidate (paired by round, so drift that hits both cancels), with its 95 %
interval from a bootstrap over rounds (`pooled_ratio`). ORT FP32 also runs a second time in
every round as an A/A arm: if FP32 against itself shows a difference, the machine is too noisy
to judge and FP32 (the fallback) stays. Otherwise the fastest candidate whose interval lies
wholly above 1 is served, among pairs whose combination gate passed; else the fallback stays.
Dense kernels' latency does not depend on the values, so the inputs are deterministic synthetic
tensors of the served shapes (token ids inside the vocabulary, normalized pixels).
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable, Collection, Mapping

import numpy as np

from mmrec import schema
from mmrec.machine import cpu_info
from mmrec.preprocess import ServedContract
from mmrec.stats import MET, Interval, aa_check, pooled_ratio
from mmrec.model_repository.lib import runtime
from .choices import DEFAULT_TUNE_ROUNDS
from .errors import ExportError
from .gates import GateSet, VariantGates, onnx_fuse, variant_outputs
from .manifest import MANIFEST_FILE, package_versions
from mmrec.layout import RepositoryLayout
from .recipes import RECIPES
from .repository import CPU_SHARES, Target
from .manifest import (Manifest, MeasuredMember, MemberRecord, ServedCombination, TuningMachine,
                       TuningRecord)
from .render import GraphFiles, graph_of, repository_graphs, rerender
from .variants import VARIANTS

TUNED_MEMBERS = tuple(name for name, recipe in RECIPES.items() if recipe.tuned)  # their shapes: recipe.tuning_cases
DEFAULT_ROUNDS = DEFAULT_TUNE_ROUNDS
SLOT_S = 0.05  # an arm's calls in one round last about this long: rounds stay short and many
MAX_CALLS_PER_ROUND = 3  # a round's median of 3 calls shrugs off one slow call
TARGET_RUNTIMES = {Target.portable: runtime.RUNTIMES, Target.onnxruntime: ("onnxruntime",),
                   Target.openvino: ("openvino",)}
REFERENCE = "fp32"
AA_ARM = f"{REFERENCE} (A/A)"  # the reference timed a second time in every round
SPEEDUP_THRESHOLD = 1.0  # served only when the whole 95 % interval of the speed-up lies above this
RULE = (f"fastest admitted variant whose 95% interval of the speed-up over ORT FP32 (geometric mean over batch "
        f"1 and 32 of per-round ratios, bootstrap over rounds) lies wholly above {SPEEDUP_THRESHOLD:g}, among pairs "
        "whose combination gate passed; the fallback when the A/A arm (ORT FP32 against itself) shows a difference")


class TuneError(ExportError):
    """The repository cannot be tuned (no manifest, a GPU target, nothing to choose from)."""


def calls_per_round(call_s: float) -> int:
    """Calls per arm and round: enough for a median where calls are quick, one where they are
    slow, so a round stays short whatever the case costs."""
    return max(1, min(MAX_CALLS_PER_ROUND, int(SLOT_S / max(call_s, 1e-9))))


def time_interleaved(sessions: dict[str, runtime.Session], feed: dict[str, np.ndarray],
                     rounds: int, calls: int | None = None) -> tuple[dict[str, list[float]], int]:
    """Seconds per run of each session, one value per round (the median of its `calls` runs in
    that round), sessions in shuffled order each round; returns them with the calls per round
    (from the warm-up's timing when `calls` is None)."""
    warm_up = []  # first runs allocate and pick kernels; an A/A arm shares its session's warm-up
    for session in {id(s): s for s in sessions.values()}.values():
        start = time.perf_counter()
        session.run(None, feed)
        warm_up.append(time.perf_counter() - start)
    calls = calls or calls_per_round(min(warm_up))  # the fastest first run is the least inflated by set-up
    times: dict[str, list[float]] = {name: [] for name in sessions}
    order = list(sessions)
    shuffler = random.Random(0)
    for _ in range(rounds):
        shuffler.shuffle(order)
        for name in order:
            runs = []
            for _ in range(calls):
                start = time.perf_counter()
                sessions[name].run(None, feed)
                runs.append(time.perf_counter() - start)
            times[name].append(float(np.median(runs)))
    return times, calls


def candidates_of(models: Mapping[str, MemberRecord], member: str, runtimes: tuple[str, ...], graphs: GraphFiles,
                  refused: Collection[str] = ()) -> dict[str, Path]:
    """Admitted CPU variants of a member that can run here, by variant name, with their graph
    file (`graphs`: staged at export, in the repository at `mmrec tune`; `refused`: those that
    failed their gate on this machine)."""
    found = {}
    for name, variant in models[member].variants.items():
        spec = VARIANTS.get(name)
        file = graphs.get(member, {}).get(graph_of(name, variant))
        if (spec is None or not spec.cpu or spec.runtime not in runtimes or file is None
                or not (variant.written or name == REFERENCE) or name in refused):
            continue
        if runtime.unavailable_reason(spec.runtime, spec.precision) is None:
            found[name] = file
    return found


def regate(root: Path, manifest: Manifest, runtimes: tuple[str, ...], progress: Callable[[str], None]) -> dict | None:
    """Every admitted candidate of the encoders gated again on this machine, on the held-out
    inputs export saved (`gates.GateSet`), and every pair of those that pass; None when the
    repository has no gate set (written before it existed: export's verdicts stand)."""
    layout = RepositoryLayout(root)
    path = layout.gate_set_file
    if not path.is_file():
        return None
    contract = layout.read_contract()
    gate_set = GateSet.load(path, contract)
    gates = VariantGates(onnx_fuse(layout.model_file(schema.FUSION)), gate_set.fallback, gate_set.labels,
                         len(contract.categories))
    members: dict[str, dict] = {}
    admitted: dict[str, list[str]] = {}
    gated = [m for m in TUNED_MEMBERS if m in gate_set.feeds and m in manifest.models]
    graphs = repository_graphs(root, manifest)
    candidates_by_member, long_references = {}, {}
    for member in gated:  # every member's FP32 reference first: a variant is judged beside the other's FP32
        candidates = candidates_by_member[member] = candidates_of(manifest.models, member, runtimes, graphs)
        if REFERENCE not in candidates:
            raise TuneError(f"{member}: the FP32 graph is missing from the repository; re-export it")
        reference_file = candidates[REFERENCE]
        gates.reference[member] = variant_outputs(reference_file, VARIANTS[REFERENCE], gate_set.feeds[member])
        if RECIPES[member].long_gate_feeds is not None and gate_set.long_feeds:
            long_references[member] = variant_outputs(reference_file, VARIANTS[REFERENCE], gate_set.long_feeds)
    for member in gated:
        candidates = candidates_by_member[member]
        progress(f"{member}: gating {len(candidates) - 1} variants again on this machine")
        feeds, long_reference = gate_set.feeds[member], long_references.get(member)
        long_feeds = gate_set.long_feeds if long_reference is not None else []
        members[member], admitted[member] = {}, [REFERENCE]
        for name, file in candidates.items():
            if name == REFERENCE:
                continue
            spec = VARIANTS[name]
            embeddings = variant_outputs(file, spec, feeds)
            long_pair = (long_reference, variant_outputs(file, spec, long_feeds)) if long_feeds else None
            gate = gates.gate_member(member, name, embeddings, long_pair)
            gate.evaluated_on = f"{spec.runtime} {spec.precision} on this machine"
            members[member][name] = gate.to_dict()
            if gate.passed:
                admitted[member].append(name)
            else:
                progress(f"{member} ({name}) refused on this machine: {'; '.join(gate.reasons)}")
    return {"members": members, "combinations": gates.combinations(admitted)}


def refused_here(gated: dict | None, member: str) -> set[str]:
    """Variants of `member` that failed their gate on this machine."""
    return {v for v, g in ((gated or {}).get("members", {}).get(member, {})).items() if not g["passed"]}


def measure_member(candidates: dict[str, Path], member: str, contract: ServedContract, rounds: int,
                   progress: Callable[[str], None]) -> dict:
    """Per-round latency of every candidate graph of one member and of the A/A arm, and each
    candidate's speed-up over ORT FP32."""
    if REFERENCE not in candidates:
        raise TuneError(f"{member}: the FP32 graph is missing from the repository; re-export it")
    threads = runtime.thread_budget(0, CPU_SHARES.get(member, 1))
    sessions = {}
    for name, file in candidates.items():
        spec = VARIANTS[name]
        sessions[name] = runtime.open_session(file, spec.runtime, threads, spec.precision)
    sessions[AA_ARM] = sessions[REFERENCE]  # an arm of its own in the rotation, the same session
    per_case: dict[str, dict[str, list[float]]] = {}
    calls: dict[str, int] = {}
    recipe = RECIPES[member]
    for case in recipe.tuning_cases:
        label = recipe.case_label(case)
        progress(f"{member}: timing {len(sessions) - 1} variants and the A/A arm at {label} ({rounds} rounds)")
        per_case[label], calls[label] = time_interleaved(sessions, recipe.timing_feed(case, contract), rounds)
    aa = {**aa_check(pooled_ratio([(t[REFERENCE], t[AA_ARM]) for t in per_case.values()])),
          "arm": f"{REFERENCE} twice per round"}
    result = {"threads": threads, "rounds": rounds, "calls_per_round": calls, "aa": aa,
              "aa_ms_per_round": _ms({c: t[AA_ARM] for c, t in per_case.items()}), "variants": {}}
    for name in candidates:
        result["variants"][name] = variant_record(name, {c: t[name] for c, t in per_case.items()},
                                                  {c: t[REFERENCE] for c, t in per_case.items()})
    return result


def variant_record(name: str, times: dict[str, list[float]], reference: dict[str, list[float]]) -> dict:
    """A candidate's numbers: per-round ms (so the interval can be recomputed), medians, and its
    speed-up over ORT FP32 pooled over the cases, with the verdict against the threshold."""
    speedup = pooled_ratio([(reference[c], times[c]) for c in times])
    verdict = "reference" if name == REFERENCE else speedup.verdict(SPEEDUP_THRESHOLD, "above")
    return {"median_ms": {c: round(1e3 * float(np.median(t)), 3) for c, t in times.items()},
            "ms_per_round": _ms(times), "speedup_vs_fp32": speedup.to_dict(), "faster_than_fp32": verdict}


def _ms(times: dict[str, list[float]]) -> dict[str, list[float]]:
    return {c: [round(1e3 * s, 3) for s in t] for c, t in times.items()}


def speedup(record: dict) -> float:
    """A measured variant's point speed-up over ORT FP32 (>1: faster)."""
    return record["speedup_vs_fp32"]["point"]


def clearly_faster(record: dict) -> bool:
    """Its whole 95 % interval of the speed-up lies above the threshold."""
    return Interval.from_dict(record["speedup_vs_fp32"]).verdict(SPEEDUP_THRESHOLD, "above") == MET


def judged(measured: dict) -> bool:
    """False when the member's A/A arm showed a difference: the machine, not the code, would
    decide, so nothing but the fallback is served."""
    return (measured.get("aa") or {}).get("stable") is not False


def rank(measured: dict, fallback: str = REFERENCE) -> list[str]:
    """Variants clearly faster than ORT FP32 (speed-up interval above 1), fastest first, then
    the fallback (ORT FP32; OpenVINO FP32 on the openvino target, whose backend runs OpenVINO
    only); the fallback alone when the A/A arm was unstable."""
    if fallback not in measured["variants"]:
        raise TuneError(f"{fallback} was not measured (not admitted at export, or its runtime left out): "
                        "nothing is left to serve on this target")
    if not judged(measured):
        return [fallback]
    variants = measured["variants"]
    faster = [v for v, m in variants.items() if v not in (REFERENCE, fallback) and clearly_faster(m)]
    if fallback != REFERENCE:  # the fallback is a real candidate: it competes on speed too
        return sorted(faster + [fallback], key=lambda v: speedup(variants[v]), reverse=True)
    return sorted(faster, key=lambda v: speedup(variants[v]), reverse=True) + [fallback]


def choose_pair(measured: dict[str, dict], combinations: list[dict],
                fixed: dict[str, str] | None = None, fallback: str = REFERENCE) -> tuple[dict[str, str], dict | None]:
    """The fastest per-member choice whose combination (with the `fixed` members' variants)
    passed its gate, by product of speed-ups; returns it with that combination's record (None
    when everything served stays ORT FP32)."""
    fixed = fixed or {}
    gated = sorted({m for c in combinations for m in c["variants"]})
    passed = {_key(c["variants"], gated): c for c in combinations if c["passed"]}

    def score(choice: dict[str, str]) -> float:
        return float(np.prod([speedup(measured[m]["variants"][v]) for m, v in choice.items()]))

    options: list[dict[str, str]] = [{}]
    for member in measured:
        options = [{**o, member: v} for o in options for v in rank(measured[member], fallback)]
    for choice in sorted(options, key=score, reverse=True):
        if all(v == REFERENCE for v in {**fixed, **choice}.values()):
            return choice, None
        combination = passed.get(_key({**fixed, **choice}, gated))
        if combination is not None:
            return choice, combination
    return {m: fallback for m in measured}, None


def decision(measured: dict, chosen: str, fallback: str = REFERENCE) -> str:
    """Why a member serves what it serves, in a line for the manifest."""
    if not judged(measured):
        return f"A/A unstable, nothing judged: {fallback} kept ({measured['aa']['why']})"
    ranked = rank(measured, fallback)
    faster = [v for v in ranked if v != fallback]
    if not faster:
        return f"no variant's speed-up interval lies wholly above {SPEEDUP_THRESHOLD:g}: {fallback} kept"
    if chosen != ranked[0]:
        return f"{', '.join(ranked[:ranked.index(chosen)])} faster, but in no pair whose gate passed: {chosen} served"
    if chosen == fallback:  # the openvino target's fallback competes on speed
        return f"{fallback} (the fallback) is faster than {', '.join(faster)}"
    return (f"{chosen}: the fastest of the variants whose speed-up interval lies wholly above "
            f"{SPEEDUP_THRESHOLD:g} ({', '.join(faster)})")


def _key(choice: dict[str, str], members: list[str]) -> tuple:
    """A choice over `members`, members not chosen being FP32."""
    return tuple((m, choice.get(m, REFERENCE)) for m in members)


def allowed_runtimes(target: Target, runtimes: tuple[str, ...] | None) -> tuple[str, ...]:
    """The runtimes tuning may choose from on a target (the FP32 reference is always timed with ORT)."""
    if target not in TARGET_RUNTIMES:
        raise TuneError(f"target {target.value} is built for a GPU; tuning chooses CPU runtimes")
    allowed = tuple(r for r in (runtimes or runtime.RUNTIMES) if r in TARGET_RUNTIMES[target])
    return ("onnxruntime",) + allowed if target is Target.openvino else allowed


def decide(models: Mapping[str, MemberRecord], graphs: GraphFiles, target: Target, allowed: tuple[str, ...],
           contract: ServedContract, rounds: int, progress: Callable[[str], None], fixed: dict[str, str], gated: dict | None,
           combinations: list[dict], gates_where: str) -> tuple[dict[str, str], dict | None, TuningRecord]:
    """Measure the candidates of every member not `fixed` and choose; returns the choice, the
    combination gate of what will be served together (None: all ORT FP32) and the manifest's
    tuning record. Writes nothing: the caller renders the repository once from the choice."""
    members = [m for m in TUNED_MEMBERS if m in models and m not in fixed]
    measured = {m: measure_member(candidates_of(models, m, allowed, graphs, refused_here(gated, m)), m, contract,
                                  rounds, progress) for m in members}
    fallback = REFERENCE
    if target is Target.openvino:  # the OpenVINO backend serves OpenVINO variants only
        fallback = "openvino-fp32"
        for m in measured:
            measured[m]["variants"] = {v: r for v, r in measured[m]["variants"].items()
                                       if VARIANTS[v].runtime == "openvino" or v == REFERENCE}
    choice, combination = choose_pair(measured, combinations, fixed, fallback)
    if gated is not None and combination is None and any(v != REFERENCE for v in fixed.values()):
        raise TuneError(f"the pinned variants {fixed} pass no combination gate on this machine with any choice "
                        "for the other members: re-export with other --serve-variant choices")
    cpu = cpu_info()
    record = TuningRecord(
        machine=TuningMachine(cpu=cpu["model"], usable_cores=runtime.usable_cores(),
                              flags=sorted(f for f, present in cpu["flags"].items() if present),
                              openvino_capabilities=list(runtime.openvino_capabilities())),
        versions={k: v for k, v in package_versions().items() if k in ("onnxruntime", "openvino")},
        runtimes=list(allowed), rule=RULE, members={m: MeasuredMember.from_dict(r) for m, r in measured.items()},
        chosen=choice, fixed_by_user=fixed,
        decisions={m: decision(measured[m], v, fallback) for m, v in choice.items()},
        gates=gated if gated is not None else {"where": gates_where})
    return choice, combination, record


def apply_choice(manifest: Manifest, choice: dict[str, str], combination: dict | None, fixed: dict[str, str]) -> None:
    """Record the chosen served variants and the combination served together in a manifest
    (before the repository is rendered from it)."""
    for member, variant in choice.items():
        manifest.models[member].serve(variant)
    if combination is not None:
        manifest.served_combination = ServedCombination(
            variants={m: v for m, v in {**fixed, **choice}.items() if v != REFERENCE}, gate=combination)
    elif not any(v != REFERENCE for v in fixed.values()):
        manifest.served_combination = None


def load_exported(root: Path) -> Manifest:
    manifest_file = root / MANIFEST_FILE
    if not manifest_file.is_file():
        raise TuneError(f"{manifest_file} not found: tune a repository written by `mmrec export`")
    return Manifest.read(manifest_file)


def tune_repository(root: Path, runtimes: tuple[str, ...] | None = None, rounds: int = DEFAULT_ROUNDS,
                    progress: Callable[[str], None] = lambda message: None,
                    fixed: dict[str, str] | None = None) -> dict:
    """Gate again, measure, choose the fastest admitted variant of each encoder (members in
    `fixed`, chosen by the user, keep their variant), then render the repository again from the
    new plan (`rerender`: a staged copy swapped in whole); returns the manifest's `tuning` record."""
    fixed = dict(fixed or {})
    root = Path(root)
    manifest = load_exported(root)
    target = Target(manifest.target)
    if manifest.gpu:
        raise TuneError(f"this {target.value} repository places its encoders on a GPU; tuning chooses CPU runtimes")
    if not fixed and manifest.tuning is not None:  # a re-tune keeps what the user pinned at export (--serve-variant)
        fixed = dict(manifest.tuning.fixed_by_user)
    allowed = allowed_runtimes(target, runtimes)
    gated = regate(root, manifest, allowed, progress)
    for member, variant in fixed.items():
        if gated is None or variant == REFERENCE or member not in gated["members"]:
            continue
        if variant in refused_here(gated, member):
            raise TuneError(f"{member} [{variant}] was pinned at export but fails its quality gate on this machine: "
                            + "; ".join(gated["members"][member][variant]["reasons"]))
        if variant not in gated["members"][member]:
            raise TuneError(f"{member} [{variant}] was pinned at export but cannot be gated here (its runtime is "
                            f"left out or unavailable: runtimes {', '.join(allowed)})")
    combinations = gated["combinations"] if gated is not None else (manifest.combinations or [])
    choice, combination, record = decide(
        manifest.models, repository_graphs(root, manifest), target, allowed, manifest.contract, rounds,
        progress, fixed, gated, combinations, "export machine (no gate set in this repository: re-export)")
    apply_choice(manifest, choice, combination, fixed)
    manifest.tuning = record
    rerender(root, manifest)
    return record.to_dict()


def serve_variants(root: Path, choice: dict[str, str]) -> None:
    """Serve the named variants (admitted at export) without measuring: the manifest's choice
    changes and the repository is rendered again from it. What is then served together must be
    ORT FP32 throughout or a pair whose combination gate passed."""
    root = Path(root)
    manifest = load_exported(root)
    for member, variant in choice.items():
        record = manifest.models[member].variants.get(variant)
        if record is None or not record.written:
            raise TuneError(f"{member} [{variant}] was not admitted at export: it cannot be served")
    wanted = {**{m: r.served_variant for m, r in manifest.models.items() if m in TUNED_MEMBERS}, **choice}
    combination = next((c for c in manifest.combinations or [] if c.get("passed")
                        and all(c["variants"].get(m, REFERENCE) == v for m, v in wanted.items())), None)
    if combination is None and any(v != REFERENCE for v in wanted.values()):
        raise TuneError(f"{wanted} is in no pair whose combination gate passed at export: it cannot be served")
    apply_choice(manifest, choice, combination, fixed={m: v for m, v in wanted.items() if m not in choice})
    rerender(root, manifest)
