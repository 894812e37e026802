"""Variants of the FP32 graphs (graph x runtime x precision), and the quality gates that admit them.

Graphs:
- text encoder INT8: static Q/DQ by NNCF (SmoothQuant, 7-bit weights, Q/K/V merged; see
  export/text_int8.py), calibrated on training captions;
- image encoder INT8: static QDQ with per-channel weights, calibrated on real images;
- FP16 (GPU targets): LayerNormalization and the softmax/reduction ops kept in FP32.
Runtimes: every CPU graph also runs on OpenVINO (FP32, BF16 where the CPU has it, and the INT8
graph with OpenVINO's own INT8 kernels); see model_repository/lib/runtime.py.
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



@dataclass(frozen=True)
class Variant:
    """One servable way to run a member: which graph, on which runtime, at which precision."""

    name: str  # the manifest's variant name
    graph: str  # fp32 | int8 | fp16: the ONNX file it runs
    runtime: str = "onnxruntime"
    precision: str = "fp32"  # runtime precision hint (OpenVINO bf16), not the graph's
    cpu: bool = True  # a CPU candidate for tuning (FP16 graphs are for GPU targets)


VARIANTS = {v.name: v for v in (
    Variant("fp32", "fp32"),
    Variant("int8", "int8"),
    Variant("fp16", "fp16", cpu=False),
    Variant("openvino-fp32", "fp32", "openvino"),
    Variant("openvino-bf16", "fp32", "openvino", "bf16"),
    Variant("openvino-int8", "int8", "openvino"),
)}


def runtime_variants(graph: str, runtimes: tuple[str, ...]) -> list[Variant]:
    """The variants other than the graph's own ORT one that run `graph` on a requested runtime."""
    return [v for v in VARIANTS.values() if v.graph == graph and v.name != graph and v.runtime in runtimes]


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
    cosine, agreement, reasons = _embedding_checks(fp32_embeddings, variant_embeddings, min_mean_cosine,
                                                   min_neighbour_agreement)
    f1_ref = metrics.macro_f1(labels, fp32_predicted, num_classes)
    f1_var = metrics.macro_f1(labels, variant_predicted, num_classes)
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


def _embedding_checks(fp32_embeddings: np.ndarray, variant_embeddings: np.ndarray, min_mean_cosine: float,
                      min_neighbour_agreement: float) -> tuple[float, float, list[str]]:
    """Mean cosine and top-k neighbour agreement with FP32, and the reasons they fail."""
    cosine = float(metrics.row_cosine(fp32_embeddings, variant_embeddings).mean())
    agreement = metrics.neighbour_agreement(fp32_embeddings, variant_embeddings, NEIGHBOURS)
    reasons = []
    if cosine < min_mean_cosine:
        reasons.append(f"mean cosine {cosine:.4f} < {min_mean_cosine}")
    if agreement < min_neighbour_agreement:
        reasons.append(f"top-{NEIGHBOURS} neighbour agreement {agreement:.3f} < {min_neighbour_agreement}")
    return cosine, agreement, reasons


def embedding_gate(variant: str, fp32_embeddings: np.ndarray, variant_embeddings: np.ndarray,
                   min_mean_cosine: float = GATE_MIN_MEAN_COSINE,
                   min_neighbour_agreement: float = GATE_MIN_NEIGHBOUR_AGREEMENT) -> GateResult:
    """The embedding half of the gate, for engines judged without the fusion head (TensorRT)."""
    cosine, agreement, reasons = _embedding_checks(fp32_embeddings, variant_embeddings, min_mean_cosine,
                                                   min_neighbour_agreement)
    return GateResult(variant, cosine, agreement, None, None, not reasons, reasons,
                      evaluated_on="TensorRT")


class ArrayCalibrationReader:
    """Feeds calibration batches (real images) to ORT's static quantizer."""

    def __init__(self, input_name: str, data: np.ndarray, batch_size: int = 8) -> None:
        self.batches = iter([{input_name: data[i:i + batch_size]} for i in range(0, len(data), batch_size)])

    def get_next(self):
        return next(self.batches, None)

    def rewind(self) -> None:  # pragma: no cover - interface completeness
        pass


# Image encoder static INT8 (choices measured on held-out items against FP32 on an AMD EPYC
# Zen 3, AVX2 without VNNI, ORT 1.32). ORT's AVX2 U8S8 convolution kernel adds pairs of u8 x s8 products
# in int16 with saturation (vpmaddubsw): with 8-bit weights and white-background images the
# integer kernels drift far from the quantized graph's own values (mean cosine 0.81 vs 0.987).
# 7-bit weights (|w| <= 64, so 2 * 255 * 64 < 2**15) make the kernels exact on every x86 CPU.
INT8_CALIBRATION = "MinMax"
INT8_PER_CHANNEL = True
# Leading Convs kept in FP32: the quantized region starts after them, so ORT cannot re-quantize
# them (an excluded Conv between DequantizeLinear and QuantizeLinear is turned back into
# QLinearConv with per-tensor weights by ORT's WeightBiasQuantization). For EfficientNet-Lite
# these are the stem and MBConv blocks 0-1 (high resolution, ~10% of the MACs), the layers whose
# weights and activations cost the most accuracy.
INT8_FP32_LEADING_CONVS = 6
# 7-bit weights on every quantized Conv that ORT runs as a GEMM (all but depthwise); depthwise
# Convs use a kernel without the int16 pair sum and keep 8 bits (7 there: -0.006 cosine).
INT8_REDUCED_RANGE_GEMM_WEIGHTS = True


@dataclass(frozen=True)
class ConvNode:
    name: str
    weight: str
    depthwise: bool  # group > 1


def conv_nodes(model: onnx.ModelProto) -> list[ConvNode]:
    """The graph's Conv nodes in (topological) graph order."""
    nodes = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            nodes.append(ConvNode(node.name, node.input[1], group > 1))
    return nodes


def quantize_static_int8(source: Path, target: Path, input_name: str, calibration: np.ndarray) -> Path:
    """Static QDQ INT8 calibrated on real data: per-channel weights, u8 activations, s8 weights;
    FP32 for the first INT8_FP32_LEADING_CONVS Convs, 7-bit weights on non-depthwise Convs.

    Held-out gate (157 items, 64 calibration images): mean cosine 0.9939 (min 0.981), top-10
    neighbour agreement 0.946; INT8/FP32 latency 0.73-0.77 at batch 1 and 0.65-0.73 at batch 32
    (2 intra-op threads, 4 interleaved runs). 8-bit weights everywhere scored 0.81 there.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(source), load_external_data=False)
    convs = conv_nodes(model)
    initializers = {i.name for i in model.graph.initializer}
    kept_fp32 = convs[:INT8_FP32_LEADING_CONVS]
    overrides = {}
    if INT8_REDUCED_RANGE_GEMM_WEIGHTS:
        overrides = {c.weight: [{"axis": 0, "reduce_range": True}]
                     for c in convs[INT8_FP32_LEADING_CONVS:] if not c.depthwise and c.weight in initializers}
    quantize_static(str(source), str(target), ArrayCalibrationReader(input_name, calibration),
                    quant_format=QuantFormat.QDQ, per_channel=INT8_PER_CHANNEL,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod[INT8_CALIBRATION],
                    nodes_to_exclude=[c.name for c in kept_fp32] or None,
                    extra_options={"TensorQuantOverrides": overrides} if overrides else None)
    return target


def convert_fp16(source: Path, target: Path) -> Path:
    """FP16 weights/compute with FP32 I/O; LayerNorm and reductions stay FP32 (overflow)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True,
                                     op_block_list=FP16_KEEP_FP32_OPS)
    onnx.save(model, str(target))
    return target
