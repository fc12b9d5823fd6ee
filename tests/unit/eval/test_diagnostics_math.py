"""The label-free diagnostics against their definitions (RankMe; Wang and Isola's alignment and uniformity)."""

import math

import pytest
import torch

from embedtrain.eval.diagnostics import (RANKME_EPSILON, alignment, collapse_warnings, diagnose, random_pair_cosine,
                                         rankme, similarity_gap, uniformity)

# Fixed small inputs, computed in float64 on both sides: a handful of terms rounds at ~1e-15, so 1e-12 is loose.
EXACT = 1e-12


def matrix_of_rank(n: int, d: int, singular: list[float], seed: int = 0) -> torch.Tensor:
    """U diag(singular) V^T with orthonormal U (n x r) and V (d x r) from QR of random matrices."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, len(singular), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, len(singular), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(singular, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("rank", [1, 5, 17, 40])
def test_rankme_of_a_matrix_of_known_rank_is_that_rank(rank):
    # r equal non-zero singular values: p_k = 1/r for r of them, so exp(entropy) = r exactly. What remains is
    # the ε = 1e-7 of RankMe added to each of the min(n, d) = 64 values: it moves the entropy by at most
    # 64·ε·(1 + |log ε|) ≈ 1.1e-4 nats, i.e. the rank by under r·1.2e-4 < 0.005; float32 storage of the matrix
    # leaves the zero singular values near 1e-6 of the others, which adds less than that again. Hence 0.01.
    embeddings = matrix_of_rank(200, 64, [3.0] * rank).float()
    assert rankme(embeddings) == pytest.approx(rank, abs=0.01)


def test_rankme_is_the_exponential_of_the_entropy_of_the_normalised_singular_values():
    singular = [4.0, 2.0, 1.0, 0.5]
    p = [s / sum(singular) + RANKME_EPSILON for s in singular] + [RANKME_EPSILON] * (16 - len(singular))
    expected = math.exp(-sum(x * math.log(x) for x in p))
    # the zero singular values come back from the SVD at ~1e-15 (float64) instead of 0: below 1e-9 in the rank
    assert rankme(matrix_of_rank(30, 16, singular)) == pytest.approx(expected, abs=1e-9)
    assert 1 < expected < len(singular)


def test_rankme_of_a_collapsed_space_is_one():
    same = torch.ones(50, 8)  # every text at the same point: one singular value (ε terms as above: < 1e-4)
    assert rankme(same) == pytest.approx(1.0, abs=1e-4)
    assert rankme(torch.zeros(5, 4)) == 1.0


def test_alignment_is_the_mean_squared_distance_of_positive_pairs():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    p = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.8, 0.6]], dtype=torch.float64)
    # ||q - p||^2 for each pair: 2, 0, (0.2^2 + 0.2^2) = 0.08
    assert alignment(q, p) == pytest.approx((2 + 0 + 0.08) / 3, abs=EXACT)
    assert alignment(q, p, alpha=1) == pytest.approx((math.sqrt(2) + 0 + math.sqrt(0.08)) / 3, abs=EXACT)
    # inputs are put on the unit sphere first: a scaled copy aligns the same
    assert alignment(3 * q, p) == pytest.approx(alignment(q, p), abs=EXACT)


def test_uniformity_is_the_log_mean_gaussian_potential_over_pairs():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    rows = x.tolist()
    potentials = [math.exp(-2 * sum((a - b) ** 2 for a, b in zip(rows[i], rows[j])))
                  for i in range(4) for j in range(i + 1, 4)]
    assert len(potentials) == 6
    assert uniformity(x) == pytest.approx(math.log(sum(potentials) / 6), abs=EXACT)
    t3 = [math.exp(-3 * sum((a - b) ** 2 for a, b in zip(rows[i], rows[j]))) for i in range(4) for j in range(i + 1, 4)]
    assert uniformity(x, t=3) == pytest.approx(math.log(sum(t3) / 6), abs=EXACT)
    assert uniformity(torch.ones(6, 3)) == pytest.approx(0.0, abs=EXACT)  # collapse: every distance 0


def test_random_pair_cosine_and_similarity_gap_against_loops():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(7, 5, generator=g, dtype=torch.float64)
    p = q + 0.5 * torch.randn(7, 5, generator=g, dtype=torch.float64)
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    pairs = [cos(q[i], q[j]) for i in range(7) for j in range(7) if i != j]
    assert random_pair_cosine(q) == pytest.approx(sum(pairs) / len(pairs), abs=EXACT)
    gaps = [cos(q[i], p[i]) - max(cos(q[i], p[j]) for j in range(7) if j != i) for i in range(7)]
    assert similarity_gap(q, p) == pytest.approx(sum(gaps) / 7, abs=EXACT)


def test_diagnose_gives_pair_figures_only_with_pairs():
    x = matrix_of_rank(20, 8, [1.0] * 8)
    assert set(diagnose(x)) == {"rankme", "uniformity", "random_cosine"}
    assert set(diagnose(torch.cat([x[:10], x[10:]]), x[:10], x[10:])) == {
        "rankme", "uniformity", "random_cosine", "alignment", "similarity_gap"}
    with pytest.raises(ValueError, match="positives: shape"):
        alignment(x[:3], x[:4])


def test_collapse_warnings_compare_against_the_reference():
    start = {"rankme": 100.0, "uniformity": -3.0}
    assert collapse_warnings({"rankme": 60.0, "uniformity": -2.0}, start, 0.5, 0.5) == []
    rank_low = collapse_warnings({"rankme": 40.0, "uniformity": -2.0}, start, 0.5, 0.5)
    assert len(rank_low) == 1 and "effective rank 40.0" in rank_low[0]
    both = collapse_warnings({"rankme": 40.0, "uniformity": -1.0}, start, 0.5, 0.5)
    assert len(both) == 2 and "uniformity -1.000" in both[1]
    assert collapse_warnings({"rankme": 1.0, "uniformity": -0.1}, start, 0, 0) == []  # both checks off
