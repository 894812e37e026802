"""TensorRT engines for the `tensorrt` target (GPU only).

- Optimization profiles cover batch 1..max_batch_size (Triton's dynamic batcher can form any
  batch up to that, so a narrower profile fails at run time: server#4038).
- Text encoders get one profile per fixed sequence bucket (fixed lengths beat dynamic ones).
- FP16 keeps LayerNormalization (and its reductions) in FP32 against overflow.
- INT8 for the text encoder uses explicit Q/DQ inserted by nvidia-modelopt (TensorRT's implicit
  calibration does not support BERT-like models well).
Everything here needs CUDA; `tensorrt_unavailable_reason()` names what is missing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ExportError

FP32_LAYER_TYPES = ("NORMALIZATION", "REDUCE")


def tensorrt_unavailable_reason() -> str | None:
    """None if engines can be built here, else why not (missing package, no GPU)."""
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError:
        return "the tensorrt package is not installed (pip install 'mmrec[gpu]')"
    try:
        import torch
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    except ImportError:  # pragma: no cover
        return "torch is not installed"
    return None


@dataclass(frozen=True)
class Profile:
    """min/opt/max shapes for every input of one optimization profile."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def batch_profiles(input_dims: dict[str, tuple[int, ...]], max_batch: int,
                   seq_buckets: tuple[int, ...] = ()) -> list[Profile]:
    """One profile per sequence bucket (or one profile if no input has a sequence axis)."""
    opt_batch = max(1, min(8, max_batch))
    has_seq = any(-1 in dims for dims in input_dims.values())
    buckets = seq_buckets if has_seq and seq_buckets else (None,)
    profiles = []
    for seq in buckets:
        shapes = {}
        for name, dims in input_dims.items():
            fixed = tuple(seq if d == -1 else d for d in dims)
            shapes[name] = ((1,) + fixed, (opt_batch,) + fixed, (max_batch,) + fixed)
        profiles.append(Profile(shapes))
    return profiles


def build_engine(onnx_path: Path, plan_path: Path, profiles: list[Profile], fp16: bool = True,
                 int8: bool = False, workspace_gib: int = 4) -> Path:
    """Parse ONNX, build a serialized engine with the given profiles, write it to plan_path."""
    reason = tensorrt_unavailable_reason()
    if reason:
        raise ExportError(f"cannot build TensorRT engine for {onnx_path.name}: {reason}")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gib << 30)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type.name in FP32_LAYER_TYPES:
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)  # explicit Q/DQ graph from modelopt
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.shapes.items():
            trt_profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(trt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT engine build failed for {onnx_path}")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    return plan_path


def modelopt_int8(onnx_path: Path, output_path: Path, calibration: dict[str, np.ndarray]) -> Path:
    """Insert INT8 Q/DQ nodes with nvidia-modelopt, calibrated on real inputs."""
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as err:
        raise ExportError("INT8 TensorRT needs nvidia-modelopt (pip install 'mmrec[gpu]')") from err
    quantize(onnx_path=str(onnx_path), quantize_mode="int8", calibration_data=calibration,
             output_path=str(output_path), calibration_eps=["cuda:0", "cpu"])
    return output_path


def run_engine(plan_path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run one batch through a built plan (GPU): how a plan is compared with the FP32 graph.

    Picks the first optimization profile whose ranges hold the feed's shapes (the text encoder
    has one per sequence bucket); buffers are torch CUDA tensors, so no pycuda is needed.
    """
    reason = tensorrt_unavailable_reason()
    if reason:
        raise ExportError(f"cannot run TensorRT engine {plan_path}: {reason}")
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    profile = next((k for k in range(engine.num_optimization_profiles)
                    if all(_fits(engine.get_tensor_profile_shape(n, k), feed[n].shape) for n in inputs)), None)
    if profile is None:
        raise ExportError(f"no optimization profile of {plan_path} holds shapes "
                          f"{ {n: feed[n].shape for n in inputs} }")
    stream = torch.cuda.Stream()
    context.set_optimization_profile_async(profile, stream.cuda_stream)
    buffers = {}
    for name in inputs:
        dtype = trt.nptype(engine.get_tensor_dtype(name))
        buffers[name] = torch.from_numpy(np.ascontiguousarray(feed[name], dtype=dtype)).cuda()
        context.set_input_shape(name, tuple(feed[name].shape))
    outputs = [n for n in names if n not in inputs]
    for name in outputs:
        dtype = torch.from_numpy(np.zeros(1, trt.nptype(engine.get_tensor_dtype(name)))).dtype
        buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
    for name, tensor in buffers.items():
        context.set_tensor_address(name, tensor.data_ptr())
    if not context.execute_async_v3(stream.cuda_stream):
        raise ExportError(f"TensorRT execution of {plan_path} failed")
    stream.synchronize()
    return [buffers[n].float().cpu().numpy() for n in outputs]


def _fits(profile_shapes, shape: tuple[int, ...]) -> bool:
    low, _, high = profile_shapes
    return all(lo <= s <= hi for lo, s, hi in zip(low, shape, high))
