"""Fuzzing the server's own preprocessing code (the python models, imported as modules).

Properties: the tokenizer (TextTokenizer.decode_texts + __call__) and the image decoder
(ImageDecoder.decode / __call__) either return well-formed arrays or raise their typed error
(InvalidText / InvalidImage); nothing else escapes, and no input takes longer than the
per-example deadline (no hang). Image inputs are random bytes, byte-level mutations of real
PNG/JPEG/WebP/GIF files (flips, truncation, insertion, deletion, duplication), and valid
containers whose headers claim random dimensions (decompression bombs, zero sizes, 2^32-1).

    pytest tests/test_fuzz.py                                  # CI: FUZZ_CI_EXAMPLES per property
    pytest -m slow tests/test_fuzz.py -s                       # dedicated run: 10 000 per property
    MMREC_FUZZ_EXAMPLES=50000 pytest -m slow tests/test_fuzz.py -s

The dedicated run prints one `FUZZ {...}` JSON line per property (inputs, outcomes, slowest).
"""
from __future__ import annotations

import io
import json
import os
import struct
import time
from collections import Counter
from datetime import timedelta
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmrec.preprocess import ServedContract
from mmrec.model_repository.lib import image_preprocessing, text_preprocessing
from mmrec.model_repository.lib.image_preprocessing import ImageDecoder
from mmrec.model_repository.lib.text_preprocessing import TextTokenizer
from mmrec.layout import RepositoryLayout
from test_bad_inputs import jpeg_with_dims, png_header

FUZZ_CI_EXAMPLES = int(os.environ.get("MMREC_FUZZ_CI_EXAMPLES", "60"))  # x 4 properties ~ 240 inputs
FUZZ_EXAMPLES = int(os.environ.get("MMREC_FUZZ_EXAMPLES", "10000"))
# Generous for a shared 2-core machine (the slowest of 40 000 inputs took 3.8 s at load 16: garbage
# decoded into a ~40 M-pixel frame); a hang, or a bomb decoded past the limit, takes far longer.
DEADLINE = timedelta(milliseconds=int(os.environ.get("MMREC_FUZZ_DEADLINE_MS", "10000")))

tokenizer_module = text_preprocessing
image_module = image_preprocessing


def fuzz_settings(examples: int, ci: bool):
    return settings(max_examples=examples, deadline=DEADLINE, database=None, derandomize=ci,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


class Tally:
    """What a property saw: outcome counts and the slowest input, printed as one JSON line."""

    def __init__(self, name: str) -> None:
        self.name, self.outcomes, self.slowest = name, Counter(), 0.0

    def time(self, fn, *args):
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.slowest = max(self.slowest, time.perf_counter() - started)

    def report(self) -> dict:
        numbers = {"property": self.name, "inputs": sum(self.outcomes.values()),
                   "outcomes": dict(self.outcomes), "slowest_s": round(self.slowest, 3)}
        print("\nFUZZ " + json.dumps(numbers))
        return numbers


# ---- the code under test, built like the server builds it ------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(exported_repository):
    return TextTokenizer.for_contract(ServedContract.load(exported_repository), RepositoryLayout(exported_repository).tokenizer_file())


@lru_cache(maxsize=None)
def decoder():
    return ImageDecoder.for_contract(ServedContract())  # the default limits: 16 MiB, 40 M pixels


# ---- text -------------------------------------------------------------------------------------------

LIMIT = ServedContract().max_text_bytes
text_items = st.one_of(
    st.binary(max_size=300),
    st.text(st.characters(blacklist_categories=()), max_size=120),  # surrogates included
    st.text(max_size=120).map(lambda t: t.encode("utf-8")),
    st.integers(LIMIT - 4, LIMIT + 4).map(lambda n: ("é" * (n // 2) + "a" * (n % 2)).encode("utf-8")),
    st.sampled_from([b"", b" ", b"\t\n", b"\x00", "\u200b".encode(), b"\xef\xbb\xbf", "🙂".encode()[:3]]),
    st.integers(-5, 5),  # not bytes at all
)
valid_items = st.one_of(  # mostly tokenizable: exercises __call__ (buckets, truncation, padding)
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=600).map(lambda t: t.encode()),
    st.lists(st.sampled_from(["a", "cat", "🙂", "東京", "naïve", "\n", " ", "##", "[SEP]", "x" * 40]),
             min_size=1, max_size=300).map(lambda words: " ".join(words).encode()),
)
text_batches = st.one_of(st.lists(valid_items, min_size=1, max_size=6),
                         st.lists(text_items, max_size=6)).flatmap(
    lambda items: st.sampled_from([(len(items), 1), (len(items),)]).map(
        lambda shape: np.array(items + [None], dtype=object)[:-1].reshape(shape)))


def check_text(tokenizer, batch: np.ndarray, tally: Tally) -> None:
    try:
        texts = tally.time(tokenizer.decode_texts, batch)
    except tokenizer_module.InvalidText as err:
        assert str(err).startswith("TEXT"), err
        tally.outcomes["InvalidText"] += 1
        return
    ids, mask = tally.time(tokenizer, texts)
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape
    assert ids.shape[0] == len(texts) == batch.size
    assert ids.shape[1] in tokenizer.buckets
    lengths = mask.sum(axis=1)
    assert (lengths >= 1).all() and (lengths <= tokenizer.max_seq_len).all()
    assert (mask == (np.arange(ids.shape[1])[None, :] < lengths[:, None])).all()  # prefix of ones
    assert (ids >= 0).all() and (ids < tokenizer.tokenizer.get_vocab_size()).all()
    assert (ids[mask == 0] == 0).all()
    tally.outcomes["tokenized"] += 1


# ---- images -----------------------------------------------------------------------------------------

def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@lru_cache(maxsize=None)
def seeds() -> tuple[bytes, ...]:
    """Small real files of every kind the decoder accepts or must refuse."""
    from mmrec.export.data import load_items

    real = load_items()[0].image_bytes()  # a real Tux Paint stamp (RGBA PNG)
    base = Image.open(io.BytesIO(real)).convert("RGBA").resize((40, 32))
    rgb = base.convert("RGB")
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return (
        real,
        _encode(base, "PNG"), _encode(rgb, "PNG"), _encode(base.convert("L"), "PNG"),
        _encode(base.convert("LA"), "PNG"), _encode(base.convert("P"), "PNG", transparency=0),
        _encode(base.convert("1"), "PNG"), _encode(base.convert("I;16"), "PNG"),
        _encode(rgb, "JPEG", quality=80), _encode(rgb, "JPEG", progressive=True),
        _encode(base.convert("L"), "JPEG"), _encode(rgb.convert("CMYK"), "JPEG"),
        _encode(rgb, "WEBP", quality=80), _encode(base, "WEBP", lossless=True),
        _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        _encode(rgb, "GIF"), _encode(rgb, "BMP"), _encode(rgb, "TIFF"),
    )


JPEG_SEED, WEBP_SEED = 8, 12  # indexes into seeds()


@st.composite
def mutated_files(draw) -> bytes:
    data = bytearray(seeds()[draw(st.integers(0, len(seeds()) - 1))])
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "duplicate"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif op == "duplicate":
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 256))]
    return bytes(data)


DIMS = st.one_of(st.integers(0, 300), st.integers(0, 70_000), st.integers(0, 2**31 - 1),
                 st.sampled_from([0, 1, 6324, 6325, 40_000_000, 2**32 - 1]))


def webp_with_dims(webp: bytes, width: int, height: int) -> bytes:
    """A lossy WebP whose VP8 frame header claims width x height (14 bits each)."""
    data = bytearray(webp)
    start = data.find(b"\x9d\x01\x2a")
    if start < 0:
        raise ValueError("no VP8 start code")
    data[start + 3:start + 7] = struct.pack("<HH", width & 0x3FFF, height & 0x3FFF)
    return bytes(data)


@st.composite
def header_dims(draw) -> bytes:
    kind = draw(st.sampled_from(["png", "jpeg", "webp"]))
    if kind == "png":
        width, height = draw(DIMS) % 2**32, draw(DIMS) % 2**32
        idat = draw(st.one_of(st.just(b""), st.binary(max_size=64),
                              st.binary(max_size=256).map(lambda b: __import__("zlib").compress(b))))
        return png_header(width, height, idat, bit_depth=draw(st.sampled_from([1, 2, 4, 8, 16])),
                          color_type=draw(st.sampled_from([0, 2, 3, 4, 6])))
    if kind == "jpeg":
        return jpeg_with_dims(seeds()[JPEG_SEED], draw(DIMS) % 65536, draw(DIMS) % 65536)
    return webp_with_dims(seeds()[WEBP_SEED], draw(DIMS) % 16384, draw(DIMS) % 16384)


def check_image(data: bytes, tally: Tally) -> None:
    d = decoder()
    try:
        pixels = tally.time(d.decode, data, 3)
    except image_module.InvalidImage as err:
        assert str(err).startswith("IMAGE[3]"), err
        tally.outcomes["InvalidImage"] += 1
        return
    assert pixels.dtype == np.uint8 and pixels.shape == (d.image_size, d.image_size, 3)
    normalized = d.normalize(pixels[None])
    assert normalized.dtype == np.float32 and np.isfinite(normalized).all()
    tally.outcomes["decoded"] += 1


# ---- the properties: CI-sized and dedicated (slow) runs ---------------------------------------------

def _text_property(examples: int, ci: bool):
    tally = Tally("tokenizer: decode_texts + __call__")

    @fuzz_settings(examples, ci)
    @given(batch=text_batches)
    def run(tokenizer, batch):
        check_text(tokenizer, batch, tally)

    return run, tally


def _image_property(name: str, strategy, examples: int, ci: bool):
    tally = Tally(f"image decoder: {name}")

    @fuzz_settings(examples, ci)
    @given(data=strategy)
    def run(data):
        check_image(data, tally)

    return run, tally


IMAGE_STRATEGIES = {
    "random bytes": st.binary(max_size=2048),
    "mutated real PNG/JPEG/WebP/GIF/BMP/TIFF files": mutated_files(),
    "containers claiming random dimensions": header_dims(),
}


def test_fuzz_tokenizer_ci(tokenizer):
    run, tally = _text_property(FUZZ_CI_EXAMPLES, ci=True)
    run(tokenizer)
    assert sum(tally.outcomes.values()) >= 1


@pytest.mark.parametrize("name", list(IMAGE_STRATEGIES))
def test_fuzz_image_decoder_ci(name):
    run, tally = _image_property(name, IMAGE_STRATEGIES[name], FUZZ_CI_EXAMPLES, ci=True)
    run()
    assert sum(tally.outcomes.values()) >= 1


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_fuzz_tokenizer_dedicated(tokenizer):
    run, tally = _text_property(FUZZ_EXAMPLES, ci=False)
    run(tokenizer)
    assert tally.report()["inputs"] >= FUZZ_EXAMPLES


@pytest.mark.slow
@pytest.mark.timeout(7200)
@pytest.mark.parametrize("name", list(IMAGE_STRATEGIES))
def test_fuzz_image_decoder_dedicated(name):
    run, tally = _image_property(name, IMAGE_STRATEGIES[name], FUZZ_EXAMPLES, ci=False)
    run()
    assert tally.report()["inputs"] >= FUZZ_EXAMPLES


# ---- fixed regressions the fuzzers cover (cheap, exact) ---------------------------------------------

def test_surrogate_text_is_invalid_text_not_a_crash(tokenizer):
    with pytest.raises(tokenizer_module.InvalidText, match=r"TEXT\[1\] is not valid UTF-8"):
        tokenizer.decode_texts(np.array([["fine"], ["\ud800 lone surrogate"]], dtype=object))
    with pytest.raises(tokenizer_module.InvalidText, match=r"TEXT\[0\] must be UTF-8 bytes, got int"):
        tokenizer.decode_texts(np.array([[7]], dtype=object))


def test_long_thin_image_is_scaled_before_padding_not_a_huge_canvas():
    """1 x 40 000 pixels is within the pixel limit, but padding it to a square first would
    allocate 40 000 x 40 000 RGBA (6.4 GB); it must decode quickly with bounded memory."""
    d = image_module.ImageDecoder(224, (0.5,) * 3, (0.5,) * 3, (255,) * 3, 1 << 24, 40_000)
    strip = _encode(Image.new("RGB", (40_000, 1), (0, 0, 0)), "PNG")
    started = time.perf_counter()
    pixels = d.decode(strip)
    assert pixels.shape == (224, 224, 3) and time.perf_counter() - started < 5


def test_pillow_bomb_guard_is_reported_with_the_limit():
    with pytest.raises(image_module.InvalidImage, match=r"IMAGE\[0\] declares too many pixels, over the limit"):
        decoder().decode(png_header(100_000, 100_000))


def test_unsupported_but_valid_formats_are_refused():
    for data in seeds()[-3:]:  # GIF, BMP, TIFF
        with pytest.raises(image_module.InvalidImage, match="not a decodable JPEG/PNG/WebP image"):
            decoder().decode(data)
