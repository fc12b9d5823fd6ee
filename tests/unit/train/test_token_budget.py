"""train.forward_token_budget: a step's texts embedded together in length-sorted chunks."""

import pytest
import torch

from embedtrain.errors import EmbedtrainError
from embedtrain.models import load_text_encoder
from embedtrain.train.step import length_sorted_chunks

from helpers_parity import CONFIGS, assert_same_sums, grads, make_batch, slice_batch, step


def _right_padded(lengths: list[int], width: int, first_id: int) -> dict[str, torch.Tensor]:
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.arange(first_id + 100 * i, first_id + 100 * i + n)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_chunks_hold_every_row_once_within_the_budget():
    roles = [_right_padded([9, 2, 5, 12], 12, 1000), _right_padded([1, 3, 3, 7], 7, 5000),
             _right_padded([4, 11, 2, 6], 11, 9000)]
    budget = 16
    chunks, order = length_sorted_chunks(roles, budget)
    assert sorted(order.tolist()) == list(range(12))
    rows = [(r, i) for r, inp in enumerate(roles) for i in range(inp["input_ids"].shape[0])]
    flat_lengths, seen = [], 0
    for chunk in chunks:
        n, width = chunk["input_ids"].shape
        lengths = chunk["attention_mask"].sum(1)
        assert width == int(lengths.max())  # cut to its own longest row
        assert n == 1 or n * width <= budget
        for j in range(n):  # each chunk row is its source row: the same tokens, nothing lost or added
            role, i = rows[int(order[seen + j])]
            src = roles[role]
            k = int(src["attention_mask"][i].sum())
            assert int(lengths[j]) == k
            assert torch.equal(chunk["input_ids"][j, :k], src["input_ids"][i, :k])
        flat_lengths += lengths.tolist()
        seen += n
    assert flat_lengths == sorted(flat_lengths)  # shortest first
    assert len(chunks) > 3  # the budget really splits the 12 rows


def test_a_row_longer_than_the_budget_gets_a_chunk_of_its_own():
    chunks, order = length_sorted_chunks([_right_padded([3, 40], 40, 1)], 8)
    assert [c["input_ids"].shape for c in chunks] == [(1, 3), (1, 40)]
    assert order.tolist() == [0, 1]


@pytest.mark.parametrize("bad, message", [
    ({"attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])}, "right-padded"),
    ({"pixel_values": torch.zeros(2, 3, 4, 4)}, "per token"),
])
def test_inputs_it_cannot_regroup_are_refused(bad, message):
    good = _right_padded([3, 2], 3, 1)
    with pytest.raises(EmbedtrainError, match=f"train.forward_token_budget.*{message}|{message}"):
        length_sorted_chunks([{**good, **bad}], 8)


def test_the_step_gives_the_gradients_of_one_batch_per_role(tiny_bert_no_dropout, one_torch_thread):
    results = []
    for budget in (None, CONFIGS["token_budget"]["budget"]):
        model = load_text_encoder(str(tiny_bert_no_dropout), max_length=32)
        model.train()
        batch = make_batch(model.tokenizer, 8)
        calls = []
        forward = model.forward

        def counting(*args, **kw):
            calls.append(len(kw.get("many") or [None]))
            return forward(*args, **kw)

        model.forward = counting
        loss = step(model, slice_batch(batch, 0, 8), dict(CONFIGS["token_budget"], budget=budget))
        results.append((loss, grads(model), calls))
    (loss_a, ga, calls_a), (loss_b, gb, calls_b) = results
    assert calls_a == [3] and len(calls_b) == 1 and calls_b[0] > 3  # one forward call, more chunks than roles
    # the same float32 sums over other matrix shapes: a few ulps of each tensor's largest value
    assert abs(loss_a - loss_b) < 1e-5
    assert len(ga) > 10
    # a key bias shifts every score of a query alike, which the softmax ignores: its gradient is 0 up to the
    # rounding of terms as large as the layer's other gradients, so it is held to the model's largest gradient
    zero = {k for k in ga if k.endswith("attention.self.key.bias")}
    scale = max(float(g.abs().max()) for g in ga.values())
    for k in zero:
        assert float(ga[k].abs().max()) <= 64 * torch.finfo(torch.float32).eps * scale
        assert float(gb[k].abs().max()) <= 64 * torch.finfo(torch.float32).eps * scale
    assert_same_sums({k: v for k, v in gb.items() if k not in zero}, {k: v for k, v in ga.items() if k not in zero})
