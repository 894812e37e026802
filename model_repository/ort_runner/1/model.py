"""Triton python model running an exported ONNX graph on CPU (the `portable` target).

The Triton binary bundled by nvidia-pytriton has only the python backend, so the `portable`
target serves text_encoder, image_encoder, fusion and scorer through this one file (copied into
each model directory next to its model.onnx, with lib/runtime.py beside it). The config's runner
settings (lib/runner_settings.py) pick ONNX Runtime or OpenVINO, OpenVINO's inference precision
(chosen per machine by `mmrec tune`), threads and length buckets. The native `onnxruntime`/`openvino`/`tensorrt` targets do
not use it.

All requests that the dynamic batcher hands over are concatenated and run as one session call.
Inputs with a dynamic sequence axis are right-padded with zeros to the longest request
(`allow_ragged_batch` lets the batcher join different lengths); the encoders mean-pool under the
attention mask, so padding does not change any result.

Each request is checked on its own before the batch runs: floating-point inputs must be finite
(a NaN/inf user or pixel tensor would otherwise come back as a NaN score with status OK), and a
bad request gets INVALID_ARG naming the input and row without failing the others. If the runtime still
rejects the joined batch, each request is retried alone so only the offending one fails.
(Inside an ensemble these checks are a last line: a step failing while a parallel branch is
still running trips a Triton 2.51 bug, so the ensembles validate pixels in their first step and
the only check expected to fire in serving is USER_EMBEDDING at the scorer, after the join.)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import batching  # lib/batching.py: join, run, split, errors per request
import priority  # lib/priority.py, copied beside this file by export
import runtime  # the copy of model_repository/lib/runtime.py that export puts beside this file
from runner_settings import RunnerSettings

try:  # only present inside Triton
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised outside the server
    pb_utils = None

MODEL_FILE = "model.onnx"
# re-exported: tests and tools reach the runner's helpers through this module
usable_cores, thread_budget = runtime.usable_cores, runtime.thread_budget
pad_and_concatenate, non_finite_row, make_session = (runtime.pad_and_concatenate, runtime.non_finite_row,
                                                     runtime.make_session)


class TritonPythonModel:
    """One session (ONNX Runtime or OpenVINO, from the `runtime` parameter); one run per batch."""

    def initialize(self, args: dict) -> None:
        priority.yield_to_server()  # Triton's own threads first (lib/priority.py)
        config = json.loads(args["model_config"])
        model_dir = Path(args["model_repository"]) / args["model_version"]
        self.model_name = args.get("model_name", config.get("name", "model"))
        settings = RunnerSettings.from_parameters(config.get("parameters", {}))
        self.session = runtime.open_configured(model_dir / MODEL_FILE, settings)
        self.input_names = [i["name"] for i in config["input"]]
        self.input_dtypes = self.session.input_dtypes
        # text encoder: rows of a joined batch run at their own length bucket (see length_groups)
        self.seq_buckets, self.length_input = settings.seq_buckets, settings.length_input
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
        """Run requests as one session call; per request, the outputs split back out."""
        feed = {name: pad_and_concatenate([b[i] for b in batches]).astype(self.input_dtypes[name], copy=False)
                for i, name in enumerate(self.input_names)}
        names = [name for name, _ in self.outputs]
        if self.seq_buckets and self.length_input in feed:
            results = runtime.run_by_length(self.session, names, feed, self.length_input, self.seq_buckets)
        else:
            results = self.session.run(names, feed)
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

    def _read(self, request) -> list[np.ndarray]:
        arrays = [pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names]
        problem = self.check(arrays)
        if problem is not None:
            raise ValueError(problem)
        return arrays

    def execute(self, requests: list) -> list:
        # shape/dtype problems surface as runtime errors of the joined run: INVALID_ARG, each alone
        results = batching.run_joined(batching.read_each(requests, self._read), self.run, self.model_name,
                                      runtime_fault_is_internal=False)
        return [self._error(r.message) if isinstance(r, batching.Failure) else self._response(r) for r in results]

    def finalize(self) -> None:
        self.session = None

