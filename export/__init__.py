"""Export pipeline: PyTorch submodels -> validated ONNX, variants, TensorRT, Triton repository."""
