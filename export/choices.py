"""What the export and tune commands offer on the command line, and their progress sink.

Light to import on purpose: `mmrec` builds every subcommand's options when it starts, so
anything imported here is paid by `mmrec serve` and `mmrec score` too. The pipeline, the models
and the tuner (torch, ONNX, OpenVINO) are imported by the commands when they run.
"""
from __future__ import annotations

from enum import Enum
from typing import Callable


class Target(str, Enum):
    """Where the repository is served: the backend each member runs on."""

    portable = "portable"
    onnxruntime = "onnxruntime"
    openvino = "openvino"
    tensorrt = "tensorrt"


PRECISIONS = ("fp32", "int8", "fp16")  # variants built and gated per quantizable member
DEFAULT_SEEDS = 5  # training seeds behind the reported mean +- std
DEFAULT_IMAGE_ENCODER = "efficientnet-lite0"
DEFAULT_TUNE_ROUNDS = 10  # rounds, not calls, are the independent repeats (mmrec.stats): >= 10 of them


class Reporter:
    """Progress sink; the CLI passes a rich-based one, tests a silent one."""

    def step(self, title: str, total: int | None = None) -> Callable[[int], None]:
        return lambda n=1: None

    def done(self, message: str) -> None:
        pass
