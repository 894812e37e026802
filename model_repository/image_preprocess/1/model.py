"""Triton python model: IMAGE (encoded JPEG/PNG/WebP BYTES) -> pixel_values FP32 [3, S, S].

Self-contained (numpy + Pillow) for the same reason as the tokenizer: it runs in Triton's stub
and is imported verbatim by the reference pipeline, the client's local preprocessing and the
tests. Decoding is per image (it has to be); normalization runs once over the whole batch.

Limits are checked from the header before any pixel is decoded, so a decompression bomb is
rejected without allocating it; an image whose padded square would exceed the pixel limit (a
long thin strip) is scaled down before padding, so memory stays bounded by the limit too.
Every failure of one item (corrupt data, unsupported mode, limits) is an `InvalidImage` for
that request only; the other requests of the batch are still answered.
"""
from __future__ import annotations

import io
import json
import math
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # only present inside Triton
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised outside the server
    pb_utils = None

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
# Decode and box-reduce no further down than this multiple of the target side, so the final
# bilinear resize still has real pixels to average (embedding cosine vs full decode >= 0.999).
DRAFT_OVERSAMPLE = 2
FITS = ("pad", "crop")  # mmrec.preprocess.IMAGE_FITS; this file runs in Triton without mmrec
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
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
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
        if image.format == "JPEG":
            scale = self._needed_scale(image.size)
            if scale < 1:  # DCT scaling: each side stays >= what the fit reads from it
                image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
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
        factor = int(1 / self._needed_scale(image.size))
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

    def _needed_scale(self, size: tuple[int, int]) -> float:
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


def decoder_from_parameters(parameters: dict[str, str]) -> ImageDecoder:
    """Build the decoder from config.pbtxt parameters (the export writes them)."""
    floats = lambda key: tuple(float(v) for v in parameters[key].split(","))  # noqa: E731
    return ImageDecoder(
        image_size=int(parameters["image_size"]),
        mean=floats("image_mean"),
        std=floats("image_std"),
        background=tuple(int(v) for v in parameters["background"].split(",")),
        fit=parameters.get("image_fit", "pad"),  # repositories written before the option padded
        max_image_bytes=int(parameters["max_image_bytes"]),
        max_image_pixels=int(parameters["max_image_pixels"]),
    )


class TritonPythonModel:
    """Decodes every image of every request, then normalizes the whole batch at once."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.decoder = decoder_from_parameters(parameters)
        self.output_dtype = pb_utils.triton_string_to_numpy(
            pb_utils.get_output_config_by_name(config, "pixel_values")["data_type"])

    def execute(self, requests: list) -> list:
        decoded: list[np.ndarray | tuple[str, int]] = []
        for request in requests:
            try:
                tensor = pb_utils.get_input_tensor_by_name(request, "IMAGE")
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
                    pb_utils.Tensor("pixel_values", next(outputs).astype(self.output_dtype))]))
        return responses

    def finalize(self) -> None:
        self.decoder = None
