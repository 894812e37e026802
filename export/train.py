"""Deterministic training of the fusion head on precomputed encoder features.

Losses: cross-entropy on interest categories; symmetric InfoNCE between the text and image
projections (so `alignment` is meaningful); supervised contrastive loss on the fused item
embedding (items of one category cluster, which is what neighbour search and user vectors use).
"""
from __future__ import annotations

import multiprocessing
import sys
from contextlib import closing, contextmanager
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterator

import numpy as np
import torch
from torch.nn import functional as F

from mmrec import metrics
from mmrec.model_repository.lib.runtime import usable_cores
from .features import ItemFeatures
from .models.fusion import FusionConfig, FusionHead

SEED = 20261122
EPOCHS = 60
BATCH_SIZE = 64
LEARNING_RATE = 2e-3
TEMPERATURE = 0.1
SPREAD_METRICS = ("interest_accuracy", "interest_macro_f1", "alignment_pair_auc",
                  "text_to_image_recall_at_1")
# What a machine that cannot run worker processes raises (no /dev/shm or semaphores, a process
# limit, a worker killed on start): the spread then trains in this process instead.
WORKER_FAILURES = (OSError, BrokenProcessPool, NotImplementedError, ImportError)
MAX_SPREAD_WORKERS = 8  # each worker imports torch (a few hundred MB): a 64-core machine needs no 64


def _info_nce(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / TEMPERATURE
    target = torch.arange(len(a))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _sup_con(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    sims = embeddings @ embeddings.T / TEMPERATURE
    eye = torch.eye(len(labels), dtype=torch.bool)
    sims = sims.masked_fill(eye, -1e9)
    positives = (labels[:, None] == labels[None, :]) & ~eye
    log_prob = sims - torch.logsumexp(sims, dim=1, keepdim=True)
    counts = positives.sum(dim=1)
    has = counts > 0
    per_row = (log_prob * positives).sum(dim=1)[has] / counts[has]
    return -per_row.mean() if has.any() else sims.new_zeros(())


def train_fusion(train: ItemFeatures, config: FusionConfig,
                 progress: Callable[[int], None] | None = None,
                 seed: int = SEED, epochs: int | None = None) -> tuple[FusionHead, float]:
    """Same features + same config + same seed -> the same weights on any x86 CPU.

    Training runs in float64 on one thread: float32 GEMM kernels differ between CPUs (AVX-512,
    AMX, AVX2 pick different blockings), and 60 epochs amplify those last-bit differences into
    points of held-out F1. In float64 the kernels still differ, but not in the float32 weights
    we export. The returned head is float32. The caller's global RNG is left as it was, so
    training here or in a worker process (seed_spread) leaves this process in the same state.
    """
    epochs = EPOCHS if epochs is None else epochs
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    try:
        model = FusionHead(config).double()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=1e-2)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        text = torch.from_numpy(train.text).double()
        image = torch.from_numpy(train.image).double()
        labels = torch.from_numpy(train.labels)
        generator = torch.Generator().manual_seed(seed)
        loss_value = float("nan")
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(labels), generator=generator)
            for start in range(0, len(order), BATCH_SIZE):
                idx = order[start:start + BATCH_SIZE]
                item, logits, text_p, image_p = model.forward_logits(text[idx], image[idx])
                loss = (F.cross_entropy(logits, labels[idx]) + _info_nce(text_p, image_p)
                        + 0.5 * _sup_con(item, labels[idx]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                loss_value = float(loss.detach())
            schedule.step()
            if progress:
                progress(1)
        return model.float().eval(), loss_value
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)


def seed_spread(train: ItemFeatures, parts: dict[str, ItemFeatures], config: FusionConfig,
                seeds: int, progress: Callable[[int], None] | None = None,
                first: FusionHead | None = None, workers: int | None = None) -> dict[str, dict]:
    """Per part: mean and standard deviation of the headline metrics over `seeds` seeds.

    What a reader needs to judge a difference: a change smaller than this spread is noise.
    Each seed trains once and is evaluated on every part; `first`, the head already trained
    with SEED (training is deterministic), stands in for that seed instead of a second run.
    The other seeds train in up to `workers` processes (default: the usable cores), each on
    one thread as in this process, so the numbers are the same bits as a serial run.
    """
    to_train = [SEED + offset for offset in range(seeds) if not (offset == 0 and first is not None)]
    runs: dict[str, list[dict]] = {name: [] for name in parts}
    with closing(_trained_heads(train, config, to_train, usable_cores() if workers is None else workers)) as trained:
        for offset in range(seeds):
            model = first if offset == 0 and first is not None else next(trained)
            for name, features in parts.items():
                runs[name].append(evaluate_fusion(model, features, config.num_categories))
            if progress:
                progress(1)
    return {name: _mean_std(part_runs) for name, part_runs in runs.items()}


def _trained_heads(train: ItemFeatures, config: FusionConfig, seeds: list[int],
                   workers: int) -> Iterator[FusionHead]:
    """The heads of `seeds`, in order: from spawned worker processes when more than one can run,
    else (or when workers cannot start here) trained in this process."""
    done = 0
    workers = min(workers, len(seeds), MAX_SPREAD_WORKERS)
    if workers > 1:
        pool = None
        try:
            # spawn, not fork: a forked copy of a process running torch threads can deadlock
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            with _main_hidden():  # every worker starts during these submits
                futures = [pool.submit(_train_weights, train, config, seed, EPOCHS) for seed in seeds]
            for future in futures:
                head = _head(config, future.result())
                done += 1
                yield head
        except WORKER_FAILURES:
            pass  # the seeds not done yet train below
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    for seed in seeds[done:]:
        yield train_fusion(train, config, seed=seed)[0]


@contextmanager
def _main_hidden() -> Iterator[None]:
    """Start workers without the parent's `__main__`: spawn runs its top level again in every
    worker, and a script without an `if __name__ == "__main__":` guard would redo its whole
    export there. The job needs only this module, so workers start as under `python -c`."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    spec, has_file, file = getattr(main, "__spec__", None), hasattr(main, "__file__"), getattr(main, "__file__", None)
    main.__spec__ = None
    if has_file:
        del main.__file__
    try:
        yield
    finally:
        main.__spec__ = spec
        if has_file:
            main.__file__ = file


def _train_weights(train: ItemFeatures, config: FusionConfig, seed: int, epochs: int) -> dict[str, np.ndarray]:
    """A worker's job: one training, returned as plain arrays (no shared-memory tensors)."""
    model, _ = train_fusion(train, config, seed=seed, epochs=epochs)
    return {name: value.numpy() for name, value in model.state_dict().items()}


def _head(config: FusionConfig, weights: dict[str, np.ndarray]) -> FusionHead:
    with torch.random.fork_rng(devices=[]):  # building a head draws initial weights: keep the RNG
        model = FusionHead(config)
    model.load_state_dict({name: torch.from_numpy(value) for name, value in weights.items()})
    return model.eval()


def _mean_std(runs: list[dict]) -> dict:
    spread: dict = {"seeds": len(runs)}
    for key in SPREAD_METRICS:
        values = np.array([run[key] for run in runs])
        spread[key] = {"mean": round(float(values.mean()), 4),
                       "std": round(float(values.std(ddof=1)), 4) if len(runs) > 1 else 0.0}
    return spread


@torch.inference_mode()
def fusion_outputs(model: FusionHead, features: ItemFeatures) -> dict[str, np.ndarray]:
    item, probs, alignment = model(torch.from_numpy(features.text), torch.from_numpy(features.image))
    return {"item_embedding": item.numpy(), "interest_probs": probs.numpy(),
            "alignment": alignment.numpy()[:, 0]}


@torch.inference_mode()
def evaluate_fusion(model: FusionHead, features: ItemFeatures, num_categories: int,
                    categories: tuple[str, ...] | None = None) -> dict:
    """Interest accuracy / macro-F1 / per-class scores and alignment quality on given items."""
    out = fusion_outputs(model, features)
    predicted = out["interest_probs"].argmax(axis=1)
    text_p, image_p = model.project(torch.from_numpy(features.text), torch.from_numpy(features.image))
    text_p, image_p = text_p.numpy(), image_p.numpy()
    shuffled = np.roll(np.arange(len(text_p)), 1)
    matched = metrics.row_cosine(text_p, image_p)
    mismatched = metrics.row_cosine(text_p, image_p[shuffled])
    names = categories or tuple(str(c) for c in range(num_categories))
    return {
        "items": int(len(features.labels)),
        "interest_accuracy": metrics.accuracy(features.labels, predicted),
        "interest_macro_f1": metrics.macro_f1(features.labels, predicted, num_categories),
        "per_class": metrics.per_class_scores(features.labels, predicted, names),
        "confusion": {"labels": list(names),
                      "matrix": metrics.confusion_matrix(features.labels, predicted, num_categories).tolist()},
        "alignment_matched_mean": float(matched.mean()),
        "alignment_mismatched_mean": float(mismatched.mean()),
        "alignment_pair_auc": metrics.pair_auc(matched, mismatched),
        "text_to_image_recall_at_1": metrics.retrieval_recall_at_1(text_p, image_p),
    }
