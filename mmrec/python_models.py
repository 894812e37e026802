"""Import the committed Triton python models as plain modules.

The tokenizer and image decoder code that runs inside Triton is the single source of truth for
preprocessing; export, the reference pipeline and the client import that same file from here.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from types import ModuleType

from .layout import SOURCES, RepositoryLayout, source_file
from .preprocess import PreprocessConfig


@lru_cache(maxsize=None)
def load_python_model(name: str) -> ModuleType:
    """Load model_repository/<name>/1/model.py under a private module name."""
    path = source_file(SOURCES.python_model(name))
    spec = importlib.util.spec_from_file_location(f"mmrec._python_models.{name}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def image_decoder(config: PreprocessConfig):
    """The server's ImageDecoder built from a PreprocessConfig."""
    module = load_python_model("image_preprocess")
    return module.decoder_from_parameters(config.image_parameters())


def text_tokenizer(config: PreprocessConfig, tokenizer_file: Path):
    """The server's TextTokenizer built from a PreprocessConfig and a tokenizer.json."""
    module = load_python_model("tokenizer")
    return module.TextTokenizer(tokenizer_file, config.max_seq_len, config.seq_buckets,
                                config.max_text_bytes)


def tokenizer_file_in(repository: Path) -> Path:
    return RepositoryLayout(repository).tokenizer_file()
