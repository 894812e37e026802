"""What the client learns from the server's model configs: batch limit, categories, limits.

Read over the wire (never from the repository folder), so a client on another machine sees
exactly what the server runs: the tokenizer and image_preprocess configs carry the
preprocessing parameters, the fusion config the widths and category names.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

from mmrec import schema
from mmrec.preprocess import PreprocessConfig

from ._errors import MMRecError
from ._items import Limits

CATEGORIES_PARAMETER = "categories"


@dataclass(frozen=True)
class ModelNames:
    """Served model names; override one to talk to a renamed or versioned deployment."""

    item_encoder: str = schema.ITEM_ENCODER
    item_encoder_pixels: str = schema.ITEM_ENCODER_PIXELS
    interest_scorer: str = schema.INTEREST_SCORER
    scorer: str = schema.SCORER
    tokenizer: str = schema.TOKENIZER
    image_preprocess: str = schema.IMAGE_PREPROCESS
    fusion: str = schema.FUSION
    catalog_scorer: str = schema.CATALOG_SCORER  # optional: checked on the first recommend(), not at connect

    def needed(self, local_preprocessing: bool) -> tuple[str, ...]:
        """Models that must be ready: the ones called, plus the ones whose configs are read."""
        called = ((self.item_encoder_pixels, self.scorer) if local_preprocessing
                  else (self.item_encoder, self.interest_scorer, self.scorer))
        return called + (self.tokenizer, self.image_preprocess, self.fusion)

    def all(self) -> tuple[str, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class ServerInfo:
    """The served interface, as far as the client needs it."""

    url: str
    protocol: str
    max_batch_size: int
    categories: tuple[str, ...]
    item_dim: int
    preprocess: PreprocessConfig

    @property
    def limits(self) -> Limits:
        return Limits(self.preprocess.max_text_bytes, self.preprocess.max_image_bytes)


def _parameters(config: dict, model: str, keys: tuple[str, ...]) -> dict[str, str]:
    found = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    missing = [k for k in keys if k not in found]
    if missing:
        raise MMRecError(f"model {model!r} config lacks parameter(s) {missing}; the repository "
                         "was not written by this version of `mmrec export`: re-export it")
    return found


def _output_dims(config: dict, model: str, name: str) -> tuple[int, ...]:
    for output in config.get("output", []):
        if output["name"] == name:
            return tuple(int(d) for d in output["dims"])
    raise MMRecError(f"model {model!r} has no output {name!r}; is this an mmrec repository?")


def _input_dims(config: dict, model: str, name: str) -> tuple[int, ...]:
    for tensor in config.get("input", []):
        if tensor["name"] == name:
            return tuple(int(d) for d in tensor["dims"])
    raise MMRecError(f"model {model!r} has no input {name!r}; is this an mmrec repository?")


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _categories(fusion: dict, model: str, count: int) -> tuple[str, ...]:
    text = fusion.get("parameters", {}).get(CATEGORIES_PARAMETER, {}).get("string_value", "")
    names = tuple(n for n in text.split(",") if n)
    if not names:
        warnings.warn(f"model {model!r} config has no `{CATEGORIES_PARAMETER}` parameter (exported "
                      "by an older mmrec); interests are named category_0.. until you re-export",
                      stacklevel=3)
        return tuple(f"category_{i}" for i in range(count))
    if len(names) != count:
        raise MMRecError(f"model {model!r} names {len(names)} categories but outputs {count} "
                         "interest probabilities; re-export the repository")
    return names


def server_info(url: str, protocol: str, configs: dict[str, dict], names: ModelNames,
                max_batch_size: int | None = None) -> ServerInfo:
    """Build ServerInfo from model configs in JSON form (model name -> config dict)."""
    tokenizer = _parameters(configs[names.tokenizer], names.tokenizer,
                            ("max_seq_len", "seq_buckets", "max_text_bytes"))
    image = _parameters(configs[names.image_preprocess], names.image_preprocess,
                        ("image_size", "image_mean", "image_std", "background",
                         "max_image_bytes", "max_image_pixels"))
    fusion = configs[names.fusion]
    item_dim = _output_dims(fusion, names.fusion, schema.ITEM_EMBEDDING_MEMBER)[0]
    num_categories = _output_dims(fusion, names.fusion, schema.INTEREST_PROBS_MEMBER)[0]
    categories = _categories(fusion, names.fusion, num_categories)
    server_batch = min(int(c.get("max_batch_size", 0)) or 1 for c in configs.values())
    batch = min(server_batch, max_batch_size) if max_batch_size else server_batch
    if batch < 1:
        raise MMRecError(f"max_batch_size must be at least 1, got {max_batch_size}")
    preprocess = PreprocessConfig(
        max_seq_len=int(tokenizer["max_seq_len"]),
        seq_buckets=tuple(int(b) for b in tokenizer["seq_buckets"].split(",")),
        max_text_bytes=int(tokenizer["max_text_bytes"]),
        image_size=int(image["image_size"]),
        image_mean=_floats(image["image_mean"]),
        image_std=_floats(image["image_std"]),
        background=tuple(int(v) for v in image["background"].split(",")),
        image_fit=image.get("image_fit", "pad"),
        max_image_bytes=int(image["max_image_bytes"]),
        max_image_pixels=int(image["max_image_pixels"]),
        categories=categories,
        max_batch_size=server_batch,
        text_dim=_input_dims(fusion, names.fusion, schema.TEXT_EMBEDDING)[0],
        image_dim=_input_dims(fusion, names.fusion, schema.IMAGE_EMBEDDING)[0],
        item_dim=item_dim,
    )
    return ServerInfo(url=url, protocol=protocol, max_batch_size=batch, categories=categories,
                      item_dim=item_dim, preprocess=preprocess)
