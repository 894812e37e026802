"""INT8 and FP16 variants of the FP32 graphs, and the quality gates that admit them.

- text encoder INT8: ONNX Runtime dynamic quantization (weights INT8, activations at run time);
- image encoder INT8: static QDQ with per-channel weights, calibrated on real images;
- FP16 (GPU targets): LayerNormalization and the softmax/reduction ops kept in FP32.
A variant that misses its gate is reported and left out of the repository.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from mmrec import metrics

# Gates against FP32 (named constants; the CLI can override, never silently).
GATE_MIN_MEAN_COSINE = 0.99
GATE_MIN_NEIGHBOUR_AGREEMENT = 0.9
GATE_MAX_MACRO_F1_DROP = 0.01
NEIGHBOURS = 10

FP16_KEEP_FP32_OPS = ["LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Softmax", "Erf"]


@dataclass
class GateResult:
    variant: str
    mean_cosine: float
    neighbour_agreement: float
    macro_f1_fp32: float | None
    macro_f1_variant: float | None
    passed: bool
    reasons: list[str] = field(default_factory=list)
    evaluated_on: str = "CPUExecutionProvider"
    long_input_mean_cosine: float | None = None  # text: max_seq_len inputs, where INT8 drifts most
    long_input_min_cosine: float | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def quality_gate(variant: str, fp32_embeddings: np.ndarray, variant_embeddings: np.ndarray,
                 labels: np.ndarray, fp32_predicted: np.ndarray, variant_predicted: np.ndarray,
                 num_classes: int, min_mean_cosine: float = GATE_MIN_MEAN_COSINE,
                 min_neighbour_agreement: float = GATE_MIN_NEIGHBOUR_AGREEMENT,
                 max_f1_drop: float = GATE_MAX_MACRO_F1_DROP,
                 long_inputs: tuple[np.ndarray, np.ndarray] | None = None) -> GateResult:
    """Compare a variant's held-out embeddings and interest predictions with FP32's.

    `long_inputs` = (FP32, variant) embeddings of max-length inputs: they must meet the same
    mean-cosine bar, since a short-caption gate hides error that grows with sequence length.
    """
    cosine = float(metrics.row_cosine(fp32_embeddings, variant_embeddings).mean())
    agreement = metrics.neighbour_agreement(fp32_embeddings, variant_embeddings, NEIGHBOURS)
    f1_ref = metrics.macro_f1(labels, fp32_predicted, num_classes)
    f1_var = metrics.macro_f1(labels, variant_predicted, num_classes)
    reasons = []
    if cosine < min_mean_cosine:
        reasons.append(f"mean cosine {cosine:.4f} < {min_mean_cosine}")
    if agreement < min_neighbour_agreement:
        reasons.append(f"top-{NEIGHBOURS} neighbour agreement {agreement:.3f} < {min_neighbour_agreement}")
    if f1_ref - f1_var > max_f1_drop:
        reasons.append(f"interest macro-F1 drops {100 * (f1_ref - f1_var):.2f} points "
                       f"(> {100 * max_f1_drop:.0f})")
    long_mean = long_min = None
    if long_inputs is not None:
        long_cos = metrics.row_cosine(*long_inputs)
        long_mean, long_min = float(long_cos.mean()), float(long_cos.min())
        if long_mean < min_mean_cosine:
            reasons.append(f"max-length inputs: mean cosine {long_mean:.4f} < {min_mean_cosine}")
    return GateResult(variant, cosine, agreement, f1_ref, f1_var, not reasons, reasons,
                      long_input_mean_cosine=long_mean, long_input_min_cosine=long_min)


def embedding_gate(variant: str, fp32_embeddings: np.ndarray, variant_embeddings: np.ndarray,
                   min_mean_cosine: float = GATE_MIN_MEAN_COSINE,
                   min_neighbour_agreement: float = GATE_MIN_NEIGHBOUR_AGREEMENT) -> GateResult:
    """The embedding half of the gate, for engines judged without the fusion head (TensorRT)."""
    cosine = float(metrics.row_cosine(fp32_embeddings, variant_embeddings).mean())
    agreement = metrics.neighbour_agreement(fp32_embeddings, variant_embeddings, NEIGHBOURS)
    reasons = []
    if cosine < min_mean_cosine:
        reasons.append(f"mean cosine {cosine:.4f} < {min_mean_cosine}")
    if agreement < min_neighbour_agreement:
        reasons.append(f"top-{NEIGHBOURS} neighbour agreement {agreement:.3f} < {min_neighbour_agreement}")
    return GateResult(variant, cosine, agreement, None, None, not reasons, reasons,
                      evaluated_on="TensorRT")


def quantize_dynamic_int8(source: Path, target: Path) -> Path:
    """Dynamic INT8 (MatMul/Gemm weights), the CPU recipe for BERT-family encoders."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Gemm"])
    return target


class ArrayCalibrationReader:
    """Feeds calibration batches (real images) to ORT's static quantizer."""

    def __init__(self, input_name: str, data: np.ndarray, batch_size: int = 8) -> None:
        self.batches = iter([{input_name: data[i:i + batch_size]} for i in range(0, len(data), batch_size)])

    def get_next(self):
        return next(self.batches, None)

    def rewind(self) -> None:  # pragma: no cover - interface completeness
        pass


def quantize_static_int8(source: Path, target: Path, input_name: str, calibration: np.ndarray) -> Path:
    """Static QDQ INT8 with per-channel weights, calibrated on real data."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(str(source), str(target), ArrayCalibrationReader(input_name, calibration),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return target


def convert_fp16(source: Path, target: Path) -> Path:
    """FP16 weights/compute with FP32 I/O; LayerNorm and reductions stay FP32 (overflow)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True,
                                     op_block_list=FP16_KEEP_FP32_OPS)
    onnx.save(model, str(target))
    return target
