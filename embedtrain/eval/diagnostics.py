"""Label-free diagnostics of an embedding space: effective rank, alignment, uniformity, similarity gaps.

Pure functions of embedding tensors (no model, no data): the training loop computes them on a probe
set of training rows held out from training, and ``embedtrain inspect`` on any saved model.

- **RankMe** (Garrido et al., 2023, "RankMe: Assessing the downstream performance of pretrained
  self-supervised representations by their rank"): with σ_k the singular values of the embedding
  matrix E (n x d) and p_k = σ_k / Σ_j σ_j + ε, RankMe(E) = exp(-Σ_k p_k log p_k). It equals r for a
  matrix with r equal non-zero singular values and falls toward 1 as the space collapses.
- **Alignment** (Wang and Isola, 2020, "Understanding contrastive representation learning through
  alignment and uniformity on the hypersphere"): mean over positive pairs of ||f(x) - f(y)||₂^α (α = 2);
  lower is better aligned.
- **Uniformity** (same paper): log( mean over pairs i < j of exp(-t ||f(x_i) - f(x_j)||₂²) ) (t = 2); it is
  at most 0, and 0 means every embedding is the same point (collapse); lower is more uniform.
- **Random-pair cosine**: the mean cosine similarity over all pairs i ≠ j (the expectation of the cosine
  of two random probe texts); near 1 means the embeddings crowd into a cone.
- **Similarity gap**: mean over queries of cos(q_i, p_i) - max_{j≠i} cos(q_i, p_j), the positive's margin
  over the hardest other positive of the probe set (the probe set is one batch); negative means the hardest
  negative outranks the positive.

Alignment and uniformity are defined on the unit sphere: the functions L2-normalise their inputs first
(a no-op for models that already normalise).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

RANKME_EPSILON = 1e-7
"""The ε of RankMe's p_k (the paper's value), so that log p_k is finite for zero singular values."""


def rankme(embeddings: torch.Tensor, eps: float = RANKME_EPSILON) -> float:
    """Effective rank exp(H(p)) of an (n, d) embedding matrix, p the L1-normalised singular values (+ ε).

    Computed in float64: the singular values of a few hundred rows are cheap, and float32 rounding in
    the small ones would otherwise add entropy that is not there.
    """
    _check_matrix(embeddings, "embeddings")
    singular = torch.linalg.svdvals(embeddings.detach().double())
    total = singular.sum()
    if total <= 0:
        return 1.0  # an all-zero matrix: one point, rank 1 by convention of a fully collapsed space
    p = singular / total + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def alignment(queries: torch.Tensor, positives: torch.Tensor, alpha: float = 2.0) -> float:
    """Mean ||q_i - p_i||₂^α over positive pairs of unit vectors (rows of the two (n, d) tensors)."""
    q, p = _unit_pairs(queries, positives)
    return float((q - p).norm(dim=1).pow(alpha).mean())


def uniformity(embeddings: torch.Tensor, t: float = 2.0) -> float:
    """log mean_{i<j} exp(-t ||x_i - x_j||₂²) over the rows of an (n, d) tensor of unit vectors (n ≥ 2)."""
    _check_matrix(embeddings, "embeddings", min_rows=2)
    x = F.normalize(embeddings.detach().double(), dim=1)
    sq = torch.pdist(x).pow(2)  # the n(n-1)/2 pairs i < j
    # log of a mean of exponentials, stably: logsumexp - log(count)
    return float(torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel()))


def random_pair_cosine(embeddings: torch.Tensor) -> float:
    """Mean cosine similarity over all ordered pairs i ≠ j of rows (n ≥ 2)."""
    _check_matrix(embeddings, "embeddings", min_rows=2)
    x = F.normalize(embeddings.detach().double(), dim=1)
    n = x.shape[0]
    # Σ_{i≠j} x_i·x_j = ||Σ_i x_i||² - Σ_i ||x_i||² (= n for unit rows)
    total = x.sum(dim=0).pow(2).sum() - (x * x).sum()
    return float(total / (n * (n - 1)))


def similarity_gap(queries: torch.Tensor, positives: torch.Tensor) -> float:
    """Mean over i of cos(q_i, p_i) - max_{j≠i} cos(q_i, p_j) (n ≥ 2 pairs)."""
    q, p = _unit_pairs(queries, positives, min_rows=2)
    sims = q @ p.T
    positive = sims.diagonal()
    hardest = sims.masked_fill(torch.eye(len(q), dtype=torch.bool), float("-inf")).max(dim=1).values
    return float((positive - hardest).mean())


def diagnose(texts: torch.Tensor, queries: Optional[torch.Tensor] = None,
             positives: Optional[torch.Tensor] = None) -> dict[str, float]:
    """Every diagnostic of one probe set: ``rankme``, ``uniformity`` and ``random_cosine`` of ``texts``
    (all probe embeddings, one per row), plus ``alignment`` and ``similarity_gap`` when the probe has
    (query, positive) pairs."""
    out = {"rankme": rankme(texts), "uniformity": uniformity(texts), "random_cosine": random_pair_cosine(texts)}
    if queries is not None and positives is not None:
        out["alignment"] = alignment(queries, positives)
        out["similarity_gap"] = similarity_gap(queries, positives)
    return out


def collapse_warnings(current: dict[str, float], reference: dict[str, float], rank_fraction: float,
                      uniformity_fraction: float) -> list[str]:
    """Reasons to warn: RankMe below ``rank_fraction`` x its reference value, or uniformity (≤ 0, 0 at
    collapse) shrunk in magnitude below ``uniformity_fraction`` x the reference's. A fraction of 0 turns
    its check off."""
    warnings = []
    rank, rank0 = current.get("rankme"), reference.get("rankme")
    if rank_fraction > 0 and rank is not None and rank0 and rank < rank_fraction * rank0:
        warnings.append(f"effective rank {rank:.1f} is below {rank_fraction:g} x its step-0 value {rank0:.1f}")
    unif, unif0 = current.get("uniformity"), reference.get("uniformity")
    if uniformity_fraction > 0 and unif is not None and unif0 and abs(unif) < uniformity_fraction * abs(unif0):
        warnings.append(f"uniformity {unif:.3f} has collapsed toward 0 (below {uniformity_fraction:g} x its "
                        f"step-0 magnitude {abs(unif0):.3f})")
    return warnings


def format_diagnostics(values: dict[str, float]) -> str:
    """One log line's worth: ``rankme 212.4, alignment 0.612, ...``."""
    return ", ".join(f"{k} {v:.1f}" if k == "rankme" else f"{k} {v:.3f}" for k, v in values.items())


def _check_matrix(x: torch.Tensor, name: str, min_rows: int = 1) -> None:
    if x.dim() != 2 or x.shape[0] < min_rows:
        raise ValueError(f"{name}: expected an (n, d) tensor with n >= {min_rows}, got shape {tuple(x.shape)}")


def _unit_pairs(queries: torch.Tensor, positives: torch.Tensor, min_rows: int = 1):
    _check_matrix(queries, "queries", min_rows)
    if queries.shape != positives.shape:
        raise ValueError(f"positives: shape {tuple(positives.shape)} differs from the queries' {tuple(queries.shape)}")
    return F.normalize(queries.detach().double(), dim=1), F.normalize(positives.detach().double(), dim=1)
