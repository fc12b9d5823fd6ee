"""NV-Embed's latent-attention pooling, and its sentence-transformers module.

From "NV-Embed: Improved Techniques for Training LLMs as Generalist Embedding Models" (Lee et al.,
arXiv 2405.17428, section 3.2): instead of the last token's state or a plain mean, the decoder's token
states query a trainable latent array, and the result is mean-pooled. The paper uses 512 latents,
8 heads and the backbone's hidden size (4096 for Mistral-7B).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.nn.functional as F
from sentence_transformers.base.modules import Module
from torch import nn

from embedtrain.models.instructions import pooling_mask

DEFAULT_NUM_LATENTS = 512
"""Rows of the latent array when not given (the paper's)."""
DEFAULT_NUM_HEADS = 8
"""Attention heads when not given (the paper's)."""


class LatentAttentionPooling(nn.Module):
    """Token states (batch, seq, d) + pooling mask (batch, seq) → one vector per text (batch, d).

    With token states ``H`` (n × d) of one text, the trainable latent array ``L`` (r × d), ``h`` heads
    of size ``d_h = d / h`` and the pooling mask ``m`` (1 for tokens to pool)::

        X    = LayerNorm(H)
        A_j  = softmax( (X W_q^j) (L W_k^j)^T / sqrt(d_h) ) (L W_v^j)      for head j = 1..h
        O    = H + [A_1, ..., A_h] W_o                    (cross-attention: tokens query the latents)
        Y    = O + W_2 GELU(W_1 LayerNorm(O) + b_1) + b_2  (MLP, intermediate size d_ff)
        e    = sum_i m_i Y_i / sum_i m_i                   (mean over pooled tokens)

    ``L`` acts as both keys and values (the paper's "dictionary"). Each token attends to the latents
    only, never to other tokens, so a masked token (padding or instruction) cannot change the output:
    the mask is needed only in the final mean. The paper writes ``O = softmax(QK^T)V`` followed by an
    MLP; the pre-norms and residual connections are the usual transformer-block choices and keep the
    large-magnitude states of a decoder LLM stable.

    Args:
        hidden_size: d, the backbone's hidden size.
        num_latents: r (paper: 512).
        num_heads: h (paper: 8); must divide ``hidden_size``.
        intermediate_size: d_ff of the MLP (default ``mlp_ratio * hidden_size``).
        mlp_ratio: used when ``intermediate_size`` is not given.
    """

    def __init__(
        self,
        hidden_size: int,
        num_latents: int = DEFAULT_NUM_LATENTS,
        num_heads: int = DEFAULT_NUM_HEADS,
        intermediate_size: Optional[int] = None,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide hidden_size ({hidden_size})")
        self.hidden_size = hidden_size
        self.num_latents = num_latents
        self.num_heads = num_heads
        self.intermediate_size = int(intermediate_size or round(mlp_ratio * hidden_size))
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_size))
        self.query_norm = nn.LayerNorm(hidden_size)
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.mlp_norm = nn.LayerNorm(hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, self.intermediate_size),
            nn.GELU(),
            nn.Linear(self.intermediate_size, hidden_size),
        )

    def sizes(self) -> dict[str, int]:
        """``num_latents``, ``num_heads`` and ``intermediate_size``: what builds this head again."""
        return {"num_latents": self.num_latents, "num_heads": self.num_heads, "intermediate_size": self.intermediate_size}

    def token_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """``Y`` above: (batch, seq, d) → (batch, seq, d), each token independently."""
        batch, seq_len, dim = hidden.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        hidden = hidden.to(self.latents.dtype)
        q = self.q_proj(self.query_norm(hidden)).view(batch, seq_len, heads, head_dim).transpose(1, 2)
        k = self.k_proj(self.latents).view(1, self.num_latents, heads, head_dim).transpose(1, 2)
        v = self.v_proj(self.latents).view(1, self.num_latents, heads, head_dim).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
        out = hidden + self.o_proj(attended.transpose(1, 2).reshape(batch, seq_len, dim))
        return out + self.mlp(self.mlp_norm(out))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(batch, seq, d), (batch, seq) → (batch, d); the mean over tokens where ``mask`` is 1."""
        states = self.token_states(hidden)
        weights = mask.unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


class LatentAttentionPoolingModule(Module):
    """sentence-transformers module around :class:`LatentAttentionPooling` (config + safetensors weights).

    Reads ``token_embeddings`` and ``attention_mask``, writes ``sentence_embedding``. With
    ``include_prompt=False`` (the default, as in NV-Embed) the prompt's tokens are left out of the mean,
    counted from each row's first real token exactly like sentence-transformers'
    ``Pooling(include_prompt=False)`` does with the ``prompt_length`` feature.

    A folder holding this module records its dotted path in ``modules.json``; sentence-transformers 6
    imports such classes only with ``SentenceTransformer(path, trust_remote_code=True)``. The path has
    several dots, so nothing is imported from the model folder itself: the class comes from the
    installed ``embedtrain`` package.
    """

    config_keys = ["embedding_dimension", "num_latents", "num_heads", "intermediate_size", "include_prompt"]

    def __init__(self, embedding_dimension: int, *, include_prompt: bool = False, **sizes: Any):
        """``sizes``: ``num_latents``, ``num_heads``, ``intermediate_size`` of the :class:`LatentAttentionPooling` head."""
        super().__init__()
        self.latent_attention = LatentAttentionPooling(embedding_dimension, **sizes)
        self.embedding_dimension = embedding_dimension
        self.num_latents = self.latent_attention.num_latents
        self.num_heads = self.latent_attention.num_heads
        self.intermediate_size = self.latent_attention.intermediate_size
        self.include_prompt = include_prompt

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        hidden = features["token_embeddings"]
        mask = features.get("attention_mask")
        if mask is None or mask.shape[-1] != hidden.shape[1]:
            mask = torch.ones(hidden.shape[:-1], device=hidden.device, dtype=torch.int64)
        if not self.include_prompt and "prompt_length" in features:
            length = features["prompt_length"]
            # an int at inference, a tensor of equal values in training batches (as Pooling reads it)
            length = int(length.reshape(-1)[0].item()) if isinstance(length, torch.Tensor) else int(length)
            mask = pooling_mask(mask, mask, length)
        features["sentence_embedding"] = self.latent_attention(hidden, mask)
        return features

    def get_embedding_dimension(self) -> int:
        return self.embedding_dimension

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        os.makedirs(output_path, exist_ok=True)
        self.save_config(output_path)
        self.save_torch_weights(output_path, safe_serialization=safe_serialization)

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        **kwargs,
    ) -> "LatentAttentionPoolingModule":
        hub = dict(
            subfolder=subfolder, token=token, cache_folder=cache_folder, revision=revision,
            local_files_only=local_files_only,
        )
        module = cls(**cls.load_config(model_name_or_path, **hub))
        cls.load_torch_weights(model_name_or_path, model=module, **hub)
        return module
