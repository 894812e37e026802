"""The generated repository on the real tritonserver: outputs equal the reference pipeline's."""
from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from mmrec import schema
from mmrec.export.repository import (CONFIG_FILE, ITEM_PIPELINE_MEMBERS, RepositoryPlan, Target, all_configs,
                                     merged_ensembles, parse, render)
from mmrec.preprocess import ServedContract

TOLERANCE = 1e-4
PUBLIC_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
PROTOCOLS = {"grpc": grpcclient, "http": httpclient}


# ---- configs: every target, no server needed ---------------------------------------------------

@pytest.mark.parametrize("target", list(Target))
def test_every_generated_config_parses_into_model_config(target, tmp_path):
    layout = RepositoryPlan(target, ServedContract(categories=("a", "b", "c")), {}, tmp_path / "t.json",
                              gpu=target is not Target.portable)
    configs = all_configs(layout)
    assert set(configs) == set(schema.PYTHON_MODELS + schema.ONNX_MODELS + schema.ENSEMBLES)
    for name, config in configs.items():
        again = parse(render(config))
        assert again == config and again.name == name
        for tensor in list(again.input) + list(again.output):
            assert PUBLIC_NAME.match(tensor.name), f"{name}: auto-generated tensor name {tensor.name!r}"
    members = {n: c for n, c in configs.items() if n not in schema.ENSEMBLES}
    merged = merged_ensembles(target)
    for name in merged:  # one python model (portable): dynamically batched, runs the members' graphs
        model = configs[name]
        assert model.backend == "python" and model.HasField("dynamic_batching")
        assert model.dynamic_batching.max_queue_delay_microseconds == 0  # CPU
        assert model.max_batch_size == members[schema.TEXT_ENCODER].max_batch_size
        parameters = {k: v.string_value for k, v in model.parameters.items()}
        for member in ITEM_PIPELINE_MEMBERS:  # the same runner settings as the member's own config
            own = {k: v.string_value for k, v in members[member].parameters.items()}
            assert parameters[f"{member}.model_file"] == f"../{member}/1/model.onnx"
            for key in ("runtime", "precision", "intra_op_threads", "seq_buckets"):
                assert parameters.get(f"{member}.{key}") == own.get(key), (member, key)
        # its own core shares: text on a worker beside the image branch, which then gets every core
        assert (parameters["text_encoder.cpu_share"], parameters["image_encoder.cpu_share"]) == ("2", "1")
    for name in set(schema.ENSEMBLES) - set(merged):
        ensemble = configs[name]
        assert ensemble.platform == "ensemble" and not ensemble.HasField("dynamic_batching")
        for step in ensemble.ensemble_scheduling.step:  # a member, or (portable) the item engine
            assert ensemble.max_batch_size <= configs[step.model_name].max_batch_size
            if merged:  # each graph loaded once: the public ensembles route through the engine
                assert step.model_name in (*merged, schema.SCORER), (name, step.model_name)
    for name in schema.ONNX_MODELS:
        member = configs[name]
        assert member.HasField("dynamic_batching")
        # CPU: no queue delay on the critical path at low load; GPU: a delay that pays for itself
        delayed = member.dynamic_batching.max_queue_delay_microseconds > 0
        on_gpu = target in (Target.onnxruntime, Target.tensorrt)  # plan.gpu set above; OpenVINO: CPU
        assert delayed == on_gpu, (target, name)
        assert (member.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU) == on_gpu, (target, name)
        if target is Target.portable:
            threads = {k: v.string_value for k, v in member.parameters.items()}
            encoder = name in (schema.TEXT_ENCODER, schema.IMAGE_ENCODER)
            assert threads["cpu_share"] == ("2" if encoder else "1")
            assert threads["intra_op_threads"] == ("0" if encoder else "1")
            assert (threads["runtime"], threads["precision"]) == ("onnxruntime", "fp32")  # until tuned
        if target is Target.openvino:  # the OpenVINO backend reads the ONNX file itself
            properties = {k: v.string_value for k, v in member.parameters.items()}
            assert member.default_model_filename == "model.onnx"
            # only keys the backend reads (it drops others silently); FP32 = no BF16 hint
            assert properties["NUM_STREAMS"] == "1" and "HINT_BF16" not in properties
            assert set(properties) - {"categories"} <= {"NUM_STREAMS", "PERFORMANCE_HINT", "INFERENCE_NUM_THREADS",
                                                        "HINT_BF16"}
        expected = {Target.portable: ("python", ""), Target.onnxruntime: ("onnxruntime", ""),
                    Target.openvino: ("openvino", ""), Target.tensorrt: ("", "tensorrt_plan")}[target]
        assert (member.backend, member.platform) == expected


def test_written_repository_configs_parse(exported_repository):
    for path in Path(exported_repository).glob(f"*/{CONFIG_FILE}"):
        config = parse(path.read_text())
        assert config.name == path.parent.name


# ---- the real server ---------------------------------------------------------------------------

def _infer(protocol: str, url: str, model: str, tensors: dict[str, np.ndarray], outputs: list[str]):
    module = PROTOCOLS[protocol]
    client = module.InferenceServerClient(url)
    inputs = []
    for name, array in tensors.items():
        dtype = "BYTES" if array.dtype == object else {"float32": "FP32"}[array.dtype.name]
        tensor = module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer(model, inputs, outputs=[module.InferRequestedOutput(o) for o in outputs])
    return {o: result.as_numpy(o) for o in outputs}


def _bytes_column(values: list[bytes]) -> np.ndarray:
    return np.array([[v] for v in values], dtype=object)


ITEM_OUTPUTS = [schema.ITEM_EMBEDDING, schema.INTEREST_PROBS, schema.ALIGNMENT]


def _assert_close(got: dict, want: dict, names: list[str]) -> None:
    for name in names:
        np.testing.assert_allclose(got[name], want[name], atol=TOLERANCE, rtol=0, err_msg=name)



@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_item_encoder_matches_reference(triton_server, reference, sample_items, protocol):
    texts = [t for t, _, _ in sample_items[:8]]
    images = [i for _, i, _ in sample_items[:8]]
    got = _infer(protocol, triton_server.urls[protocol], schema.ITEM_ENCODER,
                 {schema.TEXT: _bytes_column([t.encode() for t in texts]), schema.IMAGE: _bytes_column(images)},
                 ITEM_OUTPUTS)
    _assert_close(got, reference.encode_items(texts, images), ITEM_OUTPUTS)
    assert got[schema.ITEM_EMBEDDING].shape == (8, schema.ITEM_EMBEDDING_DIM)
    np.testing.assert_allclose(np.linalg.norm(got[schema.ITEM_EMBEDDING], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got[schema.INTEREST_PROBS].sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_interest_scorer_matches_reference(triton_server, reference, sample_items, protocol):
    texts = [t for t, _, _ in sample_items[8:14]]
    images = [i for _, i, _ in sample_items[8:14]]
    history = reference.encode_items([t for t, _, _ in sample_items[:4]],
                                     [i for _, i, _ in sample_items[:4]])[schema.ITEM_EMBEDDING]
    user = history.mean(axis=0)
    users = np.repeat(user[None, :], len(texts), axis=0).astype(np.float32)
    got = _infer(protocol, triton_server.urls[protocol], schema.INTEREST_SCORER,
                 {schema.TEXT: _bytes_column([t.encode() for t in texts]),
                  schema.IMAGE: _bytes_column(images), schema.USER_EMBEDDING: users},
                 ITEM_OUTPUTS + [schema.SCORE])
    want = reference.score_items(texts, images, user)
    _assert_close(got, want, ITEM_OUTPUTS + [schema.SCORE])
    assert np.all((got[schema.SCORE] > 0) & (got[schema.SCORE] < 1))


@pytest.mark.server
def test_client_side_pixels_ensemble_matches_bytes_ensemble(triton_server, reference, sample_items):
    texts = [t for t, _, _ in sample_items[:4]]
    images = [i for _, i, _ in sample_items[:4]]
    pixels = reference.preprocess_images(images)
    got = _infer("grpc", triton_server.urls["grpc"], schema.ITEM_ENCODER_PIXELS,
                 {schema.TEXT: _bytes_column([t.encode() for t in texts]), schema.PIXELS: pixels},
                 ITEM_OUTPUTS)
    _assert_close(got, reference.encode_items(texts, images), ITEM_OUTPUTS)


def _model_counts(url: str, model: str) -> tuple[int, int]:
    stats = grpcclient.InferenceServerClient(url).get_inference_statistics(model).model_stats[0]
    return stats.inference_count, stats.execution_count


@pytest.mark.server
def test_dynamic_batcher_joins_requests_of_different_sequence_lengths(triton_server, reference, sample_items):
    """Concurrent single-item requests with short and long texts: each answer equals the
    reference computed for that request alone, and the batching models ran fewer batches than requests."""
    url = triton_server.urls["grpc"]
    captions = [t for t, _, _ in sample_items]
    requests = []
    for i in range(32):
        words = (1, 5, 40)[i % 3]  # ~16, ~64 and 128 tokens
        text = " ".join(captions[(i + j) % len(captions)] for j in range(words))
        requests.append((text, sample_items[i % len(sample_items)][1]))
    # the models that batch the text rows: item_encoder itself where it is one python model
    # (portable: rows grouped by length inside it), else the ensemble's encoder members
    merged = parse((Path(triton_server.config.repository) / schema.ITEM_ENCODER / CONFIG_FILE).read_text())
    batching = ((schema.ITEM_ENCODER,) if merged.backend == "python" else (schema.TEXT_ENCODER, schema.IMAGE_ENCODER))
    before = {m: _model_counts(url, m) for m in batching}

    def send(request):
        text, image = request
        return _infer("grpc", url, schema.ITEM_ENCODER,
                      {schema.TEXT: _bytes_column([text.encode()]), schema.IMAGE: _bytes_column([image])},
                      ITEM_OUTPUTS)

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(send, requests))
    lengths = {reference.tokenizer([text])[0].shape[1] for text, _ in requests}
    assert len(lengths) >= 3, lengths
    for (text, image), got in zip(requests, results):
        _assert_close(got, reference.encode_items([text], [image]), ITEM_OUTPUTS)
    for model, (inferences0, executions0) in before.items():
        deadline = time.monotonic() + 5  # statistics are updated just after each response is sent
        inferences, executions = _model_counts(url, model)
        while inferences - inferences0 < len(requests) and time.monotonic() < deadline:
            time.sleep(0.05)
            inferences, executions = _model_counts(url, model)
        assert inferences - inferences0 == len(requests)
        assert executions - executions0 < len(requests), f"{model} never batched"


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_image_is_invalid_argument_and_server_keeps_serving(triton_server, reference, sample_items, protocol):
    url = triton_server.urls[protocol]
    text, image, _ = sample_items[0]
    with pytest.raises(InferenceServerException) as err:
        _infer(protocol, url, schema.ITEM_ENCODER,
               {schema.TEXT: _bytes_column([text.encode(), text.encode()]),
                schema.IMAGE: _bytes_column([image, b"definitely not an image"])}, ITEM_OUTPUTS)
    assert "IMAGE[1] is not a decodable JPEG/PNG/WebP image" in err.value.message()
    if protocol == "grpc":
        assert "INVALID_ARGUMENT" in str(err.value.status())
    else:
        assert str(err.value.status()) == "400"
    got = _infer(protocol, url, schema.ITEM_ENCODER,
                 {schema.TEXT: _bytes_column([text.encode()]), schema.IMAGE: _bytes_column([image])}, ITEM_OUTPUTS)
    _assert_close(got, reference.encode_items([text], [image]), ITEM_OUTPUTS)


@pytest.mark.server
def test_non_utf8_text_is_invalid_argument(triton_server, sample_items):
    with pytest.raises(InferenceServerException, match=r"TEXT\[0\] is not valid UTF-8"):
        _infer("grpc", triton_server.urls["grpc"], schema.ITEM_ENCODER,
               {schema.TEXT: _bytes_column([b"\xff\xfe bad"]), schema.IMAGE: _bytes_column([sample_items[0][1]])},
               ITEM_OUTPUTS)


@pytest.mark.server
def test_mmrec_serve_cli_serves_and_stops_cleanly_on_sigint(exported_repository, sample_items):
    """The README's `mmrec serve`: endpoints printed, traffic served, Ctrl-C exits 0."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mmrec.server import free_ports

    http, grpc, metrics = free_ports(3)
    command = [sys.executable, "-m", "mmrec.cli", "serve", "--repository", str(exported_repository),
               "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "COLUMNS": "200"})
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if client.is_server_ready():
                    break
            except InferenceServerException:
                pass
            time.sleep(0.5)
        assert client.is_model_ready(schema.ITEM_ENCODER)
        text, image, _ = sample_items[0]
        got = _infer("grpc", f"127.0.0.1:{grpc}", schema.ITEM_ENCODER,
                     {schema.TEXT: _bytes_column([text.encode()]), schema.IMAGE: _bytes_column([image])},
                     ITEM_OUTPUTS)
        assert got[schema.ITEM_EMBEDDING].shape == (1, schema.ITEM_EMBEDDING_DIM)
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output[-2000:]
    assert f"127.0.0.1:{grpc}" in output and "tritonserver ready" in output


@pytest.mark.server
def test_failed_requests_do_not_stay_in_flight(exported_repository, sample_items, tmp_path):
    """Regression: a step failing while a parallel ensemble branch runs leaked the request in
    Triton 2.51 (shutdown then waited out --exit-timeout-secs). Validation now happens before
    the fan-out, so after bad requests to every ensemble the server drains at once."""
    import time

    from mmrec.server import ServerConfig, TritonServer, free_ports

    http, grpc, metrics = free_ports(3)
    log = tmp_path / "triton.log"
    server = TritonServer(ServerConfig(repository=exported_repository, http_port=http, grpc_port=grpc,
                                       metrics_port=metrics, exit_timeout_s=10), log_path=log)
    server.start()
    try:
        server.wait_ready(180)
        url = server.urls["grpc"]
        text, image, _ = sample_items[0]
        user = np.zeros((1, schema.ITEM_EMBEDDING_DIM), np.float32)
        bad_requests = [
            (schema.ITEM_ENCODER, {schema.TEXT: _bytes_column([text.encode()]), schema.IMAGE: _bytes_column([b"junk"])}),
            (schema.ITEM_ENCODER, {schema.TEXT: _bytes_column([b"\xff"]), schema.IMAGE: _bytes_column([image])}),
            (schema.INTEREST_SCORER, {schema.TEXT: _bytes_column([b" "]), schema.IMAGE: _bytes_column([image]),
                                      schema.USER_EMBEDDING: user}),
            (schema.ITEM_ENCODER_PIXELS, {schema.TEXT: _bytes_column([b""]),
                                          schema.PIXELS: np.zeros((1, 3, 224, 224), np.float32)}),
        ]
        for model, tensors in bad_requests:
            with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT|TEXT|IMAGE"):
                _infer("grpc", url, model, tensors, ITEM_OUTPUTS)
    finally:
        started = time.monotonic()
        server.stop(timeout_s=30)
        stop_seconds = time.monotonic() - started
    leaked = [line for line in log.read_text().splitlines() if "in-flight inferences" in line and "has" in line]
    assert not leaked, leaked
    assert stop_seconds < 8, f"shutdown took {stop_seconds:.1f}s: requests were left in flight"
