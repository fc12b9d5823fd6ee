"""GTE's improved contrastive loss and the hardness-weighted negatives, against sums written out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from embedtrain.losses import LOSSES, GTELoss, InfoNCELoss
from embedtrain.losses.in_batch import hardness_log_weights


def emb(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def gte_reference(q, p, n, tau, beta=0.0, same_text=None):
    """Row by row: the positive against the four sums of the partition function, self-similarities left out.

    ``same_text[i][j]``: row j's positive has row i's positive text (left out of every sum of row i)."""
    B = q.shape[0]
    docs = [p[j] for j in range(B)] + ([n[j] for j in range(n.shape[0])] if n is not None else [])
    same_text = same_text or [[False] * B for _ in range(B)]
    total = 0.0
    for i in range(B):
        positive = float(q[i] @ p[i])
        negatives = []
        for j, d in enumerate(docs):  # q_i -> documents other than its positive
            if j != i and not (j < B and same_text[i][j]):
                negatives.append(float(q[i] @ d))
        for j in range(B):  # q_i -> q_j, j != i
            if j != i and not same_text[i][j]:
                negatives.append(float(q[i] @ q[j]))
        for j in range(B):  # q_j -> d_i, j != i
            if j != i and not same_text[i][j]:
                negatives.append(float(q[j] @ p[i]))
        for j, d in enumerate(docs):  # d_i -> documents, d_i itself left out
            if j != i and not (j < B and same_text[i][j]):
                negatives.append(float(p[i] @ d))
        if beta:
            mean = sum(math.exp(beta * s) for s in negatives) / len(negatives)
            weights = [math.exp(beta * s) / mean for s in negatives]
        else:
            weights = [1.0] * len(negatives)
        z = math.exp(positive / tau) + sum(w * math.exp(s / tau) for w, s in zip(weights, negatives))
        total += -(positive / tau - math.log(z))
    return total / B


@pytest.mark.parametrize("k", [0, 2])
def test_gte_matches_the_sums_written_out(k):
    q, p = emb(5, 8, seed=1), emb(5, 8, seed=2)
    n = emb(5 * k, 8, seed=3) if k else None
    out = GTELoss(temperature=0.1)(q, p, n)
    # 1e-5: float32 softmax of ~30 terms against a float64 reference
    assert abs(float(out["loss"]) - gte_reference(q, p, n, 0.1)) < 1e-5


def test_gte_partition_holds_infonce_and_more():
    """Same numerator, and Z_i holds InfoNCE's q→d sum plus positive terms: the loss is larger, and equals
    InfoNCE's plus the extra terms counted by hand on a batch of orthogonal axes."""
    q, p = emb(4, 8, seed=1), emb(4, 8, seed=2)
    assert float(GTELoss(temperature=0.05)(q, p)["loss"]) > float(InfoNCELoss(temperature=0.05)(q, p)["loss"])
    # queries and documents on their own axes: every extra term is e^0 = 1, so Z_i = Z_i(InfoNCE) + 3 (B - 1)
    eye = torch.eye(8)
    q_axes, p_axes = eye[:4], F.normalize(eye[:4] + 0.5 * eye[4:8], dim=-1)
    tau, B = 0.5, 4
    info = float(InfoNCELoss(temperature=tau)(q_axes, p_axes)["loss"])
    z_info = math.exp(float(q_axes[0] @ p_axes[0]) / tau) * math.exp(info)  # same for every row by symmetry
    # q_i·q_j = 0, q_j·d_i = 0 and d_i·d_j = 0 for j != i: each of the three extra sums adds B - 1 terms e^0
    z_gte = z_info + 3 * (B - 1)
    expected = -(float(q_axes[0] @ p_axes[0]) / tau - math.log(z_gte))
    assert abs(float(GTELoss(temperature=tau)(q_axes, p_axes)["loss"]) - expected) < 1e-5


def test_gte_leaves_out_texts_equal_to_the_positive():
    q, p = emb(4, 8, seed=1), emb(4, 8, seed=2)
    ids = torch.tensor([0, 1, 0, 3])  # rows 0 and 2 have the same positive text
    same = [[bool(ids[i] == ids[j]) and i != j for j in range(4)] for i in range(4)]
    out = GTELoss(temperature=0.1)(q, p, None, ids)
    assert abs(float(out["loss"]) - gte_reference(q, p, None, 0.1, same_text=same)) < 1e-5
    unmasked = GTELoss(temperature=0.1, mask_false_negatives=False)(q, p, None, ids)
    assert abs(float(unmasked["loss"]) - gte_reference(q, p, None, 0.1)) < 1e-5


def test_gte_refuses_settings_it_has_no_meaning_for():
    with pytest.raises(ValueError, match="symmetric"):
        GTELoss(symmetric=True)
    with pytest.raises(ValueError, match="in_batch_negatives"):
        GTELoss(in_batch_negatives=False)
    assert LOSSES.get("gte") is GTELoss


@pytest.mark.parametrize("k", [0, 2])
def test_gte_with_hardness_weights_matches_the_sums(k):
    q, p = emb(5, 8, seed=4), emb(5, 8, seed=5)
    n = emb(5 * k, 8, seed=6) if k else None
    out = GTELoss(temperature=0.1, hardness_weight=3.0)(q, p, n)
    assert abs(float(out["loss"]) - gte_reference(q, p, n, 0.1, beta=3.0)) < 1e-5


def infonce_hardness_reference(q, p, n, tau, beta):
    B = q.shape[0]
    docs = [p[j] for j in range(B)] + ([n[j] for j in range(n.shape[0])] if n is not None else [])
    total = 0.0
    for i in range(B):
        negatives = [float(q[i] @ d) for j, d in enumerate(docs) if j != i]
        mean = sum(math.exp(beta * s) for s in negatives) / len(negatives)
        z = math.exp(float(q[i] @ p[i]) / tau) + sum(math.exp(beta * s) / mean * math.exp(s / tau) for s in negatives)
        total += -(float(q[i] @ p[i]) / tau - math.log(z))
    return total / B


def test_hardness_weight_zero_is_infonce_and_positive_weights_match_the_sums():
    q, p, n = emb(6, 8, seed=1), emb(6, 8, seed=2), emb(6, 8, seed=3)
    plain = InfoNCELoss(temperature=0.05)(q, p, n)["loss"]
    assert torch.equal(InfoNCELoss(temperature=0.05, hardness_weight=0.0)(q, p, n)["loss"], plain)
    weighted = InfoNCELoss(temperature=0.05, hardness_weight=4.0)(q, p, n)["loss"]
    assert abs(float(weighted) - infonce_hardness_reference(q, p, n, 0.05, 4.0)) < 1e-5
    # harder negatives weigh more, so the loss rises (the weights average 1, and exp is convex)
    assert float(weighted) > float(plain)


def test_hardness_weights_average_one_and_carry_no_gradient():
    s = torch.randn(3, 7, requires_grad=True)
    negatives = torch.ones(3, 7, dtype=torch.bool)
    negatives[:, 0] = False  # the positives
    negatives[2] = False  # a row without negatives: weights stay 1 (log 0)
    logw = hardness_log_weights(s, negatives, 2.0)
    assert not logw.requires_grad
    assert torch.allclose(logw[:2, 1:].exp().mean(dim=1), torch.ones(2), atol=1e-6)  # float32 mean of 6 terms
    assert torch.equal(logw[:, 0], torch.zeros(3)) and torch.equal(logw[2], torch.zeros(7))
    assert torch.equal(hardness_log_weights(s, negatives, 0.0), torch.zeros(3, 7))


def test_symmetric_infonce_with_hardness_weight_zero_is_unchanged():
    q, p = emb(5, 8, seed=1), emb(5, 8, seed=2)
    ids = torch.arange(5)
    a = InfoNCELoss(temperature=0.05, symmetric=True)(q, p, None, ids)["loss"]
    b = InfoNCELoss(temperature=0.05, symmetric=True, hardness_weight=0.0)(q, p, None, ids)["loss"]
    assert torch.equal(a, b)
    c = InfoNCELoss(temperature=0.05, symmetric=True, hardness_weight=2.0)(q, p, None, ids)["loss"]
    assert float(c) > float(a)
