"""Encode items with the PyTorch source encoders (FP32): training inputs and parity references.

Texts go through the server's own tokenizer and images through the server's own decoder
(model_repository/*/1/model.py), so what the fusion head learns from is exactly what it will
receive when served.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from mmrec.python_models import image_decoder, text_tokenizer
from mmrec.preprocess import PreprocessConfig
from .data import Item

Progress = Callable[[int], None]


@dataclass
class ItemFeatures:
    text: np.ndarray  # [N, text_dim]
    image: np.ndarray  # [N, image_dim]
    labels: np.ndarray  # [N] category index


def _batches(seq: list, size: int) -> Iterable[list]:
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


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


def decode_images(config: PreprocessConfig, items: list[Item]) -> np.ndarray:
    """Item images -> normalized FP32 [N, 3, S, S] via the server's decoder."""
    return image_decoder(config)([item.image_bytes() for item in items])


def encode_items(text_model, image_model, config: PreprocessConfig, tokenizer_file,
                 items: list[Item], progress: Progress | None = None) -> ItemFeatures:
    tokenizer = text_tokenizer(config, tokenizer_file)
    categories = {c: i for i, c in enumerate(config.categories)}
    text = encode_texts(text_model, tokenizer, [i.caption for i in items], progress=progress)
    image = encode_pixels(image_model, decode_images(config, items), progress=progress)
    labels = np.array([categories[i.category] for i in items], dtype=np.int64)
    return ItemFeatures(text, image, labels)
