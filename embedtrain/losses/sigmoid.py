"""SigLIP's pairwise sigmoid loss."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from embedtrain.losses.distributed import gather_no_grad, gather_with_grad, world
from embedtrain.losses.registry import LOSSES


@LOSSES.register("siglip")
class SigmoidLoss(nn.Module):
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
        super().__init__()
        if symmetric:
            raise ValueError("the sigmoid loss scores each pair once, in no direction; set symmetric to false")
        log_scale = torch.tensor(math.log(1.0 / temperature))
        bias_value = torch.tensor(float(bias))
        if learnable_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale, persistent=False)
        if learnable_bias:
            self.bias = nn.Parameter(bias_value)
        else:
            self.register_buffer("bias", bias_value, persistent=False)
        self.in_batch_negatives = in_batch_negatives
        self.mask_false_negatives = mask_false_negatives
        self.gather = gather_across_processes

    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=100.0)

    def forward(
        self,
        query: torch.Tensor,
        positive: torch.Tensor,
        negative: Optional[torch.Tensor] = None,
        positive_ids: Optional[torch.Tensor] = None,
        negative_ids: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        batch = query.shape[0]
        k = 0 if negative is None else negative.shape[0] // batch
        rank, _ = world() if self.gather else (0, 1)
        gather = gather_with_grad if self.gather else (lambda t: t)
        gather_ids = gather_no_grad if self.gather else (lambda t: t)

        all_pos = gather(positive)  # (W·B, d)
        docs = torch.cat([all_pos, gather(negative)]) if k else all_pos
        scale = self.scale()
        logits = scale * query @ docs.T + self.bias  # (B, W·B + W·B·k)
        rows = torch.arange(batch, device=query.device)
        labels = rank * batch + rows
        signs = -torch.ones_like(logits)
        signs[rows, labels] = 1.0

        keep = torch.ones_like(logits, dtype=torch.bool)
        n_pos = all_pos.shape[0]
        if not self.in_batch_negatives:
            keep.zero_()
            keep[rows, labels] = True
            if k:
                own = n_pos + labels.unsqueeze(1) * k + torch.arange(k, device=query.device)
                keep[rows.unsqueeze(1), own] = True
        if self.mask_false_negatives and positive_ids is not None:
            doc_ids = [gather_ids(positive_ids)]
            if k and negative_ids is not None:
                doc_ids.append(gather_ids(negative_ids))
            same_text = torch.cat(doc_ids).unsqueeze(0) == positive_ids.unsqueeze(1)
            same_text[rows, labels] = False
            keep &= ~same_text
        pair_loss = -F.logsigmoid(signs * logits) * keep
        loss = pair_loss.sum() / batch
        accuracy = (logits.masked_fill(~keep, float("-inf")).argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach(), "temperature": (1.0 / scale).detach(),
                "bias": self.bias.detach().clone()}
