"""CompactLoss: the nested sum by hand, the straight-through gradients, GradCache parity, the trainer's questions."""

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedtrain.losses import InfoNCELoss
from embedtrain.losses.compact import CompactLoss, binarize_straight_through, int8_straight_through

from test_infonce import emb, reference


def by_hand(q, p, n, tau, dims, dim_weights, precisions, precision_weights):
    """Σ_d w_d Σ_p v_p InfoNCE(Q_p(norm(x[:, :d]))), every term through the loop-by-loop reference."""
    def term(x, d, precision):
        x = x[:, :d]
        x = x / x.norm(dim=1, keepdim=True)
        if precision == "binary":
            return torch.where(x > 0, 1.0, -1.0) / d ** 0.5
        return x

    total = 0.0
    for d, w in zip(dims, dim_weights):
        for precision, v in zip(precisions, precision_weights):
            total += w * v * reference(term(q, d, precision), term(p, d, precision), term(n, d, precision), tau)
    return total


@pytest.mark.parametrize("precisions,precision_weights", [(["float32"], [1.0]), (["float32", "binary"], [0.7, 0.3])])
def test_nested_loss_is_the_weighted_sum_of_per_prefix_losses(precisions, precision_weights):
    q, p, n = emb(6, 32, seed=1), emb(6, 32, seed=2), emb(6, 32, seed=3)
    dims, weights = [32, 16, 8], [1.0, 0.5, 0.25]
    loss = CompactLoss(InfoNCELoss(temperature=0.05), dims, weights, precisions, precision_weights, normalize=True,
                       embedding_arguments=("query", "positive", "negative"))
    out = loss(q, p, n)
    expected = by_hand(q, p, n, 0.05, dims, weights, precisions, precision_weights)
    # 1e-4: up to six float32 InfoNCE values of ~2-20 summed in another order than the reference's loops
    assert torch.allclose(out["loss"], torch.as_tensor(expected, dtype=torch.float32), atol=1e-4)
    # each term is reported, and the first one (full size, float32) is plain InfoNCE on the inputs
    assert set(out) >= {f"loss/{d}/{pr}" for d in dims for pr in precisions}
    assert torch.allclose(out["loss/32/float32"], InfoNCELoss(temperature=0.05)(q, p, n)["loss"], atol=1e-6)


def test_prefixes_are_renormalised_only_when_the_model_normalises():
    q, p = emb(5, 16, seed=4), emb(5, 16, seed=5)
    inner = InfoNCELoss(temperature=0.1)
    kept = CompactLoss(inner, [8], [1.0], ["float32"], [1.0], normalize=False, embedding_arguments=("query", "positive"))
    renormed = CompactLoss(inner, [8], [1.0], ["float32"], [1.0], normalize=True, embedding_arguments=("query", "positive"))
    # 1e-6: the same float32 operations on the same values
    assert torch.allclose(kept(q, p)["loss"], inner(q[:, :8], p[:, :8])["loss"], atol=1e-6)
    assert torch.allclose(renormed(q, p)["loss"], inner(F.normalize(q[:, :8], dim=-1), F.normalize(p[:, :8], dim=-1))["loss"],
                          atol=1e-6)


def test_binarization_is_the_sign_code_with_the_straight_through_gradient():
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    b = binarize_straight_through(x)
    assert torch.equal(b.detach(), torch.where(x > 0, 1.0, -1.0) / 4.0)
    upstream = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad(b, x, upstream)
    assert torch.equal(grad, upstream)  # ∂b/∂x = I exactly: the gradient passes through unchanged


def test_tanh_binary_gradient_is_the_surrogates_and_the_code_is_unchanged():
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    b = binarize_straight_through(x, gradient="tanh")
    # the code is rebuilt as s + (code - s) with |s|, |code| <= 1/4: two float32 roundings of values up to 1/4
    assert torch.allclose(b.detach(), torch.where(x > 0, 1.0, -1.0) / 4.0, rtol=0, atol=2 * 0.25 * 2 ** -23)
    upstream = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad(b, x, upstream)
    leaf = x.detach().requires_grad_()
    (expected,) = torch.autograd.grad(torch.tanh(4.0 * leaf) / 4.0, leaf, upstream)  # sech²(√d x) · upstream
    assert torch.equal(grad, expected)
    # sech² <= 1: never more than the straight-through gradient, and less away from a sign change
    assert expected.abs().le(upstream.abs()).all()
    with pytest.raises(ValueError, match="binary gradient 'sigmoid'"):
        binarize_straight_through(x, gradient="sigmoid")


@pytest.mark.parametrize("gradient", ["identity", "tanh"])
def test_binary_term_gradient_equals_the_reference_through_the_prefix_normalisation(gradient):
    """d L(b(norm(q[:, :d])))/dq = J_norm^T · (g ⊙ ∂L/∂b), padded with zeros past the prefix (the reference), with
    g = 1 (straight-through) or sech²(√d · norm(q[:, :d])) (tanh)."""
    q, p = emb(6, 32, seed=6).requires_grad_(), emb(6, 32, seed=7)
    inner = InfoNCELoss(temperature=0.05)
    loss = CompactLoss(inner, [16], [1.0], ["binary"], [1.0], normalize=True, embedding_arguments=("query", "positive"),
                       binary_gradient=gradient)
    (got,) = torch.autograd.grad(loss(q, p)["loss"], q)

    codes_q = (torch.where(q[:, :16] > 0, 1.0, -1.0) / 4.0).detach().requires_grad_()
    codes_p = torch.where(p[:, :16] > 0, 1.0, -1.0) / 4.0
    (d_codes,) = torch.autograd.grad(inner(codes_q, codes_p)["loss"], codes_q)
    if gradient == "tanh":
        d_codes = d_codes / torch.cosh(4.0 * F.normalize(q.detach()[:, :16], dim=-1)) ** 2
    leaf = q.detach().requires_grad_()
    (expected,) = torch.autograd.grad(F.normalize(leaf[:, :16], dim=-1), leaf, d_codes)
    # 1e-6: the same float32 operations, composed by autograd in one graph or in two (tanh: sech² is 1 - tanh²
    # in autograd and 1/cosh² here, a few float32 ulps apart on values of at most 1)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.all(got[:, 16:] == 0)


def test_rescore_term_is_the_float_query_against_the_documents_binary_codes():
    """Each prefix adds w_d·r·InfoNCE(norm(q[:, :d]), b(norm(p[:, :d])), b(norm(n[:, :d]))); the query's gradient
    comes through float and the documents' through the straight-through codes."""
    q, p, n = emb(6, 32, seed=8).requires_grad_(), emb(6, 32, seed=9).requires_grad_(), emb(6, 32, seed=10)
    dims, weights, tau, r = [32, 16], [1.0, 0.5], 0.05, 0.4
    loss = CompactLoss(InfoNCELoss(temperature=tau), dims, weights, ["float32"], [1.0], normalize=True,
                       embedding_arguments=("query", "positive", "negative"), rescore_weight=r,
                       query_arguments=("query",))
    out = loss(q, p, n)

    def norm(x, d):
        return F.normalize(x[:, :d], dim=-1)

    def codes(x, d):
        return torch.where(x[:, :d] > 0, 1.0, -1.0) / d ** 0.5

    rescore = {d: reference(norm(q, d).detach(), codes(p, d), codes(n, d), tau) for d in dims}
    expected = by_hand(q.detach(), p.detach(), n, tau, dims, weights, ["float32"], [1.0]) \
        + sum(w * r * rescore[d] for d, w in zip(dims, weights))
    # 1e-4: four float32 InfoNCE values of ~2-20 summed in another order than the reference's loops
    assert torch.allclose(out["loss"], torch.as_tensor(expected, dtype=torch.float32), atol=1e-4)
    for d in dims:  # 1e-5: a few float32 ulps of an InfoNCE value of ~2-20, vectorised here and looped there
        assert abs(out[f"loss/{d}/rescore"].item() - rescore[d]) < 1e-5

    # the gradient of the rescore term alone: float through the query, straight-through through the documents
    only = CompactLoss(InfoNCELoss(temperature=tau), [16], [1.0], ["float32"], [0.0], normalize=True,
                       embedding_arguments=("query", "positive", "negative"), rescore_weight=1.0,
                       query_arguments=("query",))
    got_q, got_p = torch.autograd.grad(only(q, p, n)["loss"], (q, p))
    q16, c16 = norm(q, 16).detach().requires_grad_(), codes(p, 16).requires_grad_()
    d_q, d_c = torch.autograd.grad(InfoNCELoss(temperature=tau)(q16, c16, codes(n, 16))["loss"], (q16, c16))
    leaf_q, leaf_p = q.detach().requires_grad_(), p.detach().requires_grad_()
    (expected_q,) = torch.autograd.grad(F.normalize(leaf_q[:, :16], dim=-1), leaf_q, d_q)
    (expected_p,) = torch.autograd.grad(F.normalize(leaf_p[:, :16], dim=-1), leaf_p, d_c)
    # 1e-6: the same float32 operations, composed by autograd in one graph or in two
    assert torch.allclose(got_q, expected_q, atol=1e-6) and torch.allclose(got_p, expected_p, atol=1e-6)


def test_a_rescore_term_needs_a_query_and_documents():
    with pytest.raises(ValueError, match="query_arguments"):
        CompactLoss(InfoNCELoss(), [8], [1.0], ["float32"], [1.0], normalize=True,
                    embedding_arguments=("query", "positive"), rescore_weight=1.0, query_arguments=("query", "positive"))
    with pytest.raises(ValueError, match="0 or more"):
        CompactLoss(InfoNCELoss(), [8], [1.0], ["float32"], [1.0], normalize=True,
                    embedding_arguments=("query", "positive"), rescore_weight=-1.0, query_arguments=("query",))


def test_int8_levels_are_those_of_sentence_transformers_and_the_gradient_passes_through():
    from sentence_transformers.util.quantization import quantize_embeddings

    x = torch.randn(50, 12, generator=torch.Generator().manual_seed(2), requires_grad=True)
    y = int8_straight_through(x)
    codes = quantize_embeddings(x.detach().numpy(), "int8")  # ranges from the same rows
    lo, hi = x.detach().min(0).values.numpy(), x.detach().max(0).values.numpy()
    expected = (codes.astype(np.float32) + 128) * ((hi - lo) / 255) + lo
    # 1e-6: float32 bucket arithmetic in torch vs numpy on values of magnitude ~3
    assert np.allclose(y.detach().numpy(), expected, atol=1e-6)
    upstream = torch.randn(50, 12)
    (grad,) = torch.autograd.grad(y, x, upstream)
    assert torch.equal(grad, upstream)


def test_the_wrapper_answers_the_trainers_questions_as_the_wrapped_loss():
    inner = InfoNCELoss(temperature=0.05, mask_false_negatives=False)
    loss = CompactLoss(inner, [8], [1.0], ["float32"], [1.0], True, ("query", "positive", "negative"))
    assert loss.in_batch_negatives is True and loss.masks_repeated_documents is False
    with pytest.raises(ValueError, match="longer than the embedding"):
        loss(emb(3, 4), emb(3, 4))
    with pytest.raises(ValueError, match="unknown precisions"):
        CompactLoss(inner, [8], [1.0], ["int4"], [1.0], True, ("query",))


def test_grad_cache_gives_the_plain_steps_gradients_with_the_compact_loss(tiny_bert_no_dropout):
    from embedtrain.models import load_text_encoder
    from embedtrain.train.step import grad_cache_step, plain_step

    from helpers_parity import grads, make_batch, slice_batch

    results = []
    for chunk in (None, 3):
        model = load_text_encoder(str(tiny_bert_no_dropout), max_length=32)
        model.train()
        batch = slice_batch(make_batch(model.tokenizer, 8), 0, 8)
        loss_fn = CompactLoss(InfoNCELoss(temperature=0.05), [32, 16, 8], [1.0, 0.5, 0.5], ["float32", "binary"],
                              [1.0, 1.0], True, ("query", "positive", "negative"))
        backward = lambda loss: loss.backward()  # noqa: E731
        if chunk:
            out = grad_cache_step(model, loss_fn, batch, chunk, backward, contextlib.nullcontext)
        else:
            out = plain_step(model, loss_fn, batch, backward)
        results.append((float(out["loss"]), grads(model)))
    (loss_a, ga), (loss_b, gb) = results
    assert abs(loss_a - loss_b) < 1e-4  # six InfoNCE terms of the same float32 embeddings, chunked or whole
    assert ga.keys() == gb.keys() and len(ga) > 10
    for k in ga:  # as test_grad_cache: the same float32 sums, chunked (GradCache) or whole, in another order
        assert torch.allclose(ga[k], gb[k], atol=1e-5, rtol=1e-4), k


def test_a_random_rotation_comes_before_every_binary_code_and_the_rescore_query():
    """binary_rotation="random": Q_binary(x) = b(norm(x[:d]) @ R_d), and the rescore term scores the float query
    norm(q[:d]) @ R_d against those codes; float terms are unchanged."""
    from embedtrain.losses.compact import random_rotation

    q, p, n = emb(6, 32, seed=15), emb(6, 32, seed=16), emb(6, 32, seed=17)
    dims, weights, tau, r = [32, 16], [1.0, 0.5], 0.05, 0.4
    loss = CompactLoss(InfoNCELoss(temperature=tau), dims, weights, ["float32", "binary"], [0.5, 0.5], normalize=True,
                       embedding_arguments=("query", "positive", "negative"), rescore_weight=r,
                       query_arguments=("query",), binary_rotation="random")
    out = loss(q, p, n)

    def rotated(x, d):
        return F.normalize(x[:, :d], dim=-1) @ random_rotation(d)

    def codes(x, d):
        return torch.where(rotated(x, d) > 0, 1.0, -1.0) / d ** 0.5

    for d in dims:  # 1e-5: a few float32 ulps of an InfoNCE value of ~2-20, vectorised here and looped there
        assert abs(out[f"loss/{d}/binary"].item() - reference(codes(q, d), codes(p, d), codes(n, d), tau)) < 1e-5
        assert abs(out[f"loss/{d}/rescore"].item() - reference(rotated(q, d), codes(p, d), codes(n, d), tau)) < 1e-5
        float_term = reference(F.normalize(q[:, :d], dim=-1), F.normalize(p[:, :d], dim=-1),
                               F.normalize(n[:, :d], dim=-1), tau)
        assert abs(out[f"loss/{d}/float32"].item() - float_term) < 1e-5
    # the codes differ from the unrotated ones: the rotation is applied, not an identity
    plain = CompactLoss(InfoNCELoss(temperature=tau), [32], [1.0], ["binary"], [1.0], normalize=True,
                        embedding_arguments=("query", "positive", "negative"))(q, p, n)
    assert abs(plain["loss/32/binary"].item() - out["loss/32/binary"].item()) > 1e-3
    with pytest.raises(ValueError, match="unknown binary_rotation"):
        CompactLoss(InfoNCELoss(), [8], [1.0], ["binary"], [1.0], normalize=True,
                    embedding_arguments=("query", "positive"), binary_rotation="itq")
