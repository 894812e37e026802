"""The served contract's names for mmrec code (`ServedContract`, `DEFAULT_*`).

The contract itself lives in `mmrec.model_repository.lib.served_contract`, the bottom layer, so
the thin Triton models (which cannot import mmrec) read the very same class.
"""
from __future__ import annotations

from mmrec.model_repository.lib.served_contract import (  # noqa: F401 - re-exported names
    CONTRACT_FILE, DEFAULT_IMAGE_FIT, DEFAULT_IMAGE_SIZE, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_TEXT_BYTES, DEFAULT_SEQ_BUCKETS, IMAGE_FITS,
    EXPORT_CHOICES, TOKENIZER_FILE, ContractError, ServedContract, check_export_choices, normalize_buckets,
    parse_buckets)

PREPROCESS_FILE = CONTRACT_FILE
