"""Text preprocessing: UTF-8 validation, fast tokenizer, bucketed padding (TEXT -> ids, mask).

Sequences are padded to the smallest configured bucket that holds the longest text of the
request; the encoders mean-pool under the mask, so padding never changes an embedding, and
fixed buckets let the dynamic batcher (and TensorRT profiles) join requests.

Plain Python (numpy + tokenizers): export copies this file beside the `tokenizer` and
`item_preprocess` models; the reference pipeline, benchmarks and tests import it as
`mmrec.model_repository.lib.text_preprocessing`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


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
        self.buckets = tuple(seq_buckets)  # normalized by the served contract's one rule
        self.max_text_bytes = max_text_bytes

    @classmethod
    def for_contract(cls, contract, tokenizer_file: str | Path) -> "TextTokenizer":
        """From a ServedContract (any object with its text fields) and a tokenizer.json."""
        return cls(tokenizer_file, contract.max_seq_len, contract.seq_buckets, contract.max_text_bytes)

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
