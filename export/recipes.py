"""One recipe per exported member (HF Optimum `OnnxConfig` style): everything export knows about
a member in one place, so adding an encoder means adding a recipe, not editing the exporter.

A recipe says which torch module to export, which real inputs check its parity (and at which
tolerance), which held-out inputs gate its INT8/FP16 variants, what its INT8 calibration feed
is, how its CPU INT8 graph is built, which input axes TensorRT profiles cover, and at which
shapes `mmrec tune` times its variants. The exporter loops over `RECIPES`; inputs come from one
`ExportInputs` per export, so the tokenizer is built and the dataset is tokenized, decoded and
encoded once. Torch is imported only where a recipe's export-time callables run: `mmrec tune`
reads the recipes on a serving machine without loading it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from mmrec import schema
from mmrec.model_repository.lib.text_preprocessing import TextTokenizer
from mmrec.preprocess import ServedContract

from .data import Item

if TYPE_CHECKING:
    import torch

    from .features import EncodedDataset, ItemFeatures
    from .models.fusion import FusionHead

Feed = dict[str, np.ndarray]
Case = tuple[str, Feed]  # (label, feed)

CALIBRATION_ITEMS = 64  # INT8 calibration inputs: training split, never held-out items
LONG_TEXT_CASES = 32  # texts of max_seq_len tokens in the text variant gate
TEXT_GATE_BATCH, GATE_BATCH = 32, 16  # capped at max_batch_size: TensorRT profiles end there
CAPTIONS_PER_LONG_TEXT = 30  # enough real captions to reach max_seq_len tokens
NNCF_CALIBRATION_BATCH = 16


@dataclass
class ExportInputs:
    """What every recipe reads, computed once per export: the contract, the tokenizer, the
    dataset (decoded and encoded once), the split, and the trained fusion head."""

    contract: ServedContract
    tokenizer: TextTokenizer
    dataset: EncodedDataset
    train: list[Item]
    held_out: list[Item]
    text_model: torch.nn.Module
    image_model: torch.nn.Module
    fusion: FusionHead
    held_features: ItemFeatures
    _feeds: dict = field(default_factory=dict, repr=False)

    def tokens(self, texts: list[str], batch: int) -> list[Feed]:
        """Texts tokenized by the served tokenizer in batches; the same texts are tokenized once."""
        key = (tuple(texts), batch)
        if key not in self._feeds:
            self._feeds[key] = [dict(zip((schema.INPUT_IDS, schema.ATTENTION_MASK), self.tokenizer(texts[i:i + batch])))
                                for i in range(0, len(texts), batch)]
        return self._feeds[key]

    @cached_property
    def held_out_captions(self) -> list[str]:
        return [i.caption for i in self.held_out]

    @cached_property
    def held_out_pixels(self) -> np.ndarray:
        return self.dataset.pixel_values(self.held_out)

    @cached_property
    def item_embeddings(self) -> np.ndarray:
        """The trained head's held-out item embeddings (inputs of the scorer's parity cases)."""
        import torch

        with torch.inference_mode():
            return self.fusion(torch.from_numpy(self.held_features.text),
                               torch.from_numpy(self.held_features.image))[0].numpy()

    def gate_batch(self, size: int) -> int:
        return min(size, self.contract.max_batch_size)


def joined_captions(captions: list[str], count: int, per_text: int) -> list[str]:
    """`count` texts of `per_text` real captions each: long inputs made of real language."""
    return [" ".join(captions[(b * per_text + j) % len(captions)] for j in range(per_text))
            for b in range(count)]


@dataclass(frozen=True)
class MemberRecipe:
    """Everything export needs to know about one member; see the module docstring."""

    name: str
    module: Callable[[ExportInputs], torch.nn.Module]
    parity_cases: Callable[[ExportInputs], list[Case]]
    gate_feeds: Callable[[ExportInputs], list[Feed]] | None = None  # None: no INT8/FP16 variants
    # held-out inputs at max_seq_len: INT8 error grows with length, so the text gate checks them too
    long_gate_feeds: Callable[[ExportInputs], list[Feed]] | None = None
    calibration_feed: Callable[[ExportInputs], Feed] | None = None  # None: dynamic INT8 (no calibration)
    # the CPU INT8 graph: (fp32 file, destination, inputs) -> destination; None: no INT8 variant
    quantize_int8: Callable[[Path, Path, ExportInputs], Path] | None = None
    sequence_inputs: bool = False  # TensorRT profiles cover the contract's sequence buckets
    # `mmrec tune`: the served shapes its variants are timed at (batch[, tokens]); () is not tuned
    tuning_cases: tuple[tuple[int, ...], ...] = ()
    timing_feed: Callable[[tuple[int, ...], ServedContract], Feed] | None = None
    atol: float | None = None  # FP32 parity tolerance; None: the export's --atol

    @property
    def quantizable(self) -> bool:
        return self.gate_feeds is not None

    @property
    def tuned(self) -> bool:
        return bool(self.tuning_cases)

    def case_label(self, case: tuple[int, ...]) -> str:
        return f"batch={case[0]} seq={case[1]}" if self.sequence_inputs else f"batch={case[0]}"

    def sequence_buckets(self, contract: ServedContract) -> tuple[int, ...]:
        """The sequence lengths TensorRT profiles of this member cover (none: batch axis only)."""
        return contract.seq_buckets if self.sequence_inputs else ()

    def sample(self, inputs: ExportInputs) -> tuple[torch.Tensor, ...]:
        """Example inputs for tracing: the second parity case (a real batch > 1)."""
        import torch

        cases = self.parity_cases(inputs)
        return tuple(torch.from_numpy(v) for v in cases[min(1, len(cases) - 1)][1].values())


RECIPES: dict[str, MemberRecipe] = {}


def register(recipe: MemberRecipe) -> MemberRecipe:
    RECIPES[recipe.name] = recipe
    return recipe


# ---- text encoder --------------------------------------------------------------------------------
def _text_cases(x: ExportInputs) -> list[Case]:
    """Real captions at batch 1/8/32; long texts are captions joined to reach ~16, ~64 and
    max_seq_len tokens."""
    cases = []
    for words_per_text in (1, 6, CAPTIONS_PER_LONG_TEXT):
        for batch in (1, 8, 32):
            (feed,) = x.tokens(joined_captions(x.held_out_captions, batch, words_per_text), batch)
            cases.append((f"batch={batch} seq={feed[schema.INPUT_IDS].shape[1]}", feed))
    return cases


def _text_timing_feed(case: tuple[int, ...], contract: ServedContract) -> Feed:
    """Token ids inside the vocabulary at a served shape: dense kernels' time does not depend on the values."""
    batch, tokens = case
    ids = np.random.default_rng(0).integers(1000, 20000, (batch, tokens), dtype=np.int64)
    return {schema.INPUT_IDS: ids, schema.ATTENTION_MASK: np.ones_like(ids)}


def _text_int8(fp32: Path, destination: Path, x: ExportInputs) -> Path:
    """Static INT8 by NNCF, calibrated on training captions and their long joins (every length served)."""
    from .text_int8 import calibration_texts, quantize_text_int8

    texts = calibration_texts([i.caption for i in x.train])
    return quantize_text_int8(fp32, destination, x.tokens(texts, NNCF_CALIBRATION_BATCH))


def _text_calibration(x: ExportInputs) -> Feed:
    (feed,) = x.tokens([i.caption for i in x.train[:CALIBRATION_ITEMS]], CALIBRATION_ITEMS)
    return feed


register(MemberRecipe(
    schema.TEXT_ENCODER,
    module=lambda x: x.text_model,
    parity_cases=_text_cases,
    gate_feeds=lambda x: x.tokens(x.held_out_captions, x.gate_batch(TEXT_GATE_BATCH)),
    long_gate_feeds=lambda x: x.tokens(joined_captions(x.held_out_captions, LONG_TEXT_CASES, CAPTIONS_PER_LONG_TEXT),
                                       x.gate_batch(GATE_BATCH)),
    calibration_feed=_text_calibration,
    quantize_int8=_text_int8,
    sequence_inputs=True,
    tuning_cases=((1, 16), (32, 64)),
    timing_feed=_text_timing_feed,
))


# ---- image encoder -------------------------------------------------------------------------------
def _image_gate_feeds(x: ExportInputs) -> list[Feed]:
    step, pixels = x.gate_batch(GATE_BATCH), x.held_out_pixels
    return [{schema.PIXEL_VALUES: pixels[i:i + step]} for i in range(0, len(pixels), step)]


def _image_timing_feed(case: tuple[int, ...], contract: ServedContract) -> Feed:
    size = contract.image_size
    return {schema.PIXEL_VALUES: np.random.default_rng(0).standard_normal((case[0], 3, size, size)).astype(np.float32)}


def _image_int8(fp32: Path, destination: Path, x: ExportInputs) -> Path:
    """Static QDQ INT8 by ONNX Runtime, calibrated on training images."""
    from .variants import quantize_static_int8

    return quantize_static_int8(fp32, destination, schema.PIXEL_VALUES, _image_calibration(x)[schema.PIXEL_VALUES])


def _image_calibration(x: ExportInputs) -> Feed:
    return {schema.PIXEL_VALUES: x.dataset.pixel_values(x.train[:CALIBRATION_ITEMS])}


register(MemberRecipe(
    schema.IMAGE_ENCODER,
    module=lambda x: x.image_model,
    parity_cases=lambda x: [(f"batch={b}", {schema.PIXEL_VALUES: x.held_out_pixels[:16][:b]}) for b in (1, 4, 16)],
    gate_feeds=_image_gate_feeds,
    calibration_feed=_image_calibration,
    quantize_int8=_image_int8,
    tuning_cases=((1,), (32,)),
    timing_feed=_image_timing_feed,
))


# ---- fusion head and scorer ----------------------------------------------------------------------
register(MemberRecipe(
    schema.FUSION,
    module=lambda x: x.fusion,
    parity_cases=lambda x: [(f"batch={b}", {schema.TEXT_EMBEDDING: x.held_features.text[:b],
                                            schema.IMAGE_EMBEDDING: x.held_features.image[:b]})
                            for b in (1, 8, 32)],
))


def _scorer_module() -> "torch.nn.Module":
    from .models.fusion import UserItemScorer

    return UserItemScorer().eval()


def _scorer_cases(x: ExportInputs) -> list[Case]:
    items = x.item_embeddings
    users = items[::-1].copy()
    return [(f"batch={b}", {schema.ITEM_EMBEDDING_MEMBER: items[:b], schema.USER_EMBEDDING_MEMBER: users[:b]})
            for b in (1, 8, 32)]


register(MemberRecipe(
    schema.SCORER,
    module=lambda x: _scorer_module(),
    parity_cases=_scorer_cases,
))
