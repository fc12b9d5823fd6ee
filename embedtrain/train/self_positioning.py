r"""Self Positioning: search the merge coefficients on probe data (arXiv:2410.15035).

The merged model is :math:`\theta(a, \lambda) = \theta_0 + \lambda V(a)`, where :math:`V(a)` combines
the task vectors :math:`V_i = \theta_i - \theta_0` by spherical interpolation with weights :math:`a`
(:func:`embedtrain.merge.methods.spherical_mean_coefficients`). Only the N + 1 scalars are trained;
every weight stays frozen. The objective on a probe batch is

.. math::
    J(z, \lambda) = \mathcal{L}_{\text{InfoNCE}}\big(\theta_0 + \lambda V(\operatorname{softmax}(z))\big) + \mu \lambda

- :math:`a = \operatorname{softmax}(z)`: the logits :math:`z \in \mathbb{R}^N` are the trained
  parameters, so :math:`a` always is a convex combination (non-negative, sums to 1) without any
  projection; :math:`z = 0` (equal weights) is the start;
- :math:`\lambda` starts at ``init_lambda`` and is kept :math:`\ge 0` (clamped after each step);
- :math:`\mu \lambda` keeps the model near the base unless the probe loss pays for moving
  (the paper finds :math:`\mu < 0.05` works best).

Each step builds one set of merged tensors (a differentiable function of :math:`z, \lambda`),
runs the encoder on them through ``torch.func.functional_call`` (the encoder's own parameters are
never touched), backpropagates the loss to those merged tensors (plain, or GradCache chunks for
large probe batches: ``chunk_size``) and from them to the N + 1 scalars. Memory: the base, the N
task vectors, one merged copy and its gradient, plus one (chunk's) forward graph. The encoder runs
in eval mode (no dropout), so the probe loss is a deterministic function of the coefficients.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch.func import functional_call

from embedtrain.data import BatchCollator, PairDataset, plan_epoch
from embedtrain.errors import EmbedtrainError
from embedtrain.losses import InfoNCELoss
from embedtrain.merge import TaskVectorBasis
from embedtrain.train.step import ROLES, grad_cache_step, plain_step

PREFIX = "backbone."


@dataclass
class SearchResult:
    """Coefficients found by :func:`search_self_positioning` and how the probe loss moved."""

    alphas: list[float]
    lam: float
    probe_loss_start: float
    probe_loss_end: float
    history: list[dict] = field(default_factory=list)
    """One entry per step: step, loss (before the update), objective (loss + mu*lambda), alphas, lambda."""
    seconds: float = 0.0


def build_probe_batches(
    datasets: Sequence[PairDataset], tokenizer, max_length_for: Callable[[str], int], batch_size: int, seed: int = 0
) -> list[dict]:
    """Collated probe batches: every row of every dataset once, each batch from one dataset (shuffled together)."""
    for ds in datasets:
        if len(ds) < batch_size:
            raise EmbedtrainError(
                f"probe: dataset {ds.name} has {len(ds)} rows, fewer than one batch ({batch_size}); "
                "lower probe.batch_size or add rows"
            )
    plan = plan_epoch([len(d) for d in datasets], [d.row_keys for d in datasets], batch_size, seed, 0)
    if not plan:
        raise EmbedtrainError("probe: no batch can be formed without repeating a text; lower probe.batch_size")
    collator = BatchCollator(datasets, tokenizer, max_length_for)
    return [collator(planned, planned.rows) for planned in plan]


def _to_device(batch: dict, device: torch.device) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out[k] = {kk: vv.to(device) for kk, vv in v.items()}
        elif isinstance(v, torch.Tensor):
            out[k] = v.to(device)
        else:
            out[k] = v
    return out


def _embed_in_chunks(model: Callable, inputs: dict, chunk_size: Optional[int]) -> torch.Tensor:
    n = inputs["input_ids"].shape[0]
    size = chunk_size or n
    return torch.cat([model(**{k: v[s : s + size] for k, v in inputs.items()}) for s in range(0, n, size)])


@contextlib.contextmanager
def _frozen_eval(encoder):
    """Eval mode and no parameter gradients for the duration; restored afterwards."""
    was_training = encoder.training
    flags = [(p, p.requires_grad) for p in encoder.parameters()]
    encoder.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        encoder.train(was_training)


@torch.no_grad()
def probe_loss(
    encoder,
    batches: Sequence[dict],
    loss_fn: Optional[torch.nn.Module] = None,
    state: Optional[Mapping[str, torch.Tensor]] = None,
    chunk_size: Optional[int] = None,
) -> float:
    """Mean loss over ``batches`` of the encoder, its backbone tensors replaced by ``state`` when given.

    ``state`` uses backbone keys (as ``encoder.backbone.state_dict()``); it may hold only some of them.
    """
    device = encoder.device
    loss_fn = (loss_fn or InfoNCELoss(gather_across_processes=False)).to(device)
    params = {PREFIX + k: v.to(device) for k, v in (state or {}).items()}

    def model(**kw):
        return functional_call(encoder, params, args=(), kwargs=kw)

    total = 0.0
    with _frozen_eval(encoder):
        for batch in batches:
            batch = _to_device(batch, device)
            emb = {r: (_embed_in_chunks(model, batch[r], chunk_size) if batch[r] is not None else None) for r in ROLES}
            out = loss_fn(query=emb["query"], positive=emb["positive"], negative=emb["negative"],
                          positive_ids=batch["positive_ids"], negative_ids=batch["negative_ids"])
            total += float(out["loss"])
    return total / max(len(batches), 1)


def search_self_positioning(
    encoder,
    task_states: Sequence[Mapping[str, torch.Tensor]],
    batches: Sequence[dict],
    steps: int = 40,
    lr: float = 0.05,
    mu: float = 0.01,
    optimizer: str = "adam",
    momentum: float = 0.0,
    init_lambda: float = 1.0,
    iterations: int = 10,
    chunk_size: Optional[int] = None,
    loss_fn: Optional[torch.nn.Module] = None,
    max_grad_norm: Optional[float] = 1.0,
    names: Optional[Sequence[str]] = None,
    log: Callable[[str], None] = print,
    log_every: int = 1,
) -> SearchResult:
    """Optimize :math:`z` (alphas = softmax(z)) and :math:`\\lambda` on the probe ``batches`` (see module docstring).

    ``encoder`` holds the base weights :math:`\\theta_0` (a :class:`~embedtrain.models.TextEncoder`);
    ``task_states`` are state dicts of its backbone fine-tuned on each task. One probe batch per step,
    cycling through ``batches``. ``optimizer``: 'sgd' (as in the paper; ``momentum`` optional) or 'adam'.
    The encoder comes back unchanged. Returns the final coefficients, the mean probe loss over all
    batches at the start and at the end, and the per-step history.
    """
    if optimizer not in ("sgd", "adam"):
        raise EmbedtrainError(f"search.optimizer: {optimizer!r} is not allowed; choose sgd or adam")
    if steps < 0 or lr <= 0 or mu < 0 or init_lambda < 0:
        raise EmbedtrainError(
            f"search: need steps >= 0, lr > 0, mu >= 0 and init_lambda >= 0 (got {steps}, {lr}, {mu}, {init_lambda})"
        )
    if not batches:
        raise EmbedtrainError("probe: no batches; give probe datasets with at least one batch of rows")
    t0 = time.time()
    n = len(task_states)
    names = list(names) if names is not None else [f"model {i + 1}" for i in range(n)]
    device = encoder.device
    loss_fn = (loss_fn or InfoNCELoss(gather_across_processes=False)).to(device)
    base = encoder.backbone.state_dict()
    trainable = [k for k, p in encoder.backbone.named_parameters() if torch.is_floating_point(p)]
    basis = TaskVectorBasis(base, task_states, keys=trainable, names=names)

    logits = torch.zeros(n, requires_grad=True)
    lam = torch.tensor(float(init_lambda), requires_grad=True)
    if optimizer == "sgd":
        opt = torch.optim.SGD([logits, lam], lr=lr, momentum=momentum)
    else:
        opt = torch.optim.Adam([logits, lam], lr=lr)

    def current_state() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return basis.merged(torch.softmax(logits, 0), lam, iterations)

    def backward(loss: torch.Tensor) -> None:
        loss.backward()

    def describe(alphas: list[float], lam_value: float) -> str:
        return " ".join(f"{name} {a:.3f}" for name, a in zip(names, alphas)) + f", lambda {lam_value:.3f}"

    history: list[dict] = []
    with _frozen_eval(encoder):
        start = probe_loss(encoder, batches, loss_fn, current_state(), chunk_size)
        log(f"self positioning: probe loss {start:.4f} at the start ({describe([1 / n] * n, lam.item())})")
        for step in range(steps):
            batch = _to_device(batches[step % len(batches)], device)
            opt.zero_grad(set_to_none=True)
            alphas = torch.softmax(logits, 0)
            merged = basis.merged(alphas, lam, iterations)  # the one merged copy, a function of (z, lambda)
            leaves = {k: t.detach().requires_grad_(True) for k, t in merged.items()}
            params = {PREFIX + k: t for k, t in leaves.items()}

            def model(**kw):
                return functional_call(encoder, params, args=(), kwargs=kw)

            if chunk_size:
                out = grad_cache_step(model, loss_fn, batch, chunk_size, backward, contextlib.nullcontext)
            else:
                out = plain_step(model, loss_fn, batch, backward)
            # from the merged tensors' gradients to the N + 1 scalars
            used = [k for k in merged if leaves[k].grad is not None]
            torch.autograd.backward([merged[k] for k in used], [leaves[k].grad for k in used])
            del leaves, params, merged
            (mu * lam).backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_([logits, lam], max_grad_norm)
            entry = {
                "step": step + 1,
                "loss": float(out["loss"]),
                "objective": float(out["loss"]) + mu * lam.item(),
                "alphas": [float(a) for a in alphas.detach()],
                "lambda": lam.item(),
            }
            opt.step()
            with torch.no_grad():
                lam.clamp_(min=0.0)
            history.append(entry)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                log(f"self positioning step {step + 1}/{steps}: loss {entry['loss']:.4f}, objective "
                    f"{entry['objective']:.4f}; {describe(entry['alphas'], entry['lambda'])}")
        final_alphas = [float(a) for a in torch.softmax(logits.detach(), 0)]
        end = probe_loss(encoder, batches, loss_fn, current_state(), chunk_size)
    log(f"self positioning: probe loss {start:.4f} -> {end:.4f}; {describe(final_alphas, lam.item())}")
    return SearchResult(final_alphas, lam.item(), start, end, history, time.time() - t0)
