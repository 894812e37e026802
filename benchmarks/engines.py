"""The engines compared offline, from a registry: PyTorch eager FP32 and ONNX Runtime FP32/INT8/FP16.

PyTorch models are rebuilt from the same sources the export used (the manifest records the
text model folder and image weights; the fusion head is the repository's safetensors), ONNX
graphs are the repository's files (`<model>/1/model.onnx` and `<model>/variants/*.onnx`, as
listed in manifest.json). ORT sessions use the portable runner's own `make_session`, so the
offline numbers run with exactly the session options the server uses; the pipeline engines
run `mmrec.reference.ItemPipeline`, the same pipeline the tests use as ground truth.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

from mmrec import schema
from mmrec.layout import RepositoryLayout
from mmrec.reference import ItemPipeline, ort_member, torch_member
from mmrec.release_manifest import Manifest, VariantRecord

from .workload import PipelineInput

PIPELINE = "pipeline"
PYTORCH = "pytorch"
PRECISIONS = ("fp32", "int8", "fp16")
PIPELINE_MEMBERS = (schema.TEXT_ENCODER, schema.IMAGE_ENCODER, schema.FUSION)
Runner = Callable[[object], list]


@dataclass(frozen=True)
class EngineKind:
    name: str
    backend: str  # "pytorch" | "onnxruntime"
    precision: str  # "fp32" | "int8" | "fp16"


ENGINE_KINDS: dict[str, EngineKind] = {}


def register_engine(kind: EngineKind) -> EngineKind:
    ENGINE_KINDS[kind.name] = kind
    return kind


register_engine(EngineKind(PYTORCH, "pytorch", "fp32"))
for _precision in PRECISIONS:
    register_engine(EngineKind(f"ort-{_precision}", "onnxruntime", _precision))


@dataclass(frozen=True)
class Engine:
    """One engine for one model: its kind and the files it runs (member -> ONNX path)."""

    kind: EngineKind
    model: str
    files: dict[str, Path] = field(default_factory=dict)
    composition: dict[str, str] = field(default_factory=dict)  # pipeline: member -> precision

    @property
    def name(self) -> str:
        return self.kind.name


def load_manifest(repository: Path) -> Manifest | None:
    """The repository's manifest, or None for a hand-made repository without one."""
    return RepositoryLayout(repository).load_manifest(required=False)


def recorded_variants(manifest: Manifest | None, model: str) -> dict[str, VariantRecord]:
    """The variants the manifest records for one member ({} without a manifest or that member)."""
    member = manifest.models.get(model) if manifest is not None else None
    return member.variants if member is not None else {}


def onnx_files(repository: Path, model: str, manifest: Manifest | None = None) -> dict[str, Path]:
    """precision -> ONNX file of one member, as the manifest lists them (files that exist)."""
    repository = Path(repository)
    manifest = load_manifest(repository) if manifest is None else manifest
    variants = recorded_variants(manifest, model)
    found = {v: repository / e.path for v, e in variants.items()
             if e.path and e.path.endswith(".onnx") and (repository / e.path).is_file()}
    if not variants:  # no manifest: the served file is FP32, variants by file name
        layout = RepositoryLayout(repository)
        served = layout.model_file(model)
        if served.is_file():
            found["fp32"] = served
        for path in sorted(layout.variants_dir(model).glob("*.onnx")):
            found.setdefault(path.stem, path)
    return found


def skipped_variants(repository: Path, model: str, manifest: Manifest | None = None) -> dict[str, str]:
    """precision -> why the export left it out (failed gate), for the report."""
    manifest = load_manifest(repository) if manifest is None else manifest
    return {v: "; ".join(e.gate_reasons) or "not written"
            for v, e in recorded_variants(manifest, model).items() if e.left_out}


def engines_for(repository: Path, model: str, manifest: Manifest | None = None) -> list[Engine]:
    """PyTorch first (the reference), then every ONNX precision present for the model."""
    manifest = load_manifest(repository) if manifest is None else manifest
    engines = [Engine(ENGINE_KINDS[PYTORCH], model)]
    if model == PIPELINE:
        # Each member runs the variant where the repository has it, FP32 otherwise; a variant
        # pipeline is listed only if at least one member actually uses that variant.
        members = {m: onnx_files(repository, m, manifest) for m in PIPELINE_MEMBERS}
        if any("fp32" not in files for files in members.values()):
            return engines
        for precision in PRECISIONS:
            chosen = {m: (precision if precision in files else "fp32") for m, files in members.items()}
            if precision == "fp32" or precision in chosen.values():
                engines.append(Engine(ENGINE_KINDS[f"ort-{precision}"], model,
                                      {m: members[m][p] for m, p in chosen.items()}, chosen))
        return engines
    files = onnx_files(repository, model, manifest)
    engines += [Engine(ENGINE_KINDS[f"ort-{p}"], model, {model: files[p]}) for p in PRECISIONS if p in files]
    return engines


# --------------------------------------------------------------------------- PyTorch sources


class TorchSources:
    """The PyTorch FP32 models of a repository, loaded on first use."""

    def __init__(self, repository: Path, manifest: Manifest | None = None) -> None:
        self.repository = Path(repository)
        self.manifest = load_manifest(repository) if manifest is None else manifest
        self.preprocess = RepositoryLayout(self.repository).read_contract()

    @cached_property
    def text(self):
        from mmrec.export.models.text import load_text_encoder

        folder = self.manifest.inputs.text_model.path if self.manifest is not None else None
        model, _ = load_text_encoder(Path(folder) if folder and Path(folder).is_dir() else None)
        return model

    @cached_property
    def image(self):
        from mmrec.export.models.image import DEFAULT_IMAGE_ENCODER, load_image_encoder

        source = self.manifest.inputs.image_encoder if self.manifest is not None else None
        weights = source.weights if source is not None else None
        model, _, _ = load_image_encoder((source.name if source is not None else None) or DEFAULT_IMAGE_ENCODER,
                                         Path(weights) if weights and Path(weights).is_file() else None)
        return model

    @cached_property
    def fusion(self):
        from mmrec.export.pipeline import load_fusion_checkpoint

        return load_fusion_checkpoint(RepositoryLayout(self.repository).fusion_checkpoint, self.preprocess)

    def module(self, model: str):
        return {schema.TEXT_ENCODER: lambda: self.text, schema.IMAGE_ENCODER: lambda: self.image,
                schema.FUSION: lambda: self.fusion}[model]()




class _PipelineRunner:
    """The one in-process pipeline, called the way the offline cases call an engine."""

    def __init__(self, pipeline: ItemPipeline) -> None:
        self.pipeline = pipeline

    def __call__(self, inputs: PipelineInput) -> list[np.ndarray]:
        return list(self.pipeline.encode_items(inputs.texts, inputs.images).values())


def build_runner(engine: Engine, torch_sources: TorchSources, threads: int,
                 tokenizer=None, decoder=None) -> Runner:
    """A callable running the engine on one case's inputs, returning its outputs in order."""
    if engine.model == PIPELINE:
        if engine.kind.backend == "pytorch":
            parts = [torch_member(torch_sources.module(m)) for m in PIPELINE_MEMBERS]
        else:
            parts = [ort_member(engine.files[m], threads) for m in PIPELINE_MEMBERS]
        return _PipelineRunner(ItemPipeline(torch_sources.preprocess, tokenizer, decoder,
                                            dict(zip(PIPELINE_MEMBERS, parts))))
    if engine.kind.backend == "pytorch":
        return torch_member(torch_sources.module(engine.model))
    return ort_member(engine.files[engine.model], threads)
