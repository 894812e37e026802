"""Evaluation that can be trusted: the split, the metrics and the served-combination gate."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from mmrec import metrics, schema
from mmrec.export.data import duplicate_groups, image_hash, load_items, split
from mmrec.export.errors import QualityGateError
from mmrec.export.features import ItemFeatures
from mmrec.export.models.fusion import FusionConfig, FusionHead
from mmrec.export.pipeline import VariantGates, served_combination, torch_fuse


@pytest.fixture(scope="module")
def items():
    return load_items()


@pytest.fixture(scope="module")
def hashes(items):
    return [image_hash(i) for i in items]


@pytest.fixture(scope="module")
def parts(items, hashes):
    return split(items, hashes)


def test_split_is_a_partition_and_the_same_every_time(items, hashes, parts):
    ids = [i.item_id for part in parts for i in part]
    assert sorted(ids) == sorted(i.item_id for i in items) and len(set(ids)) == len(ids)
    again = split(items, hashes)
    assert [[i.item_id for i in p] for p in again] == [[i.item_id for i in p] for p in parts]


def test_split_is_stratified_every_category_is_evaluated(items, parts):
    totals = Counter(i.category for i in items)
    held = Counter(i.category for i in parts.held_out)
    validation = Counter(i.category for i in parts.validation)
    train = Counter(i.category for i in parts.train)
    for category, total in totals.items():
        assert held[category] >= 1, category
        assert validation[category] >= 1, category
        assert held[category] <= max(0.45 * total, 3), (category, held[category], total)
        assert train[category] >= 0.5 * total, (category, train[category], total)
    assert 0.15 <= len(parts.held_out) / len(items) <= 0.25


def test_duplicates_never_straddle_parts(items, hashes, parts):
    """An exact caption or a near-identical drawing seen in training is never scored as new."""
    part_of = {i.item_id: name for name, part in parts._asdict().items() for i in part}
    by_caption: dict[str, set[str]] = {}
    for item in items:
        by_caption.setdefault(" ".join(item.caption.lower().split()), set()).add(part_of[item.item_id])
    assert all(len(p) == 1 for p in by_caption.values())
    groups = duplicate_groups(items, hashes)
    by_group: dict[int, set[str]] = {}
    for item, group in zip(items, groups):
        by_group.setdefault(group, set()).add(part_of[item.item_id])
    assert all(len(p) == 1 for p in by_group.values())
    assert len(set(groups)) < len(items)  # the data does have duplicates to keep together


def test_every_category_keeps_training_items(items):
    """Two duplicate groups in a small category: held-out gets one, training the other."""
    from dataclasses import replace

    small = [replace(items[k], item_id=f"x{k}", caption=("one" if k < 5 else "two"), category="tiny")
             for k in range(10)]
    spread = [int(h) for h in np.random.default_rng(0).integers(0, 1 << 62, 52)]  # far apart
    parts = split(items[:50] + small, spread[:50] + [spread[50]] * 5 + [spread[51]] * 5)
    assert sum(i.category == "tiny" for i in parts.train) == 5


def test_near_duplicate_images_share_a_group(items):
    """Same drawing, different caption: joined by the image hash alone."""
    from dataclasses import replace

    twin = replace(items[0], item_id="twin", caption="a caption nobody else has")
    groups = duplicate_groups([items[0], twin, items[-1]])
    assert groups[0] == groups[1] != groups[2]


def test_macro_f1_counts_only_classes_in_the_labels():
    labels = np.array([0, 0, 1, 1])
    predicted = np.array([0, 2, 1, 1])  # class 2 only among the predictions
    # class 0: tp 1, fn 1 -> F1 2/3; class 1: F1 1; no zero term for class 2
    assert metrics.macro_f1(labels, predicted, 3) == pytest.approx((2 / 3 + 1) / 2)
    scores = metrics.per_class_scores(labels, predicted, ("a", "b", "c"))
    assert scores["c"] == {"support": 0, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert scores["a"]["recall"] == 0.5 and scores["a"]["precision"] == 1.0
    assert metrics.confusion_matrix(labels, predicted, 3).tolist() == [[1, 0, 1], [0, 2, 0], [0, 0, 0]]


def _gates(seed: int = 0) -> tuple[VariantGates, ItemFeatures]:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    n, classes = 120, 4
    labels = np.arange(n) % classes
    text = rng.standard_normal((n, 384)).astype(np.float32)
    image = rng.standard_normal((n, 1280)).astype(np.float32)
    fusion = FusionHead(FusionConfig(num_categories=classes)).eval()
    held = ItemFeatures(text, image, labels)
    gates = VariantGates(torch_fuse(fusion), {schema.TEXT_ENCODER: text, schema.IMAGE_ENCODER: image}, labels, classes)
    gates.reference = {schema.TEXT_ENCODER: text, schema.IMAGE_ENCODER: image}
    return gates, held


def test_served_combination_is_gated_as_a_whole():
    gates, held = _gates()
    rng = np.random.default_rng(1)
    small = {schema.TEXT_ENCODER: held.text + 0.01 * rng.standard_normal(held.text.shape).astype(np.float32),
             schema.IMAGE_ENCODER: held.image + 0.01 * rng.standard_normal(held.image.shape).astype(np.float32)}
    for name, emb in small.items():
        assert gates.gate_member(name, "int8", emb, None).passed
    combined = served_combination(gates, {schema.TEXT_ENCODER: "int8", schema.IMAGE_ENCODER: "int8"})
    assert combined["gate"]["passed"] and set(combined["variants"]) == set(small)
    assert served_combination(gates, {schema.TEXT_ENCODER: "fp32"}) is None


def test_a_combination_that_fails_is_refused():
    gates, held = _gates()
    rng = np.random.default_rng(2)
    for name, ref in ((schema.TEXT_ENCODER, held.text), (schema.IMAGE_ENCODER, held.image)):
        gates.gate_member(name, "fp16", ref + 2.0 * rng.standard_normal(ref.shape).astype(np.float32), None)
    with pytest.raises(QualityGateError, match="served combination"):
        served_combination(gates, {schema.TEXT_ENCODER: "fp16", schema.IMAGE_ENCODER: "fp16"})


def test_long_inputs_are_part_of_the_gate():
    from mmrec.export.variants import quality_gate

    rng = np.random.default_rng(3)
    ref = rng.standard_normal((40, 16))
    labels = np.arange(40) % 4
    long_ref = rng.standard_normal((8, 16))
    gate = quality_gate("int8", ref, ref, labels, labels, labels, 4,
                        long_inputs=(long_ref, long_ref + rng.standard_normal((8, 16))))
    assert not gate.passed and "max-length inputs" in gate.reasons[0]
    assert gate.long_input_mean_cosine < 0.99
