"""Recall@K and MAP@R against brute-force definitions."""

import pytest
import torch

from embedtrain.eval.dml import dml_metrics, evaluate_dml


def brute_force(emb, labels, ks):
    emb = torch.nn.functional.normalize(emb, dim=-1)
    sims = emb @ emb.T
    recall = {k: 0 for k in ks}
    ap_sum, queries = 0.0, 0
    for q in range(len(labels)):
        order = [j for j in sorted(range(len(labels)), key=lambda j: -float(sims[q, j])) if j != q]
        r = sum(1 for j in order if labels[j] == labels[q])
        if r == 0:
            continue
        queries += 1
        for k in ks:
            recall[k] += any(labels[j] == labels[q] for j in order[:k])
        hits, ap = 0, 0.0
        for i, j in enumerate(order[:r], 1):
            if labels[j] == labels[q]:
                hits += 1
                ap += hits / i
        ap_sum += ap / r
    return {**{f"recall@{k}": recall[k] / queries for k in ks}, "map@r": ap_sum / queries, "queries": queries}


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_match_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 6, (40,), generator=g)
    emb = torch.randn(40, 5, generator=g) + torch.nn.functional.one_hot(labels, 6)[:, :5] * 1.5
    ours = dml_metrics(emb, labels, (1, 2, 4, 8), chunk=7)  # several query chunks
    expected = brute_force(emb, labels.tolist(), (1, 2, 4, 8))
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key


def test_a_hand_worked_example_and_singletons():
    # class 0: a, b (close); class 1: c, d; class 2: e alone
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.6, 0.4], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    m = dml_metrics(emb, labels, (1, 2, 4))
    # neighbours: a -> b (hit); b -> a (hit); c -> d (hit); d -> b, a, c (its class only third)
    assert m["recall@1"] == pytest.approx(3 / 4)
    assert m["recall@2"] == pytest.approx(3 / 4)
    assert m["recall@4"] == pytest.approx(4 / 4)
    assert m["map@r"] == pytest.approx(3 / 4)  # R = 1 for every query: MAP@R = precision at 1
    assert (m["queries"], m["singletons"]) == (4, 1)


def test_perfect_clusters_score_one_and_evaluate_restores_the_mode():
    emb = torch.eye(3).repeat_interleave(3, dim=0) + 0.01 * torch.randn(9, 3)
    labels = torch.arange(3).repeat_interleave(3)
    assert dml_metrics(emb, labels)["map@r"] == pytest.approx(1.0)
    model = torch.nn.Linear(3, 3)
    model.train()
    scores = evaluate_dml(model, [{"pixels": emb, "labels": labels}])
    assert model.training and 0 <= scores["recall@1"] <= 1
