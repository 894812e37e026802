"""The item engine (model_repository/lib/item_engine.py): the one implementation of the item path.

In-process checks of its schedule (chunks, pool, per-request failures) against the plain
sequential pipeline, and through the real server: the portable repository loads each graph once
(the member models stay unloaded under `mmrec serve`'s default), and the public models that now
route through the engine answer as the reference does.
"""
from __future__ import annotations

import numpy as np
import pytest

from mmrec import schema
from mmrec.model_repository.lib.batching import Failure
from mmrec.model_repository.lib.item_engine import ItemEngine, Items

TOLERANCE = 1e-4  # the served path's tolerance everywhere in the suite (FP32 sums in other orders)


def _engine(reference, **options) -> ItemEngine:
    return ItemEngine(reference.tokenizer, reference.decoder, reference.sessions, reference.preprocess.seq_buckets,
                      **options)


def _sequential(reference, texts: list[str], images: list[bytes]) -> dict[str, np.ndarray]:
    """The steps one after another, no pool, no chunks: tokenize, text encoder, decode, image
    encoder, fusion (the pipeline's own building blocks)."""
    return reference.fuse(reference.embed_texts(texts), reference.embed_pixels(reference.preprocess_images(images)))


def _items(sample_items, start: int, count: int) -> tuple[list[str], list[bytes]]:
    rows = sample_items[start:start + count]
    return [t for t, _, _ in rows], [i for _, i, _ in rows]


def test_engine_schedule_does_not_change_the_outputs(reference, sample_items):
    """Image chunks of 3 with a pool of 2 decoders, one whole-batch chunk, client pixels and the
    plain sequential steps all give the same outputs."""
    texts, images = _items(sample_items, 0, 10)
    want = _sequential(reference, texts, images)
    chunked, whole = _engine(reference, image_chunk=3, decode_threads=2), _engine(reference, image_chunk=32)
    try:
        for got in (chunked.encode(texts, images), whole.encode(texts, images),
                    chunked.encode(texts, pixels=reference.preprocess_images(images))):
            for name in (schema.ITEM_EMBEDDING, schema.INTEREST_PROBS, schema.ALIGNMENT):
                np.testing.assert_allclose(got[name], want[name], atol=TOLERANCE, rtol=0, err_msg=name)
    finally:
        chunked.close()
        whole.close()


def test_engine_fails_only_the_request_with_a_bad_image(reference, sample_items):
    """In one batch, a request whose second image is not an image gets a Failure naming IMAGE[1];
    the requests around it get exactly what they get alone (chunks cross request borders)."""
    engine = _engine(reference, image_chunk=2)
    (t1, i1), (t3, i3) = _items(sample_items, 0, 3), _items(sample_items, 3, 2)
    batch = [Items(t1, images=i1), Items(["a cat", "a dog"], images=[i1[0], b"not an image"]), Items(t3, images=i3)]
    try:
        results = engine.encode_batch(batch)
        alone = [engine.encode_batch([items])[0] for items in (batch[0], batch[2])]
    finally:
        engine.close()
    assert isinstance(results[1], Failure) and not results[1].internal and "IMAGE[1]" in results[1].message
    for got, want in zip((results[0], results[2]), alone):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, atol=TOLERANCE, rtol=0)


def test_engine_reads_either_images_or_pixels(reference):
    engine = _engine(reference)
    texts = np.array([[b"a red apple"]], dtype=object)
    try:
        with pytest.raises(ValueError, match="either IMAGE .* or PIXEL_VALUES .* not neither"):
            engine.items(texts)
        with pytest.raises(ValueError, match="not both"):
            engine.items(texts, images=np.array([[b"x"]], dtype=object), pixels=np.zeros((1, 3, 2, 2), np.float32))
        with pytest.raises(ValueError, match="1 TEXT rows but 2 IMAGE rows"):
            engine.items(texts, images=np.array([[b"x"], [b"y"]], dtype=object))
        with pytest.raises(ValueError, match="TEXT is empty"):
            engine.encode([], [])
    finally:
        engine.close()


@pytest.mark.server
def test_portable_server_loads_each_graph_once(triton_server, exported_repository):
    """`mmrec serve`'s default (explicit model control, the entry models): on the portable target
    the item engine holds the text, image and fusion graphs and no member model is loaded."""
    import tritonclient.grpc as grpcclient

    from mmrec.layout import RepositoryLayout

    client = grpcclient.InferenceServerClient(triton_server.urls["grpc"])
    ready = {m.name for m in client.get_model_repository_index().models if m.state == "READY"}
    engine_config = client.get_model_config(schema.ITEM_ENCODER).config
    assert engine_config.backend == "python"  # the suite's export is the portable target
    assert ready == set(RepositoryLayout(exported_repository).served_models())
    assert not ready & {schema.TEXT_ENCODER, schema.IMAGE_ENCODER, schema.FUSION, schema.ITEM_PREPROCESS,
                        schema.ITEM_PREPROCESS_PIXELS}
    steps = {name: [s.model_name for s in client.get_model_config(name).config.ensemble_scheduling.step]
             for name in (schema.ITEM_ENCODER_PIXELS, schema.INTEREST_SCORER)}
    assert steps == {schema.ITEM_ENCODER_PIXELS: [schema.ITEM_ENCODER],
                     schema.INTEREST_SCORER: [schema.ITEM_ENCODER, schema.SCORER]}


@pytest.mark.server
def test_served_engine_refuses_images_and_pixels_together(triton_server, reference, sample_items):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    texts, images = _items(sample_items, 0, 1)
    client = grpcclient.InferenceServerClient(triton_server.urls["grpc"])
    tensors = {schema.TEXT: np.array([[texts[0].encode()]], dtype=object),
               schema.IMAGE: np.array([[images[0]]], dtype=object), schema.PIXELS: reference.preprocess_images(images)}
    inputs = []
    for name, array in tensors.items():
        inputs.append(grpcclient.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else "FP32"))
        inputs[-1].set_data_from_numpy(array)
    with pytest.raises(InferenceServerException, match="not both") as err:
        client.infer(schema.ITEM_ENCODER, inputs)
    assert "INVALID_ARG" in str(err.value.status())
    text_and_pixels = [inputs[0], inputs[2]]  # pixels alone: the engine's pixel path, as item_encoder_pixels routes it
    got = client.infer(schema.ITEM_ENCODER, text_and_pixels).as_numpy(schema.ITEM_EMBEDDING)
    np.testing.assert_allclose(got, reference.encode_items(texts, images)[schema.ITEM_EMBEDDING], atol=TOLERANCE)


def test_a_bad_request_loses_its_rows_still_waiting_for_a_chunk(reference, sample_items):
    """With one chunk for the whole batch, the good image of a request whose next image is bad is
    never encoded: the image encoder sees only the rows of the requests that get an answer."""
    engine = _engine(reference, image_chunk=8)
    encoded_rows: list[int] = []
    encode_pixels = engine.encode_pixels
    engine.encode_pixels = lambda pixels: encoded_rows.append(len(pixels)) or encode_pixels(pixels)
    (t1, i1), (t3, i3) = _items(sample_items, 0, 3), _items(sample_items, 3, 2)
    batch = [Items(t1, images=i1), Items(["a cat", "a dog"], images=[i1[0], b"not an image"]), Items(t3, images=i3)]
    try:
        results = engine.encode_batch(batch)
    finally:
        engine.close()
    assert isinstance(results[1], Failure)
    assert sum(encoded_rows) == len(i1) + len(i3), encoded_rows
    assert [len(results[j][0]) for j in (0, 2)] == [len(i1), len(i3)]
