"""AdamW with decoupled weight decay, and warmup + decay schedules from transformers."""

from __future__ import annotations

import torch
from torch import nn


def build_optimizer(model: nn.Module, loss_fn: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; biases, norms and the loss's own parameters get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, "weight_decay": 0.0})
    groups = [g for g in groups if g["params"]]
    # The default AdamW steps one tensor at a time; the fused kernel (CPU and GPU) is ~10x faster here.
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.AdamW(groups, lr=lr, foreach=True)


def build_scheduler(optimizer, name: str, total_steps: int, warmup_ratio: float):
    """Linear warmup over ``warmup_ratio`` of the steps, then linear, cosine or constant."""
    from transformers import get_scheduler

    kind = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[name]
    return get_scheduler(kind, optimizer, num_warmup_steps=int(warmup_ratio * total_steps),
                         num_training_steps=total_steps)
