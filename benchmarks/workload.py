"""Real inputs for every benchmark: held-out Tux Paint items, tokenized and decoded by the
server's own preprocessing code, at the batch sizes and text lengths a run asks for.

Texts of an exact token length are real captions joined until they are long enough, then
truncated by the server tokenizer to that length, so no row is padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from mmrec import schema
from mmrec.export.data import Item, load_items, split
from mmrec.layout import RepositoryLayout
from mmrec.model_repository.lib.image_preprocessing import ImageDecoder
from mmrec.model_repository.lib.text_preprocessing import TextTokenizer

CAPTIONS_PER_LONG_TEXT = 48  # ~5 tokens per caption: comfortably over any benchmarked length


class WorkloadError(RuntimeError):
    """The repository or the data cannot produce the requested inputs."""


@dataclass(frozen=True)
class PipelineInput:
    """What the item_encoder ensemble receives: captions and encoded images."""

    texts: list[str]
    images: list[bytes]

    def __len__(self) -> int:
        return len(self.texts)


class Workload:
    """Held-out items of the repository's dataset and the tensors derived from them."""

    def __init__(self, repository: Path, items: list[Item] | None = None) -> None:
        self.repository = Path(repository)
        layout = RepositoryLayout(self.repository)
        self.preprocess = layout.read_contract()
        self.tokenizer_file = layout.tokenizer_file()
        if items is None:
            items = split(load_items()).held_out
        if not items:
            raise WorkloadError("no held-out items to benchmark with")
        self.items = items
        self.tokenizer = TextTokenizer.for_contract(self.preprocess, self.tokenizer_file)
        self.decoder = ImageDecoder.for_contract(self.preprocess)
        self._categories = {c: i for i, c in enumerate(self.preprocess.categories)}

    # ---- raw items
    def take(self, batch: int, offset: int = 0) -> list[Item]:
        return [self.items[(offset + i) % len(self.items)] for i in range(batch)]

    def pipeline_input(self, batch: int, offset: int = 0) -> PipelineInput:
        items = self.take(batch, offset)
        return PipelineInput([i.caption for i in items], [i.image_bytes() for i in items])

    @property
    def labels(self) -> np.ndarray:
        return np.array([self._categories[i.category] for i in self.items], dtype=np.int64)

    # ---- text encoder inputs
    def long_texts(self, batch: int) -> list[str]:
        captions = [i.caption for i in self.items]
        return [" ".join(captions[(b * CAPTIONS_PER_LONG_TEXT + j) % len(captions)]
                         for j in range(CAPTIONS_PER_LONG_TEXT)) for b in range(batch)]

    def text_feed(self, batch: int, seq_len: int) -> dict[str, np.ndarray]:
        """input_ids/attention_mask [batch, seq_len] with every position a real token."""
        tokenizer = _exact_length_tokenizer(str(self.tokenizer_file), seq_len, self.preprocess.max_text_bytes)
        ids, mask = tokenizer(self.long_texts(batch))
        if ids.shape != (batch, seq_len) or not mask.all():
            raise WorkloadError(f"could not build {batch} texts of exactly {seq_len} tokens "
                                f"(got {ids.shape}, {int(mask.sum())} real tokens)")
        return {schema.INPUT_IDS: ids, schema.ATTENTION_MASK: mask}

    def caption_feed(self, batch: int, offset: int = 0) -> dict[str, np.ndarray]:
        """Real captions as the server tokenizes them (bucketed padding)."""
        ids, mask = self.tokenizer([i.caption for i in self.take(batch, offset)])
        return {schema.INPUT_IDS: ids, schema.ATTENTION_MASK: mask}

    # ---- image encoder inputs
    def pixels(self, batch: int, offset: int = 0) -> np.ndarray:
        return self.decoder([i.image_bytes() for i in self.take(batch, offset)])

    def pixel_feed(self, batch: int) -> dict[str, np.ndarray]:
        return {schema.PIXEL_VALUES: self.pixels(batch)}


@lru_cache(maxsize=8)
def _exact_length_tokenizer(tokenizer_file: str, seq_len: int, max_text_bytes: int):
    return TextTokenizer(tokenizer_file, seq_len, (seq_len,), max(max_text_bytes, 1 << 20))
