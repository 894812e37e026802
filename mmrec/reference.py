"""The one in-process pipeline: what the Triton ensembles compute, without Triton.

`ItemPipeline` chains tokenize -> text encoder, decode -> image encoder, -> fusion (-> scorer)
over members that are plain callables (feed dict -> output list), so the same pipeline runs the
repository's ONNX files (`ReferencePipeline`: ground truth for the server in tests, the
in-process baseline in benchmarks) or PyTorch modules (`torch_member`: benchmarks' reference
engine). Preprocessing is the served library code (`lib/text_preprocessing.py`,
`lib/image_preprocessing.py`); ONNX members run through `lib/runtime.py` with the portable
runner's runtime (ONNX Runtime or OpenVINO, as each member's config says) and settings.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from . import schema
from .layout import VERSION, RepositoryLayout
from .model_repository.lib.image_preprocessing import ImageDecoder
from .model_repository.lib.item_engine import ItemEngine
from .model_repository.lib.text_preprocessing import TextTokenizer
from .model_repository.lib import runtime
from .model_repository.lib.runner_settings import RunnerSettings
from .preprocess import ServedContract
from .schema import user_vector  # noqa: F401 - the reference's name for it

Member = Callable[[dict[str, np.ndarray]], list[np.ndarray]]  # feed -> outputs, in graph order


def ort_member(path: Path, intra_op_threads: int = 0) -> Member:
    """One ONNX graph as a pipeline member (ONNX Runtime, the served runner's options)."""
    return session_member(runtime.make_session(path, intra_op_threads))


def served_settings(repository: Path, member: str) -> RunnerSettings:
    """The runner settings a member is served with: the portable runner's config parameters, or
    the OpenVINO backend's (openvino target)."""
    layout = RepositoryLayout(repository)
    if not layout.config_file(member).is_file():
        return RunnerSettings()
    config = layout.read_config(member)
    return RunnerSettings.from_config(config.backend, {k: v.string_value for k, v in config.parameters.items()})


def served_runtime(repository: Path, member: str) -> tuple[str, str]:
    """(runtime, precision) a member is served with."""
    settings = served_settings(repository, member)
    return settings.runtime, settings.precision


def session_member(session) -> Member:
    names = [o.name for o in session.get_outputs()]
    return lambda feed: session.run(names, feed)


def torch_member(module) -> Member:
    """One PyTorch module as a pipeline member (inputs in feed order, outputs as numpy)."""
    import torch

    @torch.inference_mode()
    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = module(*[torch.from_numpy(v) for v in feed.values()])
        return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]

    return run


class ItemPipeline:
    """tokenize -> text_encoder, decode -> image_encoder, -> fusion (-> scorer), in-process."""

    def __init__(self, contract: ServedContract, tokenizer: TextTokenizer, decoder: ImageDecoder,
                 members: Mapping[str, Member]) -> None:
        self.preprocess = contract
        self.tokenizer = tokenizer
        self.decoder = decoder
        self.members = dict(members)

    @property
    def categories(self) -> tuple[str, ...]:
        return self.preprocess.categories

    def _run(self, model: str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.members[model](feed)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        ids, mask = self.tokenizer(texts)
        return self.embed_tokens(ids, mask)

    def embed_tokens(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self._run(schema.TEXT_ENCODER, {schema.INPUT_IDS: ids, schema.ATTENTION_MASK: mask})[0]

    def preprocess_images(self, images: list[bytes]) -> np.ndarray:
        return self.decoder(images)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return self._run(schema.IMAGE_ENCODER, {schema.PIXEL_VALUES: pixels.astype(np.float32)})[0]

    def fuse(self, text_embedding: np.ndarray, image_embedding: np.ndarray) -> dict[str, np.ndarray]:
        item, probs, alignment = self._run(schema.FUSION, {schema.TEXT_EMBEDDING: text_embedding,
                                                           schema.IMAGE_EMBEDDING: image_embedding})
        return {schema.ITEM_EMBEDDING: item, schema.INTEREST_PROBS: probs, schema.ALIGNMENT: alignment}

    def encode_items(self, texts: list[str], images: list[bytes]) -> dict[str, np.ndarray]:
        """Same outputs as the `item_encoder` ensemble."""
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts but {len(images)} images")
        return self.fuse(self.embed_texts(texts), self.embed_pixels(self.preprocess_images(images)))

    def encode_items_pixels(self, texts: list[str], pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Same outputs as the `item_encoder_pixels` ensemble."""
        return self.fuse(self.embed_texts(texts), self.embed_pixels(pixels))

    def score(self, item_embedding: np.ndarray, user_embedding: np.ndarray) -> np.ndarray:
        """σ(item · user) per row through the exported scorer; user broadcast if 1-D."""
        users = np.broadcast_to(np.asarray(user_embedding, dtype=np.float32), item_embedding.shape)
        return self._run(schema.SCORER, {schema.ITEM_EMBEDDING_MEMBER: item_embedding,
                                         schema.USER_EMBEDDING_MEMBER: np.ascontiguousarray(users)})[0]

    def score_items(self, texts: list[str], images: list[bytes], user_embedding: np.ndarray) -> dict[str, np.ndarray]:
        """Same outputs as the `interest_scorer` ensemble."""
        out = self.encode_items(texts, images)
        out[schema.SCORE] = self.score(out[schema.ITEM_EMBEDDING], user_embedding)
        return out


class ReferencePipeline(ItemPipeline):
    """The pipeline over a repository's own files: model.onnx, tokenizer.json, the contract."""

    def __init__(self, repository: Path, intra_op_threads: int = 0) -> None:
        self.repository = Path(repository)
        layout = RepositoryLayout(self.repository)
        contract = layout.read_contract()
        self.sessions = {}
        for name in schema.ONNX_MODELS:
            path = layout.model_file(name)
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: the reference pipeline needs an ONNX "
                                        "repository (target portable, onnxruntime or openvino)")
            runtime_name, precision = served_runtime(self.repository, name)
            self.sessions[name] = runtime.open_session(path, runtime_name, intra_op_threads, precision)
        super().__init__(contract, TextTokenizer.for_contract(contract, layout.tokenizer_file()),
                         ImageDecoder.for_contract(contract), {})

    def _run(self, model: str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        # through `sessions`, which a benchmark may swap for differently configured ones
        return self.sessions[model].run(None, feed)

    def embed_tokens(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The text encoder as the portable runner runs it: rows at their own length bucket."""
        return runtime.run_by_length(self.sessions[schema.TEXT_ENCODER], None,
                                     {schema.INPUT_IDS: ids, schema.ATTENTION_MASK: mask},
                                     schema.ATTENTION_MASK, self.preprocess.seq_buckets)[0]


class NotAnEngineRepository(ValueError):
    """The repository's item_encoder is an ensemble (a native target), not the item engine."""


def in_process_engine(repository: Path, text_workers: int = 1) -> ItemEngine:
    """The served item engine (lib/item_engine.py) in this process, opened from `item_encoder`'s
    own config exactly as Triton opens it: the same graphs, runtimes, precisions and shares of the
    cores. `text_workers` > 1 lets that many concurrent callers each run a text branch (an
    in-process thread pool); the served model runs one batch at a time. Portable target only."""
    layout = RepositoryLayout(Path(repository))
    config = layout.read_config(schema.ITEM_ENCODER)
    if config.backend != "python":
        raise NotAnEngineRepository(f"{repository}: item_encoder is not the item engine (an ensemble of a "
                                    "native target); in_process_engine needs a portable repository")
    return ItemEngine.for_model({k: v.string_value for k, v in config.parameters.items()},
                                layout.model_dir(schema.ITEM_ENCODER), VERSION, text_workers=text_workers)


@dataclass(frozen=True)
class InProcessEncoder:
    """What a benchmark's in-process arm runs: `encode_items(texts, images)` -> public outputs."""

    encode_items: Callable[[list[str], list[bytes]], dict[str, np.ndarray]]
    close: Callable[[], None]
    kind: str


def in_process_encoder(repository: Path, text_workers: int = 1, intra_op_threads: int = 0) -> InProcessEncoder:
    """The served item engine in-process where the repository serves one (portable), else the
    reference pipeline (native targets: Triton runs the ensemble's steps, as the pipeline does)."""
    try:
        engine = in_process_engine(repository, text_workers)
    except NotAnEngineRepository:
        pipeline = ReferencePipeline(repository, intra_op_threads)
        return InProcessEncoder(pipeline.encode_items, lambda: None, "reference pipeline (steps in sequence)")
    return InProcessEncoder(engine.encode, engine.close, "item engine as served (lib/item_engine.py)")
