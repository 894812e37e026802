"""The served contract: every number a server and its clients must agree on, in one dataclass.

Export writes it once (`to_parameters()` into the python models' config.pbtxt, `to_json()` into
preprocess.json); the python models, the reference pipeline, the client and the benchmarks read
it back with `from_parameters()` / `from_json()`. No other code formats or parses these values.

Plain Python on purpose: export copies this file beside each thin Triton `model.py`, where the
mmrec package may not be importable (Triton's python stub).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

# Widths of the default submodels; other encoders override them at export time.
TEXT_EMBEDDING_DIM = 384
IMAGE_EMBEDDING_DIM = 1280
ITEM_EMBEDDING_DIM = 256

DEFAULT_MAX_SEQ_LEN = 128
DEFAULT_SEQ_BUCKETS = (16, 32, 64, 128)
DEFAULT_IMAGE_SIZE = 224
# How a non-square picture becomes S x S: "pad" keeps the whole picture (letterbox onto the
# background), "crop" is the ImageNet evaluation recipe the encoders were trained for (shorter
# side to S * (S + 32) / S, centre crop S). Export measures both; see README "image fit".
IMAGE_FITS = ("pad", "crop")
DEFAULT_IMAGE_FIT = "crop"
LEGACY_IMAGE_FIT = "pad"  # repositories written before the option letterboxed
DEFAULT_MAX_BATCH_SIZE = 32
# Request limits enforced by the python models and by the client before sending.
DEFAULT_MAX_IMAGE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
DEFAULT_MAX_TEXT_BYTES = 16 * 1024

# Files the contract travels in (RepositoryLayout places them; thin models open them).
CONTRACT_FILE = "preprocess.json"
TOKENIZER_FILE = "tokenizer.json"

_LIST_SEPARATOR = ","
_TUPLE_FIELDS = ("seq_buckets", "image_mean", "image_std", "background", "categories")


class ContractError(ValueError):
    """Parameters that do not describe a valid served contract; the message names the fix."""


# The contract fields an export chooses (`mmrec export` flags, ExportOptions); the others come from
# the encoders (widths, image size, normalization) and the data (categories). Each integer choice
# with the range it must lie in (None: no upper bound); seq_buckets and image_fit are checked by
# their own rules (parse_buckets/normalize_buckets, IMAGE_FITS).
EXPORT_CHOICES = ("max_seq_len", "seq_buckets", "image_fit", "max_batch_size", "max_image_bytes",
                  "max_image_pixels", "max_text_bytes")
EXPORT_RANGES: dict[str, tuple[int, int | None]] = {
    "max_batch_size": (1, 1024), "max_seq_len": (8, 512),
    "max_image_bytes": (1, None), "max_image_pixels": (1, None), "max_text_bytes": (1, None)}


def export_choice_flag(name: str) -> str:
    """The `mmrec export` flag of a contract choice (the CLI spells every one this way)."""
    return "--" + name.replace("_", "-")


def check_export_choices(choices: dict) -> None:
    """Refuse contract choices no export can serve, naming the flag and its range."""
    for name, (low, high) in EXPORT_RANGES.items():
        value = choices[name]
        if value < low or (high is not None and value > high):
            bound = f"within {low}..{high}" if high is not None else f"at least {low}"
            raise ContractError(f"{export_choice_flag(name)} must be {bound}, got {value}")
    buckets = choices["seq_buckets"]
    if not buckets or min(buckets) < 1:  # above max_seq_len: dropped by normalize_buckets
        raise ContractError(f"--seq-buckets must be positive token counts, got {list(buckets)}")
    if choices["image_fit"] not in IMAGE_FITS:
        raise ContractError(f"unknown image fit {choices['image_fit']!r}; choose from {IMAGE_FITS}")


def normalize_buckets(buckets: tuple[int, ...] | list[int], max_seq_len: int) -> tuple[int, ...]:
    """The one bucket rule: sorted, unique, each in 1..max_seq_len, always ending at max_seq_len
    (a text is padded to the smallest bucket that holds it; max_seq_len holds every text)."""
    kept = {int(b) for b in buckets if 1 <= int(b) < max_seq_len}
    return tuple(sorted(kept)) + (max_seq_len,)


def parse_buckets(text: str) -> tuple[int, ...]:
    """"16,32,64" -> (16, 32, 64); the CLI flag and the config parameter share this reader."""
    try:
        values = tuple(int(v) for v in text.split(_LIST_SEPARATOR) if v.strip())
    except ValueError:
        raise ContractError(f"sequence buckets must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ContractError(f"sequence buckets must be positive integers, got {text!r}")
    return values


@dataclass(frozen=True)
class ServedContract:
    """Widths, batch limit, sequence buckets, request limits, categories and the image recipe."""

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
    text_dim: int = TEXT_EMBEDDING_DIM
    image_dim: int = IMAGE_EMBEDDING_DIM
    item_dim: int = ITEM_EMBEDDING_DIM

    def __post_init__(self) -> None:
        object.__setattr__(self, "seq_buckets", normalize_buckets(self.seq_buckets, self.max_seq_len))
        for name in _TUPLE_FIELDS:
            object.__setattr__(self, name, tuple(getattr(self, name)))
        bad = [c for c in self.categories if _LIST_SEPARATOR in c or not c]
        if bad:
            raise ContractError(f"category names must be non-empty and free of {_LIST_SEPARATOR!r}: {bad}")
        if self.image_fit not in IMAGE_FITS:
            raise ContractError(f"image fit must be one of {IMAGE_FITS}, got {self.image_fit!r}")

    # ---- config.pbtxt parameters (string -> string)
    def to_parameters(self) -> dict[str, str]:
        """Every field as a Triton config parameter; `from_parameters` reads them back."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = _LIST_SEPARATOR.join(repr(v) if isinstance(v, float) else str(v) for v in value)
            out[f.name] = str(value)
        return out

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> "ServedContract":
        """The contract from config parameters (plain strings, or Triton's {"string_value": ...})."""
        flat = {k: (v.get("string_value", "") if isinstance(v, dict) else v) for k, v in parameters.items()}
        missing = [f.name for f in fields(cls) if f.name not in flat and f.name != "image_fit"]
        if missing:
            raise ContractError(f"config parameters lack {missing}: the repository was written by an "
                                "older `mmrec export`; re-export it")
        values: dict = {}
        for f in fields(cls):
            text = flat.get(f.name, LEGACY_IMAGE_FIT if f.name == "image_fit" else "")
            try:
                values[f.name] = _parse_field(f.name, text)
            except ValueError as err:
                raise ContractError(f"config parameter {f.name}={text!r} is not valid: {err}") from None
        return cls(**values)

    # ---- preprocess.json
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "ServedContract":
        known = {k: v for k, v in data.items() if k in {f.name for f in fields(cls)}}
        known.setdefault("image_fit", LEGACY_IMAGE_FIT)
        return cls(**known)

    @classmethod
    def from_json(cls, text: str) -> "ServedContract":
        return cls.from_dict(json.loads(text))

    def save(self, repository: Path) -> Path:
        path = Path(repository) / CONTRACT_FILE
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, repository: Path) -> "ServedContract":
        path = Path(repository) / CONTRACT_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: is {repository} a repository written by `mmrec export`?")
        return cls.from_json(path.read_text())

    # ---- views kept for callers that compare one part
    def tokenizer_parameters(self) -> dict[str, str]:
        """The text part of `to_parameters()`."""
        return _subset(self.to_parameters(), ("max_seq_len", "seq_buckets", "max_text_bytes"))

    def image_parameters(self) -> dict[str, str]:
        """The image part of `to_parameters()`."""
        return _subset(self.to_parameters(), ("image_size", "image_mean", "image_std", "background",
                                              "image_fit", "max_image_bytes", "max_image_pixels"))


def _subset(parameters: dict[str, str], keys: tuple[str, ...]) -> dict[str, str]:
    return {k: parameters[k] for k in keys}


def _parse_field(name: str, text: str):
    if name == "seq_buckets":
        return parse_buckets(text)
    if name in ("image_mean", "image_std"):
        return tuple(float(v) for v in text.split(_LIST_SEPARATOR))
    if name == "background":
        return tuple(int(v) for v in text.split(_LIST_SEPARATOR))
    if name == "categories":
        return tuple(n for n in text.split(_LIST_SEPARATOR) if n)
    if name == "image_fit":
        return text
    return int(text)
