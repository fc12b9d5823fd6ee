"""Proxy-based metric-learning losses (Proxy-Anchor, normalized softmax) with optional Metrix mixup.

Both losses see embeddings x (B, d), class labels y (B,) and one proxy per class p (C, d); both
work on cosine similarities s(x, p) (inputs are L2-normalised here). They are written for soft
targets: w(x, c) in [0, 1] is how much x belongs to class c (one-hot for real images, two non-zero
entries for a mixed embedding), so the mixup variant needs no second implementation.

Metrix (Venkataramanan et al., "It Takes Two to Tango: Mixup for Deep Metric Learning", ICLR 2022,
arXiv:2106.04990), embedding variant: each embedding x_i is mixed with the embedding x_j of an
image of another class, :math:`\\tilde x = \\mathrm{normalize}(\\lambda x_i + (1-\\lambda) x_j)` with
:math:`\\lambda \\sim \\mathrm{Beta}(b, b)`; its target is λ for y_i and 1-λ for y_j. For Proxy-Anchor
the mixed example counts as a positive of each proxy with its target weight and as a negative with
the rest (Metrix's positive/negative interpolation). The training loss is
:math:`\\mathcal L(X) + w\\,\\mathcal L(\\tilde X)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from embedtrain.losses.registry import PROXY_LOSSES


def one_hot_targets(labels: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    return F.one_hot(labels, num_classes).to(dtype)


def metrix_mix(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int,
               beta: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed embeddings (M, d) and their soft targets (M, C): each row mixed with a row of another class.

    Rows whose class is the only one in the batch are left out (M ≤ B). Partners are drawn uniformly
    among the rows of other classes and λ ~ Beta(beta, beta) per row, from torch's global random state
    (seeded by the trainer and restored on resume).
    """
    different = labels.unsqueeze(0) != labels.unsqueeze(1)  # (B, B)
    rows = different.any(dim=1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return embeddings.new_zeros(0, embeddings.shape[1]), embeddings.new_zeros(0, num_classes)
    partners = torch.multinomial(different[rows].float(), 1).squeeze(1)
    lam = torch.distributions.Beta(float(beta), float(beta)).sample((rows.numel(),))
    lam = lam.to(device=embeddings.device, dtype=embeddings.dtype)[:, None]
    x = F.normalize(embeddings, dim=-1)
    mixed = F.normalize(lam * x[rows] + (1 - lam) * x[partners], dim=-1)
    targets = lam * one_hot_targets(labels[rows], num_classes, embeddings.dtype) + \
        (1 - lam) * one_hot_targets(labels[partners], num_classes, embeddings.dtype)
    return mixed, targets


class _ProxyLoss(nn.Module):
    """Shared plumbing: clean loss, optional Metrix term, accuracy of the nearest proxy."""

    def __init__(self, metrix: bool = False, metrix_weight: float = 1.0, metrix_beta: float = 2.0):
        super().__init__()
        self.metrix, self.metrix_weight, self.metrix_beta = metrix, float(metrix_weight), float(metrix_beta)

    def soft_loss(self, similarities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor) -> dict[str, torch.Tensor]:
        num_classes = proxies.shape[0]
        p = F.normalize(proxies, dim=-1)
        x = F.normalize(embeddings, dim=-1)
        sims = x @ p.T  # (B, C)
        clean = self.soft_loss(sims, one_hot_targets(labels, num_classes, sims.dtype))
        out = {"clean_loss": clean.detach(), "accuracy": (sims.argmax(dim=1) == labels).float().mean().detach()}
        loss = clean
        if self.metrix and self.training and self.metrix_weight > 0:
            mixed, targets = metrix_mix(embeddings, labels, num_classes, self.metrix_beta)
            if mixed.shape[0]:
                mixed_loss = self.soft_loss(mixed @ p.T, targets)
                loss = loss + self.metrix_weight * mixed_loss
                out["mixed_loss"] = mixed_loss.detach()
        out["loss"] = loss
        return out


@PROXY_LOSSES.register("proxy_anchor")
class ProxyAnchorLoss(_ProxyLoss):
    r"""Proxy-Anchor loss (Kim et al., "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020, arXiv:2003.13911).

    .. math::
        \mathcal{L} = \frac{1}{|P^+|}\sum_{p \in P^+} \log\Big(1 + \sum_{x} w(x,p)\, e^{-\alpha (s(x,p) - \delta)}\Big)
                    + \frac{1}{|P|}\sum_{p \in P} \log\Big(1 + \sum_{x} (1 - w(x,p))\, e^{\alpha (s(x,p) + \delta)}\Big)

    with cosine similarity s, scale α (``scale``, 32 by default; α = 1/τ), margin δ (``margin``, 0.1),
    P all proxies and P⁺ the proxies with a positive in the batch; w(x, p) is 1 when x is of p's class
    (soft for Metrix-mixed embeddings). Shapes: embeddings (B, d), labels (B,), proxies (C, d).
    Returns ``{"loss", "clean_loss", "accuracy" (nearest proxy is the label's), "mixed_loss" with Metrix}``.
    """

    def __init__(self, scale: float = 32.0, margin: float = 0.1, **metrix):
        super().__init__(**metrix)
        self.scale, self.margin = float(scale), float(margin)

    def soft_loss(self, similarities, targets):
        a, d = self.scale, self.margin
        # log(1 + Σ w e^z) = logsumexp over [0, z + log w]; w = 0 gives -inf, i.e. no term
        pos = torch.logsumexp(_with_zero(-a * (similarities - d) + torch.log(targets)), dim=0)  # (C,)
        neg = torch.logsumexp(_with_zero(a * (similarities + d) + torch.log1p(-targets.clamp(max=1.0))), dim=0)
        with_positive = targets.sum(dim=0) > 0
        return pos[with_positive].sum() / with_positive.sum().clamp(min=1) + neg.mean()


@PROXY_LOSSES.register("normalized_softmax")
class NormalizedSoftmaxLoss(_ProxyLoss):
    r"""Normalized softmax (Zhai & Wu, "Classification is a Strong Baseline for Deep Metric Learning",
    BMVC 2019, arXiv:1811.12649): cross-entropy over cosine similarities to all proxies.

    .. math::
        \mathcal{L} = -\frac{1}{B}\sum_{x} \sum_{c} w(x,c) \log \frac{e^{s(x,p_c)/\tau}}{\sum_{c'} e^{s(x,p_{c'})/\tau}}

    with temperature τ (``temperature``, 0.05; scale = 1/τ = 20) and targets w (one-hot, or soft
    for Metrix-mixed embeddings). Shapes: embeddings (B, d), labels (B,), proxies (C, d).
    Returns ``{"loss", "clean_loss", "accuracy", "mixed_loss" with Metrix}``.
    """

    def __init__(self, temperature: float = 0.05, **metrix):
        super().__init__(**metrix)
        self.temperature = float(temperature)

    def soft_loss(self, similarities, targets):
        log_probs = F.log_softmax(similarities / self.temperature, dim=1)
        return -(targets * log_probs).sum(dim=1).mean()


def _with_zero(z: torch.Tensor) -> torch.Tensor:
    """Prepend a row of zeros along dim 0 (the '1 +' inside the logs)."""
    return torch.cat([z.new_zeros(1, z.shape[1]), z], dim=0)
