"""Triton python model running an exported ONNX graph with ONNX Runtime (the `portable` target).

The Triton binary bundled by nvidia-pytriton has only the python backend, so the `portable`
target serves text_encoder, image_encoder, fusion and scorer through this one file (copied into
each model directory next to its model.onnx). The native `onnxruntime`/`tensorrt` targets do not
use it.

All requests that the dynamic batcher hands over are concatenated and run as one ORT call.
Inputs with a dynamic sequence axis are right-padded with zeros to the longest request
(`allow_ragged_batch` lets the batcher join different lengths); the encoders mean-pool under the
attention mask, so padding does not change any result.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

try:  # only present inside Triton
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised outside the server
    pb_utils = None

MODEL_FILE = "model.onnx"


def pad_and_concatenate(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenate along the batch axis, right-padding trailing axes with zeros to the max."""
    shape = np.max([a.shape for a in arrays], axis=0)
    if all(a.shape[1:] == tuple(shape[1:]) for a in arrays):
        return np.concatenate(arrays)
    padded = [np.pad(a, [(0, 0)] + [(0, int(m - s)) for s, m in zip(a.shape[1:], shape[1:])])
              for a in arrays]
    return np.concatenate(padded)


def make_session(model_path: Path, intra_op_threads: int = 0) -> ort.InferenceSession:
    """CPU session with full graph optimization; thread count from the model config."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


class TritonPythonModel:
    """One ORT session; one run per batch of requests."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        model_dir = Path(args["model_repository"]) / args["model_version"]
        self.session = make_session(model_dir / MODEL_FILE,
                                    int(parameters.get("intra_op_threads", "0")))
        self.input_names = [i["name"] for i in config["input"]]
        self.input_dtypes = {i.name: np.dtype(_ORT_TO_NUMPY[i.type]) for i in self.session.get_inputs()}
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"]))
                        for o in config["output"]]

    def execute(self, requests: list) -> list:
        batches = [[pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.input_names]
                   for r in requests]
        sizes = [b[0].shape[0] for b in batches]
        feed = {name: pad_and_concatenate([b[i] for b in batches]).astype(self.input_dtypes[name], copy=False)
                for i, name in enumerate(self.input_names)}
        try:
            results = self.session.run([name for name, _ in self.outputs], feed)
        except Exception as err:  # shape/dtype problems surface here; fail the batch, not the model
            error = pb_utils.TritonError(f"{type(err).__name__}: {err}", pb_utils.TritonError.INVALID_ARG)
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        splits = np.cumsum(sizes)[:-1]
        per_output = [np.split(r, splits) for r in results]
        return [pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(name, per_output[k][j].astype(dtype, copy=False))
                    for k, (name, dtype) in enumerate(self.outputs)])
                for j in range(len(requests))]

    def finalize(self) -> None:
        self.session = None


_ORT_TO_NUMPY = {"tensor(float)": "float32", "tensor(float16)": "float16",
                 "tensor(int64)": "int64", "tensor(int32)": "int32"}
