"""Where everything lives in a generated Triton repository, in one class.

Export writes through it; the reference pipeline, the benchmarks, the index publisher, the demo
and the server launcher read through it. A path or file name of a repository is spelled here
and nowhere else (the thin Triton models get their folder from Triton and the two file names
they open from `served_contract`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, overload

import mmrec.model_repository as _sources
from mmrec.model_repository.lib.served_contract import CONTRACT_FILE, TOKENIZER_FILE, ServedContract

from . import schema
from .release_manifest import MANIFEST_FILE, Manifest

VERSION = "1"  # export writes one version per model; `mmrec index` adds more to catalog_scorer
CONFIG_FILE = "config.pbtxt"
PYTHON_MODEL_FILE = "model.py"
VARIANTS_DIR = "variants"
FUSION_CHECKPOINT = "fusion_head.safetensors"
GATE_SET_FILE = "gate_set.npz"  # held-out gate inputs export saves for `mmrec tune` (export/gates.py)
MODEL_FILES = {"onnx": "model.onnx", "plan": "model.plan"}
LIB_DIR = "lib"


@dataclass(frozen=True)
class RepositoryLayout:
    """Paths of one repository (a generated one, or the committed sources in model_repository/).

    <root>/preprocess.json                         the served contract (also in configs)
    <root>/manifest.json                           release manifest: files, hashes, gates
    <root>/<model>/config.pbtxt
    <root>/<model>/<version>/model.onnx|model.plan|model.py (+ library modules, tokenizer.json)
    <root>/<model>/variants/<precision>.onnx        gated variants not served
    <root>/fusion/variants/fusion_head.safetensors  the trained fusion head
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ---- one model
    def model_dir(self, model: str) -> Path:
        return self.root / model

    def config_file(self, model: str) -> Path:
        return self.model_dir(model) / CONFIG_FILE

    def version_dir(self, model: str, version: str | int = VERSION) -> Path:
        return self.model_dir(model) / str(version)

    def python_model(self, model: str, version: str | int = VERSION) -> Path:
        return self.version_dir(model, version) / PYTHON_MODEL_FILE

    def model_file(self, model: str, kind: str = "onnx", version: str | int = VERSION) -> Path:
        """The served graph: `kind` "onnx" (portable, onnxruntime) or "plan" (tensorrt)."""
        return self.version_dir(model, version) / MODEL_FILES[kind]

    def tokenizer_file(self, model: str = schema.TOKENIZER) -> Path:
        return self.version_dir(model) / TOKENIZER_FILE

    def variants_dir(self, model: str) -> Path:
        return self.model_dir(model) / VARIANTS_DIR

    def variant_file(self, model: str, precision: str) -> Path:
        return self.variants_dir(model) / f"{precision}.onnx"

    @property
    def fusion_checkpoint(self) -> Path:
        return self.variants_dir(schema.FUSION) / FUSION_CHECKPOINT

    # ---- the whole repository
    @property
    def contract_file(self) -> Path:
        return self.root / CONTRACT_FILE

    @property
    def manifest_file(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def gate_set_file(self) -> Path:
        return self.root / GATE_SET_FILE

    def config_files(self) -> list[Path]:
        return sorted(self.root.glob(f"*/{CONFIG_FILE}"))

    def served_models(self) -> tuple[str, ...]:
        """What `mmrec serve` loads (explicit model control): the models clients call that this
        repository has (schema.ENTRY_MODELS) and every model their ensembles compose; () for a
        repository without any of them."""
        return tuple(sorted(served_models(self.read_configs())))

    def read_config(self, model: str):
        """One model's config.pbtxt as a tritonclient ModelConfig message."""
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2 as mc

        return text_format.Parse(self.config_file(model).read_text(), mc.ModelConfig())

    def read_configs(self) -> dict:
        """Every model's config.pbtxt, parsed (model name -> ModelConfig)."""
        return {path.parent.name: self.read_config(path.parent.name) for path in self.config_files()}

    def has_models(self) -> bool:
        return any(self.config_files())

    def read_contract(self) -> ServedContract:
        return ServedContract.load(self.root)

    def write_contract(self, contract: ServedContract) -> Path:
        return contract.save(self.root)

    @overload
    def load_manifest(self, required: Literal[True] = ...) -> Manifest: ...

    @overload
    def load_manifest(self, required: bool) -> Manifest | None: ...

    def load_manifest(self, required: bool = True) -> Manifest | None:
        """manifest.json as a typed `Manifest`; None when absent and not required (hand-made
        repositories)."""
        return Manifest.load(self.root, required)

    def read_manifest(self, required: bool = True) -> dict:
        """manifest.json as the raw dict, for code not yet on `load_manifest`; {} when absent
        and not required."""
        if not self.manifest_file.is_file():
            if required:
                raise FileNotFoundError(f"{self.manifest_file} not found: run `mmrec export` first")
            return {}
        return json.loads(self.manifest_file.read_text())

    # ---- the committed sources (model_repository/ in the source tree)
    def lib_file(self, module: str) -> Path:
        """A library module under <root>/lib/ (sources only): copied beside thin models."""
        return self.root / LIB_DIR / f"{module}.py"


SOURCES = RepositoryLayout(Path(_sources.__file__).resolve().parent)


def served_models(configs: Mapping[str, object]) -> set[str]:
    """The entry models among `configs` (schema.ENTRY_MODELS) and every model their ensembles
    compose, transitively: what explicit model control must load for every entry to be servable
    (empty when no entry model is there)."""
    pending = [name for name in schema.ENTRY_MODELS if name in configs]
    served: set[str] = set()
    while pending:
        name = pending.pop()
        if name in served or name not in configs:
            continue
        served.add(name)
        if configs[name].platform == "ensemble":
            pending.extend(step.model_name for step in configs[name].ensemble_scheduling.step)
    return served


def source_file(path: Path) -> Path:
    """A committed source file, or FileNotFoundError naming it (a broken install)."""
    if not path.is_file():
        raise FileNotFoundError(f"no python model source {path}")
    return path
