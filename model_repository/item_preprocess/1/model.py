"""Triton python model: one validation+preprocessing step in front of the ensembles' fan-out.

TEXT + IMAGE (encoded bytes)      -> input_ids, attention_mask, pixel_values   (item_preprocess)
TEXT + PIXEL_VALUES (client-side) -> input_ids, attention_mask, pixel_values   (item_preprocess_pixels)

Why one step: Triton 2.51's ensemble scheduler never retires a request whose step fails while a
parallel branch is still running (the request stays "in flight" forever: shutdowns wait out the
exit timeout and the ensemble can no longer be unloaded). Every way an item can be invalid is
therefore detected here, before text and image branches split.

The tokenizer and image decoder are the `tokenizer` and `image_preprocess` models' own classes:
export copies those files beside this one as text_model.py / image_model.py (a model folder
pulled alone from object storage stays complete); in the source tree they are read from their
own folders.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np

try:  # only present inside Triton
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised outside the server
    pb_utils = None

HERE = Path(__file__).resolve().parent


def _load_sibling(module_name: str, *candidates: Path) -> ModuleType:
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"none of {[str(p) for p in candidates]} exists; re-run `mmrec export`")
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


text_model = _load_sibling("mmrec_item_preprocess_text", HERE / "text_model.py",
                           HERE.parents[1] / "tokenizer" / "1" / "model.py")
image_model = _load_sibling("mmrec_item_preprocess_image", HERE / "image_model.py",
                            HERE.parents[1] / "image_preprocess" / "1" / "model.py")


class InvalidPixels(ValueError):
    """Client-side pixels of the wrong shape or with non-finite values."""


def check_pixels(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """Validate a client-preprocessed FP32 [N, 3, S, S] batch (Triton checks dims; we check values)."""
    expected = (3, image_size, image_size)
    if pixels.ndim != 4 or pixels.shape[1:] != expected:
        raise InvalidPixels(f"PIXEL_VALUES must be [N, {', '.join(map(str, expected))}], got {list(pixels.shape)}")
    bad = ~np.isfinite(pixels).reshape(len(pixels), -1).all(axis=1)
    if bad.any():
        raise InvalidPixels(f"PIXEL_VALUES[{int(np.argmax(bad))}] contains NaN or infinity")
    return pixels


class TritonPythonModel:
    """Validates and preprocesses every item of every request; errors fail only their request."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        model_dir = Path(args["model_repository"]) / args["model_version"]
        self.tokenizer = text_model.TextTokenizer(
            model_dir / text_model.TOKENIZER_FILE,
            max_seq_len=int(parameters["max_seq_len"]),
            seq_buckets=tuple(int(b) for b in parameters["seq_buckets"].split(",")),
            max_text_bytes=int(parameters["max_text_bytes"]))
        self.decoder = image_model.decoder_from_parameters(parameters)
        self.takes_pixels = any(i["name"] == "PIXEL_VALUES" for i in config["input"])
        self.output_dtypes = {
            name: pb_utils.triton_string_to_numpy(pb_utils.get_output_config_by_name(config, name)["data_type"])
            for name in ("input_ids", "attention_mask", "pixel_values")}

    def _validate(self, request) -> tuple[list[str], np.ndarray]:
        """(texts, pixels uint8 [N,S,S,3] or normalized float [N,3,S,S]) or raise ValueError."""
        texts = self.tokenizer.decode_texts(pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy())
        if self.takes_pixels:
            pixels = pb_utils.get_input_tensor_by_name(request, "PIXEL_VALUES").as_numpy()
            return texts, check_pixels(pixels, self.decoder.image_size)
        raw = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
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
                pb_utils.Tensor("input_ids", ids.astype(self.output_dtypes["input_ids"])),
                pb_utils.Tensor("attention_mask", mask.astype(self.output_dtypes["attention_mask"])),
                pb_utils.Tensor("pixel_values", pixels.astype(self.output_dtypes["pixel_values"])),
            ]))
        return responses

    def finalize(self) -> None:
        self.tokenizer = self.decoder = None
