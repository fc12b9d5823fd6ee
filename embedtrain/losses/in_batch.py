"""What InfoNCE and the sigmoid loss share: a temperature, and the pool of documents each query is scored against."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import nn

from embedtrain.losses.distributed import gather_no_grad, gather_with_grad, world


class Candidates(NamedTuple):
    documents: torch.Tensor
    """(W·B + W·B·k, d): the positives of every process, then their hard negatives."""
    labels: torch.Tensor
    """(B,): the column of each query's own positive in ``documents``."""
    keep: torch.Tensor
    """(B, W·B + W·B·k) bool: the documents each query is scored against."""


class InBatchLoss(nn.Module):
    """Base of the losses that score each query against the documents of the (global) batch.

    It holds the temperature τ (as ``log_scale`` = log 1/τ, a parameter when learnable, else a buffer) and
    builds the :class:`Candidates` of each batch; a subclass scores them in :meth:`score`.
    """

    def __init__(
        self,
        temperature: float,
        learnable_temperature: bool,
        in_batch_negatives: bool,
        mask_false_negatives: bool,
        gather_across_processes: bool,
        hardness_weight: float = 0.0,
    ):
        """``hardness_weight``: β of the hardness-weighted negatives of the softmax losses (0 = off)."""
        if hardness_weight < 0:
            raise ValueError(f"hardness_weight must be 0 or more, got {hardness_weight}")
        super().__init__()
        self.hardness_weight = float(hardness_weight)
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learnable_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale, persistent=False)
        self.in_batch_negatives = in_batch_negatives
        self.mask_false_negatives = mask_false_negatives
        self.gather = gather_across_processes

    @property
    def masks_repeated_documents(self) -> bool:
        """Whether a document repeated across rows of a batch is harmless: masked as a false negative, or
        never a candidate of another row (no in-batch negatives). The epoch plan then lets documents repeat."""
        return self.mask_false_negatives or not self.in_batch_negatives

    def scale(self) -> torch.Tensor:
        # clamp as CLIP does so a learnable temperature cannot collapse below 0.01
        return self.log_scale.exp().clamp(max=100.0)

    def forward(
        self,
        query: torch.Tensor,
        positive: torch.Tensor,
        negative: Optional[torch.Tensor] = None,
        positive_ids: Optional[torch.Tensor] = None,
        negative_ids: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        candidates = candidate_documents(
            query, positive, negative, positive_ids, negative_ids, self.in_batch_negatives, self.mask_false_negatives,
            self.gather,
        )
        return self.score(query, positive, positive_ids, candidates)

    def score(
        self, query: torch.Tensor, positive: torch.Tensor, positive_ids: Optional[torch.Tensor], candidates: Candidates
    ) -> dict[str, torch.Tensor]:
        """The loss and its diagnostics for this batch's queries against ``candidates``."""
        raise NotImplementedError


def candidate_documents(
    query: torch.Tensor,
    positive: torch.Tensor,
    negative: Optional[torch.Tensor],
    positive_ids: Optional[torch.Tensor],
    negative_ids: Optional[torch.Tensor],
    in_batch_negatives: bool,
    mask_false_negatives: bool,
    across_processes: bool,
) -> Candidates:
    """The document pool of a batch, gathered across processes (with gradients) when ``across_processes``.

    Without ``in_batch_negatives`` a query keeps only its own positive and hard negatives. With
    ``mask_false_negatives`` (and ``positive_ids``) a document whose text equals the query's positive,
    other than that positive itself, is left out. Shapes as in :class:`~embedtrain.losses.InfoNCELoss`.
    """
    batch = query.shape[0]
    k = 0 if negative is None else negative.shape[0] // batch
    rank, gather, gather_ids = gatherers(across_processes)
    all_pos = gather(positive)  # (W·B, d)
    documents = torch.cat([all_pos, gather(negative)]) if k else all_pos
    rows = torch.arange(batch, device=query.device)
    labels = rank * batch + rows
    keep = torch.ones(batch, documents.shape[0], dtype=torch.bool, device=query.device)
    if not in_batch_negatives:
        keep.zero_()
        keep[rows, labels] = True
        if k:
            own = all_pos.shape[0] + labels.unsqueeze(1) * k + torch.arange(k, device=query.device)
            keep[rows.unsqueeze(1), own] = True
    if mask_false_negatives and positive_ids is not None:
        doc_ids = [gather_ids(positive_ids)]
        if k and negative_ids is not None:
            doc_ids.append(gather_ids(negative_ids))
        same_text = torch.cat(doc_ids).unsqueeze(0) == positive_ids.unsqueeze(1)
        same_text[rows, labels] = False
        keep &= ~same_text
    return Candidates(documents, labels, keep)


def hardness_log_weights(similarities: torch.Tensor, negatives: torch.Tensor, beta: float) -> torch.Tensor:
    r"""Log-weights that make each row's negatives count by their hardness (zero where ``negatives`` is False).

    .. math::
        w_{ij} = \frac{\exp(\beta\, s_{ij})}{\frac{1}{|N_i|}\sum_{k \in N_i} \exp(\beta\, s_{ik})}, \qquad j \in N_i

    with :math:`s` the raw similarity (before the temperature) and :math:`N_i` row i's negatives: the weights
    average 1 over a row, so β = 0 gives every negative weight 1 (plain InfoNCE), and a larger β puts more of
    the partition function on the negatives most similar to the query. The weights are treated as constants
    (no gradient flows through them), as in Robinson et al., "Contrastive Learning with Hard Negative Samples",
    ICLR 2021, arXiv:2010.04592. Adding :math:`\log w_{ij}` to a logit multiplies its term of the softmax
    denominator by :math:`w_{ij}`. Shapes: similarities and negatives (B, M); returns (B, M).
    """
    if beta == 0:
        return torch.zeros_like(similarities)
    scaled = (beta * similarities.detach()).masked_fill(~negatives, float("-inf"))
    count = negatives.sum(dim=1, keepdim=True).clamp(min=1)
    log_mean = torch.logsumexp(scaled, dim=1, keepdim=True) - count.log()
    # a row without negatives has log_mean = -inf; where() keeps its entries at 0
    return torch.where(negatives, scaled - log_mean, torch.zeros_like(scaled))


def gatherers(across_processes: bool):
    """(rank, gather with gradients, gather without): the shared helpers, or rank 0 and no-ops for one process."""
    if not across_processes:
        return 0, (lambda t: t), (lambda t: t)
    return world()[0], gather_with_grad, gather_no_grad
