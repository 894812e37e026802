"""Quality gates of the encoder variants, runnable where the repository is served.

Why they travel: INT8 and BF16 numerics depend on the CPU (AVX2's u8×s8 products saturate where
VNNI's do not; BF16 exists only on some CPUs), so a variant that passed on the export machine
may not pass on the serving one. Export saves the held-out inputs it gated on (`GateSet`, one
compressed file in the repository, `RepositoryLayout.gate_set_file`) and `mmrec tune` gates every candidate again on the machine
it runs on, refusing one that fails there.

`VariantGates` is the gate itself, for export (PyTorch fusion head) and tune (the repository's
fusion graph) alike: a member's variant is judged with the other member at FP32; the combination
actually served (e.g. text int8 + image fp16) is judged again as a whole on the fused item
embedding and interest predictions, because errors of two variants add up. No torch here.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from mmrec import schema
from mmrec.model_repository.lib import runtime
from mmrec.model_repository.lib.image_preprocessing import ImageDecoder
from mmrec.preprocess import ServedContract

from . import variants as var

Feed = dict[str, np.ndarray]
# (text, image) embeddings -> (item embeddings, predicted category per row)
Fuse = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
_LONG = "long"  # key part of the text encoder's max_seq_len feeds


@dataclass
class GateSet:
    """The held-out inputs of the gates: each quantizable member's feeds (image pixels kept as
    the decoder's uint8, normalized on load exactly as served), the text encoder's max_seq_len
    feeds, the held-out labels, and the held-out features a member not gated falls back to."""

    feeds: dict[str, list[Feed]]
    long_feeds: list[Feed]
    labels: np.ndarray
    fallback: dict[str, np.ndarray]  # member -> held-out embeddings (PyTorch), for a member not gated

    def save(self, path: Path, pixels_u8: np.ndarray | None = None) -> Path:
        """`pixels_u8`: the image feeds' decoder output before normalization (stored instead of
        the normalized FP32 feeds: a quarter of the bytes)."""
        arrays: dict[str, np.ndarray] = {"labels": self.labels}
        arrays.update({f"fallback/{m}": v for m, v in self.fallback.items()})
        for member, feeds in self.feeds.items():
            if member == schema.IMAGE_ENCODER and pixels_u8 is not None:
                arrays[f"{member}/pixels_u8"] = pixels_u8
                arrays[f"{member}/batch"] = np.array(len(feeds[0][schema.PIXEL_VALUES]))
                continue
            arrays.update({f"{member}/{i}/{name}": value for i, feed in enumerate(feeds) for name, value in feed.items()})
        arrays.update({f"{_LONG}/{i}/{name}": value for i, feed in enumerate(self.long_feeds)
                       for name, value in feed.items()})
        np.savez_compressed(path, **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: Path, contract: ServedContract) -> "GateSet":
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
        feeds: dict[str, dict[int, Feed]] = {}
        long_feeds: dict[int, Feed] = {}
        fallback = {}
        for key, value in arrays.items():
            parts = key.split("/")
            if parts[0] == "fallback":
                fallback[parts[1]] = value
            elif parts[0] == _LONG:
                long_feeds.setdefault(int(parts[1]), {})[parts[2]] = value
            elif len(parts) == 3:
                feeds.setdefault(parts[0], {}).setdefault(int(parts[1]), {})[parts[2]] = value
        ordered = {m: [batches[i] for i in sorted(batches)] for m, batches in feeds.items()}
        if f"{schema.IMAGE_ENCODER}/pixels_u8" in arrays:
            pixels = ImageDecoder.for_contract(contract).normalize(arrays[f"{schema.IMAGE_ENCODER}/pixels_u8"])
            step = int(arrays[f"{schema.IMAGE_ENCODER}/batch"])
            ordered[schema.IMAGE_ENCODER] = [{schema.PIXEL_VALUES: pixels[i:i + step]}
                                             for i in range(0, len(pixels), step)]
        return cls(ordered, [long_feeds[i] for i in sorted(long_feeds)], arrays["labels"], fallback)


def run_feeds(session: runtime.Session, feeds: list[Feed]) -> np.ndarray:
    """Several feeds through one session, the first output concatenated."""
    return np.concatenate([session.run(None, feed)[0] for feed in feeds])


def variant_outputs(path: Path, variant: var.Variant, feeds: list[Feed], threads: int = 0) -> np.ndarray:
    """Feeds through a variant's runtime at its precision, the first output concatenated."""
    return run_feeds(runtime.open_session(path, variant.runtime, threads, variant.precision), feeds)


def onnx_fuse(fusion_graph: Path) -> Fuse:
    """The repository's fusion graph (ONNX Runtime FP32) as the gates' fusion head."""
    session = runtime.open_session(fusion_graph)

    def fuse(text: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        item, probs = session.run([schema.ITEM_EMBEDDING_MEMBER, schema.INTEREST_PROBS_MEMBER],
                                  {schema.TEXT_EMBEDDING: text.astype(np.float32, copy=False),
                                   schema.IMAGE_EMBEDDING: image.astype(np.float32, copy=False)})
        return item, probs.argmax(1)

    return fuse


class VariantGates:
    """Held-out FP32 references, and the gates of single variants and of the served mix."""

    def __init__(self, fuse: Fuse, fallback: dict[str, np.ndarray], labels: np.ndarray, num_categories: int) -> None:
        self.fuse = fuse
        self.fallback = fallback
        self.labels = labels
        self.num_categories = num_categories
        self.reference: dict[str, np.ndarray] = {}
        self.variant_outputs: dict[tuple[str, str], np.ndarray] = {}

    def _features(self, chosen: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        text, image = schema.TEXT_ENCODER, schema.IMAGE_ENCODER
        return (chosen.get(text, self.reference.get(text, self.fallback.get(text))),
                chosen.get(image, self.reference.get(image, self.fallback.get(image))))

    def gate_member(self, name: str, variant: str, embeddings: np.ndarray,
                    long_pair: tuple[np.ndarray, np.ndarray] | None) -> var.GateResult:
        self.variant_outputs[(name, variant)] = embeddings
        _, ref_pred = self.fuse(*self._features({}))
        _, var_pred = self.fuse(*self._features({name: embeddings}))
        return var.quality_gate(variant, self.reference[name], embeddings, self.labels, ref_pred,
                                var_pred, self.num_categories, long_inputs=long_pair)

    def combination_gate(self, chosen: dict[str, str]) -> var.GateResult:
        """Gate of the fused outputs when the chosen member variants are served together."""
        ref_item, ref_pred = self.fuse(*self._features({}))
        var_item, var_pred = self.fuse(*self._features({m: self.variant_outputs[(m, v)] for m, v in chosen.items()}))
        label = "+".join(f"{m}={v}" for m, v in sorted(chosen.items()))
        return var.quality_gate(label, ref_item, var_item, self.labels, ref_pred, var_pred, self.num_categories)

    def combinations(self, admitted: dict[str, list[str]]) -> list[dict]:
        """The combination gate of every pair of `admitted` variants (member -> variants that
        passed alone; "fp32" always), FP32 alone left out."""
        names = sorted(admitted)
        results = []
        for choice in itertools.product(*(["fp32"] + [v for v in admitted[n] if v != "fp32"] for n in names)):
            pair = dict(zip(names, choice))
            chosen = {m: v for m, v in pair.items() if v != "fp32"}
            if not chosen:
                continue
            gate = self.combination_gate(chosen)
            results.append({"variants": pair, "passed": gate.passed, "mean_cosine": round(gate.mean_cosine, 6),
                            "neighbour_agreement": round(gate.neighbour_agreement, 4), "reasons": gate.reasons})
        return results
