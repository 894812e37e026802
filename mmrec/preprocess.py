"""Preprocessing constants, written once by export and read by everyone else.

Export writes them as `preprocess.json` at the repository root (for the client and the
in-process reference pipeline) and as `parameters` in the python models' config.pbtxt (so a
model directory pulled alone from object storage still knows them). Both come from one
`PreprocessConfig` object.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

PREPROCESS_FILE = "preprocess.json"
TOKENIZER_FILE = "tokenizer.json"

DEFAULT_MAX_SEQ_LEN = 128
DEFAULT_SEQ_BUCKETS = (16, 32, 64, 128)
DEFAULT_IMAGE_SIZE = 224
# How a non-square picture becomes S x S: "pad" keeps the whole picture (letterbox onto the
# background), "crop" is the ImageNet evaluation recipe the encoders were trained for (shorter
# side to S * (S + 32) / S, centre crop S). Export measures both; see README "image fit".
IMAGE_FITS = ("pad", "crop")
DEFAULT_IMAGE_FIT = "crop"
DEFAULT_MAX_BATCH_SIZE = 32
# Request limits enforced by the python models and by the client before sending.
DEFAULT_MAX_IMAGE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
DEFAULT_MAX_TEXT_BYTES = 16 * 1024


@dataclass(frozen=True)
class PreprocessConfig:
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    seq_buckets: tuple[int, ...] = DEFAULT_SEQ_BUCKETS
    image_size: int = DEFAULT_IMAGE_SIZE
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    background: tuple[int, int, int] = (255, 255, 255)
    image_fit: str = DEFAULT_IMAGE_FIT
    categories: tuple[str, ...] = ()
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES
    text_dim: int = 384
    image_dim: int = 1280
    item_dim: int = 256

    def __post_init__(self) -> None:
        buckets = tuple(b for b in self.seq_buckets if b < self.max_seq_len) + (self.max_seq_len,)
        object.__setattr__(self, "seq_buckets", tuple(sorted(set(buckets))))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def save(self, repository: Path) -> Path:
        path = Path(repository) / PREPROCESS_FILE
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known.setdefault("image_fit", "pad")  # repositories written before the option letterboxed
        for key in ("seq_buckets", "image_mean", "image_std", "background", "categories"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)

    @classmethod
    def load(cls, repository: Path) -> "PreprocessConfig":
        path = Path(repository) / PREPROCESS_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: is {repository} a repository written by `mmrec export`?")
        return cls.from_dict(json.loads(path.read_text()))

    def tokenizer_parameters(self) -> dict[str, str]:
        """config.pbtxt parameters of the tokenizer python model."""
        return {"max_seq_len": str(self.max_seq_len),
                "seq_buckets": ",".join(map(str, self.seq_buckets)),
                "max_text_bytes": str(self.max_text_bytes)}

    def image_parameters(self) -> dict[str, str]:
        """config.pbtxt parameters of the image_preprocess python model."""
        return {"image_size": str(self.image_size),
                "image_mean": ",".join(map(repr, self.image_mean)),
                "image_std": ",".join(map(repr, self.image_std)),
                "background": ",".join(map(str, self.background)),
                "image_fit": self.image_fit,
                "max_image_bytes": str(self.max_image_bytes),
                "max_image_pixels": str(self.max_image_pixels)}
