"""mmrec: optimized Triton/ONNX inference for multimodal (text + image) user-interest models."""
__version__ = "0.1.0"
