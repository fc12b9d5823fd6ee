"""AdamW with decoupled weight decay, and warmup + decay schedules from transformers."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def build_optimizer(model: nn.Module, loss_fn: nn.Module, lr: float, weight_decay: float,
                    lr_for: Optional[dict[str, float]] = None) -> torch.optim.AdamW:
    """AdamW; biases, norms and the loss's own parameters get no weight decay.

    ``lr_for`` maps a fragment of parameter names to a learning rate of their own (the MoE router's,
    ``{"moe_router.": 1e-3}``); the schedule scales it as it scales ``lr``.
    """
    own = {fragment: ([], []) for fragment in (lr_for or {})}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        pair = next((own[f] for f in own if f in name), (decay, no_decay))
        (pair[1] if p.ndim < 2 or "norm" in name.lower() else pair[0]).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    for fragment, (own_decay, own_no_decay) in own.items():
        groups += [{"params": own_decay, "weight_decay": weight_decay, "lr": lr_for[fragment]},
                   {"params": own_no_decay, "weight_decay": 0.0, "lr": lr_for[fragment]}]
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
