"""Pooling: token states (batch, seq, dim) + mask (batch, seq) → one vector per text (batch, dim).

Each pooler matches the sentence-transformers ``Pooling`` mode of the same meaning, so a saved
model reproduces embedtrain's embeddings when loaded with ``SentenceTransformer(path)``.
"""

from __future__ import annotations

from typing import Callable

import torch

from embedtrain.registry import Registry

Pooler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
POOLERS: Registry[Pooler] = Registry("pooling")

# Our name → the sentence-transformers Pooling mode that computes the same thing.
SENTENCE_TRANSFORMERS_MODE = {"mean": "mean", "cls": "cls", "last_token": "lasttoken"}


@POOLERS.register("mean")
def mean_pooling(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the states where ``mask`` is 1 (padding excluded)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


@POOLERS.register("cls")
def cls_pooling(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The first token's state (BERT's [CLS])."""
    return hidden[:, 0]


@POOLERS.register("last_token")
def last_token_pooling(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The state of the last real token, correct under both left and right padding."""
    seq_len = mask.shape[1]
    # position of the last 1 in each row: flip, find the first 1, map back
    last = seq_len - 1 - mask.flip(1).to(torch.int64).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
