"""Triton model repository writer: one description (mmrec.schema) x one target -> config.pbtxt.

Configs are built as `model_config_pb2.ModelConfig` messages and printed with text_format, never
from string templates, so every file parses by construction (tests re-parse all three targets).

Targets:
- portable:    ONNX members run by ONNX Runtime inside python-backend models (ort_runner); runs
               on the tritonserver bundled by nvidia-pytriton (python backend only).
- onnxruntime: native `backend: "onnxruntime"` members for the NGC Triton container.
- openvino:    native `backend: "openvino"` members (ONNX files read by OpenVINO) for the NGC
               container's OpenVINO backend, CPU only.
- tensorrt:    `platform: "tensorrt_plan"` members (engines from export.tensorrt).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from mmrec import schema
from mmrec.layout import CONFIG_FILE, MODEL_FILES, SOURCES, VERSION, RepositoryLayout, source_file  # noqa: F401
from mmrec.model_repository.lib import tensor_names
from mmrec.model_repository.lib.runner_settings import OPENVINO_BF16_KEY, OPENVINO_THREADS_KEY, RunnerSettings
from mmrec.preprocess import ServedContract
from mmrec.schema import EnsembleSpec, ModelSpec, TensorSpec

from .choices import Target  # noqa: F401 - re-exported (the CLI reads it from choices)


MODEL_KIND = {Target.portable: "onnx", Target.onnxruntime: "onnx", Target.openvino: "onnx",
              Target.tensorrt: "plan"}  # RepositoryLayout.model_file(member, kind)


@dataclass(frozen=True)
class BatchingPolicy:
    """Dynamic batching and instances of one member model."""

    max_queue_delay_us: int
    preferred_batch_sizes: tuple[int, ...] = ()
    instances: int = 1


# GPU targets: a short queue delay pays for itself (one batched kernel launch beats several).
DEFAULT_POLICIES = {
    schema.TOKENIZER: BatchingPolicy(500),
    schema.IMAGE_PREPROCESS: BatchingPolicy(500),
    schema.ITEM_PREPROCESS: BatchingPolicy(500),
    schema.ITEM_PREPROCESS_PIXELS: BatchingPolicy(500),
    schema.TEXT_ENCODER: BatchingPolicy(2000, (8, 16, 32)),
    schema.IMAGE_ENCODER: BatchingPolicy(2000, (8, 16, 32)),
    schema.FUSION: BatchingPolicy(1000, (8, 16, 32)),
    schema.SCORER: BatchingPolicy(500),
    # Only where it is one merged model (portable, CPU: 1 instance, no delay). Triton Model
    # Analyzer over instances {1, 2} x delay {0, 2000 us} found no setting clearly better on 2
    # cores: its two identical (1, 0) configs differed by up to 14 %, as much as the grid did, and
    # 2 instances led at concurrency 16 in one of two runs (benchmarks/results/model_analyzer/).
    # More instances also multiply the sessions' threads (each opens text + image + fusion).
    schema.ITEM_ENCODER: BatchingPolicy(500),
}
# CPU targets: no queue delay. Measured on 2 cores (issue 11): at concurrency 1 every member
# paid its delay on the critical path with nothing to batch (+6 ms of 26 ms p50); Triton still
# joins whatever queued up while the member was busy, which is where CPU batching comes from.
CPU_POLICIES = {name: BatchingPolicy(0, policy.preferred_batch_sizes, policy.instances)
                for name, policy in DEFAULT_POLICIES.items()}
# The portable runner's share of the cores per member: the encoders run side by side (half
# each); fusion and scorer are tiny and run on one thread.
CPU_SHARES = {schema.TEXT_ENCODER: 2, schema.IMAGE_ENCODER: 2}
SINGLE_THREAD_MEMBERS = (schema.FUSION, schema.SCORER)


# Public ensembles served as one python model on the portable target (item_pipeline/model.py, the
# item engine): there every step is a python model, and each hop between two stub processes
# costs a round trip through shared memory (measured in issue 11: see benchmarks/results). The
# other public ensembles route through it (schema.engine_ensemble_specs), so each graph is loaded
# once; the member configs stay in the repository (tune, the reference pipeline and `--load-model`
# read them) but no entry model loads them. Every native target keeps the ensembles.
MERGED_ENSEMBLES = {Target.portable: (schema.ITEM_ENCODER,)}
ITEM_PIPELINE_MEMBERS = tensor_names.ITEM_PIPELINE_MEMBERS  # the members item_pipeline/model.py runs
# Inside the merged model the text encoder runs on a worker beside the decode and image encoder
# (half the cores); the image encoder, ~2/3 of the compute, then gets all of them. Measured on
# 2 cores at concurrency 8: 62-67 items/s vs 54-61 with half the cores each (benchmarks/results).
ITEM_PIPELINE_CPU_SHARES = {schema.TEXT_ENCODER: 2, schema.IMAGE_ENCODER: 1}


def merged_ensembles(target: "Target") -> tuple[str, ...]:
    return MERGED_ENSEMBLES.get(target, ())


def default_policies(target: "Target", gpu: bool) -> dict[str, BatchingPolicy]:
    on_gpu = target is Target.tensorrt or (target is Target.onnxruntime and gpu)
    return dict(DEFAULT_POLICIES if on_gpu else CPU_POLICIES)


@dataclass
class RepositoryPlan:
    """What to write: target, served contract, devices, and the ONNX/plan file of each member
    (where it goes is RepositoryLayout's business)."""

    target: Target
    contract: ServedContract
    member_files: dict[str, Path]  # onnx member -> model file to copy (variant already chosen)
    tokenizer_file: Path
    gpu: bool = False
    policies: dict[str, BatchingPolicy] | None = None  # None: default_policies(target, gpu)
    intra_op_threads: int = 0  # 0: each member's share of the serving machine's cores
    # member -> (runtime, precision) chosen for it (portable/openvino targets); absent: ORT FP32
    member_runtimes: dict[str, tuple[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.policies is None:
            self.policies = default_policies(self.target, self.gpu)

    @property
    def max_batch_size(self) -> int:
        return self.contract.max_batch_size


def _dtype(name: str) -> int:
    """Schema dtype -> config enum (BYTES tensors are TYPE_STRING in config.pbtxt)."""
    return mc.DataType.Value("TYPE_STRING" if name == "BYTES" else f"TYPE_{name}")


def _tensor_input(t: TensorSpec, ragged: bool = False) -> mc.ModelInput:
    return mc.ModelInput(name=t.name, data_type=_dtype(t.dtype), dims=list(t.dims),
                         allow_ragged_batch=ragged, optional=t.optional)


def _tensor_output(t: TensorSpec) -> mc.ModelOutput:
    return mc.ModelOutput(name=t.name, data_type=_dtype(t.dtype), dims=list(t.dims))


def _set_parameters(config: mc.ModelConfig, parameters: dict[str, str]) -> None:
    for key, value in sorted(parameters.items()):
        config.parameters[key].string_value = value


def member_config(spec: ModelSpec, plan: RepositoryPlan) -> mc.ModelConfig:
    """config.pbtxt of one member model for the plan's target."""
    config = mc.ModelConfig(name=spec.name, max_batch_size=plan.max_batch_size)
    policy = plan.policies[spec.name]
    is_python = spec.kind == "python" or plan.target is Target.portable
    # The portable runner pads sequence inputs across requests itself, so the batcher may join
    # requests of different lengths; native backends need equal shapes (bucketed by tokenizer).
    ragged = plan.target is Target.portable and spec.kind == "onnx"  # OpenVINO backend: equal shapes
    config.input.extend(_tensor_input(t, ragged=ragged and bool(t.dynamic_axes)) for t in spec.inputs)
    config.output.extend(_tensor_output(t) for t in spec.outputs)
    config.dynamic_batching.max_queue_delay_microseconds = policy.max_queue_delay_us
    config.dynamic_batching.preferred_batch_size.extend(
        b for b in policy.preferred_batch_sizes if b <= plan.max_batch_size)
    on_gpu = plan.gpu and spec.kind == "onnx" and plan.target is Target.onnxruntime
    config.instance_group.append(mc.ModelInstanceGroup(
        count=policy.instances,
        kind=mc.ModelInstanceGroup.KIND_GPU if on_gpu or plan.target is Target.tensorrt and spec.kind == "onnx"
        else mc.ModelInstanceGroup.KIND_CPU))
    if is_python:
        config.backend = "python"
    elif plan.target is Target.onnxruntime:
        config.backend = "onnxruntime"
    elif plan.target is Target.openvino:
        config.backend = "openvino"
        config.default_model_filename = MODEL_FILES[MODEL_KIND[Target.openvino]]
    else:
        config.platform = "tensorrt_plan"
    contract = plan.contract.to_parameters()
    if spec.kind == "python":  # every python model carries the whole contract (client reads one)
        _set_parameters(config, contract)
    elif plan.target is Target.portable:
        _set_parameters(config, member_runner_settings(spec.name, plan).to_parameters())
    elif plan.target is Target.openvino and spec.kind == "onnx":
        # the backend sizes threads to the container unless pinned: no single-thread members here
        settings = member_runner_settings(spec.name, plan).with_(intra_op_threads=plan.intra_op_threads)
        _set_parameters(config, settings.to_openvino_backend())
    if spec.name == schema.FUSION:  # kept for clients older than the contract parameters
        _set_parameters(config, {"categories": contract["categories"]})
    return config


def member_runner_settings(member: str, plan: RepositoryPlan) -> RunnerSettings:
    """How one ONNX member is run: the runtime and precision chosen for it, its share of the
    cores, and (text encoder) its rows at their length bucket."""
    runtime, precision = plan.member_runtimes.get(member, ("onnxruntime", "fp32"))
    single = member in SINGLE_THREAD_MEMBERS and not plan.intra_op_threads
    buckets = plan.contract.seq_buckets if member == schema.TEXT_ENCODER else ()
    return RunnerSettings(runtime=runtime, precision=precision, intra_op_threads=1 if single else plan.intra_op_threads,
                          cpu_share=CPU_SHARES.get(member, 1), seq_buckets=buckets,
                          length_input=schema.ATTENTION_MASK if buckets else "")


def runner_settings(config: mc.ModelConfig, member: str | None = None) -> RunnerSettings:
    """The runner settings a config holds (`member`: a merged model's `<member>.` keys); the
    OpenVINO backend's keys on the openvino target."""
    return RunnerSettings.from_config(config.backend, {k: v.string_value for k, v in config.parameters.items()},
                                      member)


def set_runner_settings(config: mc.ModelConfig, settings: RunnerSettings, member: str | None = None) -> None:
    """Replace the runner settings in a config (the OpenVINO backend's keys on the openvino target)."""
    if config.backend == "openvino":
        for key in (OPENVINO_BF16_KEY, OPENVINO_THREADS_KEY, *settings.to_openvino_backend()):
            config.parameters.pop(key, None)
        _set_parameters(config, settings.to_openvino_backend())
        return
    for key in RunnerSettings.keys(member):
        config.parameters.pop(key, None)
    _set_parameters(config, settings.to_parameters(member))


def merged_item_encoder_config(ensemble: EnsembleSpec, plan: RepositoryPlan) -> mc.ModelConfig:
    """`item_encoder` as one dynamically batched python model (item_pipeline/model.py) running
    the members' own graphs; each member's runner settings under `<member>.`."""
    spec = ensemble.spec
    config = mc.ModelConfig(name=spec.name, backend="python", max_batch_size=plan.max_batch_size)
    config.input.extend(_tensor_input(t) for t in spec.inputs)
    config.output.extend(_tensor_output(t) for t in spec.outputs)
    config.dynamic_batching.max_queue_delay_microseconds = plan.policies[spec.name].max_queue_delay_us
    config.instance_group.append(mc.ModelInstanceGroup(count=plan.policies[spec.name].instances,
                                                       kind=mc.ModelInstanceGroup.KIND_CPU))
    _set_parameters(config, plan.contract.to_parameters())
    layout = RepositoryLayout(Path("."))
    for member in ITEM_PIPELINE_MEMBERS:
        settings = member_runner_settings(member, plan).with_(
            cpu_share=ITEM_PIPELINE_CPU_SHARES.get(member, 1),
            # relative to this model's folder: the member's served graph
            model_file=Path("..", layout.model_file(member)).as_posix())
        _set_parameters(config, settings.to_parameters(member))
    return config


def ensemble_config(ensemble: EnsembleSpec, max_batch_size: int) -> mc.ModelConfig:
    """Ensembles are not batched themselves (Triton cannot); their members are."""
    spec = ensemble.spec
    config = mc.ModelConfig(name=spec.name, platform="ensemble", max_batch_size=max_batch_size)
    config.input.extend(_tensor_input(t) for t in spec.inputs)
    config.output.extend(_tensor_output(t) for t in spec.outputs)
    for step in ensemble.steps:
        config.ensemble_scheduling.step.append(mc.ModelEnsembling.Step(
            model_name=step.model, model_version=-1,
            input_map=step.input_map, output_map=step.output_map))
    return config


def render(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def all_configs(plan: RepositoryPlan) -> dict[str, mc.ModelConfig]:
    members = schema.member_specs_for(plan.contract)
    configs = {name: member_config(spec, plan) for name, spec in members.items()}
    merged = merged_ensembles(plan.target)
    ensembles = schema.engine_ensemble_specs(members) if merged else schema.ensemble_specs(members)
    for name, ensemble in ensembles.items():
        configs[name] = (merged_item_encoder_config(ensemble, plan) if name in merged
                         else ensemble_config(ensemble, plan.max_batch_size))
    return configs


# python model -> (its thin model.py's source folder, the lib/ modules copied beside it). The
# copies keep every model folder self-contained (object storage, one model pulled alone); the
# manifest hashes them like every other file.
PYTHON_SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    schema.TOKENIZER: ("tokenizer", ("served_contract", "text_preprocessing")),
    schema.IMAGE_PREPROCESS: ("image_preprocess", ("served_contract", "image_preprocessing")),
    schema.ITEM_PREPROCESS: ("item_preprocess", ("served_contract", "text_preprocessing", "image_preprocessing")),
    schema.ITEM_PREPROCESS_PIXELS: ("item_preprocess",
                                    ("served_contract", "text_preprocessing", "image_preprocessing")),
}
ITEM_PIPELINE = ("item_pipeline", ("item_engine", "batching"))
TOKENIZER_USERS = (schema.TOKENIZER, schema.ITEM_PREPROCESS, schema.ITEM_PREPROCESS_PIXELS, schema.ITEM_ENCODER)
ORT_RUNNER = ("ort_runner", ("runtime", "runner_settings", "batching"))  # the portable target's model.py for every ONNX member
CATALOG_SCORER_SOURCES = ("catalog_scorer", ("catalog_scan", "runtime", "runner_settings"))  # copied by `mmrec index`


EVERY_PYTHON_MODEL = ("priority", "tensor_names")  # lib modules every thin model imports
# lib modules that import a sibling (`from . import x`, flat `import x` in the stub): copied with it.
# tests/test_contract.py checks this against the modules' own imports.
LIB_IMPORTS: dict[str, tuple[str, ...]] = {
    "runtime": ("runner_settings",),
    "catalog_scan": ("runner_settings",),
    "image_preprocessing": ("served_contract",),
    "item_engine": ("runtime", "batching", "image_preprocessing", "runner_settings", "served_contract", "tensor_names",
                    "text_preprocessing"),
}


def with_lib_imports(libraries: tuple[str, ...]) -> tuple[str, ...]:
    """`libraries` and every sibling they import, in first-seen order."""
    found: list[str] = []
    pending = list(libraries)
    while pending:
        module = pending.pop(0)
        if module not in found:
            found.append(module)
            pending.extend(LIB_IMPORTS.get(module, ()))
    return tuple(found)


def copy_python_model(source: str, libraries: tuple[str, ...], version_dir: Path) -> None:
    """A thin model.py and the library modules it imports, into one version folder."""
    model = source_file(SOURCES.python_model(source))
    shutil.copyfile(model, Path(version_dir) / model.name)
    for module in with_lib_imports((*EVERY_PYTHON_MODEL, *libraries)):
        library = source_file(SOURCES.lib_file(module))
        shutil.copyfile(library, Path(version_dir) / library.name)


def link_or_copy(source: Path, destination: Path) -> None:
    """A hard link where both sit on one file system (graphs are never edited in place, so a
    staged or re-rendered repository shares them instead of copying hundreds of MB), else a copy."""
    destination.unlink(missing_ok=True)
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)


def write_repository(plan: RepositoryPlan, output: Path) -> dict[str, Path]:
    """Write every model folder under `output`; returns model name -> its model file path."""
    layout = RepositoryLayout(output)
    written: dict[str, Path] = {}
    for name, config in all_configs(plan).items():
        version_dir = layout.version_dir(name)
        version_dir.mkdir(parents=True, exist_ok=True)
        layout.config_file(name).write_text(render(config))
        if name in PYTHON_SOURCES:
            copy_python_model(*PYTHON_SOURCES[name], version_dir)
        merged = name in merged_ensembles(plan.target)
        if merged:
            copy_python_model(*ITEM_PIPELINE, version_dir)
        if name in TOKENIZER_USERS and (name in PYTHON_SOURCES or merged):
            shutil.copyfile(plan.tokenizer_file, layout.tokenizer_file(name))
        if name in plan.member_files:
            target_file = layout.model_file(name, MODEL_KIND[plan.target])
            link_or_copy(plan.member_files[name], target_file)
            if plan.target is Target.portable:
                copy_python_model(*ORT_RUNNER, version_dir)
            written[name] = target_file
    layout.write_contract(plan.contract)
    return written


# --- catalog index (versions written by `mmrec index`, not by export) ---------------------------
CATALOG_SCORER_POLICY = BatchingPolicy(500)


def catalog_scorer_config(spec: ModelSpec, max_batch_size: int, parameters: dict[str, str],
                          policy: BatchingPolicy = CATALOG_SCORER_POLICY) -> mc.ModelConfig:
    """catalog_scorer on every target: a python model (it certifies exactness and batches users
    asking for different K) running ONNX Runtime; Triton serves only the newest index version,
    so loading a new version swaps catalogs while the old one answers until it is ready."""
    config = mc.ModelConfig(name=spec.name, backend="python", max_batch_size=max_batch_size)
    config.input.extend(_tensor_input(t) for t in spec.inputs)
    config.output.extend(_tensor_output(t) for t in spec.outputs)
    config.dynamic_batching.max_queue_delay_microseconds = policy.max_queue_delay_us
    config.instance_group.append(mc.ModelInstanceGroup(count=policy.instances,
                                                       kind=mc.ModelInstanceGroup.KIND_CPU))
    config.version_policy.latest.num_versions = 1
    _set_parameters(config, parameters)
    return config
