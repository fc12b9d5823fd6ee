"""Activation (gradient) checkpointing of a transformers model, in one place for every kind of encoder."""

from __future__ import annotations

from typing import Callable, Optional


def checkpoint_activations(model, context_fn: Optional[Callable] = None) -> None:
    """Recompute ``model``'s layer activations in the backward pass instead of keeping them (non-reentrant
    ``torch.utils.checkpoint``, which any graph through the layers survives, LoRA's frozen inputs included).

    ``context_fn``: torch's hook around each checkpointed call, returning a context manager for the forward pass
    and one for its recomputation (:class:`~embedtrain.models.moe.MoETextEncoder` restores a forward's routing
    with it). Uses ``activation_checkpointing_enable`` where transformers has it (its ``gradient_checkpointing_enable``
    is deprecated there), else ``gradient_checkpointing_enable``."""
    kwargs = {"use_reentrant": False, **({"context_fn": context_fn} if context_fn is not None else {})}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
