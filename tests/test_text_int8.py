"""The NNCF static INT8 text encoder (export/text_int8.py) passes the variant gate on held-out captions.

Takes the INT8 graph the suite's shared export wrote (calibrated on training-split captions only)
and gates it against ORT FP32 with inputs built here, independently of the export's recipe
(held-out captions re-tokenized, max_seq_len texts, fusion head interest macro-F1), on ONNX
Runtime and on OpenVINO.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from hard_dependencies import skip_unless
from mmrec import schema
from mmrec.layout import RepositoryLayout
from mmrec.export import variants as var
from mmrec.export.parity import cpu_session
from mmrec.export.recipes import LONG_TEXT_CASES, joined_captions
from mmrec.model_repository.lib import runtime

BATCH = 16


def _feeds(tokenizer, texts: list[str], step: int) -> list[dict[str, np.ndarray]]:
    return [dict(zip((schema.INPUT_IDS, schema.ATTENTION_MASK), tokenizer(texts[i:i + step])))
            for i in range(0, len(texts), step)]


def _run(session, feeds) -> np.ndarray:
    return np.concatenate([session.run(None, feed)[0] for feed in feeds])


@pytest.fixture(scope="module")
def gate_inputs(exported_repository):
    from mmrec.export.data import image_hash, load_items, split
    from mmrec.reference import ReferencePipeline

    root = Path(exported_repository)
    items = load_items()
    parts = split(items, [image_hash(i) for i in items])
    reference = ReferencePipeline(root)  # the served tokenizer and decoder
    config, tokenizer = reference.preprocess, reference.tokenizer
    held = [i.caption for i in parts.held_out]
    pixels = reference.preprocess_images([i.image_bytes() for i in parts.held_out])
    image = _run(cpu_session(RepositoryLayout(root).model_file(schema.IMAGE_ENCODER)),
                 [{schema.PIXEL_VALUES: pixels[i:i + BATCH]} for i in range(0, len(pixels), BATCH)])
    categories = {c: k for k, c in enumerate(config.categories)}
    return {
        "root": root,
        "feeds": _feeds(tokenizer, held, min(32, config.max_batch_size)),
        "long_feeds": _feeds(tokenizer, joined_captions(held, LONG_TEXT_CASES, 30), BATCH),
        "image": image,
        "labels": np.array([categories[i.category] for i in parts.held_out], dtype=np.int64),
        "num_classes": len(config.categories),
    }


@pytest.fixture(scope="module")
def int8_model(gate_inputs) -> Path:
    """The INT8 graph the suite's shared export wrote with `quantize_text_int8` (not quantized
    again here): what is served is what is checked."""
    root = gate_inputs["root"]
    entry = RepositoryLayout(root).read_manifest()["models"][schema.TEXT_ENCODER]["variants"]["int8"]
    assert entry.get("path"), f"the export left text INT8 out: {entry.get('gate') or entry.get('skipped')}"
    return root / entry["path"]


def test_graph_is_static_int8_with_fp32_embeddings(int8_model):
    model = onnx.load(str(int8_model))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 24  # every attention/FFN-up projection's activation
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "Gather":  # embedding tables are not dequantized at every call
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input)


@pytest.mark.parametrize("runtime_name", runtime.RUNTIMES)
def test_int8_text_encoder_passes_gate(gate_inputs, int8_model, runtime_name):
    skip_unless(runtime.unavailable_reason(runtime_name))
    g = gate_inputs
    variants = RepositoryLayout(g["root"]).read_manifest()["models"][schema.TEXT_ENCODER]["variants"]
    fp32 = cpu_session(g["root"] / variants["fp32"]["path"])  # FP32 even where tuning serves INT8
    reference, long_reference = _run(fp32, g["feeds"]), _run(fp32, g["long_feeds"])
    session = runtime.open_session(int8_model, runtime_name, 0)
    embeddings, long_embeddings = _run(session, g["feeds"]), _run(session, g["long_feeds"])
    fusion = cpu_session(RepositoryLayout(g["root"]).model_file(schema.FUSION))

    def predict(text: np.ndarray) -> np.ndarray:
        return fusion.run([schema.INTEREST_PROBS_MEMBER], {schema.TEXT_EMBEDDING: text,
                                                    schema.IMAGE_EMBEDDING: g["image"]})[0].argmax(1)

    gate = var.quality_gate(f"{runtime_name}-int8", reference, embeddings, g["labels"], predict(reference),
                            predict(embeddings), g["num_classes"], long_inputs=(long_reference, long_embeddings))
    assert gate.passed, gate.reasons
    # margins measured at 0.9976 / 0.9960 / 0.938-0.947 / no F1 drop: fail loudly if the recipe regresses
    assert gate.mean_cosine > 0.995 and gate.long_input_mean_cosine > 0.994, gate.to_dict()
    assert gate.neighbour_agreement >= 0.92, gate.to_dict()
