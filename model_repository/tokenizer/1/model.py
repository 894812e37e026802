"""Triton python model `tokenizer`: TEXT (BYTES, UTF-8) -> input_ids, attention_mask (INT64).

A thin adapter: the logic is `text_preprocessing.py`, the parameters are read by
`served_contract.py`; export copies both beside this file, and Triton's python stub puts this
folder on sys.path, so the folder is self-contained. Served for users who tokenize on the
server alone; the ensembles and the client use `item_preprocess`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import priority  # lib/priority.py, copied beside this file by export
from served_contract import TOKENIZER_FILE, ServedContract
from tensor_names import TEXT, TEXT_FEATURES as OUTPUTS
from text_preprocessing import InvalidText, TextTokenizer

try:  # only present inside Triton
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised outside the server
    pb_utils = None


class TritonPythonModel:
    """Tokenizes every request of a batch with one encode_batch call."""

    def initialize(self, args: dict) -> None:
        priority.yield_to_server()  # Triton's own threads first (lib/priority.py)
        config = json.loads(args["model_config"])
        contract = ServedContract.from_parameters(config.get("parameters", {}))
        model_dir = Path(args["model_repository"]) / args["model_version"]
        self.tokenizer = TextTokenizer.for_contract(contract, model_dir / TOKENIZER_FILE)
        self.output_dtypes = {
            name: pb_utils.triton_string_to_numpy(pb_utils.get_output_config_by_name(config, name)["data_type"])
            for name in OUTPUTS}

    @staticmethod
    def _failure(message: str, code):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

    def _response(self, ids: np.ndarray, mask: np.ndarray):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, array.astype(self.output_dtypes[name]))
            for name, array in zip(OUTPUTS, (ids, mask))])

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, TEXT)
            try:
                if raw is None:
                    raise InvalidText("TEXT input is missing")
                texts = self.tokenizer.decode_texts(raw.as_numpy())
            except InvalidText as err:
                responses.append(self._failure(str(err), pb_utils.TritonError.INVALID_ARG))
                continue
            try:
                ids, mask = self.tokenizer(texts)
            except Exception as err:  # a bug must fail this request only, never the batch
                responses.append(self._failure(f"tokenizer failed: {type(err).__name__}: {err}",
                                               pb_utils.TritonError.INTERNAL))
                continue
            responses.append(self._response(ids, mask))
        return responses

    def finalize(self) -> None:
        self.tokenizer = None
