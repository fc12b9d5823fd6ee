"""GTE's improved contrastive loss: one partition function over query and document negatives in both directions."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from embedtrain.losses.in_batch import Candidates, InBatchLoss, gatherers, hardness_log_weights
from embedtrain.losses.registry import LOSSES


@LOSSES.register("gte")
class GTELoss(InBatchLoss):
    r"""Contrastive loss whose partition function holds query→document, query→query, document→query and
    document→document in-batch negatives at once.

    For query :math:`q_i`, its positive :math:`d_i`, the gathered queries :math:`Q` and the gathered document
    pool :math:`D` (every positive and hard negative of the global batch):

    .. math::
        \mathcal{L} = -\frac{1}{N}\sum_i \log \frac{e^{s(q_i, d_i)/\tau}}{Z_i},
        \qquad
        Z_i = \sum_{d \in D} e^{s(q_i, d)/\tau} + \sum_{q_j \in Q,\, j \ne i} e^{s(q_i, q_j)/\tau}
            + \sum_{q_j \in Q,\, j \ne i} e^{s(q_j, d_i)/\tau} + \sum_{d \in D,\, d \ne d_i} e^{s(d_i, d)/\tau}

    with :math:`s` the dot product (cosine similarity for normalised embeddings) and temperature :math:`\tau`
    (scale = 1/τ). The self-similarities :math:`s(q_i, q_i)` and :math:`s(d_i, d_i)` are left out, and the
    positive pair :math:`s(q_i, d_i)` appears once (in the first sum; the third sum skips j = i). With
    ``mask_false_negatives`` (and text ids) a document with the same text as :math:`d_i` and a query whose
    positive has the same text as :math:`d_i` are also left out of every sum. With ``hardness_weight`` β > 0
    every negative term of :math:`Z_i` is multiplied by its hardness weight (see
    :func:`~embedtrain.losses.in_batch.hardness_log_weights`, over all four sums of the row).

    Shapes: query (B, d), positive (B, d), negative (B·k, d) row-major or None; positive_ids (B,),
    negative_ids (B·k,) int64 text hashes. Across processes queries and documents are gathered with
    gradients, so N is the global batch; labels are offset by rank·B.

    Input columns: query, positive, zero or more hard negatives.
    Reference: Li et al., "Towards General Text Embeddings with Multi-stage Contrastive Learning",
    arXiv:2308.03281 (the "improved contrastive loss", section 3.3).

    Returns ``{"loss", "accuracy" (top-1 of the positive among the documents), "temperature"}``.
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
        if symmetric:
            raise ValueError("the gte loss holds the document→query term already; set symmetric to false")
        if not in_batch_negatives:
            raise ValueError("the gte loss is made of in-batch negatives; set in_batch_negatives to true")
        super().__init__(temperature, learnable_temperature, in_batch_negatives, mask_false_negatives,
                         gather_across_processes, hardness_weight)

    def score(
        self, query: torch.Tensor, positive: torch.Tensor, positive_ids: Optional[torch.Tensor], candidates: Candidates
    ) -> dict[str, torch.Tensor]:
        documents, labels, keep = candidates  # keep: the pool minus false negatives (the positive itself kept)
        _, gather, gather_ids = gatherers(self.gather)
        all_query = gather(query)  # (W·B, d)
        rows = torch.arange(query.shape[0], device=query.device)
        # queries to leave out of row i: q_i itself and, with masking, queries whose positive has d_i's text
        if self.mask_false_negatives and positive_ids is not None:
            other_query = gather_ids(positive_ids).unsqueeze(0) != positive_ids.unsqueeze(1)  # (B, W·B)
        else:
            other_query = torch.ones(query.shape[0], all_query.shape[0], dtype=torch.bool, device=query.device)
        other_query[rows, labels] = False
        other_document = keep.clone()
        other_document[rows, labels] = False  # d_i against itself

        similarities = torch.cat([
            query @ documents.T,  # q_i → every document (the positive at column labels[i])
            query @ all_query.T,  # q_i → other queries
            positive @ all_query.T,  # d_i → other queries (s(q_j, d_i))
            positive @ documents.T,  # d_i → other documents
        ], dim=1)
        kept = torch.cat([keep, other_query, other_query, other_document], dim=1)
        logits = self.scale() * similarities
        if self.hardness_weight:
            negatives = kept.clone()
            negatives[rows, labels] = False
            logits = logits + hardness_log_weights(similarities, negatives, self.hardness_weight)
        logits = logits.masked_fill(~kept, float("-inf"))
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits[:, : documents.shape[0]].argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach(), "temperature": (1.0 / self.scale()).detach()}
