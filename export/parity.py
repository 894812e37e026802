"""Exported graph vs PyTorch source on real inputs: max abs error and min cosine per case.

Tolerances are named constants that an option can override; a failure collects every failing
case and raises ParityError naming the model, the variant and the numbers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from mmrec import metrics
from mmrec.model_repository.lib import runtime
from .errors import ParityError

ATOL_FP32 = 1e-4
MIN_COSINE_FP32 = 0.99999


@dataclass
class ParityCase:
    label: str  # e.g. "batch=8 seq=64"
    max_abs_error: float
    min_cosine: float


@dataclass
class ParityReport:
    model: str
    variant: str
    atol: float
    min_cosine_required: float
    cases: list[ParityCase] = field(default_factory=list)

    @property
    def max_abs_error(self) -> float:
        return max(c.max_abs_error for c in self.cases)

    @property
    def min_cosine(self) -> float:
        return min(c.min_cosine for c in self.cases)

    @property
    def passed(self) -> bool:
        return self.max_abs_error <= self.atol and self.min_cosine >= self.min_cosine_required

    def to_dict(self) -> dict:
        return {"atol": self.atol, "min_cosine_required": self.min_cosine_required,
                "max_abs_error": self.max_abs_error, "min_cosine": self.min_cosine,
                "passed": self.passed, "cases": [asdict(c) for c in self.cases]}


def cpu_session(path: Path) -> ort.InferenceSession:
    """The served runner's ONNX Runtime session (one factory for runner, reference and gates)."""
    return runtime.make_session(path)


def check_parity(model: str, variant: str, onnx_path: Path,
                 reference: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
                 cases: list[tuple[str, dict[str, np.ndarray]]],
                 atol: float = ATOL_FP32, min_cosine: float = MIN_COSINE_FP32) -> ParityReport:
    """Run every case through ORT and the reference; raise ParityError if any case fails."""
    session = cpu_session(onnx_path)
    output_names = [o.name for o in session.get_outputs()]
    report = ParityReport(model, variant, atol, min_cosine)
    for label, feed in cases:
        got = session.run(output_names, feed)
        want = reference(feed)
        errors = [float(np.max(np.abs(g - w))) for g, w in zip(got, want)]
        cosines = [float(np.min(metrics.row_cosine(g.reshape(len(g), -1), w.reshape(len(w), -1))))
                   for g, w in zip(got, want)]
        report.cases.append(ParityCase(label, max(errors), min(cosines)))
    if not report.passed:
        failing = [c for c in report.cases if c.max_abs_error > atol or c.min_cosine < min_cosine]
        detail = "; ".join(f"{c.label}: max_abs={c.max_abs_error:.3g} min_cos={c.min_cosine:.6f}"
                           for c in failing)
        raise ParityError(f"{model} [{variant}] disagrees with PyTorch (atol {atol:g}, "
                          f"min cosine {min_cosine}): {detail}")
    return report
