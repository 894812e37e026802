"""Sessions that run an exported ONNX graph on CPU: ONNX Runtime or OpenVINO, one interface.

The portable target's runner, the reference pipeline, the export gates, tuning and the
benchmarks all open sessions here, so thread counts, spinning and precision are set in one place.

Runtimes and precisions (`variant` names in the manifest in brackets):
  onnxruntime  fp32 [fp32], int8 graphs [int8]  - the graph's own precision
  openvino     fp32 [openvino-fp32], bf16 [openvino-bf16] - OpenVINO's inference precision hint,
               int8 graphs [openvino-int8] - OpenVINO runs ONNX Q/DQ graphs with its INT8 kernels
OpenVINO silently falls back to FP32 when a CPU lacks BF16 (measured: it accepts the hint and
reports f32), so BF16 is refused here on such CPUs instead of being served under a false name.

Plain numpy/onnxruntime/openvino only: this file runs inside Triton's python stub.
"""
from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

try:  # a sibling library module: `from .` in the package, flat beside model.py in Triton's stub
    from .runner_settings import PRECISIONS, RUNTIMES, RunnerSettings
except ImportError:
    from runner_settings import PRECISIONS, RUNTIMES, RunnerSettings  # noqa: F401 - re-exported
THREADS_ENV = "MMREC_ORT_INTRA_OP_THREADS"  # set by the Helm chart from the container's CPU request (downward API)
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}
_ORT_TO_NUMPY = {"tensor(float)": "float32", "tensor(float16)": "float16",
                 "tensor(int64)": "int64", "tensor(int32)": "int32"}


def usable_cores() -> int:
    """Cores this process may use: CPU affinity, capped by a cgroup v2 CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def thread_budget(configured: int, cpu_share: int) -> int:
    """intra-op threads of one session: the configured count, else the environment's, else this
    member's share of the usable cores (text and image encoders run at the same time, so each
    gets half: more threads than cores makes both slower)."""
    if configured > 0:
        return configured
    from_env = int(os.environ.get(THREADS_ENV, "0") or 0)
    total = from_env if from_env > 0 else usable_cores()
    return max(1, total // max(1, cpu_share))


def pad_and_concatenate(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenate along the batch axis, right-padding trailing axes with zeros to the max."""
    shape = np.max([a.shape for a in arrays], axis=0)
    if all(a.shape[1:] == tuple(shape[1:]) for a in arrays):
        return np.concatenate(arrays)
    padded = [np.pad(a, [(0, 0)] + [(0, int(m - s)) for s, m in zip(a.shape[1:], shape[1:])])
              for a in arrays]
    return np.concatenate(padded)


def non_finite_row(array: np.ndarray) -> int | None:
    """Index of the first batch row holding NaN or +-inf, or None (non-float arrays: None)."""
    if array.dtype.kind != "f" or array.size == 0 or np.isfinite(array).all():
        return None
    rows = ~np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1)
    return int(np.flatnonzero(rows)[0])


# Split a batch by length only when it saves at least this share of the computed tokens: each
# extra run has a fixed cost, and a batch of similar lengths gains nothing from splitting.
MIN_PADDING_SAVED = 0.25


def length_groups(mask: np.ndarray, buckets: tuple[int, ...]) -> list[tuple[np.ndarray, int]]:
    """Rows grouped by the smallest bucket that holds their real length: (row indices, width).

    A batch padded to its longest text computes every row at that width; one 128-token text
    among 31 captions of 16 makes the encoder compute 4096 tokens for 624 real ones. Grouping
    computes each row at its own bucket: the same results (mean pooling under the mask), less
    work. Returns a single group when grouping would not save MIN_PADDING_SAVED."""
    lengths = mask.sum(axis=1)
    width = mask.shape[1]
    edges = sorted({b for b in buckets if b < width} | {width})
    bucket_of = np.searchsorted(edges, lengths)  # index of the smallest edge >= length
    groups = [(np.flatnonzero(bucket_of == k), edge) for k, edge in enumerate(edges) if (bucket_of == k).any()]
    computed = sum(len(rows) * edge for rows, edge in groups)
    if len(groups) == 1 or computed > (1 - MIN_PADDING_SAVED) * mask.size:
        return [(np.arange(mask.shape[0]), width)]
    return groups


def run_by_length(session: "Session", output_names: list[str] | None, feed: dict[str, np.ndarray],
                  mask_name: str, buckets: tuple[int, ...]) -> list[np.ndarray]:
    """session.run with the rows of each length group run at their group's width, outputs
    put back in row order (outputs must be per-row: [B, ...] without a sequence axis)."""
    assert all(value.ndim == 2 for value in feed.values()), "length grouping cuts [B, S] inputs only"
    groups = length_groups(feed[mask_name], buckets)
    if len(groups) == 1:
        return session.run(output_names, feed)
    pieces = [session.run(output_names, {name: value[rows, :width] for name, value in feed.items()})
              for rows, width in groups]
    order = np.argsort(np.concatenate([rows for rows, _ in groups]), kind="stable")
    return [np.concatenate([p[k] for p in pieces])[order] for k in range(len(pieces[0]))]


def make_session(model_path: Path, intra_op_threads: int = 0, prepacking: bool = True):
    """ONNX Runtime CPU session: full graph optimization, sequential, no spinning; prepacking of
    constant weights (ORT's default) can be turned off (catalog_scan: one user's GEMV is faster
    reading the mmapped matrix)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Several sessions share few cores: ORT's default busy-wait after each run starves the
    # others (measured at concurrency 8 on 2 cores: 15-16 -> 55-67 items/s with spinning off).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepacking:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


class Session(Protocol):
    """What every caller needs of a session: typed inputs, and run by output names."""

    input_dtypes: dict[str, np.dtype]

    def run(self, output_names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class OrtSession:
    """ONNX Runtime session (its own precision: the graph's)."""

    runtime = "onnxruntime"

    def __init__(self, model_path: Path, threads: int = 0, session=None) -> None:
        """`session`: an InferenceSession opened elsewhere (an experiment's own options)."""
        self.session = session if session is not None else make_session(model_path, threads)
        self.input_dtypes = {i.name: np.dtype(_ORT_TO_NUMPY[i.type]) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, output_names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(output_names, feed)


@functools.lru_cache(maxsize=None)
def openvino_capabilities() -> tuple[str, ...]:
    """The CPU plugin's OPTIMIZATION_CAPABILITIES (e.g. FP32, INT8, BF16), () without OpenVINO."""
    try:
        import openvino as ov
    except ImportError:
        return ()
    return tuple(str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def unavailable_reason(runtime: str, precision: str = "fp32") -> str | None:
    """Why this runtime/precision cannot run on this machine, or None."""
    if runtime not in RUNTIMES:
        return f"unknown runtime {runtime!r}; choose from {RUNTIMES}"
    if precision not in PRECISIONS:
        return f"unknown precision {precision!r}; choose from {PRECISIONS}"
    if runtime == "onnxruntime":
        return "ONNX Runtime runs a graph in its own precision: bf16 is an OpenVINO hint" if precision != "fp32" else None
    capabilities = openvino_capabilities()
    if not capabilities:
        return "the openvino package is not installed"
    if precision == "bf16" and "BF16" not in capabilities:
        return ("this CPU has no native BF16 (OpenVINO CPU capabilities: " + ", ".join(capabilities)
                + "); OpenVINO would silently run FP32")
    return None


class OpenVinoSession:
    """OpenVINO CPU session: one compiled model, one infer request per calling thread."""

    runtime = "openvino"

    def __init__(self, model_path: Path, threads: int = 0, precision: str = "fp32") -> None:
        import openvino as ov

        reason = unavailable_reason("openvino", precision)
        if reason:
            raise RuntimeError(f"cannot open {model_path} with OpenVINO {precision}: {reason}")
        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                  "INFERENCE_PRECISION_HINT": _OV_PRECISION[precision],
                  # members share few cores with other processes: pinning would fight the OS
                  "ENABLE_CPU_PINNING": False}
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(str(model_path)), "CPU", config)
        self._local = threading.local()  # an infer request is not thread-safe: one per calling thread
        self.input_dtypes = {p.get_any_name(): np.dtype(p.get_element_type().to_dtype())
                             for p in self.compiled.inputs}
        self.output_names = [p.get_any_name() for p in self.compiled.outputs]
        self.precision = precision

    @property
    def request(self):
        if not hasattr(self._local, "request"):
            self._local.request = self.compiled.create_infer_request()
        return self._local.request

    def run(self, output_names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        request = self.request
        request.infer(feed)
        # the request reuses its output buffers on the next call: hand out copies
        return [request.get_tensor(name).data.copy() for name in (output_names or self.output_names)]


def open_configured(model_path: Path, settings: RunnerSettings) -> Session:
    """A session as a member's runner settings say: runtime, precision, its share of the cores."""
    return open_session(model_path, settings.runtime, thread_budget(settings.intra_op_threads, settings.cpu_share),
                        settings.precision)


def open_session(model_path: Path, runtime: str = "onnxruntime", threads: int = 0,
                 precision: str = "fp32") -> Session:
    """A session of the named runtime; raises with the reason when it cannot run here."""
    reason = unavailable_reason(runtime, precision)
    if reason:
        raise RuntimeError(f"cannot open {model_path} with {runtime} {precision}: {reason}")
    if runtime == "openvino":
        return OpenVinoSession(model_path, threads, precision)
    return OrtSession(model_path, threads)
