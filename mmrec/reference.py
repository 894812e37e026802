"""In-process reference pipeline: what the Triton ensembles compute, without Triton.

Same files (the repository's model.onnx, tokenizer.json, preprocess.json), same preprocessing
code (the python models' own modules), same runtime (ONNX Runtime or OpenVINO, as each member's
config says) and session settings as the portable runner. Tests
use it as ground truth for the server; benchmarks use it to measure serving overhead.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import schema
from .preprocess import PreprocessConfig
from .python_models import image_decoder, text_tokenizer, tokenizer_file_in
from mmrec.model_repository.lib import runtime


def served_runtime(repository: Path, member: str) -> tuple[str, str]:
    """(runtime, precision) a portable member is served with: its config's parameters."""
    from tritonclient.grpc import model_config_pb2 as mc
    from google.protobuf import text_format

    config = Path(repository) / member / "config.pbtxt"
    parameters = text_format.Parse(config.read_text(), mc.ModelConfig()).parameters if config.is_file() else {}
    runtime_name = parameters["runtime"].string_value if "runtime" in parameters else "onnxruntime"
    precision = parameters["precision"].string_value if "precision" in parameters else "fp32"
    return runtime_name, precision


class ReferencePipeline:
    """tokenize -> text_encoder, decode -> image_encoder, -> fusion (-> scorer), in-process."""

    def __init__(self, repository: Path, intra_op_threads: int = 0) -> None:
        self.repository = Path(repository)
        self.preprocess = PreprocessConfig.load(self.repository)
        self.tokenizer = text_tokenizer(self.preprocess, tokenizer_file_in(self.repository))
        self.decoder = image_decoder(self.preprocess)
        self.sessions = {}
        for name in schema.ONNX_MODELS:
            path = self.repository / name / "1" / "model.onnx"
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: the reference pipeline needs an ONNX "
                                        "repository (target portable, onnxruntime or openvino)")
            runtime_name, precision = served_runtime(self.repository, name)
            self.sessions[name] = runtime.open_session(path, runtime_name, intra_op_threads, precision)

    @property
    def categories(self) -> tuple[str, ...]:
        return self.preprocess.categories

    def _run(self, model: str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions[model].run(None, feed)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        ids, mask = self.tokenizer(texts)
        return self.embed_tokens(ids, mask)

    def embed_tokens(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The text encoder as the portable runner runs it: rows at their own length bucket."""
        return runtime.run_by_length(self.sessions[schema.TEXT_ENCODER], None,
                                     {schema.INPUT_IDS: ids, schema.ATTENTION_MASK: mask},
                                     schema.ATTENTION_MASK, self.preprocess.seq_buckets)[0]

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


def user_vector(item_embeddings: np.ndarray) -> np.ndarray:
    """A user is the mean of the embeddings of the items they engaged with (seed 003)."""
    history = np.asarray(item_embeddings, dtype=np.float32)
    if history.ndim != 2 or len(history) == 0:
        raise ValueError("user history must be a non-empty [N, D] array of item embeddings")
    return history.mean(axis=0)
