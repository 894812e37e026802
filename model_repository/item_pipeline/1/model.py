"""Triton python model: the whole item path in one step (the `portable` target's `item_encoder`).

TEXT + IMAGE (encoded bytes) or PIXEL_VALUES (client-preprocessed)
    -> ITEM_EMBEDDING, INTEREST_PROBS, ALIGNMENT

Why one step: on the portable target every ensemble step is a python model, and every hop between
two of them costs a round trip through shared memory to another stub process (measured in issue
11). The work itself is lib/item_engine.py, the one implementation of the item path (the
benchmarks' in-process arm runs it too): decode in a pool overlapping the image encoder, text encoder on
a worker, fusion once per batch, each member's graph, runtime and share of the cores as the
config's `<member>.` runner settings say (lib/runner_settings.py). This file only reads requests
and writes responses; lib/batching.py gives each request its own error. `item_encoder_pixels`
and `interest_scorer` are ensembles over this model (schema.engine_ensemble_specs), so the
text, image and fusion graphs are loaded once, here.
"""
from __future__ import annotations

import json
from pathlib import Path

import batching  # copies of model_repository/lib/*.py that export puts beside this file
import priority
from item_engine import ItemEngine
from tensor_names import IMAGE, ITEM_ENCODER, ITEM_OUTPUTS, PIXELS, TEXT

try:  # only present inside Triton
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised outside the server
    pb_utils = None


class TritonPythonModel:
    """Reads each request of a dynamic batch; the engine runs them together."""

    def initialize(self, args: dict) -> None:
        priority.yield_to_server()  # Triton's own threads first (lib/priority.py)
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.engine = ItemEngine.for_model(parameters, Path(args["model_repository"]), args["model_version"])
        self.output_dtypes = [pb_utils.triton_string_to_numpy(
            pb_utils.get_output_config_by_name(config, name)["data_type"]) for name in ITEM_OUTPUTS]

    def _read(self, request):
        text, image, pixels = (pb_utils.get_input_tensor_by_name(request, name) for name in (TEXT, IMAGE, PIXELS))
        if text is None:  # with optional inputs in the config, Triton leaves this check to the model
            raise ValueError(f"{ITEM_ENCODER}: missing required input(s) ['{TEXT}']")
        return self.engine.items(text.as_numpy(),
                                 images=None if image is None else image.as_numpy(),
                                 pixels=None if pixels is None else pixels.as_numpy())

    def execute(self, requests: list) -> list:
        parsed = batching.read_each(requests, self._read)
        return [self._response(r) for r in batching.run_joined(parsed, self.engine.encode_batch, ITEM_ENCODER)]

    def _response(self, result):
        if isinstance(result, batching.Failure):  # INVALID_ARG: what the client sent; INTERNAL: a runtime fault
            code = pb_utils.TritonError.INTERNAL if result.internal else pb_utils.TritonError.INVALID_ARG
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(result.message, code))
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, array.astype(dtype, copy=False))
            for name, dtype, array in zip(ITEM_OUTPUTS, self.output_dtypes, result)])

    def finalize(self) -> None:
        self.engine.close()
