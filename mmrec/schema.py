"""The one description of every served model: names, tensors, dtypes, dims.

Export (ONNX input/output names and dynamic axes), the repository writer (config.pbtxt for
every target), the client and the reference pipeline all read this module, so a tensor name
or a width is written exactly once.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

# Axis vocabulary shared by every exported graph (HF Optimum style).
BATCH_AXIS = "batch_size"
SEQUENCE_AXIS = "sequence_length"

# Widths of the default submodels, defined once in the served contract; non-default encoders
# override them at export time and the contract records what was used.
from mmrec.model_repository.lib.served_contract import (  # noqa: E402
    DEFAULT_IMAGE_SIZE, IMAGE_EMBEDDING_DIM, ITEM_EMBEDDING_DIM, TEXT_EMBEDDING_DIM, ServedContract)
IMAGE_CHANNELS = 3


@dataclass(frozen=True)
class TensorSpec:
    """One tensor: its name, Triton dtype, and dims without the batch dim (-1 = dynamic)."""

    name: str
    dtype: str  # Triton dtype name without the TYPE_ prefix: FP32, INT64, BYTES
    dims: tuple[int, ...]
    # names of dynamic non-batch axes by position, e.g. {0: SEQUENCE_AXIS}
    dynamic_axes: dict[int, str] = field(default_factory=dict)
    optional: bool = False

    def onnx_axes(self) -> dict[int, str]:
        """Dynamic axes for torch.onnx.export: batch first, then the named ones shifted by one."""
        axes = {0: BATCH_AXIS}
        axes.update({i + 1: name for i, name in self.dynamic_axes.items()})
        return axes


@dataclass(frozen=True)
class ModelSpec:
    """A served model's interface. `kind` says how it is implemented in the repository."""

    name: str
    kind: str  # "python" (preprocessing), "onnx" (an exported submodel), "ensemble"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


def _seq(name: str) -> TensorSpec:
    return TensorSpec(name, "INT64", (-1,), {0: SEQUENCE_AXIS})


# Names shared with the served code live in model_repository/lib/tensor_names.py (one definition).
from .model_repository.lib.tensor_names import (  # noqa: E402,F401 - re-exported
    ALIGNMENT, ALIGNMENT_MEMBER, ATTENTION_MASK, CATALOG_SCORER, FUSION, IMAGE, IMAGE_EMBEDDING, IMAGE_ENCODER, IMAGE_PREPROCESS,
    INPUT_IDS, INTEREST_PROBS, INTEREST_PROBS_MEMBER, INTEREST_SCORER, ITEM_EMBEDDING, ITEM_EMBEDDING_MEMBER,
    ITEM_ENCODER, ITEM_ENCODER_PIXELS, ITEM_OUTPUTS, ITEM_PREPROCESS, ITEM_PREPROCESS_PIXELS, PIXEL_VALUES, PIXELS, SCORE,
    SCORE_MEMBER, SCORER, TEXT, TEXT_EMBEDDING, TEXT_ENCODER, TOKENIZER, USER_EMBEDDING, USER_EMBEDDING_MEMBER)

ONNX_MODELS = (TEXT_ENCODER, IMAGE_ENCODER, FUSION, SCORER)
PYTHON_MODELS = (TOKENIZER, IMAGE_PREPROCESS, ITEM_PREPROCESS, ITEM_PREPROCESS_PIXELS)
ENSEMBLES = (ITEM_ENCODER, ITEM_ENCODER_PIXELS, INTEREST_SCORER)


def member_specs(
    num_categories: int,
    text_dim: int = TEXT_EMBEDDING_DIM,
    image_dim: int = IMAGE_EMBEDDING_DIM,
    item_dim: int = ITEM_EMBEDDING_DIM,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> dict[str, ModelSpec]:
    """Interfaces of the six member models for a given set of widths."""
    pixels = TensorSpec(PIXEL_VALUES, "FP32", (IMAGE_CHANNELS, image_size, image_size))
    text_emb = TensorSpec(TEXT_EMBEDDING, "FP32", (text_dim,))
    image_emb = TensorSpec(IMAGE_EMBEDDING, "FP32", (image_dim,))
    item_emb = TensorSpec(ITEM_EMBEDDING_MEMBER, "FP32", (item_dim,))
    specs = [
        ModelSpec(TOKENIZER, "python", (TensorSpec(TEXT, "BYTES", (1,)),),
                  (_seq(INPUT_IDS), _seq(ATTENTION_MASK))),
        ModelSpec(IMAGE_PREPROCESS, "python", (TensorSpec(IMAGE, "BYTES", (1,)),), (pixels,)),
        # validation + preprocessing in one step, before the ensembles fan out (see its model.py)
        ModelSpec(ITEM_PREPROCESS, "python", (TensorSpec(TEXT, "BYTES", (1,)), TensorSpec(IMAGE, "BYTES", (1,))),
                  (_seq(INPUT_IDS), _seq(ATTENTION_MASK), pixels)),
        ModelSpec(ITEM_PREPROCESS_PIXELS, "python",
                  (TensorSpec(TEXT, "BYTES", (1,)), TensorSpec(PIXELS, "FP32", pixels.dims)),
                  (_seq(INPUT_IDS), _seq(ATTENTION_MASK), pixels)),
        ModelSpec(TEXT_ENCODER, "onnx", (_seq(INPUT_IDS), _seq(ATTENTION_MASK)), (text_emb,)),
        ModelSpec(IMAGE_ENCODER, "onnx", (pixels,), (image_emb,)),
        ModelSpec(FUSION, "onnx", (text_emb, image_emb), (
            item_emb,
            TensorSpec(INTEREST_PROBS_MEMBER, "FP32", (num_categories,)),
            TensorSpec(ALIGNMENT_MEMBER, "FP32", (1,)),
        )),
        ModelSpec(SCORER, "onnx", (item_emb, TensorSpec(USER_EMBEDDING_MEMBER, "FP32", (item_dim,))),
                  (TensorSpec(SCORE_MEMBER, "FP32", (1,)),)),
    ]
    return {s.name: s for s in specs}


def user_vector(item_embeddings) -> "np.ndarray":
    """What USER_EMBEDDING means: the mean of the embeddings of the items a user engaged with
    (seed 003). The client and the reference pipeline both call this one definition."""
    import numpy as np

    history = np.asarray(item_embeddings, dtype=np.float32)
    if history.ndim != 2 or len(history) == 0:
        raise ValueError("user history must be a non-empty [N, D] array of item embeddings")
    return history.mean(axis=0)


def member_specs_for(contract: ServedContract) -> dict[str, ModelSpec]:
    """The member interfaces a served contract implies (its widths, categories, image size)."""
    return member_specs(len(contract.categories), contract.text_dim, contract.image_dim,
                        contract.item_dim, contract.image_size)


@dataclass(frozen=True)
class EnsembleStep:
    model: str
    input_map: dict[str, str]  # member input -> ensemble tensor
    output_map: dict[str, str]  # member output -> ensemble tensor


@dataclass(frozen=True)
class EnsembleSpec:
    spec: ModelSpec
    steps: tuple[EnsembleStep, ...]


def ensemble_specs(members: dict[str, ModelSpec]) -> dict[str, EnsembleSpec]:
    """The ensembles as DAGs over the members; only pooled embeddings cross steps."""
    fusion = members[FUSION]
    item_dim = fusion.output(ITEM_EMBEDDING_MEMBER).dims
    public_outputs = (
        TensorSpec(ITEM_EMBEDDING, "FP32", item_dim),
        TensorSpec(INTEREST_PROBS, "FP32", fusion.output(INTEREST_PROBS_MEMBER).dims),
        TensorSpec(ALIGNMENT, "FP32", (1,)),
    )
    # Every way an item can be invalid is caught by the first step, before the branches split:
    # Triton 2.51 leaks a request whose step fails while a parallel branch is still running.
    tokens_and_pixels = {INPUT_IDS: "_input_ids", ATTENTION_MASK: "_attention_mask",
                         PIXEL_VALUES: "_pixel_values"}
    preprocess = EnsembleStep(ITEM_PREPROCESS, {TEXT: TEXT, IMAGE: IMAGE}, tokens_and_pixels)
    preprocess_pixels = EnsembleStep(ITEM_PREPROCESS_PIXELS, {TEXT: TEXT, PIXELS: PIXELS}, tokens_and_pixels)
    encode_text = EnsembleStep(TEXT_ENCODER,
                               {INPUT_IDS: "_input_ids", ATTENTION_MASK: "_attention_mask"},
                               {TEXT_EMBEDDING: "_text_embedding"})
    encode_image = EnsembleStep(IMAGE_ENCODER, {PIXEL_VALUES: "_pixel_values"},
                                {IMAGE_EMBEDDING: "_image_embedding"})
    fuse = EnsembleStep(FUSION, {TEXT_EMBEDDING: "_text_embedding", IMAGE_EMBEDDING: "_image_embedding"},
                        {ITEM_EMBEDDING_MEMBER: ITEM_EMBEDDING, INTEREST_PROBS_MEMBER: INTEREST_PROBS,
                         ALIGNMENT_MEMBER: ALIGNMENT})
    score = EnsembleStep(SCORER, {ITEM_EMBEDDING_MEMBER: ITEM_EMBEDDING, USER_EMBEDDING_MEMBER: USER_EMBEDDING},
                         {SCORE_MEMBER: SCORE})
    text_in = TensorSpec(TEXT, "BYTES", (1,))
    image_in = TensorSpec(IMAGE, "BYTES", (1,))
    pixels_in = TensorSpec(PIXELS, "FP32", members[IMAGE_PREPROCESS].output(PIXEL_VALUES).dims)
    user_in = TensorSpec(USER_EMBEDDING, "FP32", item_dim)
    return {
        ITEM_ENCODER: EnsembleSpec(
            ModelSpec(ITEM_ENCODER, "ensemble", (text_in, image_in), public_outputs),
            (preprocess, encode_text, encode_image, fuse)),
        ITEM_ENCODER_PIXELS: EnsembleSpec(
            ModelSpec(ITEM_ENCODER_PIXELS, "ensemble", (text_in, pixels_in), public_outputs),
            (preprocess_pixels, encode_text, encode_image, fuse)),
        INTEREST_SCORER: EnsembleSpec(
            ModelSpec(INTEREST_SCORER, "ensemble", (text_in, image_in, user_in),
                      public_outputs + (TensorSpec(SCORE, "FP32", (1,)),)),
            (preprocess, encode_text, encode_image, fuse, score)),
    }


def engine_ensemble_specs(members: dict[str, ModelSpec]) -> dict[str, EnsembleSpec]:
    """The ensembles where `item_encoder` is the item engine, one python model (portable target,
    lib/item_engine.py): it takes IMAGE or PIXEL_VALUES, and the other public ensembles route
    through it, so every item graph is loaded once and no member model needs to be served."""
    specs = ensemble_specs(members)
    engine = specs[ITEM_ENCODER].spec
    pixels_in = specs[ITEM_ENCODER_PIXELS].spec.inputs[1]
    text_in, image_in = engine.inputs
    outputs = {t.name: t.name for t in engine.outputs}
    score = specs[INTEREST_SCORER].steps[-1]
    return {
        ITEM_ENCODER: EnsembleSpec(
            ModelSpec(ITEM_ENCODER, "python", (text_in, replace(image_in, optional=True),
                                               replace(pixels_in, optional=True)), engine.outputs), ()),
        ITEM_ENCODER_PIXELS: EnsembleSpec(specs[ITEM_ENCODER_PIXELS].spec, (
            EnsembleStep(ITEM_ENCODER, {TEXT: TEXT, PIXELS: PIXELS}, outputs),)),
        INTEREST_SCORER: EnsembleSpec(specs[INTEREST_SCORER].spec, (
            EnsembleStep(ITEM_ENCODER, {TEXT: TEXT, IMAGE: IMAGE}, outputs), score)),
    }


# The models a client calls; loading them (Triton explicit model control) loads whatever their
# ensembles compose, and nothing else. tokenizer and image_preprocess stay served for callers
# that use them on their own; catalog_scorer is loaded where `mmrec index` published one.
ENTRY_MODELS = (ITEM_ENCODER, ITEM_ENCODER_PIXELS, INTEREST_SCORER, SCORER, TOKENIZER, IMAGE_PREPROCESS,
                CATALOG_SCORER)


# --- catalog index (`mmrec index`, issue 13) ------------------------------------------------------
# A served index of item embeddings: one user vector in, the catalog's top-k item ids out. Its
# versions are written by `mmrec index build/add/remove`, not by `mmrec export`.
TOP_K = "K"  # optional per-request top-k (INT32 [1]); the model's default_k parameter otherwise
ITEM_IDS = "ITEM_IDS"  # BYTES [k]: the catalog ids, best first
ITEM_ROWS = "ITEM_ROWS"  # INT64 [k]: the same items' rows in the index version that answered
# Internal graph tensors of the catalog scan (never in a config): how many candidates the fp32
# scan keeps for the exact re-rank, and the two numbers that certify the re-rank was exact.
CANDIDATES = "candidates"
KTH_LOGIT = "kth_logit"
CANDIDATE_FLOOR = "candidate_floor"


def catalog_scorer_spec(item_dim: int = ITEM_EMBEDDING_DIM) -> ModelSpec:
    """The served catalog_scorer: USER_EMBEDDING [D] (+ K) -> top-k ITEM_IDS, ITEM_ROWS, SCORE."""
    return ModelSpec(CATALOG_SCORER, "python",
                     (TensorSpec(USER_EMBEDDING, "FP32", (item_dim,)),
                      TensorSpec(TOP_K, "INT32", (1,), optional=True)),
                     (TensorSpec(ITEM_IDS, "BYTES", (-1,)),
                      TensorSpec(ITEM_ROWS, "INT64", (-1,)),
                      TensorSpec(SCORE, "FP32", (-1,))))
