import random

from embedtrain.data.sampler import plan_epoch


def keys(n, dup_every=None):
    # row i has texts (query i, positive i); every dup_every-th row repeats row 0's positive
    return [(10_000 + i, 0 if dup_every and i % dup_every == 0 else 20_000 + i) for i in range(n)]


def test_batches_are_homogeneous_full_and_deterministic():
    sizes = [100, 37]
    row_keys = [keys(100), keys(37)]
    plan = plan_epoch(sizes, row_keys, global_batch=8, seed=1, epoch=0)
    assert plan == plan_epoch(sizes, row_keys, global_batch=8, seed=1, epoch=0)
    assert plan != plan_epoch(sizes, row_keys, global_batch=8, seed=1, epoch=1)
    assert all(len(b.rows) == 8 for b in plan)
    assert {b.dataset for b in plan} == {0, 1}
    assert sum(b.dataset == 0 for b in plan) == 12 and sum(b.dataset == 1 for b in plan) == 4
    for b in plan:
        assert len(set(b.rows)) == 8 and max(b.rows) < sizes[b.dataset]


def test_no_duplicate_texts_in_a_batch():
    row_keys = [keys(200, dup_every=5)]  # 40 rows share one positive text
    plan = plan_epoch([200], row_keys, global_batch=16, seed=0, epoch=0)
    for b in plan:
        texts = [t for r in b.rows for t in row_keys[0][r]]
        assert len(texts) == len(set(texts))
    # one shared-text row per batch at most, so most of the 40 are deferred or dropped, not batched twice
    assert len(plan) >= 8


def test_length_grouping_reduces_padding_and_keeps_all_rows_random():
    rng = random.Random(0)
    n = 2048
    lengths = [rng.randint(5, 120) for _ in range(n)]
    row_keys = [keys(n)]

    def waste(plan):
        return sum(max(lengths[r] for r in b.rows) * len(b.rows) - sum(lengths[r] for r in b.rows) for b in plan)

    plain = plan_epoch([n], row_keys, 32, seed=0, epoch=0)
    grouped = plan_epoch([n], row_keys, 32, seed=0, epoch=0, lengths=[lengths], window=16)
    assert waste(grouped) < 0.2 * waste(plain)
    assert sorted(r for b in grouped for r in b.rows) == list(range(n))
    # batch order is shuffled: batch lengths are not monotonic
    means = [sum(lengths[r] for r in b.rows) / 32 for b in grouped]
    assert means != sorted(means) and means != sorted(means, reverse=True)


def test_round_robin_alternates():
    plan = plan_epoch([40, 40], [keys(40), keys(40)], 8, seed=0, epoch=0, mixing="round_robin")
    assert [b.dataset for b in plan] == [0, 1] * 5


def test_weight_upsamples():
    plan = plan_epoch([64, 64], [keys(64), keys(64)], 8, seed=0, epoch=0, weights=[2.0, 0.5])
    assert sum(b.dataset == 0 for b in plan) == 16 and sum(b.dataset == 1 for b in plan) == 4


def test_length_grouping_keeps_long_rows_and_shuffles_each_batch():
    """The rows a length-sorted pool cannot place in a full batch are its longest: they move on to the next
    pool rather than being dropped, so an epoch drops at most one partial batch; and each global batch is
    shuffled, so the first process's slice is not the shortest."""
    import numpy as np

    n, batch, window = 1000, 24, 4  # pools of 96 rows
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=n).tolist()
    pairs = [(10_000 + i, 20_000 + i // 2) for i in range(n)]  # every positive twice: some rows must wait
    plan = plan_epoch([n], [pairs], batch, seed=3, epoch=0, lengths=[lengths], window=window)
    seen = [r for b in plan for r in b.rows]
    assert len(seen) == len(set(seen)) and n - len(seen) < batch  # one partial batch at most, not one a pool
    longest = set(np.argsort(lengths)[-100:].tolist())
    assert len(longest - set(seen)) < batch  # the longest tenth trains
    first_half = [np.mean([lengths[r] for r in b.rows[: batch // 2]]) for b in plan]
    second_half = [np.mean([lengths[r] for r in b.rows[batch // 2:]]) for b in plan]
    assert 0.25 < np.mean(np.array(first_half) < np.array(second_half)) < 0.75  # no process always the shorter
