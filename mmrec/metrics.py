"""Quality metrics shared by export gates, the manifest and the benchmark's drift report."""
from __future__ import annotations

import numpy as np


def accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.mean(labels == predicted))


def macro_f1(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in `labels`.

    A class that only appears among the predictions adds no term of its own (an F1 of 0 that
    says nothing about the data); its false positives still count, as misses of the true
    classes they were taken from.
    """
    present = np.unique(labels)
    scores = [_f1(labels, predicted, int(c)) for c in present if 0 <= c < num_classes]
    return float(np.mean(scores)) if scores else 0.0


def _counts(labels: np.ndarray, predicted: np.ndarray, c: int) -> tuple[int, int, int]:
    tp = int(np.sum((predicted == c) & (labels == c)))
    fp = int(np.sum((predicted == c) & (labels != c)))
    fn = int(np.sum((predicted != c) & (labels == c)))
    return tp, fp, fn


def _f1(labels: np.ndarray, predicted: np.ndarray, c: int) -> float:
    tp, fp, fn = _counts(labels, predicted, c)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def per_class_scores(labels: np.ndarray, predicted: np.ndarray, names: tuple[str, ...]) -> dict:
    """name -> support, precision, recall, F1 (precision 0 where the class was never predicted)."""
    scores = {}
    for c, name in enumerate(names):
        tp, fp, fn = _counts(labels, predicted, c)
        scores[name] = {"support": tp + fn,
                        "precision": round(tp / (tp + fp), 4) if tp + fp else 0.0,
                        "recall": round(tp / (tp + fn), 4) if tp + fn else 0.0,
                        "f1": round(_f1(labels, predicted, c), 4)}
    return scores


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """[true, predicted] counts."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of matching rows of two [N, D] arrays."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(denom, 1e-12)


def top_k_neighbours(embeddings: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's k nearest rows by cosine, excluding itself."""
    x = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def neighbour_agreement(reference: np.ndarray, candidate: np.ndarray, k: int = 10) -> float:
    """Mean overlap of the top-k neighbour sets of two embeddings of the same items."""
    k = min(k, len(reference) - 1)
    ref = top_k_neighbours(reference, k)
    cand = top_k_neighbours(candidate, k)
    return float(np.mean([len(set(r) & set(c)) / k for r, c in zip(ref, cand)]))


def retrieval_recall_at_1(queries: np.ndarray, keys: np.ndarray) -> float:
    """Fraction of queries whose most similar key is their own pair (row i <-> row i)."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    k = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    return float(np.mean(np.argmax(q @ k.T, axis=1) == np.arange(len(q))))


def pair_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a matched pair scores above a mismatched one (ties count half)."""
    pos = np.asarray(positive)[:, None]
    neg = np.asarray(negative)[None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def ranking_agreement(reference_scores: np.ndarray, candidate_scores: np.ndarray, k: int = 10) -> float:
    """Overlap of the top-k items ranked by two score vectors (per user rows if 2-D)."""
    ref = np.atleast_2d(reference_scores)
    cand = np.atleast_2d(candidate_scores)
    k = min(k, ref.shape[1])
    top_ref = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    top_cand = np.argsort(-cand, axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top_ref, top_cand)]))
