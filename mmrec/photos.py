"""Real photos with known content, shipped inside PyPI packages (never downloaded).

The upstream-reference tests and the benchmark's real-photo workload use them: scikit-image's
sample data (a cat, a cup of coffee, a rocket, a motorcycle) and scikit-learn's two sample
photos (a daisy, a Chinese palace; 640 x 427 JPEGs, the size issue reports quote). Each comes
with the ImageNet classes a correct EfficientNet must put first; neighbours in the taxonomy
(tabby / tiger cat / Egyptian cat) all count.

`phone_photo()` turns one into what phones send: a 12-megapixel JPEG, optionally stored
sideways with an EXIF orientation tag. `full_resolution_pixels()` is the reference a fast
decoder is checked against (tests and the benchmark's photos section): the documented recipe
written independently of the served decoder, with plain PIL at full resolution.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

PHONE_SIZE = (4032, 3024)  # 12 MP, 4:3
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Photo:
    name: str
    path: Path
    imagenet_classes: frozenset[int]  # acceptable top-1 classes

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()


def _folder(package: str, *parts: str) -> Path:
    try:
        module = __import__(package)
    except ImportError as err:
        raise RuntimeError(f"real test photos come from {package!r}: "
                           "pip install 'mmrec[dev]' (scikit-image, scikit-learn)") from err
    return Path(module.__file__).resolve().parent.joinpath(*parts)


def known_photos() -> list[Photo]:
    """Photos with the ImageNet classes they show (indices of the 1000-class head)."""
    skimage = _folder("skimage", "data")
    sklearn = _folder("sklearn", "datasets", "images")
    return [
        Photo("cat", skimage / "chelsea.png", frozenset({281, 282, 285})),  # tabby, tiger, Egyptian
        Photo("coffee", skimage / "coffee.png", frozenset({967, 968})),  # espresso, cup
        Photo("rocket", skimage / "rocket.jpg", frozenset({657, 744, 812})),  # missile, projectile, shuttle
        Photo("motorcycle", skimage / "motorcycle_left.png", frozenset({665, 670})),  # moped, scooter
        Photo("daisy", sklearn / "flower.jpg", frozenset({985})),
        Photo("palace", sklearn / "china.jpg", frozenset({698})),
    ]


def phone_photo(photo: Photo, orientation: int = 1, quality: int = 90) -> bytes:
    """A 12 MP JPEG of `photo` as a phone stores it: pixels rotated so that applying EXIF
    `orientation` (1 = upright, 6 = rotate 90° clockwise to view, 3 = 180°, 8 = 90° ccw)
    shows the upright picture."""
    from PIL import Image

    upright = Image.open(photo.path).convert("RGB").resize(PHONE_SIZE, Image.Resampling.BICUBIC)
    stored = {1: upright, 3: upright.transpose(Image.Transpose.ROTATE_180),
              6: upright.transpose(Image.Transpose.ROTATE_90),
              8: upright.transpose(Image.Transpose.ROTATE_270)}[orientation]
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=quality, exif=exif.tobytes())
    return buffer.getvalue()


def full_resolution_pixels(data: bytes, config) -> "np.ndarray":
    """The documented recipe, written from its description with plain PIL at full resolution:
    upright by EXIF, alpha onto the background, fit to S x S, scale to mean/std. `config`: the
    repository's ServedContract (image_size, image_fit, background, image_mean, image_std).
    Returns [1, 3, S, S] float32."""
    import numpy as np
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGBA")
    flat = Image.new("RGBA", image.size, tuple(config.background) + (255,))
    flat.alpha_composite(image)
    image, size = flat.convert("RGB"), config.image_size
    if config.image_fit == "crop":
        side = min(image.size) * size / (size + 32)
        left, top = (image.width - side) / 2, (image.height - side) / 2
        image = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    else:
        side = max(image.size)
        canvas = Image.new("RGB", (side, side), tuple(config.background))
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas.resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    chw = ((pixels - np.array(config.image_mean)) / np.array(config.image_std)).transpose(2, 0, 1)
    return chw[None].astype(np.float32)
