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
from typing import Iterator

import numpy as np
import torch

from mmrec import schema
from mmrec.export_defaults import DEFAULT_REPOSITORY
from mmrec.layout import FUSION_CHECKPOINT, RepositoryLayout  # noqa: F401 - FUSION_CHECKPOINT re-exported
from mmrec.preprocess import (DEFAULT_IMAGE_FIT, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_IMAGE_BYTES,
                              DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_TEXT_BYTES,
                              DEFAULT_SEQ_BUCKETS, EXPORT_CHOICES, TOKENIZER_FILE, ContractError, ServedContract,
                              check_export_choices)
from mmrec.model_repository.lib import runtime
from mmrec.model_repository.lib.text_preprocessing import TextTokenizer
from mmrec.reference import torch_member
from . import variants as var
from .choices import DEFAULT_SEEDS, PRECISIONS, Reporter  # noqa: F401 - re-exported
from .data import Item, categories_of, dataset_fingerprint, image_hash, load_items, split
from .errors import ExportError, ModelSourceError, QualityGateError
from .feature_cache import FeatureCache, SourceHashes
from .features import EncodedDataset, ItemFeatures, encode_dataset
from .gates import Fuse, GateSet, VariantGates, run_feeds, variant_outputs
from .manifest import (DatasetRecord, InputSource, Inputs, Manifest, MemberRecord, ServedCombination, VariantRecord,
                       package_versions, sha256_file, sha256_tree, write_manifest)
from .models.fusion import FusionConfig, FusionHead
from .models.image import DEFAULT_IMAGE_ENCODER, IMAGE_ENCODERS, load_image_encoder
from .models.text import load_text_encoder, text_hidden_size
from .onnx_export import export_onnx, slim
from .parity import ATOL_FP32, check_parity, cpu_session
from .recipes import RECIPES, ExportInputs
from .render import GraphFiles, plan_for, render_repository
from .repository import Target
from .train import evaluate_fusion, seed_spread, train_fusion
from .tuning import DEFAULT_ROUNDS, allowed_runtimes, apply_choice, decide

QUANTIZABLE = tuple(name for name, recipe in RECIPES.items() if recipe.quantizable)
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
    feature_cache: bool = True  # reuse the PyTorch feature pass of identical inputs (feature_cache.py)

    def contract_choices(self) -> dict:
        """The served-contract fields this export chooses (the contract owns which and their ranges)."""
        return {name: getattr(self, name) for name in EXPORT_CHOICES}

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
        try:
            check_export_choices(self.contract_choices())
        except ContractError as err:
            raise ExportError(str(err)) from None
        if not 1 <= self.seeds <= 100:
            raise ExportError(f"--seeds must be within 1..100, got {self.seeds}")
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
    hashes: SourceHashes  # once per export: the manifest and the feature cache key both read them


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
        **options.contract_choices(),
        image_size=entry.image_size, image_mean=entry.mean, image_std=entry.std, categories=categories_of(items),
        text_dim=text_hidden_size(text_model), image_dim=entry.feature_dim,
        item_dim=schema.ITEM_EMBEDDING_DIM)
    hashes = SourceHashes(sha256_tree(text_folder), sha256_file(weights), dataset_fingerprint(items))
    return Sources(text_model, text_folder, image_model, weights, preprocess, items, parts.train,
                   parts.validation, parts.held_out, options.image_encoder, hashes)


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


def variant_entry(variant: var.Variant, **fields) -> VariantRecord:
    return VariantRecord(graph=variant.graph, runtime=variant.runtime, precision=variant.precision, **fields)


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
        if manifest.tuning is not None:
            self.reporter.done("serving " + ", ".join(f"{m}={v}" for m, v in manifest.tuning.chosen.items()))
        self.reporter.done(f"repository written to {Path(options.output).resolve()}")
        return manifest.to_dict()

    def _export_into(self, root: Path, sources: Sources) -> Manifest:
        o, p = self.options, sources.preprocess
        members = schema.member_specs_for(p)
        tokenizer_file = sources.text_folder / TOKENIZER_FILE
        layout = RepositoryLayout(root)
        tokenizer = TextTokenizer.for_contract(p, tokenizer_file)

        # a user's checkpoint is checked before the long feature pass
        fusion = load_fusion_checkpoint(o.fusion_checkpoint, p) if o.fusion_checkpoint else None
        n = len(sources.items)
        tick = self.reporter.step(f"decoding and encoding {n} items with the PyTorch encoders", 2 * n)
        cache = (FeatureCache.for_sources(sources.hashes, sources.image_encoder, p)
                 if o.feature_cache else None)
        dataset = encode_dataset(sources.text_model, sources.image_model, p, tokenizer_file,
                                 sources.items, tick, tokenizer=tokenizer, cache=cache,
                                 report=self.reporter.done)
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
        models = {name: MemberRecord(served_variant="fp32", variants={"fp32": variant_entry(
                      var.VARIANTS["fp32"], parity=info["parity"], written=True)})
                  for name, info in fp32.items()}
        self._graphs: GraphFiles = {name: {"fp32": info["file"]} for name, info in fp32.items()}
        gates = self._variants(staging, sources, dataset, fusion, held_f, fp32, models)

        for member, variant in o.serve_variants.items():
            record = models[member].variants.get(variant)
            if record is None or not record.written:
                reason = (record.skipped or record.gate_reasons) if record and (
                    record.gate is not None or record.skipped) else "not exported"
                raise QualityGateError(f"cannot serve {member} [{variant}]: {reason}")
            models[member].serve(variant)
        if o.target is Target.openvino:  # its backend runs every ONNX member on OpenVINO
            for member, record in models.items():
                if record.served_variant != "fp32" or member not in QUANTIZABLE:
                    continue
                openvino = record.variants.get("openvino-fp32")
                if openvino is None or not openvino.written:
                    raise QualityGateError(f"target openvino: {member} on OpenVINO FP32 failed its gate")
                record.serve("openvino-fp32")
        # TensorRT plans are gated one by one against FP32 in _tensorrt; the ONNX mix is not served
        combination = None
        if gates and o.target is not Target.tensorrt:
            combination = served_combination(gates, o.serve_variants)
            manifest_combinations = all_combinations(gates, models)
        else:
            manifest_combinations = []

        if o.target is Target.tensorrt:
            self._tensorrt(staging, fp32, members, sources, models)
        manifest = Manifest(
            target=o.target.value, max_batch_size=o.max_batch_size, preprocess=json.loads(p.to_json()),
            models=models, training=training, versions=package_versions(), gpu=o.gpu,
            inputs=Inputs(
                text_model=InputSource.from_dict(source_identity(sources.text_folder, sources.hashes.text_model)),
                image_encoder=InputSource(name=sources.image_encoder, **source_identity(
                    sources.image_weights, sources.hashes.image_weights)),
                dataset=DatasetRecord(items=len(sources.items), train=len(sources.train),
                                      validation=len(sources.validation), held_out=len(sources.held_out),
                                      sha256=sources.hashes.dataset)),
            served_combination=ServedCombination.from_dict(combination) if combination is not None else None,
            combinations=manifest_combinations or None)
        if o.tune and o.target is not Target.tensorrt and not o.gpu:
            self._tune(manifest, p)
        # everything is decided: the repository is rendered once, from the staged graphs
        render_repository(plan_for(o.target, p, models, self._graphs, tokenizer_file, o.gpu), models, self._graphs,
                          root)
        shutil.rmtree(staging)
        return manifest

    def _tune(self, manifest: Manifest, contract: ServedContract) -> None:
        """Time the admitted CPU variants' staged graphs here and serve the fastest (gated at
        export a moment ago on this same machine: no second gating)."""
        o = self.options
        tick = self.reporter.step("tuning: timing the admitted CPU variants on this machine")
        fixed = dict(o.serve_variants)
        choice, combination, record = decide(
            manifest.models, self._graphs, o.target, allowed_runtimes(o.target, o.runtimes), contract,
            DEFAULT_ROUNDS, self.reporter.done, fixed, None, manifest.combinations or [], "export machine")
        apply_choice(manifest, choice, combination, fixed)
        manifest.tuning = record
        tick()

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

    def _gate_feeds(self) -> tuple[dict, list]:
        """Held-out inputs of each quantizable member (from its recipe, tokenized once per export),
        plus the max_seq_len texts of the text gate."""
        inputs = self._inputs
        feeds = {name: recipe.gate_feeds(inputs) for name, recipe in RECIPES.items() if recipe.quantizable}
        long_feeds = RECIPES[schema.TEXT_ENCODER].long_gate_feeds(inputs)
        return feeds, long_feeds

    def _variants(self, staging: Path, sources: Sources, dataset: EncodedDataset,
                  fusion: FusionHead, held_f: ItemFeatures, fp32: dict,
                  models: dict[str, MemberRecord]) -> "VariantGates | None":
        """Build INT8/FP16 graphs of the encoders, run every graph on every requested runtime and
        precision, and gate each variant against ORT FP32 on held-out items (text: also on
        max_seq_len inputs, where INT8 error grows with length)."""
        p, o = sources.preprocess, self.options
        wanted = [v for v in o.precisions if v != "fp32"]
        if not wanted and o.runtimes == ("onnxruntime",):
            return None
        feeds, long_feeds = self._gate_feeds()
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
            graphs = self._graphs[name]
            for graph in wanted:
                tick = self.reporter.step(f"{name}: {graph} graph", 1)
                graphs[graph] = self._build_variant(name, graph, fp32[name]["file"], staging)
                tick()
            variants = [var.VARIANTS[g] for g in wanted]
            variants += [v for graph in graphs for v in var.runtime_variants(graph, o.runtimes)]
            for variant in variants:
                record = models[name].add(variant.name, variant_entry(variant))
                reason = runtime.unavailable_reason(variant.runtime, variant.precision)
                if reason:
                    record.written, record.skipped = False, reason
                    self.reporter.done(f"{name} ({variant.name}) not built: {reason}")
                    continue
                tick = self.reporter.step(f"{name}: {variant.name} quality gate", 1)
                emb = variant_outputs(graphs[variant.graph], variant, feeds[name])
                long_pair = ((long_reference, variant_outputs(graphs[variant.graph], variant, long_feeds))
                             if RECIPES[name].long_gate_feeds is not None else None)
                gate = gates.gate_member(name, variant.name, emb, long_pair)
                gate.evaluated_on = f"{variant.runtime} {variant.precision}"
                tick()
                record.gate, record.written = gate.to_dict(), gate.passed
                if not gate.passed:
                    self.reporter.done(f"{name} ({variant.name}) left out: {'; '.join(gate.reasons)}")
        return gates

    def _build_variant(self, name: str, variant: str, fp32_file: Path, staging: Path) -> Path:
        """The member's FP16 graph, or its INT8 graph by its recipe's quantizer."""
        target = staging / f"{name}.{variant}.onnx"
        if variant == "fp16":
            return var.convert_fp16(fp32_file, target)
        quantize = RECIPES[name].quantize_int8
        if quantize is None:
            raise ExportError(f"{name} has no INT8 quantizer in its recipe")
        return quantize(fp32_file, target, self._inputs)

    def _tensorrt(self, staging: Path, fp32: dict[str, dict], members: dict, sources: Sources,
                  models: dict[str, MemberRecord]) -> None:
        """Build a plan for every member from its FP32 graph (GPU only), compare it with FP32
        on held-out inputs, and record it under its own variant name (tensorrt-fp16/-int8).

        FP16 everywhere (LayerNorm pinned to FP32); INT8 where --serve-variant asks for it,
        through explicit Q/DQ from nvidia-modelopt calibrated on real training inputs.
        """
        from .tensorrt import batch_profiles, build_engine, modelopt_int8, run_engine

        p = sources.preprocess
        feeds, _ = self._gate_feeds()
        plans = {}
        for name, info in fp32.items():
            tick = self.reporter.step(f"{name}: TensorRT engine", 1)
            source = info["file"]
            int8 = self.options.serve_variants.get(name) == "int8"
            if int8:
                source = modelopt_int8(source, staging / f"{name}.qdq.onnx",
                                       self._calibration_feed(name))
            dims = {t.name: t.dims for t in members[name].inputs}
            buckets = RECIPES[name].sequence_buckets(p)
            plans[name] = build_engine(source, staging / f"{name}.plan",
                                       batch_profiles(dims, p.max_batch_size, buckets),
                                       fp16=True, int8=int8)
            variant = "tensorrt-int8" if int8 else "tensorrt-fp16"
            record = VariantRecord(written=True)
            if name in feeds:
                reference = ort_outputs(info["file"], feeds[name])
                got = np.concatenate([run_engine(plans[name], feed)[0] for feed in feeds[name]])
                gate = var.embedding_gate(variant, reference, got)
                record.gate, record.written = gate.to_dict(), gate.passed
                if not gate.passed:
                    raise QualityGateError(f"{name} [{variant}] fails its gate vs FP32: "
                                           + "; ".join(gate.reasons))
            models[name].add(variant, record)
            models[name].serve(variant)
            self._graphs[name][variant] = plans[name]  # the plan is its own graph
            tick()

    def _calibration_feed(self, name: str) -> dict[str, np.ndarray]:
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


def all_combinations(gates: VariantGates, models: dict[str, MemberRecord]) -> list[dict]:
    """The combination gate of every pair of admitted CPU variants of the two encoders, so
    `mmrec tune` can serve the fastest pair that passes (it gates them again on its machine)."""
    return gates.combinations({name: [v for v, e in models[name].variants.items()
                                      if e.written and v != "fp32" and var.VARIANTS[v].cpu
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
