"""torch -> ONNX for one submodel, named and shaped from mmrec.schema (one axis vocabulary)."""
from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

from mmrec.schema import ModelSpec

OPSET = 17  # >= 17 keeps LayerNormalization as one op (FP32-pinnable under FP16)


def export_onnx(model: torch.nn.Module, spec: ModelSpec, sample_inputs: tuple[torch.Tensor, ...],
                path: Path, opset: int = OPSET) -> Path:
    """Export with the spec's tensor names and dynamic axes, then check the graph."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic_axes = {t.name: t.onnx_axes() for t in spec.inputs + spec.outputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter; parity checks are the real guard
        torch.onnx.export(
            model.eval(), sample_inputs, str(path),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    return path


def slim(source: Path, target: Path) -> Path:
    """Graph cleanup with onnxslim (constant folding, dead-node and redundant-op removal)."""
    import onnxslim

    model = onnxslim.slim(onnx.load(str(source)))
    onnx.save(model, str(target))
    return target

