"""The feature pass's disk cache: a hit is the fresh computation bit for bit, a bad entry is
recomputed, and every input that decides the features is part of the key. Real encoders on a
few real items; every cache lives in the test's own folder."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from mmrec.export import feature_cache as fc
from mmrec.export.data import categories_of, dataset_fingerprint, load_items
from mmrec.export.errors import ExportError
from mmrec.export.feature_cache import FeatureCache, SourceHashes, feature_key
from mmrec.export.features import CONTRACT_FIELDS, encode_dataset
from mmrec.export.manifest import sha256_file, sha256_tree
from mmrec.export.models.image import DEFAULT_IMAGE_ENCODER, load_image_encoder
from mmrec.export.models.text import load_text_encoder, text_hidden_size
from mmrec.model_repository.lib.image_preprocessing import ImageDecoder
from mmrec.model_repository.lib.text_preprocessing import TextTokenizer
from mmrec.preprocess import TOKENIZER_FILE, ServedContract

ITEMS = 6


@dataclasses.dataclass
class Sources:
    text_model: object
    image_model: object
    tokenizer_file: Path
    items: list
    contract: ServedContract
    hashes: SourceHashes


@pytest.fixture(scope="module")
def sources() -> Sources:
    text_model, text_folder = load_text_encoder()
    image_model, entry, weights = load_image_encoder()
    items = load_items()[::150][:ITEMS]  # a few items from several categories
    contract = ServedContract(image_size=entry.image_size, image_mean=entry.mean, image_std=entry.std,
                              categories=categories_of(items), text_dim=text_hidden_size(text_model),
                              image_dim=entry.feature_dim)
    hashes = SourceHashes(sha256_tree(text_folder), sha256_file(weights), dataset_fingerprint(items))
    return Sources(text_model, image_model, text_folder / TOKENIZER_FILE, items, contract, hashes)


@pytest.fixture(scope="module")
def fresh(sources):
    """The pass without any cache: what every cached result must equal."""
    return encode_dataset(sources.text_model, sources.image_model, sources.contract, sources.tokenizer_file,
                          sources.items)


def _cache(sources: Sources, folder: Path) -> FeatureCache:
    return FeatureCache.for_sources(sources.hashes, DEFAULT_IMAGE_ENCODER, sources.contract, folder)


def _encode(sources: Sources, cache: FeatureCache, messages: list[str], encoders: bool = True):
    models = (sources.text_model, sources.image_model) if encoders else (None, None)
    return encode_dataset(*models, sources.contract, sources.tokenizer_file, sources.items,
                          cache=cache, report=messages.append)


def _assert_bitwise_equal(got, want) -> None:
    for name in ("text", "image", "labels"):
        a, b = getattr(got.features, name), getattr(want.features, name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
    assert got.pixels.tobytes() == want.pixels.tobytes()


def test_a_hit_is_the_fresh_computation_bit_for_bit(sources, fresh, tmp_path):
    cache, messages = _cache(sources, tmp_path), []
    stored = _encode(sources, cache, messages)
    assert messages == [f"features: cache miss {cache.key[:12]}, stored"] and cache.path.is_file()
    _assert_bitwise_equal(stored, fresh)
    # no encoders this time: a hit must not need them
    hit = _encode(sources, cache, messages, encoders=False)
    assert messages[-1] == f"features: cache hit {cache.key[:12]}"
    _assert_bitwise_equal(hit, fresh)
    assert [p.name for p in tmp_path.iterdir()] == [cache.path.name]  # no temporary file left behind


def _damage(cache: FeatureCache, fresh, how: str) -> None:
    cache.store(fresh.features.text, fresh.features.image)
    if how == "garbage":
        cache.path.write_bytes(b"not an npz file" * 100)
    elif how == "truncated":
        cache.path.write_bytes(cache.path.read_bytes()[:1000])
    elif how == "empty":
        cache.path.write_bytes(b"")
    elif how == "other_key":  # an entry renamed or copied under the wrong name
        FeatureCache("0" * 64, cache.folder).store(fresh.features.text, fresh.features.image)
        (cache.folder / f"{'0' * 64}.npz").replace(cache.path)
    else:  # rows of another item list
        cache.store(fresh.features.text[:2], fresh.features.image[:2])


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty", "other_key", "wrong_rows"])
def test_a_damaged_entry_is_no_entry(sources, fresh, tmp_path, how):
    cache = _cache(sources, tmp_path)
    _damage(cache, fresh, how)
    assert cache.load(ITEMS) is None


def test_a_damaged_entry_is_recomputed_and_replaced(sources, fresh, tmp_path):
    cache = _cache(sources, tmp_path)
    _damage(cache, fresh, "truncated")
    messages: list[str] = []
    again = _encode(sources, cache, messages)
    assert messages == [f"features: cache miss {cache.key[:12]}, stored"]
    _assert_bitwise_equal(again, fresh)
    text, image = cache.load(ITEMS)  # the recomputed entry replaced the bad one
    assert text.tobytes() == fresh.features.text.tobytes() and image.tobytes() == fresh.features.image.tobytes()


def test_an_unwritable_cache_costs_time_not_the_export(fresh, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    cache = FeatureCache("a" * 64, blocked / "features")
    reason = cache.store(fresh.features.text, fresh.features.image)
    assert reason and "a-file" in reason and cache.load(ITEMS) is None
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_every_input_that_decides_the_features_is_in_the_key(sources, tmp_path, monkeypatch):
    base = feature_key(sources.hashes, DEFAULT_IMAGE_ENCODER, sources.contract)
    assert feature_key(sources.hashes, DEFAULT_IMAGE_ENCODER, sources.contract) == base
    changed = {
        "text model": (dataclasses.replace(sources.hashes, text_model="1" * 64), DEFAULT_IMAGE_ENCODER, sources.contract),
        "image weights": (dataclasses.replace(sources.hashes, image_weights="1" * 64), DEFAULT_IMAGE_ENCODER,
                          sources.contract),
        "dataset": (dataclasses.replace(sources.hashes, dataset="1" * 64), DEFAULT_IMAGE_ENCODER, sources.contract),
        "image encoder": (sources.hashes, "efficientnet-b0", sources.contract),
        "max_seq_len": (sources.hashes, DEFAULT_IMAGE_ENCODER, dataclasses.replace(sources.contract, max_seq_len=64)),
        "image_fit": (sources.hashes, DEFAULT_IMAGE_ENCODER, dataclasses.replace(sources.contract, image_fit="pad")),
        "image_std": (sources.hashes, DEFAULT_IMAGE_ENCODER,
                      dataclasses.replace(sources.contract, image_std=(0.2, 0.2, 0.2))),
    }
    for what, args in changed.items():
        assert feature_key(*args) != base, what
    # a field the pass does not read shares the entry: exports differing only in it hit
    assert feature_key(sources.hashes, DEFAULT_IMAGE_ENCODER,
                       dataclasses.replace(sources.contract, max_batch_size=8)) == base
    # the code that computes the features, and the packages it runs on
    code = tmp_path / "features_copy.py"
    code.write_text("A = 1\n")
    monkeypatch.setattr(fc, "code_files", lambda: [code])
    before = feature_key(sources.hashes, DEFAULT_IMAGE_ENCODER, sources.contract)
    code.write_text("A = 2\n")
    assert feature_key(sources.hashes, DEFAULT_IMAGE_ENCODER, sources.contract) != before
    monkeypatch.setattr(fc, "_version", lambda name: "0.0-other" if name == "torch" else "1")
    assert feature_key(sources.hashes, DEFAULT_IMAGE_ENCODER, sources.contract) != before
    # and a different key finds nothing where the other one was stored
    _cache(sources, tmp_path).store(np.zeros((ITEMS, 4), np.float32), np.zeros((ITEMS, 4), np.float32))
    assert FeatureCache(before, tmp_path).load(ITEMS) is None


def test_the_key_names_every_contract_field_the_pass_reads(sources):
    """A field the tokenizer, the decoder or the labels read but the key left out would let two
    different contracts share one entry."""
    class Recorder:
        def __init__(self, contract: ServedContract) -> None:
            self.contract, self.read = contract, set()

        def __getattr__(self, name: str):
            self.read.add(name)
            return getattr(self.contract, name)

    recorder = Recorder(sources.contract)
    TextTokenizer.for_contract(recorder, sources.tokenizer_file)
    ImageDecoder.for_contract(recorder)
    encode_dataset(sources.text_model, sources.image_model, recorder, sources.tokenizer_file, sources.items[:2])
    assert recorder.read and recorder.read <= set(CONTRACT_FIELDS), recorder.read - set(CONTRACT_FIELDS)


def test_old_entries_are_pruned(tmp_path):
    rows = np.zeros((2, 3), np.float32)
    for index in range(fc.MAX_ENTRIES + 3):
        FeatureCache(f"{index:064d}", tmp_path).store(rows, rows)
    kept = sorted(p.name for p in tmp_path.glob("*.npz"))
    assert len(kept) == fc.MAX_ENTRIES and f"{fc.MAX_ENTRIES + 2:064d}.npz" in kept


def test_cli_no_feature_cache_reaches_the_exporter(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from mmrec.cli import app
    from mmrec.export import pipeline

    seen = []

    def run(self):
        seen.append(self.options.feature_cache)
        raise ExportError("stopped before any work")

    monkeypatch.setattr(pipeline.Exporter, "run", run)
    for flags, expected in (([], True), (["--no-feature-cache"], False)):
        result = CliRunner().invoke(app, ["export", "-o", str(tmp_path / "o"), *flags])
        assert result.exit_code == 2 and "stopped before any work" in result.output, result.output
        assert seen[-1] is expected
