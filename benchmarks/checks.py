"""Output checks before timing: an engine is only timed once its outputs agree with PyTorch.

The tolerances are the export's own named constants, never loosened here:
- FP32 graphs: max |Δ| ≤ ATOL_FP32 (1e-4) and min row cosine ≥ MIN_COSINE_FP32 on every output;
- INT8/FP16 variants: mean row cosine of the embedding output ≥ GATE_MIN_MEAN_COSINE (0.99),
  the export's variant gate (min cosine and max |Δ| are recorded too). As in the export gate,
  interest probabilities are not judged by cosine (a probability vector near a decision
  boundary moves a lot when the prediction flips): the quality section judges them by the
  macro-F1 drop on all held-out items.
One-value-per-row outputs (alignment) have no meaningful row cosine; max |Δ| covers them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from mmrec import metrics
from mmrec.export.parity import ATOL_FP32, MIN_COSINE_FP32
from mmrec.export.variants import GATE_MIN_MEAN_COSINE


@dataclass
class CheckResult:
    rule: str
    max_abs_error: float
    min_cosine: float
    mean_cosine: float
    passed: bool
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(len(a), -1) if a.ndim > 1 else a.reshape(-1, 1)


def _cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray | None:
    """Row cosines of a vector output; None for one-value-per-row outputs (alignment, score),
    where a cosine only says whether the sign agrees: those are judged by max |Δ| alone."""
    g, w = _rows(got), _rows(want)
    if g.shape[1] == 1:
        return None
    return metrics.row_cosine(g, w)


EMBEDDING_OUTPUT = 0  # every benchmarked model's first output is its embedding


def compare(precision: str, got: list[np.ndarray], want: list[np.ndarray],
            atol: float = ATOL_FP32, min_cosine: float = MIN_COSINE_FP32,
            min_mean_cosine: float = GATE_MIN_MEAN_COSINE) -> CheckResult:
    """Compare an engine's outputs with PyTorch's under the rule for its precision."""
    if len(got) != len(want):
        return CheckResult("outputs", float("nan"), float("nan"), float("nan"), False,
                           f"{len(got)} outputs, PyTorch gives {len(want)}")
    for g, w in zip(got, want):
        if np.shape(g) != np.shape(w):
            return CheckResult("shapes", float("nan"), float("nan"), float("nan"), False,
                               f"shape {np.shape(g)} vs PyTorch {np.shape(w)}")
    max_abs = max(float(np.max(np.abs(np.asarray(g, np.float64) - w))) for g, w in zip(got, want))
    judged = list(zip(got, want)) if precision == "fp32" else [(got[EMBEDDING_OUTPUT], want[EMBEDDING_OUTPUT])]
    cosines = [c for c in (_cosines(g, w) for g, w in judged) if c is not None]
    min_cos = min((float(c.min()) for c in cosines), default=1.0)
    mean_cos = min((float(c.mean()) for c in cosines), default=1.0)
    if precision == "fp32":
        rule = f"max|Δ| ≤ {atol:g} and min cosine ≥ {min_cosine}"
        reasons = []
        if not max_abs <= atol:
            reasons.append(f"max|Δ| {max_abs:.3g} > {atol:g}")
        if not min_cos >= min_cosine:
            reasons.append(f"min cosine {min_cos:.6f} < {min_cosine}")
    else:
        rule = f"embedding mean cosine ≥ {min_mean_cosine} (export variant gate)"
        reasons = [] if mean_cos >= min_mean_cosine else [f"mean cosine {mean_cos:.4f} < {min_mean_cosine}"]
    return CheckResult(rule, max_abs, min_cos, mean_cos, not reasons, "; ".join(reasons))
