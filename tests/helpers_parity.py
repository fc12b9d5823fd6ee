"""Shared by the parity tests: a fixed batch and the gradients of one contrastive step."""

from __future__ import annotations

import contextlib

import torch

from embedtrain.losses import LOSSES
from embedtrain.train.step import grad_cache_step, plain_step

CONFIGS = {
    "plain": dict(chunk=None, loss={}),
    "hard_negatives_off_in_batch": dict(chunk=None, loss={"in_batch_negatives": False}),
    "symmetric": dict(chunk=None, loss={"symmetric": True}),
    "grad_cache": dict(chunk=3, loss={}),
    "grad_cache_symmetric": dict(chunk=2, loss={"symmetric": True}),
    "gte": dict(chunk=None, name="gte", loss={}),
    "grad_cache_gte_hardness": dict(chunk=3, name="gte", loss={"hardness_weight": 5.0}),
    "grad_cache_hardness": dict(chunk=2, loss={"hardness_weight": 5.0, "symmetric": True}),
    # every role's rows embedded together in length-sorted chunks of at most 24 tokens (train.forward_token_budget)
    "token_budget": dict(chunk=None, budget=24, loss={"symmetric": True}),
    # loss.compact: nested prefixes, binary codes (straight-through) and the rescore term, each prefix gathered
    # across processes as whole embeddings are; binary codes are per element, so parity holds (int8 terms, whose
    # ranges are all-reduced over processes, are compared on fixed embeddings instead, in
    # test_int8_terms_quantize_with_the_whole_batchs_ranges_on_two_processes: here a forward pass's float noise
    # could move a value across one of the 256 levels)
    "compact": dict(chunk=None, loss={}, compact=dict(dims=[32, 16], dim_weights=[1.0, 0.5],
                                                      precisions=["float32", "binary"], precision_weights=[1.0, 0.5],
                                                      rescore_weight=0.5)),
    "grad_cache_compact": dict(chunk=2, loss={"symmetric": True}, compact=dict(dims=[32, 8], dim_weights=[1.0, 1.0],
                                                                              precisions=["binary"],
                                                                              precision_weights=[1.0])),
}


def make_batch(tokenizer, rows: int, seed: int = 0) -> dict:
    import random

    from conftest import sentence

    rng = random.Random(seed)
    q = [sentence(rng, rng.randint(2, 9)) for _ in range(rows)]
    p = [sentence(rng, rng.randint(1, 5)) + f" {i}" for i in range(rows)]
    n = [sentence(rng, rng.randint(1, 5)) + f" n{i}" for i in range(rows)]

    def enc(texts):
        e = tokenizer(texts, padding=True, return_tensors="pt")
        return {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}

    return {"query": q, "positive": p, "negative": n, "tensors": {"query": enc(q), "positive": enc(p), "negative": enc(n)}}


def slice_batch(batch: dict, start: int, stop: int) -> dict:
    """Rows start..stop of a batch, re-padded to their own longest text (as a real process would)."""
    out = {}
    for role in ("query", "positive", "negative"):
        t = batch["tensors"][role]
        part = {k: v[start:stop] for k, v in t.items()}
        longest = int(part["attention_mask"].sum(1).max())
        out[role] = {k: v[:, :longest] for k, v in part.items()}
    out["positive_ids"] = torch.arange(start, stop)
    out["negative_ids"] = torch.arange(1000 + start, 1000 + stop)
    return out


def step(model, batch: dict, cfg: dict, backward=None, no_sync=contextlib.nullcontext, gather=True,
         after_replays=lambda: None) -> float:
    loss_fn = LOSSES.get(cfg.get("name", "infonce"))(temperature=0.05, gather_across_processes=gather, **cfg["loss"])
    if "compact" in cfg:
        from embedtrain.losses.compact import CompactLoss

        loss_fn = CompactLoss(loss_fn, normalize=True, embedding_arguments=("query", "positive", "negative"),
                              query_arguments=("query",), **cfg["compact"])
    backward = backward or (lambda loss: loss.backward())
    if cfg["chunk"]:
        out = grad_cache_step(model, loss_fn, batch, cfg["chunk"], backward, no_sync, after_replays=after_replays)
    else:
        out = plain_step(model, loss_fn, batch, backward, token_budget=cfg.get("budget"))
    return float(out["loss"])


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_sums(got: dict, expected: dict, ulps: int = 64) -> None:
    """Gradients computed as the same float32 sums in another order (chunks vs the whole batch): every element
    may differ by the rounding of the tensor's largest terms, so the bound is ``ulps`` float32 ulps of the
    tensor's largest magnitude (seen: at most 7 on the tiny VLM), not a fixed absolute or per-element value
    (a near-zero element of a large gradient failed a fixed 1e-6 once: 6.7e-6)."""
    eps = torch.finfo(torch.float32).eps
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        bound = ulps * eps * float(value.abs().max())
        worst = float((got[name] - value).abs().max())
        assert worst <= bound, (name, worst, bound)


def scale_loss_at(monkeypatch, steps: set[int], factor: float) -> None:
    """Multiply the text task's loss by ``factor`` at the given 1-based steps (NaN: every gradient NaN; 1e30:
    gradients that overflow float16), to drive the trainer's non-finite and overflow handling."""
    from embedtrain.train.tasks import text as text_task

    calls = {"n": 0}
    real = text_task.plain_step

    def step(model, loss_fn, batch, backward, token_budget=None):
        calls["n"] += 1
        if calls["n"] not in steps:
            return real(model, loss_fn, batch, backward, token_budget)

        def scaled(**kw):
            out = loss_fn(**kw)
            return {**out, "loss": out["loss"] * factor}

        return real(model, scaled, batch, backward, token_budget)

    monkeypatch.setattr(text_task, "plain_step", step)
