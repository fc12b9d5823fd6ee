"""Zero-shot metric-learning evaluation: Recall@K and MAP@R on classes never seen in training.

Every test image is a query against all other test images (cosine similarity, the query itself
left out):

- Recall@K: the fraction of queries with at least one image of their class among the K nearest
  (Song et al. 2016, the usual CUB-200 / Cars-196 / SOP protocol);
- MAP@R (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020): with R the number of other
  images of the query's class, the mean over queries of
  :math:`\\frac{1}{R}\\sum_{i=1}^{R} P@i \\cdot \\mathrm{rel}(i)` over the R nearest neighbours.

A query whose class has no other test image can neither hit nor be ranked; such queries are left out
of every metric, and their number is reported as ``singletons``. Figures are on a 0-1 scale.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

RECALL_AT = (1, 2, 4, 8)


def dml_metrics(embeddings: torch.Tensor, labels: torch.Tensor, recall_at: Sequence[int] = RECALL_AT,
                chunk: int = 1024) -> dict[str, float]:
    """``recall@K`` for each K, ``map@r``, and the counts ``queries`` and ``singletons``."""
    x = F.normalize(embeddings.float(), dim=-1)
    labels = torch.as_tensor(labels).long().to(x.device)
    n = x.shape[0]
    same_counts = torch.bincount(labels)[labels] - 1  # R for every query
    valid = same_counts > 0
    if n < 2 or not bool(valid.any()):
        raise ValueError("DML evaluation needs at least one class with two or more images")
    k_max = min(n - 1, max(max(recall_at), int(same_counts.max())))
    hits = {k: 0 for k in recall_at}
    ap_sum = 0.0
    for start in range(0, n, chunk):
        q = slice(start, min(start + chunk, n))
        sims = x[q] @ x.T
        rows = torch.arange(q.start, q.stop, device=x.device)
        sims[torch.arange(len(rows)), rows] = float("-inf")  # never retrieve the query itself
        neighbours = sims.topk(k_max, dim=1).indices  # (q, k_max), nearest first
        relevant = labels[neighbours] == labels[q, None]
        ok = valid[q]
        for k in recall_at:
            hits[k] += int((relevant[:, :k].any(dim=1) & ok).sum())
        r = same_counts[q].clamp(min=1)
        ranks = torch.arange(1, k_max + 1, device=x.device)
        within_r = ranks[None, :] <= r[:, None]
        rel = (relevant & within_r).float()
        precision_at_i = rel.cumsum(dim=1) / ranks[None, :]
        ap = (precision_at_i * rel).sum(dim=1) / r
        ap_sum += float(ap[ok].sum())
    queries = int(valid.sum())
    out = {f"recall@{k}": hits[k] / queries for k in recall_at}
    out["map@r"] = ap_sum / queries
    out["queries"] = queries
    out["singletons"] = int(n - queries)
    return out


@torch.no_grad()
def embed_batches(encode: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[dict],
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (N, d) and labels (N,) of batches ``{"pixels", "labels"}`` through ``encode``."""
    embs, labels = [], []
    for batch in batches:
        embs.append(encode(batch["pixels"].to(device)).float().cpu())
        labels.append(batch["labels"].cpu())
    return torch.cat(embs), torch.cat(labels)


def evaluate_dml(model: torch.nn.Module, batches: Iterable[dict], recall_at: Sequence[int] = RECALL_AT,
                 device: torch.device | str | None = None) -> dict[str, float]:
    """Zero-shot DML metrics of ``model`` (images → embeddings) on labelled test batches.

    The model runs in eval mode (its mode is restored afterwards).
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        embeddings, labels = embed_batches(model, batches, device)
    finally:
        model.train(was_training)
    return dml_metrics(embeddings, labels, recall_at)
