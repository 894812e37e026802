"""The Triton python models' logic, imported outside the server (same files Triton runs)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mmrec.preprocess import ServedContract
from mmrec.model_repository.lib import image_preprocessing, text_preprocessing
from mmrec.model_repository.lib.image_preprocessing import ImageDecoder
from mmrec.model_repository.lib.text_preprocessing import TextTokenizer
from mmrec.export.models.text import default_text_model_dir

CONFIG = ServedContract(max_image_bytes=200_000, max_image_pixels=1_000_000, max_text_bytes=64)


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer.for_contract(CONFIG, default_text_model_dir() / "tokenizer.json")


def png(width: int, height: int, mode: str = "RGBA") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), (10, 20, 30, 128)[: len(mode)]).save(buffer, "PNG")
    return buffer.getvalue()


def test_tokenizer_pads_to_the_smallest_bucket_and_masks_padding(tokenizer):
    ids, mask = tokenizer(["a frog.", "a red kangaroo in the desert"])
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == np.int64
    assert mask[0].sum() < mask[1].sum() and np.all(ids[mask == 0] == 0)
    long_ids, _ = tokenizer(["word " * 500])
    assert long_ids.shape == (1, CONFIG.max_seq_len)


@pytest.mark.parametrize("raw, message", [
    ([b""], r"TEXT\[0\] is empty"),
    ([b"ok", b"   "], r"TEXT\[1\] is empty or whitespace"),
    ([b"\xff\xfe"], r"TEXT\[0\] is not valid UTF-8"),
    ([b"x" * 65], r"TEXT\[0\] is 65 bytes, over the limit of 64"),
])
def test_tokenizer_rejects_bad_text_naming_the_item(tokenizer, raw, message):
    module = text_preprocessing
    with pytest.raises(module.InvalidText, match=message):
        tokenizer.decode_texts(np.array([[r] for r in raw], dtype=object))


def test_decoder_flattens_alpha_pads_to_square_and_normalizes():
    from dataclasses import replace

    decoder = ImageDecoder.for_contract(replace(CONFIG, image_fit="pad"))
    pixels = decoder([png(40, 20), png(10, 10, "RGB")])
    assert pixels.shape == (2, 3, 224, 224) and pixels.dtype == np.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert np.allclose(pixels[0, :, 0, 112], 1.0)  # padding band is the white background


@pytest.mark.parametrize("mode, key", [("RGB", (0, 0, 0)), ("L", 0)])
def test_decoder_honours_a_colour_key(mode, key):
    """PNG tRNS colour keys are transparency too: keyed pixels become the white background."""
    from dataclasses import replace

    image = Image.new(mode, (40, 40), key)
    image.paste((255, 0, 0) if mode == "RGB" else 128, (15, 15, 25, 25))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=key)
    pixels = ImageDecoder.for_contract(replace(CONFIG, image_fit="pad"))([buffer.getvalue()])[0]
    assert np.allclose(pixels[:, 2, 2], 1.0)  # a keyed corner pixel is the background, not black


def test_decoder_crops_the_centre_square_by_default():
    """The centre of a wide image fills the square; the left and right ends are cut."""
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    image.paste((0, 0, 255), (100, 0, 200, 100))  # blue centre third
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    pixels = ImageDecoder.for_contract(CONFIG)([buffer.getvalue()])[0]
    assert CONFIG.image_fit == "crop"
    assert np.allclose(pixels[:, 5:-5, 5:-5], np.array([-1, -1, 1]).reshape(3, 1, 1), atol=0.02)


def test_ort_runner_thread_budget(monkeypatch):
    from mmrec.model_repository.lib import runtime as runner  # the runner's copy of this module
    monkeypatch.delenv(runner.THREADS_ENV, raising=False)
    assert runner.thread_budget(3, 2) == 3  # an explicit count wins
    assert runner.thread_budget(0, 2) == max(1, runner.usable_cores() // 2)
    monkeypatch.setenv(runner.THREADS_ENV, "8")  # the chart's CPU limit
    assert runner.thread_budget(0, 2) == 4 and runner.thread_budget(0, 1) == 8


@pytest.mark.parametrize("data, message", [
    (b"", "is empty"),
    (b"GIF89a" + b"\x00" * 20, "not a decodable JPEG/PNG/WebP"),
    (png(2000, 1000), "over the limit of 1000000 pixels"),
    (b"\x89PNG" + b"\x00" * 300_000, "over the limit of 200000 bytes"),
    (png(64, 64)[:60], "not a decodable"),
])
def test_decoder_rejects_bad_images_before_decoding_them(data, message):
    module = image_preprocessing
    with pytest.raises(module.InvalidImage, match=message):
        ImageDecoder.for_contract(CONFIG).decode(data, 0)


def test_item_preprocess_checks_client_pixels():
    module = image_preprocessing
    good = np.zeros((2, 3, 224, 224), np.float32)
    assert module.check_pixels(good, 224) is good
    bad = good.copy()
    bad[1, 0, 0, 0] = np.nan
    with pytest.raises(module.InvalidPixels, match=r"PIXEL_VALUES\[1\] contains NaN"):
        module.check_pixels(bad, 224)
    with pytest.raises(module.InvalidPixels, match="must be"):
        module.check_pixels(good[:, :, :100], 224)


def test_ort_runner_pads_ragged_requests_with_zeros():
    from mmrec.model_repository.lib import runtime as runner
    out = runner.pad_and_concatenate([np.ones((1, 3), np.int64), np.ones((2, 5), np.int64)])
    assert out.shape == (3, 5) and out[0, 3:].sum() == 0 and out[1:].sum() == 10
