"""Triton python model running an exported ONNX graph with ONNX Runtime (the `portable` target).

The Triton binary bundled by nvidia-pytriton has only the python backend, so the `portable`
target serves text_encoder, image_encoder, fusion and scorer through this one file (copied into
each model directory next to its model.onnx). The native `onnxruntime`/`tensorrt` targets do not
use it.

All requests that the dynamic batcher hands over are concatenated and run as one ORT call.
Inputs with a dynamic sequence axis are right-padded with zeros to the longest request
(`allow_ragged_batch` lets the batcher join different lengths); the encoders mean-pool under the
attention mask, so padding does not change any result.

Each request is checked on its own before the batch runs: floating-point inputs must be finite
(a NaN/inf user or pixel tensor would otherwise come back as a NaN score with status OK), and a
bad request gets INVALID_ARG naming the input and row without failing the others. If ORT still
rejects the joined batch, each request is retried alone so only the offending one fails.
(Inside an ensemble these checks are a last line: a step failing while a parallel branch is
still running trips a Triton 2.51 bug, so the ensembles validate pixels in their first step and
the only check expected to fire in serving is USER_EMBEDDING at the scorer, after the join.)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

try:  # only present inside Triton
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised outside the server
    pb_utils = None

MODEL_FILE = "model.onnx"
THREADS_ENV = "MMREC_ORT_INTRA_OP_THREADS"  # set by the Helm chart from the pod's CPU limit


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


def make_session(model_path: Path, intra_op_threads: int = 0) -> ort.InferenceSession:
    """CPU session with full graph optimization; thread count from the model config."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Several sessions share few cores: ORT's default busy-wait after each run starves the
    # others (measured at concurrency 8 on 2 cores: 15-16 -> 55-67 items/s with spinning off).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


class TritonPythonModel:
    """One ORT session; one run per batch of requests."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        model_dir = Path(args["model_repository"]) / args["model_version"]
        self.model_name = args.get("model_name", config.get("name", "model"))
        self.session = make_session(model_dir / MODEL_FILE, thread_budget(
            int(parameters.get("intra_op_threads", "0")), int(parameters.get("cpu_share", "1"))))
        self.input_names = [i["name"] for i in config["input"]]
        self.input_dtypes = {i.name: np.dtype(_ORT_TO_NUMPY[i.type]) for i in self.session.get_inputs()}
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"]))
                        for o in config["output"]]

    def check(self, arrays: list[np.ndarray]) -> str | None:
        """Why one request's inputs cannot be run (NaN/inf values), or None."""
        for name, array in zip(self.input_names, arrays):
            row = non_finite_row(array)
            if row is not None:
                return (f"{self.model_name}: input '{name}' row {row} has NaN or infinite values; "
                        "send finite numbers")
        return None

    def run(self, batches: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
        """Run requests as one ORT call; per request, the outputs split back out."""
        feed = {name: pad_and_concatenate([b[i] for b in batches]).astype(self.input_dtypes[name], copy=False)
                for i, name in enumerate(self.input_names)}
        results = self.session.run([name for name, _ in self.outputs], feed)
        splits = np.cumsum([b[0].shape[0] for b in batches])[:-1]
        per_output = [np.split(r, splits) for r in results]
        return [[per_output[k][j] for k in range(len(self.outputs))] for j in range(len(batches))]

    def _response(self, outputs: list[np.ndarray]):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, array.astype(dtype, copy=False))
            for (name, dtype), array in zip(self.outputs, outputs)])

    @staticmethod
    def _error(message: str):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))

    def execute(self, requests: list) -> list:
        batches = [[pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.input_names]
                   for r in requests]
        problems = [self.check(b) for b in batches]
        responses: list = [self._error(p) if p is not None else None for p in problems]
        good = [j for j, problem in enumerate(problems) if problem is None]
        if not good:
            return responses
        try:
            for j, outputs in zip(good, self.run([batches[j] for j in good])):
                responses[j] = self._response(outputs)
        except Exception as err:  # shape/dtype problems surface here: isolate the bad request(s)
            if len(good) == 1:
                responses[good[0]] = self._error(f"{self.model_name}: {type(err).__name__}: {err}")
                return responses
            for j in good:
                try:
                    responses[j] = self._response(self.run([batches[j]])[0])
                except Exception as alone:
                    responses[j] = self._error(f"{self.model_name}: {type(alone).__name__}: {alone}")
        return responses

    def finalize(self) -> None:
        self.session = None


_ORT_TO_NUMPY = {"tensor(float)": "float32", "tensor(float16)": "float16",
                 "tensor(int64)": "int64", "tensor(int32)": "int32"}
