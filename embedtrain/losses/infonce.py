"""InfoNCE over in-batch and hard negatives."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from embedtrain.losses.in_batch import Candidates, InBatchLoss, gatherers, hardness_log_weights
from embedtrain.losses.registry import LOSSES


@LOSSES.register("infonce")
class InfoNCELoss(InBatchLoss):
    r"""Contrastive loss of each query against its positive and a pool of negatives.

    For query :math:`q_i`, positive :math:`p_i` and the document pool :math:`D` (all positives and
    hard negatives of the global batch when in-batch negatives are on, else only
    :math:`p_i` and the row's own hard negatives :math:`n_{i,1..k}`):

    .. math::
        \mathcal{L}_{q \to d} = -\frac{1}{N}\sum_i \log
            \frac{\exp(s(q_i, p_i)/\tau)}{\sum_{d \in D_i} \exp(s(q_i, d)/\tau)}

    with :math:`s` the dot product (cosine similarity for normalised embeddings) and temperature
    :math:`\tau` (scale = 1/τ; sentence-transformers' default scale 20 is τ = 0.05). With
    ``symmetric=True`` the loss is :math:`\tfrac12(\mathcal{L}_{q\to d} + \mathcal{L}_{d\to q})`,
    where each positive retrieves its query among the batch's queries. A document whose text equals
    the row's positive (a false negative) is removed from :math:`D_i` when ``mask_false_negatives``.

    With ``hardness_weight`` β > 0 each negative's term of the denominator is multiplied by
    :math:`w = e^{\beta s(q_i, d)} / \mathrm{mean}_{d' \in N_i} e^{\beta s(q_i, d')}` (constant, no gradient;
    see :func:`~embedtrain.losses.in_batch.hardness_log_weights`); β = 0 is the plain loss above.

    Shapes: query (B, d), positive (B, d), negative (B·k, d) row-major (row i's negatives are
    i·k … i·k+k-1) or None; positive_ids (B,), negative_ids (B·k,) int64 text hashes. Across
    processes the documents (and queries, for the symmetric term) are gathered with gradients, so
    N is the global batch; labels are offset by rank·B.

    Input columns: query, positive, zero or more hard negatives.
    Reference: van den Oord et al., "Representation Learning with Contrastive Predictive Coding",
    arXiv:1807.03748; in-batch negatives as in Henderson et al. 2017 / Karpukhin et al. 2020 (DPR).

    Returns ``{"loss", "accuracy" (top-1 of the positive), "temperature"}``.
    """

    def __init__(
        self,
        temperature: float = 0.05,
        learnable_temperature: bool = False,
        symmetric: bool = False,
        in_batch_negatives: bool = True,
        mask_false_negatives: bool = True,
        gather_across_processes: bool = True,
        hardness_weight: float = 0.0,
    ):
        if symmetric and not in_batch_negatives:
            raise ValueError("symmetric InfoNCE needs in-batch negatives: a positive's only candidate would be its query")
        super().__init__(temperature, learnable_temperature, in_batch_negatives, mask_false_negatives,
                         gather_across_processes, hardness_weight)
        self.symmetric = symmetric

    def score(
        self, query: torch.Tensor, positive: torch.Tensor, positive_ids: Optional[torch.Tensor], candidates: Candidates
    ) -> dict[str, torch.Tensor]:
        documents, labels, keep = candidates
        scale = self.scale()
        rows = torch.arange(query.shape[0], device=query.device)
        logits = scale * query @ documents.T  # (B, W·B + W·B·k)
        if self.hardness_weight:
            logits = logits + self._hardness(query @ documents.T, keep, rows, labels)
        logits = logits.masked_fill(~keep, float("-inf"))
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()

        if self.symmetric:
            _, gather, gather_ids = gatherers(self.gather)
            all_query = gather(query)  # (W·B, d)
            back = scale * positive @ all_query.T  # (B, W·B)
            same = torch.zeros_like(back, dtype=torch.bool)
            if self.mask_false_negatives and positive_ids is not None:
                # another query whose positive has the same text is also a correct match
                same = gather_ids(positive_ids).unsqueeze(0) == positive_ids.unsqueeze(1)
                same[rows, labels] = False
            if self.hardness_weight:
                back = back + self._hardness(positive @ all_query.T, ~same, rows, labels)
            back = back.masked_fill(same, float("-inf"))
            loss = 0.5 * (loss + F.cross_entropy(back, labels))
        return {"loss": loss, "accuracy": accuracy.detach(), "temperature": (1.0 / scale).detach()}

    def _hardness(self, similarities: torch.Tensor, keep: torch.Tensor, rows: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
        """Hardness log-weights of the kept candidates other than each row's positive."""
        negatives = keep.clone()
        negatives[rows, labels] = False
        return hardness_log_weights(similarities, negatives, self.hardness_weight)
