"""Parameter groups (with layer-wise learning-rate decay), AdamW (or SGD) and warmup + decay schedules from transformers."""

from __future__ import annotations

import re
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from embedtrain.errors import EmbedtrainError


def no_weight_decay(name: str, p: nn.Parameter) -> bool:
    """Biases, norms and prompt tokens are not decayed (decay would pull them to zero)."""
    last = name.split(".")[-1]
    return p.ndim < 2 or "norm" in name.lower() or "prompts" in last or ".prompts." in name


def parameter_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                     lr_for: Optional[dict[str, float]] = None,
                     plain: Callable[[str, nn.Parameter], bool] = no_weight_decay) -> list[dict]:
    """Optimizer groups of the trainable parameters: with decay, without (``plain``), and for each
    name fragment of ``lr_for`` (the MoE router's ``{"moe_router.": 1e-3}``) the same two with that
    learning rate, which the schedule scales as it scales the main one. Empty groups are left out."""
    own = {fragment: ([], []) for fragment in (lr_for or {})}
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        pair = next((own[f] for f in own if f in name), (decay, no_decay))
        (pair[1] if plain(name, p) else pair[0]).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    for fragment, (own_decay, own_no_decay) in own.items():
        groups += [{"params": own_decay, "weight_decay": weight_decay, "lr": lr_for[fragment]},
                   {"params": own_no_decay, "weight_decay": 0.0, "lr": lr_for[fragment]}]
    return [g for g in groups if g["params"]]


def loss_group(loss_fn: nn.Module) -> list[dict]:
    """The loss's own parameters (a learnable temperature or bias), never decayed."""
    params = [p for p in loss_fn.parameters() if p.requires_grad]
    return [{"params": params, "weight_decay": 0.0}] if params else []


class LossOptimizer:
    """The loss's own parameters (a learnable temperature or bias) with an optimizer of their own.

    FSDP maps the optimizer's parameters to the model's names to save and load its state, and the loss's
    parameters live outside the model; so under every engine they are stepped apart from the model's, by the
    recipe's optimizer kind, undecayed, at ``lr`` times the model's schedule at its current step (:meth:`step`):
    the same update, to the bit, as one optimizer holding both. Every process holds
    the same values (their gradients are averaged), and the checkpoint keeps the state as tensors
    (:meth:`state_tensors`, ``loss_optimizer.safetensors``).
    """

    def __init__(self, loss_fn: nn.Module, kind: str, lr: float, momentum: float = 0.9):
        self.names = [n for n, p in loss_fn.named_parameters() if p.requires_grad]
        self.params = [p for p in loss_fn.parameters() if p.requires_grad]
        self.lr = lr
        self.optimizer = build_optimizer(loss_group(loss_fn), lr, kind, momentum) if self.params else None

    def step(self, scheduler) -> None:
        """One update, at the rate the model's schedule (a ``LambdaLR``, or accelerate's wrapper of one) gives this
        step: ``lr * lambda(step)``, the product LambdaLR computes for each of its groups."""
        if self.optimizer is None:
            return
        schedule = getattr(scheduler, "scheduler", scheduler)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * schedule.lr_lambdas[0](schedule.last_epoch)
        self.optimizer.step()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The optimizer's state, one tensor per parameter name and state key (none before the first step)."""
        if self.optimizer is None:
            return {}
        out = {}
        for name, p in zip(self.names, self.params):
            for key, value in self.optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    out[f"{name}.{key}"] = value.detach().to("cpu", copy=True).contiguous()  # not the live state
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_tensors`; a tensor of a parameter this loss lacks is an error."""
        if self.optimizer is None:
            if tensors:
                raise EmbedtrainError("the loss's optimizer state is for learnable parameters this loss does not have")
            return
        state: dict[int, dict] = {}
        known = set(self.names)
        for key, value in tensors.items():
            name, _, field = key.rpartition(".")
            if name not in known:
                raise EmbedtrainError(f"the loss's optimizer state names '{name}', which is not a learnable parameter "
                                      f"of this loss ({', '.join(self.names)})")
            state.setdefault(self.names.index(name), {})[field] = value.clone()
        saved = self.optimizer.state_dict()
        self.optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def build_optimizer(groups: list[dict], lr: float, kind: str = "adamw", momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) or SGD with momentum over ``groups``."""
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
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


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|resblocks)\.(\d+)(?:\.|$)")
"""A transformer block's index in a parameter name: BERT's ``encoder.layer.3.``, Llama's ``layers.3.``,
GPT-2's ``h.3.``, ViT's ``blocks.3.``, open_clip's ``resblocks.3.``."""


def layer_depth(name: str, num_layers: int) -> int:
    """0 for the embeddings, i + 1 for block i, ``num_layers`` + 1 for everything above the blocks (final
    norms, poolers, heads)."""
    found = _LAYER_INDEX.search(name)
    if found:
        return int(found.group(1)) + 1
    return 0 if "embed" in name.lower() else num_layers + 1


def layerwise_lr_decay(groups: list[dict], named: Iterable[tuple[str, nn.Parameter]], lr: float,
                       decay: float) -> list[dict]:
    r"""Split each optimizer group by depth and scale its learning rate with depth (layer-wise decay):

    .. math:: \mathrm{lr}_\ell = \mathrm{lr}_\text{group} \cdot \text{decay}^{\,L + 1 - \ell}

    with :math:`\ell` = :func:`layer_depth` (0 embeddings, 1..L the blocks, L + 1 the rest) and L the number
    of blocks (the largest block index + 1 among ``named``), as in ELECTRA (Clark et al. 2020) and BEiT. A
    group's own ``lr`` (the MoE router's) is scaled the same way; the schedule scales every group alike.
    ``decay`` = 1 returns ``groups`` unchanged. Groups keep their order; within a group the top layers come
    first. Parameters not in ``named`` (a loss's temperature) keep their group's rate.
    """
    if decay == 1.0:
        return groups
    names = {id(p): n for n, p in named}
    indices = [int(m.group(1)) for n in names.values() for m in [_LAYER_INDEX.search(n)] if m]
    num_layers = max(indices) + 1 if indices else 0
    out = []
    for group in groups:
        by_depth: dict[int, list] = {}
        for p in group["params"]:
            depth = layer_depth(names[id(p)], num_layers) if id(p) in names else num_layers + 1
            by_depth.setdefault(depth, []).append(p)
        for depth in sorted(by_depth, reverse=True):
            factor = decay ** (num_layers + 1 - depth)
            out.append({**group, "params": by_depth[depth], "lr": group.get("lr", lr) * factor})
    return out
