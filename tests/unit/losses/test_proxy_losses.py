"""Proxy-Anchor and normalized softmax against their equations, Metrix mixup, and proxies that move."""

import math

import pytest
import torch
import torch.nn.functional as F

from embedtrain.losses import PROXY_LOSSES, NormalizedSoftmaxLoss, ProxyAnchorLoss, metrix_mix

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def batch(seed=0, b=8, c=5, d=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])[:b]
    proxies = torch.randn(c, d, generator=g)
    return x, labels, proxies


def proxy_anchor_by_hand(x, labels, proxies, alpha=32.0, delta=0.1):
    """The paper's equation, one proxy at a time."""
    x, p = F.normalize(x, dim=-1), F.normalize(proxies, dim=-1)
    pos_terms, neg_terms = [], []
    for c in range(p.shape[0]):
        s = x @ p[c]
        pos = [math.exp(-alpha * (float(s[i]) - delta)) for i in range(len(labels)) if labels[i] == c]
        neg = [math.exp(alpha * (float(s[i]) + delta)) for i in range(len(labels)) if labels[i] != c]
        if pos:
            pos_terms.append(math.log(1 + sum(pos)))
        neg_terms.append(math.log(1 + sum(neg)))
    return sum(pos_terms) / len(pos_terms) + sum(neg_terms) / p.shape[0]


def test_registry_names():
    assert PROXY_LOSSES.names() == ["normalized_softmax", "proxy_anchor"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_proxy_anchor_equals_its_equation(seed):
    x, labels, proxies = batch(seed)
    out = ProxyAnchorLoss(scale=32, margin=0.1)(x, labels, proxies)
    assert out["loss"].item() == pytest.approx(proxy_anchor_by_hand(x, labels, proxies), rel=1e-5)
    out = ProxyAnchorLoss(scale=8, margin=0.3)(x, labels, proxies)
    assert out["loss"].item() == pytest.approx(proxy_anchor_by_hand(x, labels, proxies, 8, 0.3), rel=1e-5)


def test_normalized_softmax_is_cross_entropy_over_cosines():
    x, labels, proxies = batch()
    out = NormalizedSoftmaxLoss(temperature=0.1)(x, labels, proxies)
    sims = F.normalize(x, dim=-1) @ F.normalize(proxies, dim=-1).T
    assert out["loss"].item() == pytest.approx(F.cross_entropy(sims / 0.1, labels).item(), rel=1e-6)
    assert out["accuracy"].item() == pytest.approx((sims.argmax(1) == labels).float().mean().item())


def test_metrix_mixes_two_classes_with_soft_targets():
    x, labels, _ = batch()
    torch.manual_seed(0)
    mixed, targets = metrix_mix(x, labels, 5, beta=2.0)
    assert mixed.shape == (8, 6) and targets.shape == (8, 5)
    assert torch.allclose(targets.sum(1), torch.ones(8))
    assert torch.allclose(mixed.norm(dim=1), torch.ones(8), atol=1e-6)
    for row, t in zip(range(8), targets):
        classes = (t > 0).nonzero().squeeze(1).tolist()
        assert labels[row].item() in classes and len(classes) == 2  # its own class and one other
    single = metrix_mix(x[:2], labels[:2], 5)  # one class only: nothing to mix
    assert single[0].shape == (0, 6)


def test_one_hot_soft_loss_equals_the_clean_loss_and_metrix_adds_a_term_in_training_only():
    x, labels, proxies = batch()
    for loss in (ProxyAnchorLoss(metrix=True, metrix_weight=0.5), NormalizedSoftmaxLoss(metrix=True, metrix_weight=0.5)):
        loss.train()
        torch.manual_seed(1)
        out = loss(x, labels, proxies)
        torch.manual_seed(1)
        mixed, targets = metrix_mix(x, labels, 5, 2.0)
        p = F.normalize(proxies, dim=-1)
        expected = loss.soft_loss(F.normalize(x, dim=-1) @ p.T, F.one_hot(labels, 5).float()) + \
            0.5 * loss.soft_loss(mixed @ p.T, targets)
        assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
        assert out["clean_loss"].item() < out["loss"].item()
        loss.eval()
        assert loss(x, labels, proxies)["loss"].item() == pytest.approx(out["clean_loss"].item(), rel=1e-6)


@pytest.mark.parametrize("name", ["proxy_anchor", "normalized_softmax"])
def test_optimising_the_proxies_moves_them_and_lowers_the_loss(name):
    x, labels, proxies = batch()
    proxies = torch.nn.Parameter(proxies)
    start = proxies.detach().clone()
    loss_fn = PROXY_LOSSES.get(name)(metrix=True)
    opt = torch.optim.SGD([proxies], lr=0.05)
    first = None
    for _ in range(30):
        loss = loss_fn(x, labels, proxies)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss_fn.eval()
    assert loss_fn(x, labels, proxies)["loss"].item() < first
    assert not torch.allclose(proxies.detach(), start)
