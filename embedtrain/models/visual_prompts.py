"""Visual prompt tuning (VPT) on a frozen ViT, with a trainable embedding head.

Jia et al., "Visual Prompt Tuning", ECCV 2022 (arXiv:2203.12119). Learnable prompt tokens are
inserted after the prefix tokens (the class token) of a ViT:

- *shallow*: n prompts enter before the first block and travel through every block;
- *deep*: before block i, the prompt tokens that came out of block i-1 are dropped and n_i fresh
  learnable prompts take their place (VPT-deep), for the first ``depth`` blocks; later blocks carry
  the last prompts along.

The per-layer counts are a list ``[n_0, n_1, ...]`` (0 = no new prompts at that block), so shallow is
``[n]``, deep is ``[n] * L``, and anything in between is expressible. Prompts never reach the pooled
output: they are removed before pooling, so 'avg' pooling still averages patch tokens only.

The backbone is frozen (``train_backbone='frozen'``), or only its biases are trained ('biases',
BitFit, Ben Zaken et al. 2022), or all of it ('full', plain fine-tuning). The embedding head (a
linear map from the pooled width-D features to the embedding size) is always trained; when the
backbone has its own projection (CLIP towers) the head can start from it, so that before training
the embedding equals the backbone's own image embedding.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from embedtrain.errors import EmbedtrainError
from embedtrain.models.vit_backbones import ViTAdapter

TRAIN_BACKBONE = ("frozen", "biases", "full")


def prompt_layout(num_layers: int, depth: int = 0, num_prompts: int = 0,
                  per_layer: Optional[Sequence[int]] = None) -> list[int]:
    """New prompts before each of the ``num_layers`` blocks.

    ``per_layer`` (if given) is used as is (padded with zeros); otherwise the first ``depth`` blocks get
    ``num_prompts`` each: depth 0 = no prompts, 1 = shallow, ``num_layers`` = deep.
    """
    if per_layer is not None:
        counts = [int(n) for n in per_layer]
        if len(counts) > num_layers:
            raise EmbedtrainError(f"prompts: {len(counts)} per-layer counts for a backbone with {num_layers} blocks")
        if any(n < 0 for n in counts):
            raise EmbedtrainError(f"prompts: per-layer counts must be 0 or more, got {counts}")
    else:
        if depth > num_layers:
            raise EmbedtrainError(f"prompts: depth {depth} is more than the backbone's {num_layers} blocks")
        counts = [num_prompts] * depth if num_prompts > 0 else []
    return counts + [0] * (num_layers - len(counts))


def prompt_init_(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Uniform in ±sqrt(6 / (2·D)): VPT's Xavier-uniform bound when 3·patch² ≈ D (ViT-B/16)."""
    bound = math.sqrt(6.0 / (2 * width))
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


def encode_with_prompts(backbone: ViTAdapter, pixels: torch.Tensor,
                        layer_prompts: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """Pooled image features (B, D) with prompts inserted before each block.

    ``layer_prompts[i]`` is None (keep the current prompts) or the prompts that replace them before
    block i: (n, D) shared by the batch, or (B, n, D) one set per image (class-specific prompts).
    """
    x = backbone.embed(pixels)
    batch, prefix = x.shape[0], backbone.num_prefix_tokens
    current = 0  # prompt tokens now in the sequence, right after the prefix
    for i in range(backbone.num_layers):
        new = layer_prompts[i] if i < len(layer_prompts) else None
        if new is not None and new.shape[-2] > 0:
            if new.dim() == 2:
                new = new.unsqueeze(0).expand(batch, -1, -1)
            x = torch.cat([x[:, :prefix], new.to(x.dtype), x[:, prefix + current:]], dim=1)
            current = new.shape[1]
        x = backbone.run_block(i, x)
    if current:
        x = torch.cat([x[:, :prefix], x[:, prefix + current:]], dim=1)
    return backbone.pool(x)


class PromptedViT(nn.Module):
    """Images → L2-normalised embeddings (B, embed_dim) through a prompted ViT and a linear head.

    Args:
        backbone: a :class:`~embedtrain.models.vit_backbones.ViTAdapter`.
        prompts_per_layer: new prompts before each block (see :func:`prompt_layout`).
        embed_dim: output size; None = the backbone's projection size if it has one, else its width.
        train_backbone: 'frozen', 'biases' (BitFit) or 'full'.
        head_init: 'projection' starts the head from the backbone's own projection (CLIP towers;
            falls back to random when there is none or the sizes differ), 'random' does not.
    """

    def __init__(self, backbone: ViTAdapter, prompts_per_layer: Sequence[int] = (), embed_dim: Optional[int] = None,
                 train_backbone: Literal["frozen", "biases", "full"] = "frozen",
                 head_init: Literal["projection", "random"] = "projection"):
        super().__init__()
        if train_backbone not in TRAIN_BACKBONE:
            raise EmbedtrainError(f"train_backbone: {train_backbone!r} is not one of {', '.join(TRAIN_BACKBONE)}")
        self.backbone = backbone
        width = backbone.width
        if len(prompts_per_layer) > backbone.num_layers:
            raise EmbedtrainError(
                f"prompts: {len(prompts_per_layer)} per-layer counts for a backbone with {backbone.num_layers} blocks")
        counts = list(prompts_per_layer) + [0] * (backbone.num_layers - len(prompts_per_layer))
        self.prompts_per_layer = counts
        # one parameter per prompted block, named by block index ("prompts.3"), none for empty blocks
        self.prompts = nn.ParameterDict({
            str(i): nn.Parameter(prompt_init_(torch.empty(n, width), width)) for i, n in enumerate(counts) if n > 0
        })
        proj = backbone.projection()
        if embed_dim is None:
            embed_dim = int(proj.shape[1]) if proj is not None else width
        self.embed_dim = int(embed_dim)
        self.head = nn.Linear(width, self.embed_dim)
        self.head_from_projection = False
        if head_init == "projection" and proj is not None and tuple(proj.shape) == (width, self.embed_dim):
            with torch.no_grad():
                self.head.weight.copy_(proj.detach().T)
                self.head.bias.zero_()
            self.head_from_projection = True
        self.train_backbone = train_backbone
        self.set_trainable(train_backbone)

    def set_trainable(self, train_backbone: str) -> None:
        """Freeze the backbone, or open its biases, or all of it; prompts and head always train."""
        for name, p in self.backbone.named_parameters():
            p.requires_grad = train_backbone == "full" or (train_backbone == "biases" and _is_bias(name))
        for p in list(self.prompts.parameters()) + list(self.head.parameters()):
            p.requires_grad = True

    def layer_prompts(self) -> list[Optional[torch.Tensor]]:
        return [self.prompts[str(i)] if str(i) in self.prompts else None for i in range(self.backbone.num_layers)]

    def features(self, pixels: torch.Tensor, layer_prompts: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
        """Pooled backbone features (B, D) with the model's prompts, or with ``layer_prompts`` instead."""
        return encode_with_prompts(self.backbone, pixels, self.layer_prompts() if layer_prompts is None else layer_prompts)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.features(pixels)), dim=-1)


def _is_bias(name: str) -> bool:
    # "…bias" covers Linear/LayerNorm biases and nn.MultiheadAttention's in_proj_bias
    return name.rsplit(".", 1)[-1].endswith("bias")
