import pytest
import torch

from embedtrain.models import load_text_encoder

from helpers_parity import CONFIGS, grads, make_batch, slice_batch, step


@pytest.mark.parametrize("name", ["grad_cache", "grad_cache_symmetric", "grad_cache_gte_hardness", "grad_cache_hardness",
                                  "grad_cache_compact"])
def test_grad_cache_matches_plain_step(tiny_bert_no_dropout, name):
    batch_rows = 8
    results = []
    for chunk_cfg in (dict(CONFIGS[name], chunk=None), CONFIGS[name]):
        model = load_text_encoder(str(tiny_bert_no_dropout), max_length=32)
        model.train()
        batch = make_batch(model.tokenizer, batch_rows)
        loss = step(model, slice_batch(batch, 0, batch_rows), chunk_cfg)
        results.append((loss, grads(model)))
    (loss_a, ga), (loss_b, gb) = results
    # 1e-5 / 1e-5 + 1e-4 relative: the same float32 sums, chunked (GradCache) or whole, in another order
    assert abs(loss_a - loss_b) < 1e-5
    assert ga.keys() == gb.keys() and len(ga) > 10
    for k in ga:
        assert torch.allclose(ga[k], gb[k], atol=1e-5, rtol=1e-4), k


def test_grad_cache_replays_dropout(tiny_bert):
    """The graph-building forward of each chunk sees the same dropout mask as the cached one."""
    model = load_text_encoder(str(tiny_bert), max_length=32)
    model.train()
    outputs = []
    original = model.forward

    def recording_forward(**kw):
        out = original(**kw)
        outputs.append(out.detach().clone())
        return out

    model.forward = recording_forward
    batch = make_batch(model.tokenizer, 6)
    step(lambda **kw: model.forward(**kw), slice_batch(batch, 0, 6), dict(chunk=2, loss={}))
    first, second = outputs[: len(outputs) // 2], outputs[len(outputs) // 2 :]
    assert len(first) == 9  # 3 roles x 3 chunks
    for a, b in zip(first, second):  # 1e-6: the same chunk, the same dropout mask, the same operations
        assert torch.allclose(a, b, atol=1e-6)
    # and dropout really is on: a fresh forward differs
    again = original(**slice_batch(batch, 0, 2)["query"])
    assert not torch.allclose(again, first[0], atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_bert_no_dropout):
    results = []
    for checkpointing in (False, True):
        model = load_text_encoder(str(tiny_bert_no_dropout), max_length=32, gradient_checkpointing=checkpointing)
        model.train()
        assert model.backbone.is_gradient_checkpointing == checkpointing
        batch = make_batch(model.tokenizer, 6)
        loss = step(model, slice_batch(batch, 0, 6), dict(chunk=None, loss={}))
        results.append((loss, grads(model)))
    (la, ga), (lb, gb) = results
    # 1e-6: recomputing activations in backward repeats the same operations in the same order
    assert abs(la - lb) < 1e-6
    for k in ga:
        assert torch.allclose(ga[k], gb[k], atol=1e-6), k
