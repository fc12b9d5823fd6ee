"""LoRA on a text backbone through peft, and the merged weights a saved model carries.

NV-Embed trains Mistral-7B with LoRA (rank 16, alpha 32, dropout 0.1) and the latent-attention head in
full; a sentence-transformers text encoder (a BERT-class encoder, or a decoder with causal attention and
last-token pooling such as Qwen3-Embedding) takes LoRA the same way. Adapters are added with peft's
``get_peft_model`` on the backbone (sentence-transformers' ``add_adapter`` needs a newer peft than the one
published). A saved model holds both the merged backbone (plain weights ``W + (alpha / r) B A``, loadable
without peft) and the adapter alone, in ``adapter/`` (peft's own format), to apply to the original base
model again.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

import torch

from embedtrain.errors import EmbedtrainError

ADAPTER_DIR = "adapter"
"""Subfolder of a saved model holding the LoRA adapter (adapter_config.json, adapter_model.safetensors)."""


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency; without it nothing can be wrapped
        return False
    return isinstance(model, PeftModel)


def apply_lora(model, r: int, alpha: float, dropout: float, target_modules: Sequence[str]):
    """Wrap ``model`` with fresh LoRA adapters (only the adapters are trainable afterwards)."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in target_modules if t not in present]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise EmbedtrainError(
            f"model.lora.target_modules: {', '.join(missing)} not found in {type(model).__name__}; "
            f"its linear layers are: {', '.join(linear)}"
        )
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none")
    return get_peft_model(model, config)


@torch.no_grad()
def merged_state_dict(peft_model, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter folded in, without changing ``peft_model``.

    Keys are those of the unwrapped base model (``layers.0.self_attn.q_proj.weight``): each LoRA layer's
    ``base_layer.weight`` becomes ``weight + delta`` (peft's ``get_delta_weight``, in the weight's dtype),
    and the ``lora_*`` tensors are left out. Tensors are returned on ``device``.
    """
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            delta = None
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    d = module.get_delta_weight(adapter)
                    delta = d if delta is None else delta + d
            if delta is not None:
                deltas[f"{name}.base_layer.weight"] = delta
    merged = {}
    for key, tensor in base.state_dict().items():
        if ".lora_" in key:
            continue
        if key in deltas:
            tensor = (tensor.float() + deltas[key].float()).to(tensor.dtype)
        merged[key.replace(".base_layer.", ".")] = tensor.detach().to(device, copy=True).contiguous()
    return merged


def save_merged_transformer(transformer, output_path: str, safe_serialization: bool = True) -> None:
    """Save a sentence-transformers ``Transformer`` module whose model is LoRA-wrapped as its own ``save`` would
    save a plain one (config, merged weights, tokenizer, ``sentence_bert_config.json``), with the adapter alone
    in ``adapter/``."""
    base = transformer.model.get_base_model()
    base.save_pretrained(output_path, state_dict=merged_state_dict(transformer.model), safe_serialization=safe_serialization)
    transformer.model.save_pretrained(os.path.join(output_path, ADAPTER_DIR), safe_serialization=safe_serialization)
    transformer.processor.save_pretrained(output_path)
    transformer.save_config(output_path)


@contextlib.contextmanager
def saved_merged(transformer) -> Iterator[None]:
    """Inside the block, saving the stock sentence-transformers ``Transformer`` module ``transformer`` writes the
    merged weights and the adapter (:func:`save_merged_transformer`) when its model is LoRA-wrapped. The module
    keeps its class, so ``modules.json`` names sentence-transformers' own and the folder loads without embedtrain."""
    if not is_peft_model(transformer.model):
        yield
        return

    def save(output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        save_merged_transformer(transformer, output_path, safe_serialization)

    transformer.save = save  # this instance only, for this block
    try:
        yield
    finally:
        del transformer.save
