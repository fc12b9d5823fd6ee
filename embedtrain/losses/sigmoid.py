"""SigLIP's pairwise sigmoid loss."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from embedtrain.losses.in_batch import Candidates, InBatchLoss
from embedtrain.losses.registry import LOSSES


@LOSSES.register("siglip")
class SigmoidLoss(InBatchLoss):
    r"""Every (query, document) pair is an independent binary decision: match or not.

    For the B queries :math:`q_i` of this process and the document pool :math:`D` (all positives
    and hard negatives of the global batch; with ``in_batch_negatives=False`` only the row's own
    positive and hard negatives):

    .. math::
        \mathcal{L} = -\frac{1}{B}\sum_i \sum_{d \in D} \log \sigma\big(z_{i,d}\,(s(q_i, d)/\tau + b)\big)

    with :math:`z_{i,d} = 1` for the row's own positive and :math:`-1` otherwise, :math:`s` the dot
    product (cosine similarity for normalised embeddings), temperature :math:`\tau` (scale = 1/τ;
    SigLIP starts at τ = 0.1, scale 10) and bias :math:`b` (SigLIP starts at -10 so that the many
    negative pairs do not dominate the first steps). Both are learnable by default. A document
    whose text equals the row's positive is left out of the sum when ``mask_false_negatives``.

    Shapes: query (B, d), positive (B, d), negative (B·k, d) row-major or None; positive_ids (B,),
    negative_ids (B·k,) int64 hashes. Across processes the documents are gathered with gradients;
    averaging the per-process losses (as DDP does with their gradients) gives the loss of the
    global batch, normalised by the global batch size as in the paper.

    Input columns: query (e.g. a caption), positive (e.g. its image), optional hard negatives.
    Reference: Zhai et al., "Sigmoid Loss for Language Image Pre-Training", arXiv:2303.15343.

    Returns ``{"loss", "accuracy" (the positive scores highest), "temperature", "bias"}``.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        learnable_temperature: bool = True,
        bias: float = -10.0,
        learnable_bias: bool = True,
        symmetric: bool = False,
        in_batch_negatives: bool = True,
        mask_false_negatives: bool = True,
        gather_across_processes: bool = True,
    ):
        if symmetric:
            raise ValueError("the sigmoid loss scores each pair once, in no direction; set symmetric to false")
        super().__init__(temperature, learnable_temperature, in_batch_negatives, mask_false_negatives,
                         gather_across_processes)
        bias_value = torch.tensor(float(bias))
        if learnable_bias:
            self.bias = nn.Parameter(bias_value)
        else:
            self.register_buffer("bias", bias_value, persistent=False)

    def score(
        self, query: torch.Tensor, positive: torch.Tensor, positive_ids: Optional[torch.Tensor], candidates: Candidates
    ) -> dict[str, torch.Tensor]:
        documents, labels, keep = candidates
        scale = self.scale()
        logits = scale * query @ documents.T + self.bias  # (B, W·B + W·B·k)
        signs = -torch.ones_like(logits)
        signs[torch.arange(query.shape[0], device=query.device), labels] = 1.0
        pair_loss = -F.logsigmoid(signs * logits) * keep
        loss = pair_loss.sum() / query.shape[0]
        accuracy = (logits.masked_fill(~keep, float("-inf")).argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach(), "temperature": (1.0 / scale).detach(),
                "bias": self.bias.detach().clone()}
