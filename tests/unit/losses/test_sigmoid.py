"""SigLIP's sigmoid loss: the equation written out, its options, and 2 processes equal to 1."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from embedtrain.losses import LOSSES, SigmoidLoss

from conftest import REPO


def emb(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def reference(q, p, n, tau, bias, in_batch=True):
    """-1/B sum_i sum_d log sigmoid(z * (q_i.d / tau + b)), with explicit loops."""
    B, k = q.shape[0], (0 if n is None else n.shape[0] // q.shape[0])
    docs = [p[j] for j in range(B)] + ([n[j] for j in range(B * k)] if k else [])
    total = 0.0
    for i in range(B):
        for j, d in enumerate(docs):
            own_negative = j >= B and (j - B) // k == i
            if not in_batch and j != i and not own_negative:
                continue
            z = 1.0 if j == i else -1.0
            total += -F.logsigmoid(torch.tensor(z) * (q[i] @ d / tau + bias))
    return total / B


@pytest.mark.parametrize("k", [0, 2])
def test_matches_reference(k):
    q, p = emb(5, 8, seed=1), emb(5, 8, seed=2)
    n = emb(5 * k, 8, seed=3) if k else None
    out = SigmoidLoss(temperature=0.1, bias=-3.0)(q, p, n)
    assert torch.allclose(out["loss"], reference(q, p, n, 0.1, -3.0), atol=1e-5)
    assert set(out) == {"loss", "accuracy", "temperature", "bias"}
    assert LOSSES.get("siglip") is SigmoidLoss


def test_own_negatives_only():
    q, p, n = emb(4, 8, seed=1), emb(4, 8, seed=2), emb(8, 8, seed=3)
    out = SigmoidLoss(temperature=0.2, bias=-1.0, in_batch_negatives=False)(q, p, n)
    assert torch.allclose(out["loss"], reference(q, p, n, 0.2, -1.0, in_batch=False), atol=1e-5)


def test_temperature_and_bias_learn_and_masking_removes_false_negatives():
    q, p = emb(4, 8, seed=1), emb(4, 8, seed=2)
    loss_fn = SigmoidLoss()
    loss_fn(q, p)["loss"].backward()
    assert loss_fn.log_scale.grad is not None and loss_fn.bias.grad is not None
    # rows 0 and 1 have the same positive text: each one's pairing with the other's positive is not a negative
    ids = torch.tensor([7, 7, 8, 9])
    masked = SigmoidLoss(bias=0.0)(q, p, positive_ids=ids)["loss"]
    unmasked = SigmoidLoss(bias=0.0, mask_false_negatives=False)(q, p, positive_ids=ids)["loss"]
    pair = -(F.logsigmoid(-(q[0] @ p[1] / 0.1)) + F.logsigmoid(-(q[1] @ p[0] / 0.1))) / 4
    assert torch.allclose(unmasked - masked, pair, atol=1e-5)
    with pytest.raises(ValueError, match="symmetric"):
        SigmoidLoss(symmetric=True)


WORKER = textwrap.dedent('''
    import json, os, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from embedtrain.losses import SigmoidLoss
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=int(sys.argv[3]), world_size=2)
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    q, p, n = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    rows = slice(rank * 4, rank * 4 + 4)
    q, p, n = (t[rows].clone().requires_grad_() for t in (q, p, n))
    loss_fn = SigmoidLoss(temperature=0.5, bias=-1.0)
    loss = loss_fn(q, p, n)["loss"]
    (loss / 2).backward()  # DDP averages gradients over the 2 processes
    for param in loss_fn.parameters():
        dist.all_reduce(param.grad)
    out = {"loss": loss.item(), "q": q.grad.tolist(), "p": p.grad.tolist(), "n": n.grad.tolist(),
           "bias": loss_fn.bias.grad.item()}
    with open(sys.argv[4] + f"/rank{rank}.json", "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
''')


def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(REPO), str(tmp_path / "store"), str(r), str(tmp_path)],
                              env=env) for r in range(2)]
    assert all(p.wait(timeout=240) == 0 for p in procs)
    parts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    g = torch.Generator().manual_seed(0)
    q, p, n = (torch.randn(8, 6, generator=g).requires_grad_() for _ in range(3))
    loss_fn = SigmoidLoss(temperature=0.5, bias=-1.0)
    loss = loss_fn(q, p, n)["loss"]
    loss.backward()
    assert sum(part["loss"] for part in parts) / 2 == pytest.approx(loss.item(), abs=1e-5)
    for name, full in (("q", q), ("p", p), ("n", n)):
        got = torch.tensor(parts[0][name] + parts[1][name])
        torch.testing.assert_close(got, full.grad, atol=1e-5, rtol=1e-4)
    assert parts[0]["bias"] == pytest.approx(loss_fn.bias.grad.item(), abs=1e-5)
