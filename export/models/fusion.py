"""Fusion head: attention fusion of the text and image tokens (seed 000), alignment (seed 004),
user-item score σ(item · user) (seed 002).

Text and image features are projected into one space; the two modality tokens attend to each
other (a transformer layer over a 2-token sequence), and a learned query pools them into the
fused item embedding. `alignment` is the cosine of the two projections before fusion, so it
measures how well the caption describes the picture.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from mmrec.model_repository.lib.served_contract import (IMAGE_EMBEDDING_DIM, ITEM_EMBEDDING_DIM,
                                                        TEXT_EMBEDDING_DIM, ServedContract)


@dataclass(frozen=True)
class FusionConfig:
    text_dim: int = TEXT_EMBEDDING_DIM
    image_dim: int = IMAGE_EMBEDDING_DIM
    hidden_dim: int = ITEM_EMBEDDING_DIM  # the fused item embedding's width
    num_heads: int = 4
    num_categories: int = 16
    dropout: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_contract(cls, contract: ServedContract) -> "FusionConfig":
        """The head the contract serves: its input widths, item width and categories."""
        return cls(text_dim=contract.text_dim, image_dim=contract.image_dim, hidden_dim=contract.item_dim,
                   num_categories=len(contract.categories))


class FusionHead(nn.Module):
    """(text_embedding, image_embedding) -> item_embedding, interest_probs, alignment."""

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_dim
        self.text_proj = nn.Sequential(nn.Linear(config.text_dim, d), nn.LayerNorm(d))
        self.image_proj = nn.Sequential(nn.Linear(config.image_dim, d), nn.LayerNorm(d))
        self.modality = nn.Parameter(torch.zeros(2, d))
        self.attention = nn.MultiheadAttention(d, config.num_heads, dropout=config.dropout,
                                               batch_first=True)
        self.norm1 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(config.dropout),
                                 nn.Linear(2 * d, d))
        self.norm2 = nn.LayerNorm(d)
        self.pool_query = nn.Parameter(torch.zeros(d))
        self.item_head = nn.Linear(d, d)
        self.classifier = nn.Linear(d, config.num_categories)

    def project(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_proj(text), self.image_proj(image)

    def fuse(self, text_p: torch.Tensor, image_p: torch.Tensor) -> torch.Tensor:
        tokens = torch.stack([text_p, image_p], dim=1) + self.modality
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        tokens = self.norm1(tokens + attended)
        tokens = self.norm2(tokens + self.ffn(tokens))
        weights = torch.softmax(tokens @ self.pool_query / tokens.shape[-1] ** 0.5, dim=1)
        return (weights.unsqueeze(-1) * tokens).sum(dim=1)

    def forward_logits(self, text: torch.Tensor, image: torch.Tensor):
        """Training view: (item_embedding, logits, text_p, image_p)."""
        text_p, image_p = self.project(text, image)
        fused = self.fuse(text_p, image_p)
        item = F.normalize(self.item_head(fused), dim=-1)
        return item, self.classifier(fused), text_p, image_p

    def forward(self, text_embedding: torch.Tensor, image_embedding: torch.Tensor):
        item, logits, text_p, image_p = self.forward_logits(text_embedding, image_embedding)
        alignment = F.cosine_similarity(text_p, image_p, dim=-1, eps=1e-8).unsqueeze(-1)
        return item, torch.softmax(logits, dim=-1), alignment


class UserItemScorer(nn.Module):
    """score = σ(item_embedding · user_embedding); a user vector is the mean of the embeddings
    of items the user engaged with (seed 003), see `mmrec.client` `user_vector`."""

    def forward(self, item_embedding: torch.Tensor, user_embedding: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((item_embedding * user_embedding).sum(dim=-1, keepdim=True))

