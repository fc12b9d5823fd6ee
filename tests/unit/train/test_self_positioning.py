"""Self Positioning's coefficient search on the tiny BERT with two briefly trained task models."""

import json
import random

import pytest
import torch

from embedtrain.data import read_pairs
from embedtrain.errors import EmbedtrainError
from embedtrain.losses import InfoNCELoss
from embedtrain.merge import linear_merge, self_positioning_merge
from embedtrain.models import load_text_encoder
from embedtrain.train.self_positioning import build_probe_batches, probe_loss, search_self_positioning
from embedtrain.train.step import plain_step

from conftest import WORDS, write_pairs


def write_odd_words(path, rows: int, seed: int):
    """A second task: the positive is every other word of the query."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            words = [rng.choice(WORDS) for _ in range(6)]
            f.write(json.dumps({"anchor": " ".join(words), "positive": " ".join(words[1::2]) + f" {i}"}) + "\n")
    return path


def batches_of(encoder, paths, batch_size=16, seed=0):
    datasets = [read_pairs(str(p), f"probe[{i}]", p.stem) for i, p in enumerate(paths)]
    return build_probe_batches(datasets, encoder.tokenizer, encoder.max_length_for, batch_size, seed)


def train_briefly(model_dir, data, steps=20):
    encoder = load_text_encoder(str(model_dir), max_length=32)
    batches = batches_of(encoder, [data])
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=3e-3)
    loss_fn = InfoNCELoss(gather_across_processes=False)
    encoder.train()
    for step in range(steps):
        plain_step(encoder, loss_fn, batches[step % len(batches)], lambda loss: loss.backward())
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in encoder.backbone.state_dict().items()}


# tiny tensors: a second intra-op thread only adds synchronisation (and stalls on a busy machine)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tiny_bert_no_dropout, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("self-positioning")
    torch.manual_seed(0)
    task_a = train_briefly(tiny_bert_no_dropout, write_pairs(tmp / "a_train.jsonl", 160, seed=1, negatives=False))
    task_b = train_briefly(tiny_bert_no_dropout, write_odd_words(tmp / "b_train.jsonl", 160, seed=2))
    encoder = load_text_encoder(str(tiny_bert_no_dropout), max_length=32)
    probe = [write_pairs(tmp / "a_probe.jsonl", 64, seed=11, negatives=False), write_odd_words(tmp / "b_probe.jsonl", 64, seed=12)]
    return encoder, [task_a, task_b], batches_of(encoder, probe)


def test_search_beats_its_start_and_uniform_averaging(setup):
    encoder, tasks, batches = setup
    base = {k: v.clone() for k, v in encoder.backbone.state_dict().items()}
    flags = {n: p.requires_grad for n, p in encoder.named_parameters()}
    lines = []
    result = search_self_positioning(encoder, tasks, batches, steps=30, lr=0.05, mu=0.01, optimizer="adam",
                                     names=["pairs", "odd"], log=lines.append, log_every=10)
    loss_fn = InfoNCELoss(gather_across_processes=False)
    uniform = probe_loss(encoder, batches, loss_fn, linear_merge(base, tasks))
    assert result.probe_loss_end < result.probe_loss_start
    assert result.probe_loss_end < uniform, (result.probe_loss_end, uniform)
    # the task models each are worse on the mixed probe than the search's result
    assert all(result.probe_loss_end < probe_loss(encoder, batches, loss_fn, t) for t in tasks)
    # the reported end loss is the loss of the merge the pure function builds from the coefficients
    merged = self_positioning_merge(base, tasks, result.alphas, result.lam)
    assert abs(probe_loss(encoder, batches, loss_fn, merged) - result.probe_loss_end) < 1e-5
    # coefficients: a convex combination, lambda >= 0, one history entry per step, logged
    assert abs(sum(result.alphas) - 1) < 1e-6 and min(result.alphas) > 0 and result.lam >= 0
    assert len(result.history) == 30 and result.history[0]["alphas"] == [0.5, 0.5] and result.history[0]["lambda"] == 1.0
    assert {"step", "loss", "objective", "alphas", "lambda"} <= set(result.history[-1])
    assert len(lines) == 5 and "pairs" in lines[1] and "lambda" in lines[1]
    # the encoder is unchanged: weights, trainability, mode
    assert all(torch.equal(base[k], v) for k, v in encoder.backbone.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in encoder.named_parameters()}


def test_grad_cache_chunks_give_the_same_search(setup):
    encoder, tasks, batches = setup
    runs = [search_self_positioning(encoder, tasks, batches[:2], steps=3, lr=0.5, optimizer="sgd", chunk_size=chunk,
                                    log=lambda *_: None) for chunk in (None, 5)]
    for a, b in zip(runs[0].history, runs[1].history):
        assert abs(a["loss"] - b["loss"]) < 1e-5
        assert all(abs(x - y) < 1e-5 for x, y in zip(a["alphas"] + [a["lambda"]], b["alphas"] + [b["lambda"]]))
    assert runs[0].history[-1]["alphas"] != [0.5, 0.5]  # the coefficients did move


def test_penalty_pulls_lambda_to_the_base(setup):
    encoder, tasks, batches = setup
    result = search_self_positioning(encoder, tasks, batches, steps=4, lr=1.0, mu=50.0, optimizer="sgd",
                                     max_grad_norm=None, log=lambda *_: None)
    assert result.lam == 0.0  # clamped at 0: the base itself
    base_loss = probe_loss(encoder, batches, InfoNCELoss(gather_across_processes=False))
    assert abs(result.probe_loss_end - base_loss) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_search_on_cuda_matches_cpu(setup):
    encoder, tasks, batches = setup
    runs = []
    for device in ("cpu", "cuda"):
        encoder.to(device)  # the task states stay on the CPU: the search moves what it needs
        try:
            runs.append(search_self_positioning(encoder, tasks, batches[:2], steps=3, lr=0.5, optimizer="sgd",
                                                log=lambda *_: None))
        finally:
            encoder.to("cpu")
    for a, b in zip(runs[0].history, runs[1].history):
        assert abs(a["loss"] - b["loss"]) < 1e-4
        assert all(abs(x - y) < 1e-4 for x, y in zip(a["alphas"] + [a["lambda"]], b["alphas"] + [b["lambda"]]))


def test_bad_settings_are_user_errors(setup, tmp_path):
    encoder, tasks, batches = setup
    with pytest.raises(EmbedtrainError, match="choose sgd or adam"):
        search_self_positioning(encoder, tasks, batches, optimizer="lbfgs")
    small = write_pairs(tmp_path / "small.jsonl", 4, negatives=False)
    with pytest.raises(EmbedtrainError, match="fewer than one batch"):
        batches_of(encoder, [small], batch_size=8)
