"""Triton python model: TEXT (BYTES, UTF-8) -> input_ids, attention_mask (INT64).

Self-contained on purpose (numpy + tokenizers only): it runs inside Triton's python stub, where
the mmrec package may not be importable, and it is also imported by the reference pipeline and
the tests, so the server and the ground truth share this exact code.

Sequences are padded to the smallest configured bucket that holds the longest text of the
request; the encoders mean-pool under the mask, so padding never changes an embedding, and
fixed buckets let the dynamic batcher (and TensorRT profiles) join requests.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

try:  # only present inside Triton
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised outside the server
    pb_utils = None

TOKENIZER_FILE = "tokenizer.json"


class InvalidText(ValueError):
    """A request's text cannot be tokenized; the message says which item and why."""


class TextTokenizer:
    """Fast (Rust) tokenizer with truncation and bucketed padding, vectorized over the batch."""

    def __init__(self, tokenizer_file: str | Path, max_seq_len: int, seq_buckets: tuple[int, ...],
                 max_text_bytes: int) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.enable_truncation(max_length=max_seq_len)
        self.tokenizer.no_padding()
        self.max_seq_len = max_seq_len
        self.buckets = tuple(sorted(b for b in seq_buckets if b <= max_seq_len)) or (max_seq_len,)
        self.max_text_bytes = max_text_bytes

    def decode_texts(self, raw: np.ndarray) -> list[str]:
        """Validate a BYTES tensor [B, 1] (or [B]) and return the texts, or raise InvalidText."""
        flat = np.asarray(raw, dtype=object).reshape(-1)
        if flat.size == 0:
            raise InvalidText("TEXT is empty: send one string per batch item")
        texts = []
        for i, item in enumerate(flat):
            if isinstance(item, (bytes, bytearray)):
                data = bytes(item)
            elif isinstance(item, str):
                try:
                    data = item.encode("utf-8")
                except UnicodeEncodeError as err:  # lone surrogates cannot be UTF-8
                    raise InvalidText(f"TEXT[{i}] is not valid UTF-8 ({err.reason} at character "
                                      f"{err.start})") from None
            else:
                raise InvalidText(f"TEXT[{i}] must be UTF-8 bytes, got {type(item).__name__}")
            if len(data) > self.max_text_bytes:
                raise InvalidText(f"TEXT[{i}] is {len(data)} bytes, over the limit of "
                                  f"{self.max_text_bytes} bytes")
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InvalidText(f"TEXT[{i}] is not valid UTF-8 ({err.reason} at byte {err.start})")
            if not text.strip():
                raise InvalidText(f"TEXT[{i}] is empty or whitespace only")
            texts.append(text)
        return texts

    def bucket_for(self, length: int) -> int:
        return next((b for b in self.buckets if b >= length), self.max_seq_len)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize texts into int64 [B, bucket] ids and mask."""
        encodings = self.tokenizer.encode_batch(texts)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        width = self.bucket_for(int(lengths.max()))
        ids = np.zeros((len(texts), width), dtype=np.int64)
        positions = np.arange(width)[None, :]
        mask = (positions < lengths[:, None]).astype(np.int64)
        ids[mask.astype(bool)] = np.fromiter(
            (t for e in encodings for t in e.ids), dtype=np.int64, count=int(lengths.sum()))
        return ids, mask


def _parameter(config: dict, key: str) -> str:
    try:
        return config["parameters"][key]["string_value"]
    except KeyError as err:
        raise KeyError(f"tokenizer config.pbtxt lacks parameter {key!r}; re-run `mmrec export`") from err


class TritonPythonModel:
    """Tokenizes every request of a batch with one encode_batch call."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        model_dir = Path(args["model_repository"]) / args["model_version"]
        self.tokenizer = TextTokenizer(
            model_dir / TOKENIZER_FILE,
            max_seq_len=int(_parameter(config, "max_seq_len")),
            seq_buckets=tuple(int(b) for b in _parameter(config, "seq_buckets").split(",")),
            max_text_bytes=int(_parameter(config, "max_text_bytes")),
        )
        self.output_dtypes = {
            name: pb_utils.triton_string_to_numpy(
                pb_utils.get_output_config_by_name(config, name)["data_type"])
            for name in ("input_ids", "attention_mask")
        }

    @staticmethod
    def _failure(message: str, code):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

    def _response(self, ids: np.ndarray, mask: np.ndarray):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("input_ids", ids.astype(self.output_dtypes["input_ids"])),
            pb_utils.Tensor("attention_mask", mask.astype(self.output_dtypes["attention_mask"])),
        ])

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "TEXT")
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
