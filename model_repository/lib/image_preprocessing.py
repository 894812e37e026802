"""Image preprocessing: encoded JPEG/PNG/WebP bytes -> normalized FP32 [N, 3, S, S].

Decoding is per image (it has to be); normalization runs once over the whole batch. Limits are
checked from the header before any pixel is decoded, so a decompression bomb is rejected
without allocating it; an image whose padded square would exceed the pixel limit (a long thin
strip) is scaled down before padding, so memory stays bounded by the limit too. Every failure
of one item (corrupt data, unsupported mode, limits) is an `InvalidImage` naming that item.
Client-side pixels (the *_pixels ensemble) are checked by `check_pixels`.

Plain Python (numpy + Pillow): export copies this file beside the `image_preprocess` and
`item_preprocess` models; the reference pipeline, the client's local preprocessing, benchmarks
and tests import it as `mmrec.model_repository.lib.image_preprocessing`.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # a sibling library module: `from .` in the package, flat beside model.py in Triton's stub
    from .served_contract import IMAGE_FITS as FITS
except ImportError:
    from served_contract import IMAGE_FITS as FITS

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
# Decode and box-reduce no further down than this multiple of the target side, so the final
# bilinear resize still has real pixels to average (embedding cosine vs full decode >= 0.999).
DRAFT_OVERSAMPLE = 2
CROP_MARGIN = 32  # "crop": shorter side to S + 32, centre S x S (TF EfficientNet eval recipe)


def _has_alpha(image: Image.Image) -> bool:
    """An alpha channel, or a colour key (PNG tRNS on P, L or RGB images)."""
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info



class InvalidImage(ValueError):
    """An image cannot be decoded or breaks a limit; the message says which item and why."""


def _signature(data: bytes) -> str:
    """The first bytes of a payload, printable, so an error shows what was sent instead."""
    head = bytes(data[:8])
    return f"starts with {head!r}" + ("..." if len(data) > 8 else "")


class ImageDecoder:
    """Decode, turn upright, flatten alpha onto a background, fit to S x S, normalize."""

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 background: tuple[int, ...], max_image_bytes: int, max_image_pixels: int,
                 fit: str = "pad") -> None:
        if fit not in FITS:
            raise ValueError(f"image fit must be one of {FITS}, got {fit!r}")
        self.fit = fit
        self.image_size = image_size
        self.scale = (1.0 / (255.0 * np.asarray(std, dtype=np.float32))).reshape(1, 3, 1, 1)
        self.offset = (np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32)
                       ).reshape(1, 3, 1, 1)
        self.background = tuple(int(c) for c in background)
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels

    @classmethod
    def for_contract(cls, contract) -> "ImageDecoder":
        """From a ServedContract (any object with its image fields)."""
        return cls(image_size=contract.image_size, mean=contract.image_mean, std=contract.image_std,
                   background=contract.background, max_image_bytes=contract.max_image_bytes,
                   max_image_pixels=contract.max_image_pixels, fit=contract.image_fit)

    def decode(self, data: bytes, index: int = 0) -> np.ndarray:
        """Encoded bytes -> uint8 [S, S, 3]; raises InvalidImage naming the item."""
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidImage(f"IMAGE[{index}] must be encoded bytes, got {type(data).__name__}")
        if len(data) == 0:
            raise InvalidImage(f"IMAGE[{index}] is empty (0 bytes)")
        if len(data) > self.max_image_bytes:
            raise InvalidImage(f"IMAGE[{index}] is {len(data)} bytes, over the limit of "
                               f"{self.max_image_bytes} bytes")
        try:
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = image.size
            if width <= 0 or height <= 0 or width * height > self.max_image_pixels:
                raise InvalidImage(
                    f"IMAGE[{index}] is {width}x{height} pixels, over the limit of "
                    f"{self.max_image_pixels} pixels")
            return self._to_square_rgb(image)
        except InvalidImage:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            # Pillow's own guard fires in open() for headers claiming > ~179M pixels.
            raise InvalidImage(f"IMAGE[{index}] declares too many pixels, over the limit of "
                               f"{self.max_image_pixels} pixels ({err})") from None
        except MemoryError:
            raise InvalidImage(f"IMAGE[{index}] needs more memory to decode than is available") from None
        except UnidentifiedImageError:
            raise InvalidImage(f"IMAGE[{index}] is not a decodable JPEG/PNG/WebP image (not "
                               f"recognized as any of them; {_signature(data)})") from None
        except Exception as err:  # PIL raises many types for corrupt or unsupported data
            raise InvalidImage(f"IMAGE[{index}] is not a decodable JPEG/PNG/WebP image "
                               f"({type(err).__name__}: {err})") from None

    def _to_square_rgb(self, image: Image.Image) -> np.ndarray:
        """The recipe: upright (EXIF), alpha over the background, then to S x S by `fit`:
        "pad" letterboxes the whole picture onto the background, "crop" takes the centre
        square of side min(w, h) * S / (S + 32) (the encoders' ImageNet evaluation recipe).

        Computed in the cheap order with the same result: a JPEG is decoded at reduced scale
        (DCT scaling, never below DRAFT_OVERSAMPLE x the target), the picture is reduced by an
        integer box filter, and only then padded or cropped. A 12 MP phone photo never becomes
        a full-resolution canvas.
        """
        self.draft(image)
        try:
            image = ImageOps.exif_transpose(image)  # phones store sideways pixels + a rotation tag
        except (TypeError, ValueError, KeyError, SyntaxError):
            pass  # a malformed orientation tag: keep the pixels as stored rather than refuse the photo
        if image.mode not in ("RGB", "RGBA") or (image.mode == "RGB" and _has_alpha(image)):
            image = image.convert("RGBA" if _has_alpha(image) else "RGB")
        if image.mode == "RGBA":  # flatten before any filtering: transparent pixels have no colour
            flat = Image.new("RGBA", image.size, self.background + (255,))
            flat.alpha_composite(image)
            image = flat.convert("RGB")
        factor = int(1 / self.needed_scale(image.size))
        if factor >= 2:
            image = image.reduce(factor)
        size = self.image_size
        if self.fit == "crop":
            side = min(image.size) * size / (size + CROP_MARGIN)
            left, top = (image.width - side) / 2, (image.height - side) / 2
            resized = image.resize((size, size), Image.Resampling.BILINEAR,
                                   box=(left, top, left + side, top + side))
            return np.asarray(resized, dtype=np.uint8)
        side = max(image.size)  # already reduced: this canvas is small
        canvas = Image.new("RGB", (side, side), self.background)
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        return np.asarray(canvas.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)

    def draft(self, image: Image.Image) -> None:
        """Let libjpeg decode a JPEG at reduced scale (DCT scaling) before it is loaded: each side
        stays >= what the fit reads from it. Other formats decode at full size."""
        if image.format == "JPEG":
            scale = self.needed_scale(image.size)
            if scale < 1:
                image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))

    def needed_scale(self, size: tuple[int, int]) -> float:
        """Smallest scale of the picture at which the part the fit reads still has
        DRAFT_OVERSAMPLE x S pixels across: the crop's square (min side * S / (S + 32)) or
        the letterboxed long side."""
        read = min(size) * self.image_size / (self.image_size + CROP_MARGIN) if self.fit == "crop" else max(size)
        return self.image_size * DRAFT_OVERSAMPLE / read

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] -> float32 [N, 3, S, S], one vectorized pass."""
        chw = pixels.transpose(0, 3, 1, 2).astype(np.float32)
        return chw * self.scale - self.offset

    def __call__(self, images: list[bytes]) -> np.ndarray:
        return self.normalize(np.stack([self.decode(d, i) for i, d in enumerate(images)]))


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
