"""The item path, implemented once: texts + images -> item embedding, interest probs, alignment.

The served `item_encoder` (portable target) and the benchmarks' in-process arm
(`mmrec.reference.in_process_engine`, configured from the same config) run this class; index
builds through a server run it there. The reference pipeline deliberately does not: it runs the same library
pieces one after another, the ground truth this schedule is checked against (tests/test_item_engine.py
in-process, the serving tests through Triton).

The schedule fills the cores instead of running the steps one after another:
- the texts of the whole batch are tokenized and encoded on a worker thread (the text encoder's
  share of the cores, `<text_encoder>.cpu_share`), rows at their own length bucket;
- meanwhile every image of the batch is submitted to a small decode pool (Pillow releases the GIL
  while it decodes and resizes), and the image encoder runs on every IMAGE_CHUNK images as soon
  as they are decoded, in batch order, while the pool decodes the next ones: decode is no longer
  a serial step in front of the image encoder;
- fusion runs once on the whole batch when both branches are done.
Running the image encoder in chunks also bounds its activation memory: ONNX Runtime's arena keeps
its peak, and a CNN's activations at batch 32 are several hundred MB (measured in issue 21).

Per request: a request whose text or image is bad gets a Failure naming the item (INVALID_ARG
when served), without failing the others; its text rows are encoded and dropped.

Plain numpy + the sibling library modules: this file runs inside Triton's python stub.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

if __package__:  # sibling library modules: `from .` in the package, flat beside model.py in Triton's stub
    from .runtime import Session, open_configured, run_by_length, usable_cores
    from .batching import Failure
    from .image_preprocessing import ImageDecoder, InvalidImage, check_pixels
    from .runner_settings import MEMBER_SEPARATOR, RunnerSettings
    from .served_contract import TOKENIZER_FILE, ServedContract
    from .tensor_names import (ATTENTION_MASK, FUSION, FUSION_OUTPUTS, IMAGE_EMBEDDING, IMAGE_ENCODER, INPUT_IDS,
                               IMAGE, ITEM_OUTPUTS, ITEM_PIPELINE_MEMBERS, PIXEL_VALUES, PIXELS, TEXT,
                               TEXT_EMBEDDING, TEXT_ENCODER)
    from .text_preprocessing import TextTokenizer
else:
    from runtime import Session, open_configured, run_by_length, usable_cores
    from batching import Failure
    from image_preprocessing import ImageDecoder, InvalidImage, check_pixels
    from runner_settings import MEMBER_SEPARATOR, RunnerSettings
    from served_contract import TOKENIZER_FILE, ServedContract
    from tensor_names import (ATTENTION_MASK, FUSION, FUSION_OUTPUTS, IMAGE_EMBEDDING, IMAGE_ENCODER, INPUT_IDS,
                              IMAGE, ITEM_OUTPUTS, ITEM_PIPELINE_MEMBERS, PIXEL_VALUES, PIXELS, TEXT,
                              TEXT_EMBEDDING, TEXT_ENCODER)
    from text_preprocessing import TextTokenizer

# Images per image-encoder run: small enough that the encoder starts while the pool still
# decodes and its activations stay small, large enough to keep the convolutions efficient.
IMAGE_CHUNK = 8


def check_one_image_input(images: object | None, pixels: object | None) -> None:
    """An item comes with encoded images or preprocessed pixels, exactly one of them."""
    if (images is None) == (pixels is None):
        raise ValueError(f"send either {IMAGE} (encoded bytes) or {PIXELS} (preprocessed) with {TEXT}, "
                         f"not {'both' if images is not None else 'neither'}")


@dataclass(frozen=True)
class Items:
    """One request's items: captions, and either encoded images or client-normalized pixels."""

    texts: list[str]
    images: Sequence[bytes] | None = None
    pixels: np.ndarray | None = None  # float [N, 3, S, S], already checked

    def __post_init__(self) -> None:
        check_one_image_input(self.images, self.pixels)
        if not self.texts:
            raise ValueError(f"{TEXT} is empty: send one text and one image per item")
        rows = len(self.images) if self.images is not None else len(self.pixels)
        if rows != len(self.texts):
            what = "IMAGE" if self.images is not None else "PIXEL_VALUES"
            raise ValueError(f"{len(self.texts)} TEXT rows but {rows} {what} rows")


class ItemEngine:
    """Texts + images of a whole dynamic batch in, per request the fusion outputs out."""

    def __init__(self, tokenizer: TextTokenizer, decoder: ImageDecoder, sessions: Mapping[str, Session],
                 seq_buckets: tuple[int, ...], *, decode_threads: int = 0, text_workers: int = 1,
                 image_chunk: int = IMAGE_CHUNK) -> None:
        self.tokenizer = tokenizer
        self.decoder = decoder
        self.sessions = sessions  # held by reference: a benchmark may swap a member's session
        self.seq_buckets = tuple(seq_buckets)
        self.image_chunk = image_chunk
        self.text_worker = ThreadPoolExecutor(text_workers, thread_name_prefix="text-encoder")
        self.decode_pool = ThreadPoolExecutor(decode_threads or usable_cores(), thread_name_prefix="decode")

    @classmethod
    def for_model(cls, parameters: Mapping[str, object], model_dir: Path, version: str, **options) -> "ItemEngine":
        """The served engine: the contract and each member's `<member>.` runner settings from the
        model's config parameters; graph paths relative to the model's folder. `options`: the
        constructor's keyword options (an in-process thread pool gives each caller a text branch)."""
        contract = ServedContract.from_parameters(parameters)
        settings = {member: RunnerSettings.from_parameters(parameters, member) for member in ITEM_PIPELINE_MEMBERS}
        sessions = {member: open_configured((Path(model_dir) / s.model_file).resolve(), s) for member, s in settings.items()}
        # the text rows' length buckets: the text encoder's runner setting, as for the member itself
        # (repositories written before it was recorded there: the contract's)
        recorded = f"{TEXT_ENCODER}{MEMBER_SEPARATOR}seq_buckets" in parameters
        buckets = settings[TEXT_ENCODER].seq_buckets if recorded else contract.seq_buckets
        return cls(TextTokenizer.for_contract(contract, Path(model_dir) / version / TOKENIZER_FILE),
                   ImageDecoder.for_contract(contract), sessions, buckets, **options)

    # ---- reading a request (ValueError: the request's own fault)
    def items(self, raw_texts: np.ndarray, images: np.ndarray | None = None,
              pixels: np.ndarray | None = None) -> Items:
        """Validate one request's tensors: BYTES texts, and BYTES images or FP32 pixels."""
        check_one_image_input(images, pixels)  # before decoding the texts: the cheaper message first
        texts = self.tokenizer.decode_texts(raw_texts)
        if pixels is not None:
            return Items(texts, pixels=check_pixels(pixels, self.decoder.image_size))
        return Items(texts, images=list(np.asarray(images, dtype=object).reshape(-1)))

    # ---- the branches
    def encode_text(self, texts: list[str]) -> np.ndarray:
        """Text embeddings, rows at their own length bucket (as the text_encoder member runs)."""
        ids, mask = self.tokenizer(texts)
        session = self.sessions[TEXT_ENCODER]
        feed = {INPUT_IDS: ids.astype(session.input_dtypes[INPUT_IDS], copy=False),
                ATTENTION_MASK: mask.astype(session.input_dtypes[ATTENTION_MASK], copy=False)}
        return run_by_length(session, [TEXT_EMBEDDING], feed, ATTENTION_MASK, self.seq_buckets)[0]

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Image embeddings of normalized pixels [N, 3, S, S]."""
        session = self.sessions[IMAGE_ENCODER]
        feed = {PIXEL_VALUES: pixels.astype(session.input_dtypes[PIXEL_VALUES], copy=False)}
        return session.run([IMAGE_EMBEDDING], feed)[0]

    def fuse(self, text_embedding: np.ndarray, image_embedding: np.ndarray) -> list[np.ndarray]:
        """The fusion outputs (FUSION_OUTPUTS order) of matching rows."""
        return self.sessions[FUSION].run(list(FUSION_OUTPUTS), {TEXT_EMBEDDING: text_embedding,
                                                                IMAGE_EMBEDDING: image_embedding})

    def _rows(self, batch: list[Items]):
        """(request, normalized pixel row [3, S, S]) in batch order, each image as soon as the pool
        has decoded it; an InvalidImage stands in for a request's first bad image (its later
        images are skipped). Every image is submitted to the pool first, so decoding runs ahead."""
        decoding = [[self.decode_pool.submit(self.decoder.decode, data, i) for i, data in enumerate(items.images)]
                    if items.pixels is None else None for items in batch]
        try:
            for j, (items, futures) in enumerate(zip(batch, decoding)):
                if futures is None:
                    yield from ((j, row) for row in items.pixels)
                    continue
                for k, future in enumerate(futures):
                    try:
                        yield j, self.decoder.normalize(future.result()[None])[0]
                    except InvalidImage as err:
                        for rest in futures[k + 1:]:
                            rest.cancel()
                        yield j, err
                        break
        finally:  # the encoder failed (or we are done): no decode of this batch is left queued
            for futures in decoding:
                for future in futures or ():
                    future.cancel()

    def _image_embeddings(self, batch: list[Items]) -> tuple[np.ndarray, np.ndarray, dict[int, Failure]]:
        """Image embeddings of every image row (batch order) and the request each row belongs to,
        the encoder run on every IMAGE_CHUNK rows as soon as they are decoded (chunks cross request
        borders). A request that turns out bad loses its rows still waiting for a chunk; rows
        already encoded are dropped by the caller."""
        failures: dict[int, Failure] = {}
        pending: list[tuple[int, np.ndarray]] = []  # (request, row) not yet encoded
        owners: list[int] = []
        embeddings: list[np.ndarray] = []
        rows = self._rows(batch)

        def encode_pending() -> None:
            embeddings.append(self.encode_pixels(np.stack([row for _, row in pending])))
            owners.extend(j for j, _ in pending)
            pending.clear()

        try:
            for j, row in rows:
                if isinstance(row, InvalidImage):
                    failures[j] = Failure(str(row))
                    pending[:] = [(o, r) for o, r in pending if o != j]
                    continue
                pending.append((j, row))
                if len(pending) == self.image_chunk:
                    encode_pending()
        finally:
            rows.close()  # cancels whatever decode is still queued (an encoder failure, say)
        if pending:
            encode_pending()
        encoded = np.concatenate(embeddings) if embeddings else np.zeros((0, 0), np.float32)
        return encoded, np.asarray(owners, dtype=np.int64), failures

    # ---- a whole dynamic batch
    def encode_batch(self, batch: list[Items]) -> list[list[np.ndarray] | Failure]:
        """Per request: its FUSION_OUTPUTS arrays, or the Failure of its first bad image."""
        text_future = self.text_worker.submit(self.encode_text, [t for items in batch for t in items.texts])
        try:
            image_embedding, owners, failures = self._image_embeddings(batch)
            text_embedding = text_future.result()
        except BaseException:
            text_future.cancel()
            raise
        good = [j for j in range(len(batch)) if j not in failures]
        if not good:
            return [failures[j] for j in range(len(batch))]
        text_owners = np.repeat(np.arange(len(batch)), [len(items.texts) for items in batch])
        outputs = self.fuse(text_embedding[~np.isin(text_owners, list(failures))],
                            image_embedding[~np.isin(owners, list(failures))])
        sizes = [len(batch[j].texts) for j in good]
        per_request = iter(zip(*[np.split(o, np.cumsum(sizes)[:-1]) for o in outputs]))
        return [failures[j] if j in failures else list(next(per_request)) for j in range(len(batch))]

    def encode(self, texts: list[str], images: Sequence[bytes] | None = None,
               pixels: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """One request in-process: public output name -> array; ValueError for bad input."""
        result = self.encode_batch([Items(list(texts), images=images, pixels=pixels)])[0]
        if isinstance(result, Failure):
            raise InvalidImage(result.message)
        return dict(zip(ITEM_OUTPUTS, result))

    def close(self) -> None:
        self.text_worker.shutdown(wait=True)
        self.decode_pool.shutdown(wait=True)
