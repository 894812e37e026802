"""How a served ONNX graph is run, and how a catalog is served: the owners of those config parameters.

`RunnerSettings` is the one reader and writer of the portable runner's parameters (runtime,
precision, threads, core share, graph file, length buckets), for a member's own config and, under
`<member>.`, for a merged model that runs several members (`item_pipeline`). Export writes them,
the runner, the merged model, the reference pipeline, tuning and the benchmarks read or change
them here; no other code formats, parses or pattern-matches these keys. The OpenVINO backend's
own keys (the openvino target) are translated here too.

`CatalogSettings` owns catalog_scorer's parameters (K limits, threads, prepacking): `mmrec index`
writes them, the served model and the client read them back.

Plain Python on purpose: export copies this file beside each thin Triton `model.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Mapping

RUNTIMES = ("onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16")  # a float graph's inference precision; int8 lives in the graph
DEFAULT_RUNTIME, DEFAULT_PRECISION = RUNTIMES[0], PRECISIONS[0]
MEMBER_SEPARATOR = "."  # a merged model's "<member>.<key>"
_LIST_SEPARATOR = ","

# The OpenVINO backend passes on only INFERENCE_NUM_THREADS, COMPILATION_NUM_THREADS, HINT_BF16
# (YES), NUM_STREAMS and PERFORMANCE_HINT; any other key (e.g. INFERENCE_PRECISION_HINT) is dropped.
OPENVINO_BF16_KEY = "HINT_BF16"
OPENVINO_THREADS_KEY = "INFERENCE_NUM_THREADS"
OPENVINO_FIXED = {"NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY"}


class SettingsError(ValueError):
    """Config parameters that are not valid settings; the message names the key."""


def flatten(parameters: Mapping[str, object]) -> dict[str, str]:
    """Config parameters as plain strings (Triton's JSON form wraps them in {"string_value": ...})."""
    return {k: (v.get("string_value", "") if isinstance(v, dict) else str(v)) for k, v in parameters.items()}


@dataclass(frozen=True)
class RunnerSettings:
    """One member's runner: which runtime at which precision, on how many threads, which graph."""

    runtime: str = DEFAULT_RUNTIME
    precision: str = DEFAULT_PRECISION
    intra_op_threads: int = 0  # 0: this member's share of the usable cores (runtime.thread_budget)
    cpu_share: int = 1  # members running at the same time split the cores: 2 means half
    model_file: str = ""  # a merged model's path to the member's served graph ("": the model's own)
    seq_buckets: tuple[int, ...] = ()  # text encoder: rows of a joined batch run at their length bucket
    length_input: str = ""  # the mask input whose row sums are those lengths

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise SettingsError(f"runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if self.precision not in PRECISIONS:
            raise SettingsError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.intra_op_threads < 0 or self.cpu_share < 1:
            raise SettingsError(f"need intra_op_threads >= 0 and cpu_share >= 1, got "
                                f"{self.intra_op_threads} and {self.cpu_share}")
        object.__setattr__(self, "seq_buckets", tuple(int(b) for b in self.seq_buckets))

    def to_parameters(self, member: str | None = None) -> dict[str, str]:
        """Config parameters (`<member>.` keys for a merged model); empty optional fields are left out."""
        prefix = member + MEMBER_SEPARATOR if member else ""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _OPTIONAL and not value:
                continue
            out[prefix + f.name] = _LIST_SEPARATOR.join(map(str, value)) if isinstance(value, tuple) else str(value)
        return out

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, object], member: str | None = None) -> "RunnerSettings":
        """The settings in config parameters (plain or Triton's JSON form); absent keys take defaults."""
        prefix = member + MEMBER_SEPARATOR if member else ""
        flat = flatten(parameters)
        values: dict = {}
        for f in fields(cls):
            text = flat.get(prefix + f.name)
            if text is None:
                continue
            try:
                values[f.name] = _parse(f.name, text)
            except ValueError:
                raise SettingsError(f"config parameter {prefix + f.name}={text!r} is not valid") from None
        return cls(**values)

    @classmethod
    def from_config(cls, backend: str, parameters: Mapping[str, object], member: str | None = None) -> "RunnerSettings":
        """The settings a model config holds: the OpenVINO backend's keys where `backend` is
        openvino, else the runner's (`member`: a merged model's `<member>.` keys)."""
        if backend == "openvino":
            return cls.from_openvino_backend(parameters)
        return cls.from_parameters(parameters, member)

    @staticmethod
    def keys(member: str | None = None) -> tuple[str, ...]:
        """Every parameter key these settings may write (to remove them from a config)."""
        prefix = member + MEMBER_SEPARATOR if member else ""
        return tuple(prefix + f.name for f in fields(RunnerSettings))

    def with_(self, **changes) -> "RunnerSettings":
        return replace(self, **changes)

    # ---- the OpenVINO backend (openvino target), which has keys of its own
    def to_openvino_backend(self) -> dict[str, str]:
        """The OpenVINO backend's properties: one latency stream, BF16 when chosen, threads only
        where pinned (else the backend sizes them to the container). The backend cannot force
        FP32: on a CPU with native BF16 it runs BF16 by default (export refuses that case)."""
        out = dict(OPENVINO_FIXED)
        if self.precision == "bf16":
            out[OPENVINO_BF16_KEY] = "YES"
        if self.intra_op_threads:
            out[OPENVINO_THREADS_KEY] = str(self.intra_op_threads)
        return out

    @classmethod
    def from_openvino_backend(cls, parameters: Mapping[str, object]) -> "RunnerSettings":
        flat = flatten(parameters)
        bf16 = flat.get(OPENVINO_BF16_KEY, "").upper() == "YES"
        return cls(runtime="openvino", precision="bf16" if bf16 else "fp32",
                   intra_op_threads=int(flat.get(OPENVINO_THREADS_KEY, "0") or 0))


_OPTIONAL = ("model_file", "seq_buckets", "length_input")


def _parse(name: str, text: str):
    if name == "seq_buckets":
        return tuple(int(v) for v in text.split(_LIST_SEPARATOR) if v.strip())
    if name in ("intra_op_threads", "cpu_share"):
        return int(text)
    return text


# ---- catalog_scorer ---------------------------------------------------------------------------
PREPACKING_MODES = ("auto", "on", "off")
DEFAULT_MAX_K = 1000
DEFAULT_K = 10


@dataclass(frozen=True)
class CatalogSettings:
    """catalog_scorer config parameters (the same for every index version, so a load is a pure swap)."""

    max_k: int = DEFAULT_MAX_K
    default_k: int = DEFAULT_K
    intra_op_threads: int = 0
    prepacking: str = "auto"  # auto | on | off: see catalog_scan.CatalogScan

    def __post_init__(self) -> None:
        if self.max_k < 1 or not 1 <= self.default_k <= self.max_k:
            raise SettingsError(f"need 1 <= default_k <= max_k, got default_k={self.default_k}, max_k={self.max_k}")
        if self.prepacking not in PREPACKING_MODES:
            raise SettingsError(f"prepacking must be one of {PREPACKING_MODES}, got {self.prepacking!r}")

    def to_parameters(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, object]) -> "CatalogSettings":
        """max_k and default_k are required (a catalog config without them is not mmrec's)."""
        flat = flatten(parameters)
        missing = [k for k in ("max_k", "default_k") if k not in flat]
        if missing:
            raise SettingsError(f"catalog config parameters lack {missing}")
        try:
            return cls(max_k=int(flat["max_k"]), default_k=int(flat["default_k"]),
                       intra_op_threads=int(flat.get("intra_op_threads", "0") or 0),
                       prepacking=flat.get("prepacking", "auto"))
        except ValueError as err:
            raise SettingsError(f"catalog config parameters are not valid: {err}") from None
