"""Every CPU runtime x precision side by side, in one run, with the quality of each (issue 15).

Three views, all on real inputs (held-out Tux Paint captions joined up to the maximum length,
real photos and the Tux Paint drawings decoded by the served decoder):
  offline   each encoder alone at batch 1 and 32: ORT FP32 / INT8, OpenVINO FP32 / BF16 / INT8,
            PyTorch FP32 and PyTorch BF16 autocast (where the CPU has native BF16), the speed-up
            of each over ORT FP32, and the mean/min cosine of each output to ORT FP32's;
  pipeline  text + image encoders + fusion on 32 items: ORT FP32 padded to the longest text,
            ORT FP32 with rows at their length bucket (the runner's way), and the tuned variants;
  served    `item_encoder` over gRPC, one request of 32 items, the same three arms, each its own
            Triton, requests alternating.
Variants that fail their gate or cannot run on this CPU are listed with the reason.

Every view times its arms in many short interleaved rounds, one value per arm per round (the
median of the round's calls), and gives each speed-up paired by round with its 95 % interval over
rounds (mmrec.stats), judged against 1 with Interval.verdict ("faster": met / missed / not
conclusive). Each view also runs its reference twice per round (the A/A arm): when the reference
differs from itself the view's verdicts read "not judged (A/A unstable)".

`python -m mmrec.benchmarks.runtimes --fp32 FP32_REPO --tuned TUNED_REPO --output benchmarks/results/runtimes`
"""
from __future__ import annotations

import os

# PyTorch's OpenMP threads busy-wait after each op by default; in one process with ORT and
# OpenVINO that spin steals the cores of the next arm (and made PyTorch's own batch-1 runs look
# 50x slow). Passive waiting must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import sys
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import typer  # noqa: E402

from mmrec import metrics, schema  # noqa: E402
from mmrec.export.tuning import time_interleaved  # noqa: E402
from mmrec.stats import Interval, aa_check, paired_ratio, pooled_ratio, round_medians  # noqa: E402
from mmrec.layout import RepositoryLayout  # noqa: E402
from mmrec.release_manifest import VariantRecord  # noqa: E402
from mmrec.export.variants import VARIANTS  # noqa: E402
from mmrec.model_repository.lib import runtime  # noqa: E402
from mmrec.model_repository.lib.runner_settings import RunnerSettings  # noqa: E402
from .served_engine import real_items  # noqa: E402
from mmrec.reference import ReferencePipeline  # noqa: E402
from .machine import RunStart, cpu_share, git_commit, loadavg, machine_info, write_results  # noqa: E402
from .targets import NOT_JUDGED  # noqa: E402

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
DEFAULT_ROUNDS = 10  # rounds are the independent repeats (mmrec.stats): at least 10
REFERENCE = "fp32"  # offline: ORT FP32
PADDED = "ort-fp32-padded"  # pipeline and served: ORT FP32 padded to the longest text
PAIRS = (("ort-fp32", PADDED), ("tuned", PADDED), ("tuned", "ort-fp32"))  # (arm, base) of pipeline and served
REQUESTS_PER_ROUND = 3  # served: one round's value is the median of these


def aa_arm(reference: str) -> str:
    return f"{reference} (A/A)"


def section_aa(interval: Interval, reference: str) -> dict:
    """A view's A/A record: its reference against its own second arm (mmrec.stats.aa_check)."""
    return {**aa_check(interval), "arm": f"{reference} twice per round"}


def faster(interval: Interval, aa: dict) -> str:
    """Is the arm faster than its base (speed-up interval against 1)? Not judged when the view's
    A/A arm showed a difference."""
    return NOT_JUDGED if aa.get("stable") is False else interval.verdict(1.0, "above")


def speedup_record(interval: Interval, aa: dict) -> dict:
    return {"speedup": round(interval.point, 4), "interval": interval.to_dict(), "faster": faster(interval, aa)}


def _ms(seconds: list[float]) -> list[float]:
    return [round(1e3 * s, 3) for s in seconds]


def _inputs(reference: ReferencePipeline, batch: int) -> tuple[list[str], list[bytes]]:
    """`batch` real items (served_engine.real_items: the engine section's request)."""
    return real_items(batch)


class TorchRunner:
    """The PyTorch module export started from, FP32 or BF16 autocast: the peer a user would try."""

    def __init__(self, module, bf16: bool) -> None:
        import torch

        self.module, self.bf16, self.torch = module.eval(), bf16, torch

    def run(self, output_names, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.module(*[torch.from_numpy(v) for v in feed.values()])
        out = out[0] if isinstance(out, tuple) else out
        return [out.float().numpy()]


def _torch_encoders() -> dict:
    from mmrec.export.models.image import DEFAULT_IMAGE_ENCODER, load_image_encoder
    from mmrec.export.models.text import load_text_encoder

    return {schema.TEXT_ENCODER: load_text_encoder(None)[0],
            schema.IMAGE_ENCODER: load_image_encoder(DEFAULT_IMAGE_ENCODER, None)[0]}


def offline(repository: Path, feeds: dict[str, dict[int, dict]], rounds: int, bf16_cpu: bool) -> dict:
    """Each encoder alone: every runtime x precision the machine can run, vs ORT FP32."""
    import torch

    manifest = RepositoryLayout(repository).load_manifest()
    torch_models = _torch_encoders()
    threads = runtime.usable_cores()
    torch.set_num_threads(threads)
    report = {}
    for member, by_batch in feeds.items():
        runners, quality_skips = {}, {}
        variants = manifest.models[member].variants
        for name, entry in variants.items():
            spec = VARIANTS[name]
            reason = runtime.unavailable_reason(spec.runtime, spec.precision)
            if not spec.cpu:
                continue
            if reason or not entry.path:
                quality_skips[name] = reason or "failed its gate at export: " + "; ".join(
                    (entry.gate or {}).get("reasons", ["not written"]))
                continue
            runners[name] = runtime.open_session(repository / entry.path, spec.runtime, threads, spec.precision)
        runners["pytorch-fp32"] = TorchRunner(torch_models[member], bf16=False)
        if bf16_cpu:
            runners["pytorch-bf16-autocast"] = TorchRunner(torch_models[member], bf16=True)
        else:
            quality_skips["pytorch-bf16-autocast"] = "no native BF16 on this CPU (" + "/".join(BF16_FLAGS) + " absent)"
        arms = {**runners, aa_arm(REFERENCE): runners[REFERENCE]}  # the A/A arm: same session, own slot
        times, calls, quality = {}, {}, {}
        for batch, feed in by_batch.items():
            print(f"offline {member} batch={batch}: {len(runners)} runners and the A/A arm x {rounds} rounds",
                  file=sys.stderr, flush=True)
            times[batch], calls[f"batch={batch}"] = time_interleaved(arms, feed, rounds)
            reference = runners[REFERENCE].run(None, feed)[0]
            for name, runner in runners.items():
                cos = metrics.row_cosine(reference, runner.run(None, feed)[0])
                quality.setdefault(name, []).extend(cos.tolist())
        aa = section_aa(pooled_ratio([(t[REFERENCE], t[aa_arm(REFERENCE)]) for t in times.values()]), REFERENCE)
        rows = {name: runner_record(times, name, aa, quality[name], variants.get(name)) for name in runners}
        report[member] = {"threads": threads, "rounds": rounds, "calls_per_round": calls, "aa": aa,
                          "aa_ms_per_round": {f"batch={b}": _ms(t[aa_arm(REFERENCE)]) for b, t in times.items()},
                          "runners": rows, "not_run": quality_skips}
    return report


def runner_record(times: dict[int, dict[str, list[float]]], name: str, aa: dict, cosines: list[float],
                  variant: VariantRecord | None) -> dict:
    """One runner's speed-up over ORT FP32 per batch (paired by round) and pooled over the batches."""
    per_batch = {}
    for b, t in times.items():
        interval = paired_ratio(t[REFERENCE], t[name])
        per_batch[f"batch={b}"] = {"median_ms": round(1e3 * float(np.median(t[name])), 2),
                                   "ms_per_round": _ms(t[name]), **speedup_record(interval, aa)}
    pooled = pooled_ratio([(t[REFERENCE], t[name]) for t in times.values()])
    cos = np.array(cosines)
    return {"cases": per_batch, **speedup_record(pooled, aa),
            "cosine_vs_ort_fp32": {"mean": round(float(cos.mean()), 6), "min": round(float(cos.min()), 6)},
            "gate": (variant.gate or {}).get("passed") if variant is not None else None}


def pipeline(fp32: ReferencePipeline, tuned: ReferencePipeline, texts: list[str], images: list[bytes],
             rounds: int) -> dict:
    """Encoders + fusion on one batch, pre-decoded pixels (the decoder is the same in every arm).
    Arms: ORT FP32 with the batch padded to its longest text (what a plain pipeline does), ORT
    FP32 with rows run at their length bucket (what the runner does), and the tuned variants."""
    ids, mask = fp32.tokenizer(texts)
    pixels = fp32.preprocess_images(images)

    class Arm:
        def __init__(self, pipe: ReferencePipeline, bucketed: bool) -> None:
            self.pipe, self.bucketed = pipe, bucketed

        def run(self, _names, _feed) -> list[np.ndarray]:
            feed = {schema.INPUT_IDS: ids, schema.ATTENTION_MASK: mask}
            text = (self.pipe.embed_tokens(ids, mask) if self.bucketed
                    else self.pipe.sessions[schema.TEXT_ENCODER].run(None, feed)[0])
            image = self.pipe.embed_pixels(pixels)
            return [self.pipe.fuse(text, image)[schema.ITEM_EMBEDDING]]

    arms = {PADDED: Arm(fp32, False), "ort-fp32": Arm(fp32, True), "tuned": Arm(tuned, True)}
    arms[aa_arm(PADDED)] = arms[PADDED]
    print(f"pipeline: batch {len(texts)}, {len(arms)} arms (one A/A) x {rounds} rounds", file=sys.stderr, flush=True)
    times, calls = time_interleaved(arms, {}, rounds)
    outputs = {arm: arms[arm].run(None, {})[0] for arm in (PADDED, "ort-fp32", "tuned")}
    groups = runtime.length_groups(mask, fp32.preprocess.seq_buckets)
    aa = section_aa(paired_ratio(times[PADDED], times[aa_arm(PADDED)]), PADDED)
    return {"batch": len(texts), "text_width": int(mask.shape[1]), "rounds": rounds, "calls_per_round": calls,
            "padding": {"real_tokens": int(mask.sum()), "computed_padded": int(mask.size),
                        "computed_bucketed": int(sum(len(rows) * width for rows, width in groups))},
            "median_ms": {k: round(1e3 * float(np.median(v)), 1) for k, v in times.items()},
            "ms_per_round": {k: _ms(v) for k, v in times.items()}, "aa": aa,
            "speedups": speedups(times, outputs, aa)}


def speedups(per_round: dict[str, list[float]], outputs: dict[str, np.ndarray], aa: dict) -> dict:
    """Each arm's speed-up over its base, paired by round, with the cosine of its item embedding."""
    found = {}
    for arm, base in PAIRS:
        cos = metrics.row_cosine(outputs[base], outputs[arm])
        found[f"{arm}_over_{base}"] = {
            **speedup_record(paired_ratio(per_round[base], per_round[arm]), aa),
            "item_embedding_cosine": {"mean": round(float(cos.mean()), 5), "min": round(float(cos.min()), 5)}}
    return found


SHARE_GOAL = 0.9  # issue 21: served tuned-over-FP32 speed-up >= 90 % of the pipeline's


def served_share(pipeline_view: dict, served_view: dict, pair: str = "tuned_over_ort-fp32") -> dict:
    """How much of the tuned variants' gain over bucketed ORT FP32 survives serving: the served
    speed-up over the pipeline's (pre-decoded pixels), both from this run. Served requests also
    decode their images, the same work in both arms, so the share is at most what that leaves."""
    offline, online = pipeline_view["speedups"][pair]["speedup"], served_view["speedups"][pair]["speedup"]
    return {"pair": pair, "pipeline_speedup": offline, "served_speedup": online,
            "share_of_gain": round((online - 1) / (offline - 1), 3) if offline > 1 else None,
            "speedup_ratio": round(online / offline, 3), "goal": SHARE_GOAL}


def padded_copy(repository: Path, into: Path) -> Path:
    """The repository with the text runner's length grouping off (the behaviour before it): files
    symlinked, only the configs that run the text encoder rewritten (its own; on the portable
    target also item_encoder's `text_encoder.` settings, which the item engine runs)."""
    import os
    import shutil

    from mmrec.export.repository import CONFIG_FILE, parse, render, runner_settings, set_runner_settings

    copy = into / "padded"
    shutil.copytree(repository, copy, copy_function=os.symlink)
    # one bucket, the longest: every row at the batch's width (an empty setting would mean "unrecorded")
    padded = (RepositoryLayout(repository).read_contract().max_seq_len,)
    for model in (schema.TEXT_ENCODER, schema.ITEM_ENCODER):  # the member, and the item engine's text branch
        config_file = copy / model / CONFIG_FILE
        config = parse(config_file.read_text())
        scope = None if model == schema.TEXT_ENCODER else schema.TEXT_ENCODER
        if config.backend != "python" or not any(k in config.parameters for k in RunnerSettings.keys(scope)):
            continue  # an ensemble (native targets): its text_encoder step is the member above
        set_runner_settings(config, runner_settings(config, scope).with_(seq_buckets=padded), scope)
        config_file.unlink()
        config_file.write_text(render(config))
    return copy


def served(fp32_repo: Path, tuned_repo: Path, texts: list[str], images: list[bytes], rounds: int) -> dict:
    """`item_encoder` over gRPC, one request of the whole batch: ORT FP32 with the batch padded to
    its longest text, ORT FP32 as exported (rows at their length bucket), and the tuned repository,
    each its own Triton, all up at once (an idle server costs no CPU), requests alternating."""
    from contextlib import ExitStack

    import tritonclient.grpc as grpcclient

    from .serving import running_server

    def request() -> list:
        text = grpcclient.InferInput(schema.TEXT, [len(texts), 1], "BYTES")
        text.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
        picture = grpcclient.InferInput(schema.IMAGE, [len(images), 1], "BYTES")
        picture.set_data_from_numpy(np.array([[i] for i in images], dtype=object))
        return [text, picture]

    samples: dict[str, list[list[float]]] = {}
    outputs = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        repos = {PADDED: padded_copy(fp32_repo, Path(tmp)), "ort-fp32": fp32_repo, "tuned": tuned_repo}
        clients = {}
        for name, repo in repos.items():
            server = stack.enter_context(running_server(repo, Path(tmp) / f"{name}.log"))
            clients[name] = grpcclient.InferenceServerClient(server.urls["grpc"])
        for name, client in clients.items():
            for _ in range(2):  # warm-up
                outputs[name] = client.infer(schema.ITEM_ENCODER, request()).as_numpy(schema.ITEM_EMBEDDING)
        clients[aa_arm(PADDED)] = clients[PADDED]  # the A/A arm: the same server, its own slot
        samples = {name: [] for name in clients}
        order = list(clients.items())
        for r in range(rounds):  # alternate the order: A B C D, then D C B A
            for name, client in (order if r % 2 == 0 else order[::-1]):
                timed = []
                for _ in range(REQUESTS_PER_ROUND):
                    t = time.perf_counter()
                    client.infer(schema.ITEM_ENCODER, request())
                    timed.append(time.perf_counter() - t)
                samples[name].append(timed)
            print(f"served round {r + 1}/{rounds}: " + ", ".join(
                f"{k} {1e3 * np.median(v[-1]):.0f} ms" for k, v in samples.items()), file=sys.stderr, flush=True)
    per_round = {k: round_medians(v) for k, v in samples.items()}
    aa = section_aa(paired_ratio(per_round[PADDED], per_round[aa_arm(PADDED)]), PADDED)
    return {"batch": len(texts), "rounds": rounds, "requests_per_round": REQUESTS_PER_ROUND,
            "samples_per_arm": rounds * REQUESTS_PER_ROUND,
            "median_ms": {k: round(1e3 * float(np.median(v)), 1) for k, v in per_round.items()},
            "ms_per_round": {k: _ms(v) for k, v in per_round.items()}, "aa": aa,
            "speedups": speedups(per_round, outputs, aa)}


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    members = list(report["offline"])
    fig, axes = plt.subplots(1, len(members), figsize=(6 * len(members), 4), squeeze=False)
    for ax, member in zip(axes[0], members):
        rows = report["offline"][member]["runners"]
        names = list(rows)
        for k, case in enumerate(next(iter(rows.values()))["cases"]):
            intervals = [rows[n]["cases"][case]["interval"] for n in names]
            values = [iv["point"] for iv in intervals]
            errors = np.array([[iv["point"] - (iv["low"] or iv["point"]), (iv["high"] or iv["point"]) - iv["point"]]
                               for iv in intervals]).T
            ax.barh(np.arange(len(names)) + 0.4 * k, values, 0.4, xerr=errors, label=case)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yticks(np.arange(len(names)) + 0.2, names)
        ax.set_xlabel("speed-up over ORT FP32 (higher is faster), 95% interval over paired rounds")
        ax.set_title(member)
        ax.legend()
    fig.suptitle(report["machine"]["cpu"]["model"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


RESULTS_FILE = "runtimes.json"


def save(output: Path, report: dict, start: RunStart) -> Path:
    """runtimes.json with its provenance (commit, machine, load before/after, command, times)."""
    return write_results(Path(output) / RESULTS_FILE, report, start, indent=2, sort_keys=True)


def _tuned_choice(repository: Path) -> dict[str, str] | None:
    """member -> variant `mmrec tune` chose for the tuned repository (None: it was never tuned)."""
    tuning = RepositoryLayout(repository).load_manifest().tuning
    return dict(tuning.chosen) if tuning is not None else None


def main(fp32: Path = typer.Option(..., help="Repository serving ORT FP32 (export --no-tune)."),
         tuned: Path = typer.Option(..., help="The same export after `mmrec tune` on this machine."),
         output: Path = typer.Option(Path("benchmarks/results/runtimes")),
         rounds: int = typer.Option(DEFAULT_ROUNDS, min=3), batch: int = typer.Option(32),
         skip_served: bool = typer.Option(False, help="Leave out the Triton arm (no server start).")) -> None:
    run_start = RunStart.now()
    cpu = machine_info()["cpu"]
    bf16_cpu = any(cpu["flags"].get(f) for f in BF16_FLAGS)
    fp32_pipe, tuned_pipe = ReferencePipeline(fp32), ReferencePipeline(tuned)
    texts, images = _inputs(fp32_pipe, batch)
    ids, mask = fp32_pipe.tokenizer(texts)
    pixels = fp32_pipe.preprocess_images(images)
    feeds = {schema.TEXT_ENCODER: {1: {schema.INPUT_IDS: ids[1:2, :int(mask[1].sum())],
                                       schema.ATTENTION_MASK: mask[1:2, :int(mask[1].sum())]},
                                   batch: {schema.INPUT_IDS: ids, schema.ATTENTION_MASK: mask}},
             schema.IMAGE_ENCODER: {1: {schema.PIXEL_VALUES: pixels[:1]}, batch: {schema.PIXEL_VALUES: pixels}}}
    start = {"loadavg": loadavg(), "cpu_share": cpu_share()}
    report = {"machine": machine_info(), "commit": git_commit(), "start": start,
              "tuned_choice": _tuned_choice(tuned),
              "text_tokens_batch": int(ids.shape[1]), "offline": offline(fp32, feeds, rounds, bf16_cpu),
              "pipeline": pipeline(fp32_pipe, tuned_pipe, texts, images, rounds)}
    if not skip_served:
        report["served"] = served(fp32, tuned, texts, images, rounds)
        report["served_share_of_pipeline_gain"] = served_share(report["pipeline"], report["served"])
    report["end"] = {"loadavg": loadavg(), "cpu_share": cpu_share()}
    save(output, report, run_start)
    plot(report, output / "runtimes.png")
    summary = {m: {n: r["speedup"] for n, r in v["runners"].items()} for m, v in report["offline"].items()}
    print(json.dumps({"offline_speedup_vs_ort_fp32": summary, "pipeline": report["pipeline"],
                      "served": report.get("served")}, indent=2))


if __name__ == "__main__":
    typer.run(main)
