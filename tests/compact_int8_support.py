"""The fixed embeddings and compact loss with an int8 term that the two-process test and its one-process reference share."""

import torch
import torch.nn.functional as F

from embedtrain.losses import InfoNCELoss
from embedtrain.losses.compact import CompactLoss

ROWS, DIM = 8, 16


def embeddings() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: F.normalize(torch.randn(ROWS, DIM, generator=g), dim=-1) for k in ("query", "positive", "negative")}


def compact_int8_loss() -> CompactLoss:
    return CompactLoss(InfoNCELoss(temperature=0.05), [DIM, DIM // 2], [1.0, 0.5], ["float32", "int8"], [0.5, 1.0],
                       normalize=True, embedding_arguments=("query", "positive", "negative"))
