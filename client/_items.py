"""What the caller sends: items (text + image) and embedding arrays, checked before any request.

An `Item` keeps its image as given (bytes, path or PIL image) and is normalized to encoded
bytes only when a call validates the whole list, so a problem is reported with the item's
index in that list and nothing has gone over the network yet.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np

from ._errors import InvalidItemError

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image as PILImage

ImageLike = Union[bytes, bytearray, memoryview, str, os.PathLike, "PILImage"]


@dataclass(frozen=True)
class Limits:
    """The server's request limits (from the tokenizer/image_preprocess configs)."""

    max_text_bytes: int
    max_image_bytes: int


@dataclass(frozen=True)
class Item:
    """One item: a caption and an image (encoded bytes, a file path, or a PIL image)."""

    text: str
    image: ImageLike
    item_id: str | None = None

    def encoded_image(self) -> bytes:
        """The image as encoded bytes: files are read, PIL images are encoded as PNG."""
        image = self.image
        if isinstance(image, (bytes, bytearray, memoryview)):
            return bytes(image)
        if isinstance(image, (str, os.PathLike)):
            return Path(image).read_bytes()
        if hasattr(image, "save"):  # PIL.Image.Image, without importing PIL for everyone
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return buffer.getvalue()
        raise TypeError(f"image must be bytes, a path or a PIL image, got {type(image).__name__}")


@dataclass(frozen=True)
class PreparedItems:
    """Validated items as the request tensors want them."""

    texts: list[bytes]
    images: list[bytes]
    item_ids: tuple[str | None, ...]

    def __len__(self) -> int:
        return len(self.texts)


def as_item(value: Item | tuple, index: int) -> Item:
    """Accept Item or a (text, image[, item_id]) tuple."""
    if isinstance(value, Item):
        return value
    if isinstance(value, tuple) and len(value) in (2, 3):
        return Item(*value)
    raise InvalidItemError(index, f"expected an Item or a (text, image) tuple, got {type(value).__name__}")


def _text_bytes(item: Item, index: int, limits: Limits) -> bytes:
    if not isinstance(item.text, str):
        raise InvalidItemError(index, f"text must be a str, got {type(item.text).__name__}")
    if not item.text.strip():
        raise InvalidItemError(index, "text is empty or whitespace only")
    data = item.text.encode("utf-8")
    if len(data) > limits.max_text_bytes:
        raise InvalidItemError(index, f"text is {len(data)} bytes, over the server's limit of "
                                      f"{limits.max_text_bytes} bytes")
    return data


def _image_bytes(item: Item, index: int, limits: Limits) -> bytes:
    try:
        data = item.encoded_image()
    except FileNotFoundError:
        raise InvalidItemError(index, f"image file {item.image} does not exist") from None
    except OSError as err:
        raise InvalidItemError(index, f"image file {item.image} cannot be read ({err.strerror or err})") from None
    except (TypeError, ValueError) as err:
        raise InvalidItemError(index, f"image cannot be encoded: {err}") from None
    if not data:
        raise InvalidItemError(index, "image is empty (0 bytes)")
    if len(data) > limits.max_image_bytes:
        raise InvalidItemError(index, f"image is {len(data)} bytes, over the server's limit of "
                                      f"{limits.max_image_bytes} bytes")
    return data


def prepare_items(items: Sequence[Item | tuple], limits: Limits) -> PreparedItems:
    """Validate every item and encode it; raises InvalidItemError naming the first bad one."""
    if isinstance(items, (Item, str, bytes)):
        raise InvalidItemError(None, "items must be a list of Item, not a single value")
    texts, images, ids = [], [], []
    for index, value in enumerate(items):
        item = as_item(value, index)
        texts.append(_text_bytes(item, index, limits))
        images.append(_image_bytes(item, index, limits))
        ids.append(item.item_id)
    return PreparedItems(texts, images, tuple(ids))


def embedding_matrix(values: object, dim: int, what: str) -> np.ndarray:
    """An [N, dim] float32 array of finite embeddings, or InvalidItemError."""
    try:
        array = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise InvalidItemError(None, f"{what} is not numeric: {err}") from None
    if array.ndim != 2 or array.shape[1] != dim:
        raise InvalidItemError(None, f"{what} must be an [N, {dim}] array, got shape {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if bad.size:
        raise InvalidItemError(int(bad[0]), f"{what} row has NaN or infinite values")
    return np.ascontiguousarray(array)


def user_embedding(values: object, dim: int) -> np.ndarray:
    """A [dim] float32 user vector, or InvalidItemError saying what is wrong with it."""
    try:
        array = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise InvalidItemError(None, f"user embedding is not numeric: {err}") from None
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.shape != (dim,):
        raise InvalidItemError(None, f"user embedding must have {dim} values (the server's item "
                                     f"embedding size), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise InvalidItemError(None, "user embedding has NaN or infinite values")
    return array
