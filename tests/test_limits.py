"""Request limits: configurable at export, written into the python models' configs, enforced by
the server (and checked by the client before sending where it can).

The small-limits repository is written from the default export's ONNX files with
export.repository.write_repository and a ServedContract carrying small limits, exactly what
`mmrec export --max-image-bytes ... --max-image-pixels ... --max-text-bytes ... --max-batch-size ...`
produces, without re-running the ~1 min export.
"""
from __future__ import annotations

import dataclasses
import re
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tritonclient.utils import InferenceServerException

from mmrec import schema
from mmrec.client import InvalidItemError, InvalidRequestError, MMRecClient
from mmrec.export.errors import ExportError
from mmrec.export.pipeline import ExportOptions
from mmrec.export.repository import CONFIG_FILE, RepositoryPlan, Target, parse, write_repository
from mmrec.preprocess import TOKENIZER_FILE, ServedContract
from test_bad_inputs import OUTPUTS, PROTOCOLS, STATUS, TOLERANCE, column, infer

SMALL = dict(max_image_bytes=12_000, max_image_pixels=64 * 64, max_text_bytes=64, max_batch_size=4)


def png(width: int, height: int, noise: bool = False) -> bytes:
    if noise:  # incompressible: 64x64 RGBA noise is ~16.5 KB, over 12 000 bytes at 4096 pixels
        array = np.random.default_rng(0).integers(0, 256, (height, width, 4), dtype=np.uint8)
        image = Image.fromarray(array, "RGBA")
    else:
        image = Image.new("RGB", (width, height), (30, 160, 90))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


SMALL_PNG = png(64, 64)  # exactly at the pixel limit, ~160 bytes
WIDE_PNG = png(65, 64)  # one column over the pixel limit
HEAVY_PNG = png(64, 64, noise=True)  # within the pixel limit, over the byte limit
TEXT_AT_LIMIT = "a" * 64
TEXT_OVER = "é" * 33  # 33 characters, 66 UTF-8 bytes: the limit counts bytes


def small_plan(source: Path, **limits) -> RepositoryPlan:
    preprocess = dataclasses.replace(ServedContract.load(source), **limits)
    return RepositoryPlan(Target.portable, preprocess,
                            {name: source / name / "1" / "model.onnx" for name in schema.ONNX_MODELS},
                            source / schema.TOKENIZER / "1" / TOKENIZER_FILE)


@pytest.fixture(scope="module")
def small_repository(exported_repository, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("limits") / "repository"
    write_repository(small_plan(Path(exported_repository), **SMALL), output)
    return output


@pytest.fixture(scope="module")
def small_server(small_repository, tmp_path_factory):
    from mmrec.server import ServerConfig, TritonServer, free_ports

    http, grpc, metrics = free_ports(3)
    config = ServerConfig(repository=small_repository, http_port=http, grpc_port=grpc, metrics_port=metrics)
    log = tmp_path_factory.mktemp("limits-triton") / "tritonserver.log"
    with TritonServer(config, log_path=log, ready_timeout_s=240) as server:
        yield server


# ---- export options -> configs (no server) --------------------------------------------------------

def test_export_cli_passes_limit_options(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import mmrec.export.pipeline as export_pipeline
    from mmrec.cli import app

    captured = {}

    class StopExporter:
        def __init__(self, options, reporter=None):
            captured["options"] = options

        def run(self):
            raise ExportError("stopped by the test before any work")

    monkeypatch.setattr(export_pipeline, "Exporter", StopExporter)  # the command imports it when it runs
    result = CliRunner().invoke(app, ["export", "-o", str(tmp_path / "repo"), "--max-image-bytes", "12000",
                                      "--max-image-pixels", "4096", "--max-text-bytes", "64",
                                      "--max-batch-size", "4"])
    assert result.exit_code == 2, result.output
    options = captured["options"]
    assert (options.max_image_bytes, options.max_image_pixels, options.max_text_bytes,
            options.max_batch_size) == (12_000, 4096, 64, 4)


@pytest.mark.parametrize("field, flag", [("max_image_bytes", "--max-image-bytes"),
                                         ("max_image_pixels", "--max-image-pixels"),
                                         ("max_text_bytes", "--max-text-bytes")])
def test_export_rejects_non_positive_limits_before_any_work(field, flag):
    with pytest.raises(ExportError, match=f"{flag} must be at least 1, got 0"):
        ExportOptions(**{field: 0}).validate()


def test_export_sources_carry_the_limits_into_preprocess_config():
    from mmrec.export.pipeline import load_sources

    sources = load_sources(ExportOptions(max_image_bytes=1234, max_image_pixels=5678, max_text_bytes=91,
                                         max_batch_size=4))
    p = sources.preprocess
    assert (p.max_image_bytes, p.max_image_pixels, p.max_text_bytes, p.max_batch_size) == (1234, 5678, 91, 4)


def test_limits_are_written_into_configs_and_preprocess_json(small_repository):
    assert {k: getattr(ServedContract.load(small_repository), k) for k in SMALL} == SMALL
    expected = {"max_text_bytes": "64", "max_image_bytes": "12000", "max_image_pixels": "4096"}
    checked = 0
    for path in sorted(small_repository.glob(f"*/{CONFIG_FILE}")):
        config = parse(path.read_text())
        assert config.max_batch_size == 4, path
        parameters = {k: v.string_value for k, v in config.parameters.items()}
        for key, value in expected.items():
            if key in parameters:
                assert parameters[key] == value, (path, key)
                checked += 1
    assert checked >= 3  # tokenizer + image_preprocess (+ any combined preprocess step)


# ---- the server enforces them --------------------------------------------------------------------

CASES = [  # name, text, images, message (None: accepted)
    ("text_at_limit_accepted", TEXT_AT_LIMIT, [SMALL_PNG], None),
    ("text_over_limit", TEXT_OVER, [SMALL_PNG], r"TEXT\[0\] is 66 bytes, over the limit of 64 bytes"),
    ("image_at_pixel_limit_accepted", "a red square", [SMALL_PNG], None),
    ("image_over_pixel_limit", "a wide square", [WIDE_PNG], r"IMAGE\[0\] is 65x64 pixels, over the limit of 4096"),
    ("image_over_byte_limit", "noise", [HEAVY_PNG],
     rf"IMAGE\[0\] is {len(HEAVY_PNG)} bytes, over the limit of 12000 bytes"),
    ("batch_at_limit_accepted", "item", [SMALL_PNG] * 4, None),
    ("batch_over_limit", "item", [SMALL_PNG] * 5, r"batch-size must be <= 4"),
]


@pytest.mark.server
@pytest.mark.timeout(300)
@pytest.mark.parametrize("protocol", list(PROTOCOLS))
@pytest.mark.parametrize("name, text, images, message", CASES, ids=[c[0] for c in CASES])
def test_small_limits_are_enforced_by_the_server(small_server, reference, protocol, name, text, images, message):
    assert len(HEAVY_PNG) > SMALL["max_image_bytes"]
    module = PROTOCOLS[protocol]
    client = module.InferenceServerClient(small_server.urls[protocol])
    tensors = {schema.TEXT: (column([text.encode()] * len(images)), "BYTES"),
               schema.IMAGE: (column(images), "BYTES")}
    try:
        if message is None:
            got = infer(client, protocol, schema.ITEM_ENCODER, tensors, OUTPUTS[schema.ITEM_ENCODER])
            want = reference.encode_items([text] * len(images), images)
            for output in OUTPUTS[schema.ITEM_ENCODER]:
                np.testing.assert_allclose(got[output], want[output], atol=TOLERANCE, rtol=0)
        else:
            with pytest.raises(InferenceServerException) as raised:
                infer(client, protocol, schema.ITEM_ENCODER, tensors, OUTPUTS[schema.ITEM_ENCODER])
            assert str(raised.value.status()) == STATUS[(protocol, "INVALID_ARGUMENT")]
            assert re.search(message, raised.value.message() or ""), raised.value.message()
    finally:
        client.close()


# ---- the client checks before sending (where it exposes the check) ---------------------------------

def _item_encoder_requests(url: str) -> int:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics(schema.ITEM_ENCODER).model_stats[0].inference_stats
        return stats.success.count + stats.fail.count


CLIENT_CASES = [  # name, (text, image), local_preprocessing
    ("text_over_limit", (TEXT_OVER, SMALL_PNG), False),
    ("image_over_byte_limit", ("noise", HEAVY_PNG), False),
    ("image_over_pixel_limit_local_decode", ("wide", WIDE_PNG), True),
]


@pytest.mark.server
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name, item, local", CLIENT_CASES, ids=[c[0] for c in CLIENT_CASES])
def test_client_rejects_over_limit_items_before_sending(small_server, name, item, local):
    url = small_server.urls["grpc"]
    with MMRecClient(url, local_preprocessing=local) as client:
        limits = client.server_info.limits
        assert (limits.max_text_bytes, limits.max_image_bytes) == (64, 12_000)
        before = _item_encoder_requests(url)
        with pytest.raises(InvalidItemError) as raised:
            client.encode_items([("fine", SMALL_PNG), item])
        assert raised.value.index == 1, raised.value
        assert "over" in str(raised.value) and "limit" in str(raised.value)
    assert _item_encoder_requests(url) == before  # nothing went over the wire


@pytest.mark.server
@pytest.mark.timeout(300)
def test_client_without_local_decoding_leaves_the_pixel_limit_to_the_server(small_server):
    """The pixel count is in the image header; without local_preprocessing the client does not parse
    it, so the server's INVALID_ARGUMENT comes back typed, naming the item."""
    with MMRecClient(small_server.urls["grpc"]) as client:
        with pytest.raises(InvalidRequestError) as raised:
            client.encode_items([("fine", SMALL_PNG), ("wide", WIDE_PNG)])
    assert "65x64 pixels, over the limit of 4096" in str(raised.value)
    assert raised.value.index == 1


@pytest.mark.server
@pytest.mark.timeout(300)
def test_client_splits_calls_into_batches_within_the_server_limit(small_server, reference):
    items = [(f"item {i}", SMALL_PNG) for i in range(10)]
    with MMRecClient(small_server.urls["grpc"]) as client:
        assert client.server_info.max_batch_size == 4
        encoded = client.encode_items(items)
    want = reference.encode_items([t for t, _ in items], [i for _, i in items])
    np.testing.assert_allclose(np.asarray(encoded.item_embedding), want[schema.ITEM_EMBEDDING], atol=TOLERANCE)
