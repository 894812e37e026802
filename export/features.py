"""Encode items with the PyTorch source encoders (FP32): training inputs and parity references.

Texts go through the server's own tokenizer and images through the server's own decoder
(model_repository/*/1/model.py), so what the fusion head learns from is exactly what it will
receive when served. Every item is tokenized, decoded and encoded once per export; the parts
(train / validation / held-out), parity cases, variant gates and calibration all read from
that one `EncodedDataset`. The encoder outputs can come from a `FeatureCache` (feature_cache.py):
the same inputs give the same arrays, bit for bit, so the export writes the same files either way.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
import torch

from mmrec.model_repository.lib.image_preprocessing import ImageDecoder
from mmrec.model_repository.lib.text_preprocessing import TextTokenizer
from mmrec.preprocess import ServedContract
from .data import Item

if TYPE_CHECKING:
    from .feature_cache import FeatureCache

Progress = Callable[[int], None]
# One fixed intra-op thread count for feature extraction: results must not depend on how many
# cores the export machine has.
FEATURE_THREADS = 2
# The served contract's fields the pass reads (tokenizer, image decoder, labels): part of the
# feature cache's key. A test checks that the tokenizer and decoder read no other field.
CONTRACT_FIELDS = ("max_seq_len", "seq_buckets", "max_text_bytes", "image_size", "image_mean", "image_std",
                   "background", "image_fit", "max_image_bytes", "max_image_pixels", "categories")


@dataclass
class ItemFeatures:
    text: np.ndarray  # [N, text_dim]
    image: np.ndarray  # [N, image_dim]
    labels: np.ndarray  # [N] category index


@dataclass
class EncodedDataset:
    """All items, decoded and encoded once: uint8 pixels plus both encoders' features."""

    items: list[Item]
    pixels: np.ndarray  # uint8 [N, S, S, 3], the server decoder's output before normalization
    features: ItemFeatures
    normalize: Callable[[np.ndarray], np.ndarray]

    def __post_init__(self) -> None:
        self._row = {item.item_id: row for row, item in enumerate(self.items)}

    def rows(self, items: list[Item]) -> np.ndarray:
        return np.array([self._row[item.item_id] for item in items], dtype=np.int64)

    def subset(self, items: list[Item]) -> ItemFeatures:
        rows = self.rows(items)
        f = self.features
        return ItemFeatures(f.text[rows], f.image[rows], f.labels[rows])

    def pixel_values(self, items: list[Item]) -> np.ndarray:
        """Normalized FP32 [N, 3, S, S] exactly as image_preprocess serves them."""
        return self.normalize(self.pixels[self.rows(items)])


def _batches(seq: list, size: int) -> Iterable[list]:
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


@contextmanager
def fixed_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.inference_mode()
def encode_texts(model: torch.nn.Module, tokenizer, texts: list[str], batch_size: int = 64,
                 progress: Progress | None = None) -> np.ndarray:
    out = []
    for chunk in _batches(texts, batch_size):
        ids, mask = tokenizer(chunk)
        out.append(model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy())
        if progress:
            progress(len(chunk))
    return np.concatenate(out)


@torch.inference_mode()
def encode_pixels(model: torch.nn.Module, pixels: np.ndarray, batch_size: int = 32,
                  progress: Progress | None = None) -> np.ndarray:
    out = []
    for start in range(0, len(pixels), batch_size):
        chunk = pixels[start:start + batch_size]
        out.append(model(torch.from_numpy(chunk)).numpy())
        if progress:
            progress(len(chunk))
    return np.concatenate(out)


def encode_dataset(text_model, image_model, config: ServedContract, tokenizer_file,
                   items: list[Item], progress: Progress | None = None,
                   tokenizer: TextTokenizer | None = None, cache: FeatureCache | None = None,
                   report: Callable[[str], None] | None = None) -> EncodedDataset:
    """Tokenize, decode and encode every item once (fixed thread count, batch order by id);
    `tokenizer`: the export's own, so it is built once. With a `cache`, the encoder outputs are
    read from it when present (the pixels are always decoded: cheap, and needed) and stored
    into it when computed; `report` hears which."""
    tokenizer = tokenizer or TextTokenizer.for_contract(config, tokenizer_file)
    decoder = ImageDecoder.for_contract(config)
    categories = {c: i for i, c in enumerate(config.categories)}
    pixels = np.stack([decoder.decode(item.image_bytes(), i) for i, item in enumerate(items)])
    labels = np.array([categories[i.category] for i in items], dtype=np.int64)
    cached = cache.load(len(items)) if cache is not None else None
    if cached is not None:
        text, image = cached
        if progress:
            progress(2 * len(items))
        if report:
            report(f"features: cache hit {cache.key[:12]}")
    else:
        with fixed_threads(FEATURE_THREADS):
            text = encode_texts(text_model, tokenizer, [i.caption for i in items], progress=progress)
            image = np.concatenate([
                encode_pixels(image_model, decoder.normalize(pixels[start:start + 64]), progress=progress)
                for start in range(0, len(pixels), 64)])
        if cache is not None:
            failure = cache.store(text, image)
            if report:
                report(f"features: cache miss {cache.key[:12]}, "
                       + (f"not stored ({failure})" if failure else "stored"))
    return EncodedDataset(items, pixels, ItemFeatures(text, image, labels), decoder.normalize)
