"""A disk cache for the PyTorch feature pass: the encoders' outputs over every item.

The pass takes tens of seconds and its result is a pure function of the inputs named in
`feature_key`; every export of the same sources on the same machine (the test suite runs
several) reads it back instead. Only the encoder outputs are stored: decoding the pixels is
cheap and they are needed anyway. A missing, corrupt or foreign entry is recomputed, never an
error, and an entry is replaced atomically (temporary file + rename), so a crash or a second
export writing the same key never leaves half a file under the final name.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mmrec.machine import cpu_info, default_cache_dir
from mmrec.model_repository.lib import image_preprocessing, served_contract, text_preprocessing
from mmrec.preprocess import ServedContract
from . import features, models

CACHE_FORMAT = 1  # bump when the stored arrays change meaning
FOLDER = "features"
MAX_ENTRIES = 8  # newest kept; each is a few MB
# Packages whose code computes the features: tokenization, decoding, both encoders, the math.
FEATURE_PACKAGES = ("torch", "transformers", "tokenizers", "numpy", "pillow", "efficientnet-lite-pytorch",
                    "safetensors")


@dataclass(frozen=True)
class SourceHashes:
    """sha256 of each source, computed once per export: the manifest records them and the
    feature cache is keyed by them."""

    text_model: str  # the text model folder (weights, config, tokenizer.json)
    image_weights: str
    dataset: str  # ids, captions and image bytes, in order


def code_files() -> list[Path]:
    """The source files whose code decides the features (a change in any of them is a miss)."""
    files = [Path(features.__file__), Path(__file__), Path(image_preprocessing.__file__),
             Path(text_preprocessing.__file__), Path(served_contract.__file__)]
    files += sorted(Path(models.__file__).parent.glob("*.py"))
    return files


def feature_key(hashes: SourceHashes, image_encoder: str, contract: ServedContract) -> str:
    """sha256 of everything that decides the feature pass's output on this machine: the sources,
    the contract fields the pass reads, the code and package versions that compute it, and the
    CPU (float32 kernels differ between instruction sets in the last bits)."""
    cpu = cpu_info()
    identity = {
        "format": CACHE_FORMAT,
        "sources": asdict(hashes),
        "image_encoder": image_encoder,
        "contract": {name: getattr(contract, name) for name in features.CONTRACT_FIELDS},
        "packages": {name: _version(name) for name in FEATURE_PACKAGES},
        "code": {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in code_files()},
        "cpu": {"model": cpu["model"], "vendor": cpu["vendor"], "flags": cpu["flags"],
                "torch_capability": torch.backends.cpu.get_cpu_capability()},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


class FeatureCache:
    """One entry: `<cache>/features/<key>.npz` holding the text and image features."""

    def __init__(self, key: str, folder: Path | None = None) -> None:
        self.key = key
        self.folder = Path(folder) if folder is not None else default_cache_dir() / FOLDER
        self.path = self.folder / f"{key}.npz"

    @classmethod
    def for_sources(cls, hashes: SourceHashes, image_encoder: str, contract: ServedContract,
                    folder: Path | None = None) -> "FeatureCache":
        return cls(feature_key(hashes, image_encoder, contract), folder)

    def load(self, items: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(text, image) features of `items` rows, or None when there is no usable entry."""
        try:
            with np.load(self.path, allow_pickle=False) as data:
                key, text, image = str(data["key"]), data["text"], data["image"]
        except FileNotFoundError:
            return None
        except Exception:  # truncated, corrupt, not an npz, unreadable: numpy raises many types
            return None
        usable = (key == self.key and all(a.dtype == np.float32 and a.ndim == 2 and len(a) == items
                                          for a in (text, image)))
        if not usable:
            return None
        try:
            os.utime(self.path)  # recently used: kept by the pruning
        except OSError:
            pass
        return text, image

    def store(self, text: np.ndarray, image: np.ndarray) -> str | None:
        """Write the entry atomically; returns why it could not be written (None when it was):
        a cache that cannot be written costs time, never the export."""
        tmp = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{self.key[:12]}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.savez(f, key=np.array(self.key), text=text, image=image)
            os.replace(tmp, self.path)
        except OSError as err:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            return f"{type(err).__name__}: {err}"
        self._prune()
        return None

    def _prune(self) -> None:
        """Keep the MAX_ENTRIES most recently used entries (keys change with every code edit)."""
        entries = []
        for path in self.folder.glob("*.npz"):
            try:
                entries.append((path.stat().st_mtime, path))
            except OSError:
                continue
        for _, path in sorted(entries, reverse=True)[MAX_ENTRIES:]:
            path.unlink(missing_ok=True)
