"""Quality drift of every variant combination vs the FP32 pipeline, on held-out items.

A combination picks one precision per encoder (the repository's variants) with the FP32
fusion head; it is compared with all-FP32 on: encoder and item embedding cosine, top-10
neighbour agreement, interest accuracy / macro-F1 (against the items' real categories),
prediction agreement, and ranking agreement for simulated users (a user is the mean
embedding of a few items of one category, seed 003; scored σ(item · user), seed 002).
Each combination is also judged by the export's variant gate on item embeddings.
"""
from __future__ import annotations

import itertools
from typing import Callable

import numpy as np

from mmrec import metrics, schema
from mmrec.export.variants import quality_gate

from .engines import ort_member, load_manifest, onnx_files, recorded_variants
from .settings import Settings
from .workload import Workload

ENCODERS = (schema.TEXT_ENCODER, schema.IMAGE_ENCODER)
TEXT_BATCH = 32
IMAGE_BATCH = 16
SEED = 0

Tick = Callable[[int], None]


def _encode(workload: Workload, model: str, path, threads: int) -> np.ndarray:
    run = ort_member(path, threads)
    n = len(workload.items)
    if model == schema.TEXT_ENCODER:
        return np.concatenate([run(workload.caption_feed(min(TEXT_BATCH, n - i), offset=i))[0]
                               for i in range(0, n, TEXT_BATCH)])
    return np.concatenate([run({schema.PIXEL_VALUES: workload.pixels(min(IMAGE_BATCH, n - i), offset=i)})[0]
                           for i in range(0, n, IMAGE_BATCH)])


def simulated_users(labels: np.ndarray, per_category: int, items_per_user: int,
                    seed: int = SEED) -> list[np.ndarray]:
    """Index sets of each user's history: `items_per_user` items of one category."""
    rng = np.random.default_rng(seed)
    users = []
    for category in np.unique(labels):
        members = np.flatnonzero(labels == category)
        if len(members) < items_per_user:
            continue
        users += [np.sort(rng.choice(members, items_per_user, replace=False)) for _ in range(per_category)]
    return users


def user_scores(items: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
    """[users, items] σ(item · user); a user's own history is excluded (score -inf)."""
    scores = np.empty((len(histories), len(items)))
    for u, history in enumerate(histories):
        user = items[history].mean(axis=0)
        scores[u] = 1.0 / (1.0 + np.exp(-(items @ user)))
        scores[u, history] = -np.inf
    return scores


def run_quality(workload: Workload, settings: Settings, threads: int, tick: Tick) -> dict:
    if settings.quality_items and settings.quality_items < len(workload.items):
        workload = Workload(workload.repository, items=workload.items[:settings.quality_items])
    repository = workload.repository
    manifest = load_manifest(repository)
    files = {m: onnx_files(repository, m, manifest) for m in (*ENCODERS, schema.FUSION)}
    labels = workload.labels
    num_classes = len(workload.preprocess.categories)
    fusion = ort_member(files[schema.FUSION]["fp32"], threads)

    encoded = {}
    for model in ENCODERS:
        for precision, path in files[model].items():
            encoded[(model, precision)] = _encode(workload, model, path, threads)
            tick(1)

    def fuse(text: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        item, probs, _ = fusion({schema.TEXT_EMBEDDING: text, schema.IMAGE_EMBEDDING: image})
        return item, probs

    ref_item, ref_probs = fuse(encoded[(schema.TEXT_ENCODER, "fp32")], encoded[(schema.IMAGE_ENCODER, "fp32")])
    ref_pred = ref_probs.argmax(1)
    histories = simulated_users(labels, settings.users_per_category, settings.items_per_user)
    ref_scores = user_scores(ref_item, histories)
    k = settings.neighbours
    fp32_row = {"combination": {m: "fp32" for m in ENCODERS}, "label": "fp32",
                "interest_accuracy": metrics.accuracy(labels, ref_pred),
                "interest_macro_f1": metrics.macro_f1(labels, ref_pred, num_classes)}

    rows = []
    for choice in itertools.product(*[sorted(files[m]) for m in ENCODERS]):
        combo = dict(zip(ENCODERS, choice))
        if all(p == "fp32" for p in choice):
            continue
        text = encoded[(schema.TEXT_ENCODER, combo[schema.TEXT_ENCODER])]
        image = encoded[(schema.IMAGE_ENCODER, combo[schema.IMAGE_ENCODER])]
        item, probs = fuse(text, image)
        pred = probs.argmax(1)
        encoder_drift = {}
        for model in ENCODERS:
            if combo[model] == "fp32":
                continue
            ref, got = encoded[(model, "fp32")], encoded[(model, combo[model])]
            cos = metrics.row_cosine(ref, got)
            encoder_drift[model] = {"precision": combo[model], "mean_cosine": float(cos.mean()),
                                    "min_cosine": float(cos.min()),
                                    "neighbour_agreement": metrics.neighbour_agreement(ref, got, k)}
        cos = metrics.row_cosine(ref_item, item)
        gate = quality_gate("+".join(f"{m}:{p}" for m, p in combo.items() if p != "fp32"),
                            ref_item, item, labels, ref_pred, pred, num_classes)
        rows.append({
            "combination": combo,
            "label": " + ".join(f"{m.split('_')[0]} {p}" for m, p in combo.items() if p != "fp32"),
            "encoders": encoder_drift,
            "item_mean_cosine": float(cos.mean()), "item_min_cosine": float(cos.min()),
            "item_neighbour_agreement": metrics.neighbour_agreement(ref_item, item, k),
            "interest_accuracy": metrics.accuracy(labels, pred),
            "interest_macro_f1": metrics.macro_f1(labels, pred, num_classes),
            "macro_f1_drop_points": 100 * (fp32_row["interest_macro_f1"] - metrics.macro_f1(labels, pred, num_classes)),
            "prediction_agreement": float(np.mean(pred == ref_pred)),
            "ranking_agreement_top10": metrics.ranking_agreement(ref_scores, user_scores(item, histories), k),
            "gate": gate.to_dict(),
        })
        tick(1)
    return {"items": len(labels), "users": len(histories), "items_per_user": settings.items_per_user,
            "neighbours": k, "fp32": fp32_row, "variants": rows,
            "left_out": {m: {v: e.gate_reasons for v, e in recorded_variants(manifest, m).items() if e.left_out}
                         for m in ENCODERS}}


def quality_steps(workload: Workload) -> int:
    files = {m: onnx_files(workload.repository, m) for m in ENCODERS}
    combos = int(np.prod([len(f) for f in files.values()])) - 1
    return sum(len(f) for f in files.values()) + combos
