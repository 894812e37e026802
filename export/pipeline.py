"""`mmrec export` end to end: sources -> features -> fusion training -> ONNX + parity ->
variants + gates -> (TensorRT) -> Triton repository -> manifest.

Everything is written into a staging folder beside the output and moved into place only when
every gate passed, so a failed export never leaves a half-written repository behind.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from mmrec import schema
from mmrec.export_defaults import DEFAULT_REPOSITORY
from mmrec.layout import FUSION_CHECKPOINT, RepositoryLayout  # noqa: F401 - FUSION_CHECKPOINT re-exported
from mmrec.preprocess import (DEFAULT_IMAGE_FIT, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_IMAGE_BYTES,
                              DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_TEXT_BYTES,
                              DEFAULT_SEQ_BUCKETS, IMAGE_FITS, TOKENIZER_FILE, ServedContract)
from mmrec.model_repository.lib import runtime
from mmrec.model_repository.lib.text_preprocessing import TextTokenizer
from mmrec.reference import torch_member
from . import variants as var
from .choices import DEFAULT_SEEDS, PRECISIONS, Reporter  # noqa: F401 - re-exported
from .data import Item, categories_of, dataset_fingerprint, image_hash, load_items, split
from .errors import ExportError, ModelSourceError, QualityGateError
from .features import EncodedDataset, ItemFeatures, encode_dataset
from .gates import Fuse, GateSet, VariantGates, run_feeds, variant_outputs
from .manifest import file_entry, package_versions, sha256_file, sha256_tree, write_manifest
from .models.fusion import FusionConfig, FusionHead
from .models.image import DEFAULT_IMAGE_ENCODER, IMAGE_ENCODERS, load_image_encoder
from .models.text import load_text_encoder, text_hidden_size
from .onnx_export import export_onnx, slim
from .parity import ATOL_FP32, check_parity, cpu_session
from .recipes import CALIBRATION_ITEMS, RECIPES, ExportInputs
from .repository import RepositoryPlan, Target, write_repository
from .text_int8 import calibration_texts, quantize_text_int8
from .train import evaluate_fusion, seed_spread, train_fusion
from .tuning import tune_repository

QUANTIZABLE = tuple(name for name, recipe in RECIPES.items() if recipe.quantizable)
CALIBRATION_IMAGES = CALIBRATION_ITEMS
CHECKPOINT_METADATA_KEY = "mmrec_fusion"
DEFAULT_OUTPUT = DEFAULT_REPOSITORY


@dataclass
class ExportOptions:
    output: Path = DEFAULT_OUTPUT
    target: Target = Target.portable
    text_model: Path | None = None
    image_encoder: str = DEFAULT_IMAGE_ENCODER
    image_weights: Path | None = None
    fusion_checkpoint: Path | None = None
    precisions: tuple[str, ...] = PRECISIONS
    serve_variants: dict[str, str] = field(default_factory=dict)  # member -> fp32|int8|fp16
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    seq_buckets: tuple[int, ...] = DEFAULT_SEQ_BUCKETS
    # Request limits the python models enforce (and the client checks before sending).
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES
    atol: float = ATOL_FP32
    image_fit: str = DEFAULT_IMAGE_FIT
    seeds: int = DEFAULT_SEEDS
    gpu: bool = False
    models: tuple[str, ...] = schema.ONNX_MODELS  # which members to export (all for a repository)
    # CPU runtimes whose variants are built, gated and offered to tuning (openvino when installed)
    runtimes: tuple[str, ...] = field(default_factory=lambda: default_runtimes())
    tune: bool = True  # measure the gated CPU variants here and serve the fastest (portable target)

    def validate(self) -> None:
        """Fail before any work on options that cannot succeed."""
        unknown = set(self.precisions) - set(PRECISIONS)
        if unknown:
            raise ExportError(f"unknown precision(s) {sorted(unknown)}; choose from {PRECISIONS}")
        if "fp32" not in self.precisions:
            raise ExportError("fp32 is required: it is the reference every variant is gated against")
        if self.image_encoder not in IMAGE_ENCODERS:
            raise ModelSourceError(f"unknown image encoder {self.image_encoder!r}; choose one of: "
                                   + ", ".join(sorted(IMAGE_ENCODERS)))
        if self.text_model is not None and not Path(self.text_model).is_dir():
            raise ModelSourceError(f"text model folder {self.text_model} does not exist")
        if self.image_weights is not None and not Path(self.image_weights).is_file():
            raise ModelSourceError(f"image weights file {self.image_weights} does not exist")
        if self.fusion_checkpoint is not None and not Path(self.fusion_checkpoint).is_file():
            raise ModelSourceError(f"fusion checkpoint {self.fusion_checkpoint} does not exist")
        if self.image_fit not in IMAGE_FITS:
            raise ExportError(f"unknown image fit {self.image_fit!r}; choose from {IMAGE_FITS}")
        if not 1 <= self.seeds <= 100:
            raise ExportError(f"--seeds must be within 1..100, got {self.seeds}")
        if not 1 <= self.max_batch_size <= 1024:
            raise ExportError(f"max batch size {self.max_batch_size} is outside 1..1024")
        if not 8 <= self.max_seq_len <= 512:
            raise ExportError(f"max sequence length {self.max_seq_len} is outside 8..512")
        if not self.seq_buckets or min(self.seq_buckets) < 1:  # above max_seq_len: dropped by the contract
            raise ExportError(f"--seq-buckets must be positive token counts, got {list(self.seq_buckets)}")
        for flag, value in (("--max-image-bytes", self.max_image_bytes),
                            ("--max-image-pixels", self.max_image_pixels),
                            ("--max-text-bytes", self.max_text_bytes)):
            if value < 1:
                raise ExportError(f"{flag} must be at least 1, got {value}")
        for name in self.runtimes:
            if name not in runtime.RUNTIMES:
                raise ExportError(f"unknown runtime {name!r}; choose from {runtime.RUNTIMES}")
            reason = runtime.unavailable_reason(name)
            if reason:
                raise ExportError(f"--runtime {name}: {reason}")
        if "onnxruntime" not in self.runtimes:
            raise ExportError("onnxruntime is required: its FP32 run is the reference of every gate")
        for member, variant in self.serve_variants.items():
            if member not in schema.ONNX_MODELS:
                raise ExportError(f"--serve-variant names unknown model {member!r}")
            spec = var.VARIANTS.get(variant)
            if spec is None:
                raise ExportError(f"--serve-variant {member}={variant}: unknown variant; choose from "
                                  + ", ".join(var.VARIANTS))
            if spec.graph not in self.precisions or spec.runtime not in self.runtimes:
                raise ExportError(f"--serve-variant {member}={variant}: {variant} is not being exported")
            served_by = {Target.onnxruntime: "onnxruntime", Target.openvino: "openvino"}.get(self.target)
            if served_by and spec.runtime != served_by:
                raise ExportError(f"--serve-variant {member}={variant}: target {self.target.value} runs "
                                  f"{served_by} only; choose a {served_by} variant")
        if self.target is Target.openvino and "openvino" not in self.runtimes:
            raise ExportError("target openvino needs the openvino runtime (pip install openvino)")
        if self.target is Target.openvino and "BF16" in runtime.openvino_capabilities():
            # the backend cannot force FP32 (it passes no precision hint) and OpenVINO runs BF16
            # by default on such CPUs: only the gated BF16 variants would say what really runs
            wanted = {v for v in self.serve_variants.values()}
            if not wanted or any(v != "openvino-bf16" for v in wanted):
                raise ExportError("target openvino on a CPU with native BF16: the OpenVINO backend runs "
                                  "BF16 there whatever the variant says; serve openvino-bf16 explicitly "
                                  "(--serve-variant text_encoder=openvino-bf16 --serve-variant "
                                  "image_encoder=openvino-bf16) or use --target portable")
        if self.target is Target.tensorrt:
            from .tensorrt import tensorrt_unavailable_reason
            reason = tensorrt_unavailable_reason()
            if reason:
                raise ExportError(f"target tensorrt needs a GPU build machine: {reason}")


def default_runtimes() -> tuple[str, ...]:
    """Every CPU runtime installed here (ONNX Runtime always; OpenVINO when importable)."""
    return tuple(name for name in runtime.RUNTIMES if runtime.unavailable_reason(name) is None)


@dataclass
class Sources:
    text_model: torch.nn.Module
    text_folder: Path
    image_model: torch.nn.Module
    image_weights: Path
    preprocess: ServedContract
    items: list[Item]
    train: list[Item]
    validation: list[Item]
    held_out: list[Item]
    image_encoder: str


@contextmanager
def staging_dir(output: Path) -> Iterator[Path]:
    """A fresh folder beside `output`; moved over it on success, deleted on failure."""
    output = Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)


def load_sources(options: ExportOptions) -> Sources:
    text_model, text_folder = load_text_encoder(options.text_model)
    image_model, entry, weights = load_image_encoder(options.image_encoder, options.image_weights)
    items = load_items()
    parts = split(items, [image_hash(item) for item in items])
    preprocess = ServedContract(
        max_seq_len=options.max_seq_len, seq_buckets=options.seq_buckets,
        image_size=entry.image_size, image_mean=entry.mean, image_std=entry.std,
        image_fit=options.image_fit, categories=categories_of(items), max_batch_size=options.max_batch_size,
        max_image_bytes=options.max_image_bytes, max_image_pixels=options.max_image_pixels,
        max_text_bytes=options.max_text_bytes,
        text_dim=text_hidden_size(text_model), image_dim=entry.feature_dim,
        item_dim=schema.ITEM_EMBEDDING_DIM)
    return Sources(text_model, text_folder, image_model, weights, preprocess, items, parts.train,
                   parts.validation, parts.held_out, options.image_encoder)


def load_fusion_checkpoint(path: Path, preprocess: ServedContract) -> FusionHead:
    """A user's fusion head: safetensors with its FusionConfig and categories in the metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        header = json.loads(metadata[CHECKPOINT_METADATA_KEY])
        config = FusionConfig(**header["fusion_config"])
        categories = tuple(header["categories"])
        state = load_file(str(path))
    except Exception as err:
        raise ModelSourceError(f"cannot read fusion checkpoint {path} (expected safetensors written "
                               f"by `mmrec export`): {err}") from err
    if categories != preprocess.categories:
        raise ModelSourceError(f"fusion checkpoint {path} was trained on categories {categories}, "
                               f"the data has {preprocess.categories}")
    if (config.text_dim, config.image_dim) != (preprocess.text_dim, preprocess.image_dim):
        raise ModelSourceError(f"fusion checkpoint {path} expects text/image widths "
                               f"{config.text_dim}/{config.image_dim}, the encoders give "
                               f"{preprocess.text_dim}/{preprocess.image_dim}")
    model = FusionHead(config)
    model.load_state_dict(state)
    return model.eval()


def save_fusion_checkpoint(model: FusionHead, categories: tuple[str, ...], path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in sorted(model.state_dict().items())}
    # one metadata key: safetensors writes several keys in hash order, breaking determinism
    header = {"fusion_config": model.config.to_dict(), "categories": list(categories)}
    save_file(state, str(path), metadata={CHECKPOINT_METADATA_KEY: json.dumps(header, sort_keys=True)})
    return path


# ---- parity cases on real inputs --------------------------------------------------------------

def ort_outputs(path: Path, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Run several feeds through one ORT session (parity's options), concatenating the first output."""
    return run_feeds(cpu_session(path), feeds)


def _variant_fields(variant: var.Variant) -> dict:
    return {"graph": variant.graph, "runtime": variant.runtime, "precision": variant.precision}


def _place_variant_files(models: dict, written: dict[str, Path], root: Path) -> None:
    """Record each admitted variant's file: the served graph is `<member>/1/model.onnx`; every
    other graph an admitted variant runs is kept once as `<member>/variants/<graph>.onnx`."""
    for name, info in models.items():
        served_graph = info["variants"][info["served_variant"]].get("graph", info["served_variant"])
        for variant, entry in info["variants"].items():
            file = entry.pop("file", None)
            graph = entry.get("graph", variant)
            if name in written and graph == served_graph and (entry.get("written") or variant == info["served_variant"]):
                entry.update(file_entry(written[name], root))
            elif entry.get("written") and file is not None:
                dest = RepositoryLayout(root).variant_file(name, graph)
                if not dest.exists():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(file, dest)
                entry.update(file_entry(dest, root))


# ---- the pipeline -------------------------------------------------------------------------------

class Exporter:
    def __init__(self, options: ExportOptions, reporter: Reporter | None = None) -> None:
        self.options = options
        self.reporter = reporter or Reporter()

    def run(self) -> dict:
        options = self.options
        options.validate()
        tick = self.reporter.step("loading encoders and data")
        sources = load_sources(options)
        tick()
        with staging_dir(options.output) as root:
            manifest = self._export_into(root, sources)
            write_manifest(root, manifest)
            if options.tune and options.target is not Target.tensorrt and not options.gpu:
                tick = self.reporter.step("tuning: timing the admitted CPU variants on this machine")
                tuning = tune_repository(root, options.runtimes, progress=self.reporter.done,
                                         fixed=options.serve_variants, regate_here=False)
                tick()
                manifest = RepositoryLayout(root).read_manifest()
                self.reporter.done("serving " + ", ".join(f"{m}={v}" for m, v in tuning["chosen"].items()))
        self.reporter.done(f"repository written to {Path(options.output).resolve()}")
        return manifest

    def _export_into(self, root: Path, sources: Sources) -> dict:
        o, p = self.options, sources.preprocess
        members = schema.member_specs_for(p)
        tokenizer_file = sources.text_folder / TOKENIZER_FILE
        layout = RepositoryLayout(root)
        tokenizer = TextTokenizer.for_contract(p, tokenizer_file)

        # a user's checkpoint is checked before the long feature pass
        fusion = load_fusion_checkpoint(o.fusion_checkpoint, p) if o.fusion_checkpoint else None
        n = len(sources.items)
        tick = self.reporter.step(f"decoding and encoding {n} items with the PyTorch encoders", 2 * n)
        dataset = encode_dataset(sources.text_model, sources.image_model, p, tokenizer_file,
                                 sources.items, tick, tokenizer=tokenizer)
        train_f, val_f, held_f = (dataset.subset(part) for part in
                                  (sources.train, sources.validation, sources.held_out))

        config = FusionConfig.from_contract(p)
        if fusion is not None:
            training = {"source": "checkpoint", "sha256": sha256_file(o.fusion_checkpoint)}
        else:
            fusion, loss = train_fusion(train_f, config, self.reporter.step("training the fusion head", 60))
            training = {"source": "trained", "final_loss": round(loss, 6), "train_items": len(train_f.labels)}
            if o.seeds > 1:
                training["held_out_seed_spread"] = seed_spread(
                    train_f, {"held_out": held_f}, config, o.seeds,
                    self.reporter.step(f"fusion head: spread over {o.seeds} seeds", o.seeds),
                    first=fusion)["held_out"]
        training["validation"] = evaluate_fusion(fusion, val_f, len(p.categories), p.categories)
        training["held_out"] = evaluate_fusion(fusion, held_f, len(p.categories), p.categories)
        save_fusion_checkpoint(fusion, p.categories, layout.fusion_checkpoint)

        staging = root / ".onnx"
        self._inputs = ExportInputs(p, tokenizer, dataset, sources.train, sources.held_out, sources.text_model,
                                    sources.image_model, fusion, held_f)
        fp32 = self._export_fp32(staging, members)
        served: dict[str, Path] = {name: info["file"] for name, info in fp32.items()}
        models = {name: {"served_variant": "fp32",
                         "variants": {"fp32": {"parity": info["parity"], "file": info["file"], "written": True,
                                               **_variant_fields(var.VARIANTS["fp32"])}}}
                  for name, info in fp32.items()}
        gates = self._variants(staging, sources, dataset, tokenizer, fusion, held_f, fp32, models)

        runtimes: dict[str, tuple[str, str]] = {}
        for member, variant in o.serve_variants.items():
            entry = models[member]["variants"].get(variant)
            if entry is None or not entry.get("written"):
                reason = (entry.get("skipped") or entry["gate"]["reasons"]) if entry and (
                    "gate" in entry or "skipped" in entry) else "not exported"
                raise QualityGateError(f"cannot serve {member} [{variant}]: {reason}")
            served[member] = entry["file"]
            models[member]["served_variant"] = variant
            runtimes[member] = (entry["runtime"], entry["precision"])
        if o.target is Target.openvino:  # its backend runs every ONNX member on OpenVINO
            for member, info in models.items():
                if info["served_variant"] != "fp32" or member not in QUANTIZABLE:
                    continue
                if not info["variants"].get("openvino-fp32", {}).get("written"):
                    raise QualityGateError(f"target openvino: {member} on OpenVINO FP32 failed its gate")
                info["served_variant"] = "openvino-fp32"
        # TensorRT plans are gated one by one against FP32 in _tensorrt; the ONNX mix is not served
        combination = None
        if gates and o.target is not Target.tensorrt:
            combination = served_combination(gates, o.serve_variants)
            manifest_combinations = all_combinations(gates, models)
        else:
            manifest_combinations = []

        if o.target is Target.tensorrt:
            served = self._tensorrt(staging, fp32, members, sources, dataset, tokenizer, models)

        plan = RepositoryPlan(o.target, p, served, tokenizer_file, gpu=o.gpu, member_runtimes=runtimes)
        written = write_repository(plan, root)
        _place_variant_files(models, written, root)
        shutil.rmtree(staging)
        manifest = {
            "format": 1,
            "target": o.target.value,
            "max_batch_size": o.max_batch_size,
            "preprocess": json.loads(p.to_json()),
            "models": models,
            "training": training,
            "inputs": {
                "text_model": source_identity(sources.text_folder, sha256_tree(sources.text_folder)),
                "image_encoder": {"name": sources.image_encoder,
                                  **source_identity(sources.image_weights, sha256_file(sources.image_weights))},
                "dataset": {"items": len(sources.items), "train": len(sources.train),
                            "validation": len(sources.validation), "held_out": len(sources.held_out),
                            "sha256": dataset_fingerprint(sources.items)},
            },
            "versions": package_versions(),
        }
        if combination is not None:
            manifest["served_combination"] = combination
        if manifest_combinations:
            manifest["combinations"] = manifest_combinations
        return manifest

    def _export_fp32(self, staging: Path, members: dict) -> dict[str, dict]:
        """Export, slim and parity-check each member by its recipe; returns name -> {file, parity}."""
        o, inputs = self.options, self._inputs
        results = {}
        for name in o.models:
            recipe = RECIPES[name]
            model, cases = recipe.module(inputs), recipe.parity_cases(inputs)
            tick = self.reporter.step(f"{name}: ONNX export, onnxslim, parity on {len(cases)} cases", 3)
            raw = export_onnx(model, members[name], recipe.sample(inputs), staging / f"{name}.raw.onnx")
            tick()
            cleaned = slim(raw, staging / f"{name}.fp32.onnx")
            tick()
            atol = o.atol if recipe.atol is None else recipe.atol
            report = check_parity(name, "fp32", cleaned, torch_member(model), cases, atol=atol)
            tick()
            results[name] = {"file": cleaned, "parity": report.to_dict()}
        return results

    def _gate_feeds(self, sources: Sources, dataset: EncodedDataset, tokenizer) -> tuple[dict, list]:
        """Held-out inputs of each quantizable member (from its recipe, tokenized once per export),
        plus the max_seq_len texts of the text gate."""
        inputs = self._inputs
        feeds = {name: recipe.gate_feeds(inputs) for name, recipe in RECIPES.items() if recipe.quantizable}
        long_feeds = RECIPES[schema.TEXT_ENCODER].long_gate_feeds(inputs)
        return feeds, long_feeds

    def _variants(self, staging: Path, sources: Sources, dataset: EncodedDataset, tokenizer,
                  fusion: FusionHead, held_f: ItemFeatures, fp32: dict, models: dict) -> "VariantGates | None":
        """Build INT8/FP16 graphs of the encoders, run every graph on every requested runtime and
        precision, and gate each variant against ORT FP32 on held-out items (text: also on
        max_seq_len inputs, where INT8 error grows with length)."""
        p, o = sources.preprocess, self.options
        wanted = [v for v in o.precisions if v != "fp32"]
        if not wanted and o.runtimes == ("onnxruntime",):
            return None
        feeds, long_feeds = self._gate_feeds(sources, dataset, tokenizer)
        gates = VariantGates(torch_fuse(fusion), {schema.TEXT_ENCODER: held_f.text, schema.IMAGE_ENCODER: held_f.image},
                             held_f.labels, len(p.categories))
        for name in QUANTIZABLE:
            if name not in fp32:
                continue
            gates.reference[name] = ort_outputs(fp32[name]["file"], feeds[name])
        long_reference = (ort_outputs(fp32[schema.TEXT_ENCODER]["file"], long_feeds)
                          if schema.TEXT_ENCODER in fp32 else None)
        # the same inputs travel with the repository: `mmrec tune` gates again where it serves
        GateSet({m: feeds[m] for m in gates.reference}, long_feeds if long_reference is not None else [],
                held_f.labels, gates.fallback).save(RepositoryLayout(staging.parent).gate_set_file,
                                                    pixels_u8=dataset.pixels[dataset.rows(sources.held_out)])
        for name in list(gates.reference):
            graphs = {"fp32": fp32[name]["file"]}
            for graph in wanted:
                tick = self.reporter.step(f"{name}: {graph} graph", 1)
                graphs[graph] = self._build_variant(name, graph, fp32[name]["file"], staging, sources, dataset,
                                                    tokenizer)
                tick()
            variants = [var.VARIANTS[g] for g in wanted]
            variants += [v for graph in graphs for v in var.runtime_variants(graph, o.runtimes)]
            for variant in variants:
                entry: dict = {"file": graphs[variant.graph], **_variant_fields(variant)}
                models[name]["variants"][variant.name] = entry
                reason = runtime.unavailable_reason(variant.runtime, variant.precision)
                if reason:
                    entry.update(written=False, skipped=reason)
                    self.reporter.done(f"{name} ({variant.name}) not built: {reason}")
                    continue
                tick = self.reporter.step(f"{name}: {variant.name} quality gate", 1)
                emb = variant_outputs(entry["file"], variant, feeds[name])
                long_pair = ((long_reference, variant_outputs(entry["file"], variant, long_feeds))
                             if name == schema.TEXT_ENCODER else None)
                gate = gates.gate_member(name, variant.name, emb, long_pair)
                gate.evaluated_on = f"{variant.runtime} {variant.precision}"
                tick()
                entry.update(gate=gate.to_dict(), written=gate.passed)
                if not gate.passed:
                    self.reporter.done(f"{name} ({variant.name}) left out: {'; '.join(gate.reasons)}")
        return gates

    def _build_variant(self, name: str, variant: str, fp32_file: Path, staging: Path,
                       sources: Sources, dataset: EncodedDataset, tokenizer) -> Path:
        target = staging / f"{name}.{variant}.onnx"
        if variant == "fp16":
            return var.convert_fp16(fp32_file, target)
        if name == schema.TEXT_ENCODER:  # static INT8 (NNCF), calibrated on training captions
            texts = calibration_texts([i.caption for i in sources.train])
            feeds = [dict(zip((schema.INPUT_IDS, schema.ATTENTION_MASK), tokenizer(texts[i:i + 16])))
                     for i in range(0, len(texts), 16)]
            return quantize_text_int8(fp32_file, target, feeds)
        calibration = dataset.pixel_values(sources.train[:CALIBRATION_IMAGES])
        return var.quantize_static_int8(fp32_file, target, schema.PIXEL_VALUES, calibration)

    def _tensorrt(self, staging: Path, fp32: dict[str, dict], members: dict, sources: Sources,
                  dataset: EncodedDataset, tokenizer, models: dict) -> dict[str, Path]:
        """Build a plan for every member from its FP32 graph (GPU only), compare it with FP32
        on held-out inputs, and record it under its own variant name (tensorrt-fp16/-int8).

        FP16 everywhere (LayerNorm pinned to FP32); INT8 where --serve-variant asks for it,
        through explicit Q/DQ from nvidia-modelopt calibrated on real training inputs.
        """
        from .tensorrt import batch_profiles, build_engine, modelopt_int8, run_engine

        p = sources.preprocess
        feeds, _ = self._gate_feeds(sources, dataset, tokenizer)
        plans = {}
        for name, info in fp32.items():
            tick = self.reporter.step(f"{name}: TensorRT engine", 1)
            source = info["file"]
            int8 = self.options.serve_variants.get(name) == "int8"
            if int8:
                source = modelopt_int8(source, staging / f"{name}.qdq.onnx",
                                       self._calibration_feed(name, sources, dataset, tokenizer))
            dims = {t.name: t.dims for t in members[name].inputs}
            buckets = p.seq_buckets if name == schema.TEXT_ENCODER else ()
            plans[name] = build_engine(source, staging / f"{name}.plan",
                                       batch_profiles(dims, p.max_batch_size, buckets),
                                       fp16=True, int8=int8)
            variant = "tensorrt-int8" if int8 else "tensorrt-fp16"
            entry: dict = {"written": True}
            if name in feeds:
                reference = ort_outputs(info["file"], feeds[name])
                got = np.concatenate([run_engine(plans[name], feed)[0] for feed in feeds[name]])
                gate = var.embedding_gate(variant, reference, got)
                entry.update(gate=gate.to_dict(), written=gate.passed)
                if not gate.passed:
                    raise QualityGateError(f"{name} [{variant}] fails its gate vs FP32: "
                                           + "; ".join(gate.reasons))
            models[name]["variants"][variant] = entry
            models[name]["served_variant"] = variant
            tick()
        return plans

    def _calibration_feed(self, name: str, sources: Sources, dataset: EncodedDataset,
                          tokenizer) -> dict[str, np.ndarray]:
        """Real calibration inputs from the member's recipe (training split, never held-out items)."""
        recipe = RECIPES[name]
        if recipe.calibration_feed is None:
            raise QualityGateError(f"{name} has no INT8 calibration feed in its recipe")
        return recipe.calibration_feed(self._inputs)


def torch_fuse(fusion: FusionHead) -> Fuse:
    """The trained PyTorch fusion head as the gates' fusion (export's own; tune uses the graph)."""
    def fuse(text: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            item, probs, _ = fusion(torch.from_numpy(text), torch.from_numpy(image))
        return item.numpy(), probs.numpy().argmax(1)

    return fuse


def served_combination(gates: VariantGates, serve_variants: dict[str, str]) -> dict | None:
    """Gate of the fused outputs of every non-FP32 member served together, or None."""
    chosen = {m: v for m, v in serve_variants.items() if v != "fp32" and (m, v) in gates.variant_outputs}
    if not chosen:
        return None
    gate = gates.combination_gate(chosen)
    if not gate.passed:
        raise QualityGateError(f"the served combination {gate.variant} fails its gate on the fused "
                               "item embedding: " + "; ".join(gate.reasons))
    return {"variants": chosen, "gate": gate.to_dict()}


def all_combinations(gates: VariantGates, models: dict) -> list[dict]:
    """The combination gate of every pair of admitted CPU variants of the two encoders, so
    `mmrec tune` can serve the fastest pair that passes (it gates them again on its machine)."""
    return gates.combinations({name: [v for v, e in models[name]["variants"].items()
                                      if e.get("written") and v != "fp32" and var.VARIANTS[v].cpu
                                      and (name, v) in gates.variant_outputs]
                               for name in gates.reference})


def source_identity(path: Path, sha256: str) -> dict:
    """Name, owning package and version, and hash of a source: never a machine's absolute path."""
    path = Path(path).resolve()
    identity = {"file": path.name, "sha256": sha256}
    for parent in path.parents:
        if parent.name in ("site-packages", "dist-packages"):
            top = path.relative_to(parent).parts[0]
            identity["package_path"] = path.relative_to(parent).as_posix()
            distribution = _distribution_of(top)
            if distribution:
                identity["package"], identity["version"] = distribution
            break
    return identity


def _distribution_of(top_level: str) -> tuple[str, str] | None:
    import importlib.metadata

    for name in importlib.metadata.packages_distributions().get(top_level, []):
        return name, importlib.metadata.version(name)
    return None
