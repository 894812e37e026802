"""Triton python model `image_preprocess`: IMAGE (encoded JPEG/PNG/WebP BYTES) -> pixel_values
FP32 [3, S, S].

A thin adapter: the logic is `image_preprocessing.py`, the parameters are read by
`served_contract.py`; export copies both beside this file, and Triton's python stub puts this
folder on sys.path. Served for users who decode on the server alone; the ensembles and the
client use `item_preprocess`.
"""
from __future__ import annotations

import json

import numpy as np
import priority  # lib/priority.py, copied beside this file by export
from image_preprocessing import ImageDecoder, InvalidImage
from served_contract import ServedContract
from tensor_names import IMAGE, PIXEL_VALUES

try:  # only present inside Triton
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised outside the server
    pb_utils = None


class TritonPythonModel:
    """Decodes every image of every request, then normalizes the whole batch at once."""

    def initialize(self, args: dict) -> None:
        priority.yield_to_server()  # Triton's own threads first (lib/priority.py)
        config = json.loads(args["model_config"])
        self.decoder = ImageDecoder.for_contract(ServedContract.from_parameters(config.get("parameters", {})))
        self.output_dtype = pb_utils.triton_string_to_numpy(
            pb_utils.get_output_config_by_name(config, PIXEL_VALUES)["data_type"])

    def execute(self, requests: list) -> list:
        decoded: list[np.ndarray | tuple[str, int]] = []
        for request in requests:
            try:
                tensor = pb_utils.get_input_tensor_by_name(request, IMAGE)
                if tensor is None:
                    raise InvalidImage("IMAGE input is missing")
                raw = tensor.as_numpy().reshape(-1)
                if raw.size == 0:
                    raise InvalidImage("IMAGE is empty: send one encoded image per batch item")
                decoded.append(np.stack([self.decoder.decode(d, i) for i, d in enumerate(raw)]))
            except InvalidImage as err:
                decoded.append((str(err), pb_utils.TritonError.INVALID_ARG))
            except Exception as err:  # a bug must fail this request only, never the batch
                decoded.append((f"image_preprocess failed: {type(err).__name__}: {err}",
                                pb_utils.TritonError.INTERNAL))
        valid = [d for d in decoded if not isinstance(d, tuple)]
        normalized = (np.split(self.decoder.normalize(np.concatenate(valid)),
                               np.cumsum([len(d) for d in valid])[:-1]) if valid else [])
        responses, outputs = [], iter(normalized)
        for item in decoded:
            if isinstance(item, tuple):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(*item)))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(PIXEL_VALUES, next(outputs).astype(self.output_dtype))]))
        return responses

    def finalize(self) -> None:
        self.decoder = None
