"""Class proxies for deep metric learning: learnable, or combined with semantic proxies from visual prompts.

Ren et al., "Learning Semantic Proxies from Visual Prompts for Parameter-Efficient Fine-Tuning in
Deep Metric Learning", ICLR 2024 (arXiv:2402.02340).

Ordinary proxies are one learnable vector per training class. Semantic proxies add what the
backbone itself says about a class: every class c owns prompts :math:`Q_c` (``class_prompts`` per
block for the first ``class_prompt_depth`` blocks); during training each image x of class c is
encoded a second time with :math:`Q_c` in place of the shared prompts, and a separate head maps it
to a class representation :math:`r(x) = \\mathrm{normalize}(W_s\\, f(x; Q_c))`. Representations
accumulate across steps in a memory :math:`m_c`:

- ``ema``: :math:`m_c \\leftarrow \\mathrm{normalize}(\\beta\\, m_c + (1-\\beta)\\, \\bar r_c)`, with
  :math:`\\bar r_c` the normalised mean over the batch's images of c (the first time, :math:`m_c = \\bar r_c`);
- ``gru``: :math:`m_c \\leftarrow \\mathrm{normalize}(h)`, where a GRU cell reads the batch's
  representations of c one by one starting from :math:`h = m_c` (zeros the first time).

The proxy of class c is :math:`p_c = \\mathrm{normalize}(\\alpha\\, w_c + (1-\\alpha)\\, m_c)`, where the
learnable :math:`w_c` is *not* normalised and starts small (norm about 0.1, against the unit-norm
:math:`m_c`): it is a learned correction of the semantic proxy (the reference code's "proxy bias") that
grows as far as training finds it useful. Normalising it instead gives it full weight from the first
step while it is still random, and the negatives of the proxy loss then push it away from the
embeddings, against the semantic part. Classes not seen yet use :math:`\\mathrm{normalize}(w_c)`;
without semantic proxies the proxies are :math:`\\mathrm{normalize}(w_c)` (unit-norm start).
The rows of m updated in a step keep their graph for that step's loss (so the class prompts, the
semantic head and the GRU learn from it) and are stored detached for later steps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from embedtrain.errors import EmbedtrainError
from embedtrain.models.folders import DML_CONFIG_FILE, DML_FORMAT, read_json_object, write_json
from embedtrain.models.visual_prompts import PromptedViT, prompt_init_
from embedtrain.models.vit_backbones import build_vit_from_spec

CONFIG_NAME = DML_CONFIG_FILE
WEIGHTS_NAME = "model.safetensors"
FORMAT = DML_FORMAT


class ProxyBank(nn.Module):
    """One proxy per training class, learnable and optionally combined with semantic proxies.

    Args:
        num_classes: training classes C (labels are 0..C-1).
        dim: embedding size.
        semantic: add semantic proxies from class prompts (needs ``width``/``num_layers``).
        alpha: weight of the learnable proxies in the combination (1 = learnable only).
        accumulate: 'ema' or 'gru' (how class representations accumulate across steps).
        momentum: β of the EMA.
        class_prompt_depth / class_prompts: blocks that receive class prompts, and prompts per block.
        width / num_layers: the backbone's token width and depth.
        semantic_head: a head to copy as the starting point of the semantic head (the image head).
    """

    def __init__(self, num_classes: int, dim: int, semantic: bool = False, alpha: float = 0.4,
                 accumulate: Literal["ema", "gru"] = "ema", momentum: float = 0.9, class_prompt_depth: int = 1,
                 class_prompts: int = 1, width: int = 0, num_layers: int = 0,
                 semantic_head: Optional[nn.Linear] = None):
        super().__init__()
        if num_classes < 2:
            raise EmbedtrainError(f"proxies: {num_classes} training class; metric learning needs at least 2")
        self.num_classes, self.dim, self.semantic = num_classes, dim, semantic
        self.alpha, self.accumulate, self.momentum = float(alpha), accumulate, float(momentum)
        # unit norm on their own; a small correction of the semantic proxies (see the module docstring)
        scale = (0.1 if semantic else 1.0) / dim ** 0.5
        self.learnable = nn.Parameter(torch.randn(num_classes, dim) * scale)
        if not semantic:
            return
        if accumulate not in ("ema", "gru"):
            raise EmbedtrainError(f"model.proxies.accumulate: {accumulate!r} is not one of ema, gru")
        if not 1 <= class_prompt_depth <= num_layers:
            raise EmbedtrainError(f"model.proxies.class_prompt_depth: must be in 1..{num_layers} (the backbone's blocks), got {class_prompt_depth}")
        if class_prompts < 1:
            raise EmbedtrainError(f"model.proxies.class_prompts: must be at least 1, got {class_prompts}")
        self.class_prompt_depth, self.class_prompts_per_layer = class_prompt_depth, class_prompts
        self.class_prompts = nn.Parameter(
            prompt_init_(torch.empty(class_prompt_depth, num_classes, class_prompts, width), width))
        self.semantic_head = nn.Linear(width, dim)
        if semantic_head is not None:
            self.semantic_head.load_state_dict(semantic_head.state_dict())
        self.gru = nn.GRUCell(dim, dim) if accumulate == "gru" else None
        self.register_buffer("memory", torch.zeros(num_classes, dim))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))

    def learnable_proxies(self) -> torch.Tensor:
        return F.normalize(self.learnable, dim=-1)

    def forward(self, encoder: Optional[PromptedViT] = None, pixels: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Proxies (C, dim), L2-normalised; with semantic proxies, updates the memory from this batch."""
        learned = self.learnable_proxies()
        if not self.semantic:
            return learned
        if encoder is None or pixels is None or labels is None:
            raise ValueError("semantic proxies need the encoder, the images and their labels")
        prompts = [self.class_prompts[i][labels] for i in range(self.class_prompt_depth)]  # each (B, n, D)
        reps = F.normalize(self.semantic_head(encoder.features(pixels, prompts)), dim=-1).to(learned.dtype)
        classes, inverse = torch.unique(labels, return_inverse=True)
        previous, seen = self.memory[classes], self.seen[classes]
        if self.accumulate == "ema":
            mean = torch.zeros(len(classes), reps.shape[1], device=reps.device, dtype=reps.dtype)
            mean = F.normalize(mean.index_add(0, inverse, reps), dim=-1)
            mixed = self.momentum * previous + (1 - self.momentum) * mean
            updated = F.normalize(torch.where(seen[:, None], mixed, mean), dim=-1)
        else:
            h = torch.where(seen[:, None], previous, torch.zeros_like(previous))
            order = torch.argsort(inverse, stable=True)
            counts = torch.bincount(inverse, minlength=len(classes))
            starts = torch.cumsum(counts, 0) - counts
            for j in range(int(counts.max())):  # the j-th image of every class that has one
                rows = (counts > j).nonzero().squeeze(1)
                # (under autocast the cell computes in half precision; the memory stays in float32)
                h = h.index_put((rows,), self.gru(reps[order[starts[rows] + j]], h[rows]).to(h.dtype))
            updated = F.normalize(h, dim=-1)
        memory = self.memory.index_put((classes,), updated)
        with torch.no_grad():
            self.memory.copy_(memory.detach())
            self.seen[classes] = True
        combined = F.normalize(self.alpha * self.learnable + (1 - self.alpha) * memory, dim=-1)
        return torch.where(self.seen[:, None], combined, learned)

    def config(self) -> dict:
        cfg = {"num_classes": self.num_classes, "dim": self.dim, "semantic": self.semantic, "alpha": self.alpha,
               "accumulate": self.accumulate, "momentum": self.momentum}
        if self.semantic:
            cfg.update(class_prompt_depth=self.class_prompt_depth, class_prompts=self.class_prompts_per_layer)
        return cfg


class DMLModel(nn.Module):
    """A prompted ViT encoder and the proxies of the training classes.

    ``forward(pixels)`` gives embeddings; ``forward(pixels, labels)`` (training) also gives the
    proxies, so that one forward call runs everything that receives gradients.
    """

    def __init__(self, encoder: PromptedViT, proxies: ProxyBank):
        super().__init__()
        self.encoder, self.proxies = encoder, proxies

    def forward(self, pixels: torch.Tensor, labels: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        out = {"embeddings": self.encoder(pixels)}
        if labels is not None:
            out["proxies"] = self.proxies(self.encoder, pixels, labels) if self.proxies.semantic else self.proxies()
        return out

    def trainable_parameter_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def config(self) -> dict:
        e = self.encoder
        return {"format": FORMAT, "backbone": e.backbone.spec(), "prompts_per_layer": e.prompts_per_layer,
                "embed_dim": e.embed_dim, "train_backbone": e.train_backbone, "proxies": self.proxies.config(),
                "image_size": list(e.backbone.image_size), "mean": list(e.backbone.mean), "std": list(e.backbone.std)}


def save_dml_model(model: DMLModel, folder: str | os.PathLike, extra: Optional[dict] = None) -> None:
    """Write ``dml_config.json`` (architecture, prompts, proxies, preprocessing, ``extra``) and ``model.safetensors``."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**model.config(), **(extra or {})}
    write_json(folder / CONFIG_NAME, config)
    save_model(model, str(folder / WEIGHTS_NAME))  # handles tensors that share storage (tied weights)


def load_dml_model(folder: str | os.PathLike) -> tuple[DMLModel, dict]:
    """A model saved by :func:`save_dml_model` and its config (no access to the original backbone needed)."""
    from safetensors.torch import load_model

    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise EmbedtrainError(f"{folder}: no {CONFIG_NAME}; this is not a model folder written by embedtrain dml")
    config = read_json_object(path)
    if config.get("format") != FORMAT:
        raise EmbedtrainError(f"{path}: format {config.get('format')!r} is not {FORMAT!r}")
    backbone = build_vit_from_spec(config["backbone"])
    encoder = PromptedViT(backbone, config["prompts_per_layer"], config["embed_dim"], config["train_backbone"], "random")
    p = dict(config["proxies"])
    proxies = ProxyBank(p.pop("num_classes"), p.pop("dim"), width=backbone.width, num_layers=backbone.num_layers, **p)
    model = DMLModel(encoder, proxies)
    load_model(model, str(folder / WEIGHTS_NAME))
    return model, config


def load_dml_encoder(folder: str | os.PathLike) -> PromptedViT:
    """The image encoder of a folder saved by :func:`save_dml_model` (in eval mode): pixels (B, 3, H, W),
    preprocessed with its backbone's ``image_size``, ``mean`` and ``std``, → L2-normalised embeddings.

    The proxies are training state and are left out; :func:`load_dml_model` gives them and the saved config.
    """
    model, _ = load_dml_model(folder)
    return model.encoder.eval()
