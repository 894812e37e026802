"""Triton python model: one validation+preprocessing step in front of the ensembles' fan-out.

TEXT + IMAGE (encoded bytes)      -> input_ids, attention_mask, pixel_values   (item_preprocess)
TEXT + PIXEL_VALUES (client-side) -> input_ids, attention_mask, pixel_values   (item_preprocess_pixels)

Why one step: Triton 2.51's ensemble scheduler never retires a request whose step fails while a
parallel branch is still running (the request stays "in flight" forever: shutdowns wait out the
exit timeout and the ensemble can no longer be unloaded). Every way an item can be invalid is
therefore detected here, before text and image branches split.

A thin adapter: tokenizing is `text_preprocessing.py`, decoding and pixel checks
`image_preprocessing.py`, the parameters (the whole served contract, which the client reads from
this model's config) `served_contract.py`; export copies them beside this file, and Triton's
python stub puts this folder on sys.path, so the folder is self-contained.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import priority  # lib/priority.py, copied beside this file by export
from image_preprocessing import ImageDecoder, check_pixels
from served_contract import TOKENIZER_FILE, ServedContract
from tensor_names import ATTENTION_MASK, IMAGE, INPUT_IDS, PIXEL_VALUES, PIXELS, TEXT, TEXT_FEATURES
from text_preprocessing import TextTokenizer

try:  # only present inside Triton
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised outside the server
    pb_utils = None


class TritonPythonModel:
    """Validates and preprocesses every item of every request; errors fail only their request."""

    def initialize(self, args: dict) -> None:
        priority.yield_to_server()  # Triton's own threads first (lib/priority.py)
        config = json.loads(args["model_config"])
        contract = ServedContract.from_parameters(config.get("parameters", {}))
        model_dir = Path(args["model_repository"]) / args["model_version"]
        self.tokenizer = TextTokenizer.for_contract(contract, model_dir / TOKENIZER_FILE)
        self.decoder = ImageDecoder.for_contract(contract)
        self.takes_pixels = any(i["name"] == PIXELS for i in config["input"])
        self.output_dtypes = {
            name: pb_utils.triton_string_to_numpy(pb_utils.get_output_config_by_name(config, name)["data_type"])
            for name in (*TEXT_FEATURES, PIXEL_VALUES)}

    def _validate(self, request) -> tuple[list[str], np.ndarray]:
        """(texts, pixels uint8 [N,S,S,3] or normalized float [N,3,S,S]) or raise ValueError."""
        texts = self.tokenizer.decode_texts(pb_utils.get_input_tensor_by_name(request, TEXT).as_numpy())
        if self.takes_pixels:
            pixels = pb_utils.get_input_tensor_by_name(request, PIXELS).as_numpy()
            return texts, check_pixels(pixels, self.decoder.image_size)
        raw = pb_utils.get_input_tensor_by_name(request, IMAGE).as_numpy().reshape(-1)
        return texts, np.stack([self.decoder.decode(d, i) for i, d in enumerate(raw)])

    def execute(self, requests: list) -> list:
        validated: list[tuple[list[str], np.ndarray] | str] = []
        for request in requests:
            try:
                validated.append(self._validate(request))
            except ValueError as err:  # InvalidText, InvalidImage, InvalidPixels
                validated.append(str(err))
        good = [v for v in validated if not isinstance(v, str)]
        if good and not self.takes_pixels:  # normalize all decoded images in one pass
            normalized = self.decoder.normalize(np.concatenate([p for _, p in good]))
            parts = iter(np.split(normalized, np.cumsum([len(p) for _, p in good])[:-1]))
            good = [(texts, next(parts)) for texts, _ in good]
        ready = iter(good)
        responses = []
        for item in validated:
            if isinstance(item, str):
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(item, pb_utils.TritonError.INVALID_ARG)))
                continue
            texts, pixels = next(ready)
            ids, mask = self.tokenizer(texts)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(INPUT_IDS, ids.astype(self.output_dtypes[INPUT_IDS])),
                pb_utils.Tensor(ATTENTION_MASK, mask.astype(self.output_dtypes[ATTENTION_MASK])),
                pb_utils.Tensor(PIXEL_VALUES, pixels.astype(self.output_dtypes[PIXEL_VALUES])),
            ]))
        return responses

    def finalize(self) -> None:
        self.tokenizer = self.decoder = None
