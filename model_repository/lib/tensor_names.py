"""Model and tensor names that served code and mmrec share: their one definition.

`mmrec.schema` re-exports them (with shapes, dtypes and the ensembles built from them); the thin
Triton models import them from the copy export puts beside their `model.py`, so no served file
spells a name of its own. Plain Python on purpose (Triton's python stub imports it flat).
"""
from __future__ import annotations

# --- member models' tensors ---------------------------------------------------------------------
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
PIXEL_VALUES = "pixel_values"
TEXT_EMBEDDING = "text_embedding"
IMAGE_EMBEDDING = "image_embedding"
ITEM_EMBEDDING_MEMBER = "item_embedding"
INTEREST_PROBS_MEMBER = "interest_probs"
ALIGNMENT_MEMBER = "alignment"
USER_EMBEDDING_MEMBER = "user_embedding"
SCORE_MEMBER = "score"

# --- public ensemble tensors (what clients send and receive) -------------------------------------
TEXT = "TEXT"
IMAGE = "IMAGE"
PIXELS = "PIXEL_VALUES"
USER_EMBEDDING = "USER_EMBEDDING"
ITEM_EMBEDDING = "ITEM_EMBEDDING"
INTEREST_PROBS = "INTEREST_PROBS"
ALIGNMENT = "ALIGNMENT"
SCORE = "SCORE"

# --- models --------------------------------------------------------------------------------------
TOKENIZER = "tokenizer"
IMAGE_PREPROCESS = "image_preprocess"
ITEM_PREPROCESS = "item_preprocess"
ITEM_PREPROCESS_PIXELS = "item_preprocess_pixels"
TEXT_ENCODER = "text_encoder"
IMAGE_ENCODER = "image_encoder"
FUSION = "fusion"
SCORER = "scorer"
ITEM_ENCODER = "item_encoder"
ITEM_ENCODER_PIXELS = "item_encoder_pixels"
INTEREST_SCORER = "interest_scorer"
CATALOG_SCORER = "catalog_scorer"  # written by `mmrec index`, not by export

# the merged item_encoder (portable target): the members it runs, and their outputs in fusion order
ITEM_PIPELINE_MEMBERS = (TEXT_ENCODER, IMAGE_ENCODER, FUSION)
FUSION_OUTPUTS = (ITEM_EMBEDDING_MEMBER, INTEREST_PROBS_MEMBER, ALIGNMENT_MEMBER)
ITEM_OUTPUTS = (ITEM_EMBEDDING, INTEREST_PROBS, ALIGNMENT)
TEXT_FEATURES = (INPUT_IDS, ATTENTION_MASK)  # the tokenizer's outputs, the text encoder's inputs
