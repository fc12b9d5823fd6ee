import math

import pytest
import torch
import torch.nn.functional as F

from embedtrain.losses import LOSSES, InfoNCELoss


def emb(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def reference(q, p, n, tau, in_batch=True):
    """Row-by-row InfoNCE written out with explicit loops."""
    B, k = q.shape[0], (0 if n is None else n.shape[0] // q.shape[0])
    total = 0.0
    for i in range(B):
        if in_batch:
            cands = [p[j] for j in range(B)] + ([n[j] for j in range(B * k)] if k else [])
            target = i
        else:
            cands = [p[i]] + [n[i * k + j] for j in range(k)]
            target = 0
        logits = torch.stack([q[i] @ c / tau for c in cands])
        total += -(logits[target] - torch.logsumexp(logits, 0))
    return total / B


@pytest.mark.parametrize("k", [0, 1, 3])
def test_matches_reference(k):
    q, p = emb(6, 16, seed=1), emb(6, 16, seed=2)
    n = emb(6 * k, 16, seed=3) if k else None
    out = InfoNCELoss(temperature=0.05)(q, p, n)
    assert torch.allclose(out["loss"], reference(q, p, n, 0.05), atol=1e-5)
    assert 0.0 <= float(out["accuracy"]) <= 1.0


def test_in_batch_negatives_off_uses_only_own_hard_negatives():
    q, p, n = emb(5, 8, seed=1), emb(5, 8, seed=2), emb(10, 8, seed=3)
    out = InfoNCELoss(temperature=0.1, in_batch_negatives=False)(q, p, n)
    assert torch.allclose(out["loss"], reference(q, p, n, 0.1, in_batch=False), atol=1e-5)


def test_false_negative_with_same_text_is_masked():
    q, p, n = emb(4, 8, seed=1), emb(4, 8, seed=2), emb(4, 8, seed=3)
    ids = torch.arange(4)
    neg_ids = torch.arange(100, 104)
    loss_fn = InfoNCELoss(temperature=0.05)
    base = loss_fn(q, p, n, ids, neg_ids)["loss"]
    # row 2's negative is the same text as row 0's positive: make it score very high for query 0
    n2 = n.clone()
    n2[2] = q[0]
    neg_ids2 = neg_ids.clone()
    neg_ids2[2] = ids[0]
    masked = loss_fn(q, p, n2, ids, neg_ids2)["loss"]
    unmasked = InfoNCELoss(temperature=0.05, mask_false_negatives=False)(q, p, n2, ids, neg_ids2)["loss"]
    assert unmasked > masked + 1.0
    # with the false negative removed, the loss only lost a (harmless) candidate
    assert masked <= base + 1e-6 or abs(float(masked - base)) < 0.5


def test_symmetric_adds_document_to_query_term():
    q, p = emb(6, 8, seed=1), emb(6, 8, seed=2)
    tau = 0.05
    forward = reference(q, p, None, tau)
    backward = reference(p, q, None, tau)
    out = InfoNCELoss(temperature=tau, symmetric=True)(q, p)
    assert torch.allclose(out["loss"], 0.5 * (forward + backward), atol=1e-5)
    with pytest.raises(ValueError):
        InfoNCELoss(symmetric=True, in_batch_negatives=False)


def test_learnable_temperature_gets_gradient():
    loss_fn = LOSSES.get("infonce")(temperature=0.05, learnable_temperature=True)
    q, p = emb(4, 8, seed=1).requires_grad_(), emb(4, 8, seed=2)
    out = loss_fn(q, p)
    out["loss"].backward()
    assert loss_fn.log_scale.grad is not None
    assert math.isclose(float(out["temperature"]), 0.05, rel_tol=1e-5)
