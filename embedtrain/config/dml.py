"""Metric-learning recipes (``kind: dml``): visual prompts and proxies on a ViT.

A metric-learning recipe trains an image embedding on some classes of a labelled image set and
evaluates it zero-shot on the others. ``model`` holds the ViT ``backbone``, what is ``tuning`` (prompts,
biases, the whole backbone; the head always) and the class ``proxies`` (learnable, optionally
semantic); then the ``data`` and its class split, the ``loss``, and the sections every kind shares
(``train``, ``output``). This module does not import torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from embedtrain.config.common import EvalConfig, check_eval, check_output, check_train, check_unused, recipe_type
from embedtrain.config.compact import CompactConfig, check_compact
from embedtrain.config.schema import resolve_path
from embedtrain.errors import did_you_mean

RECALL = re.compile(r"^recall@(\d+)$")


@dataclass
class BackboneConfig:
    kind: Literal["open_clip", "timm", "transformers"] = "open_clip"
    """Library of the ViT: an open_clip model folder, a timm model name, or a transformers ViT/CLIP folder or Hub id."""
    name_or_path: str = ""
    """open_clip: folder with open_clip_config.json + weights; timm: model name; transformers: folder or Hub id."""
    pretrained: bool = True
    """timm only: load the model's pretrained weights (from the Hub, or from `weights`)."""
    weights: Optional[str] = None
    """timm only: a local weights file (.safetensors/.bin/.pth/.npz) for the model (no download)."""
    revision: Optional[str] = None
    """transformers only: Hub revision."""


@dataclass
class TuningConfig:
    train_backbone: Literal["frozen", "biases", "full"] = "frozen"
    """Backbone weights trained: none, only biases (BitFit), or all (full fine-tuning)."""
    prompt_depth: int = 0
    """Blocks that get new prompts: 0 = none, 1 = shallow VPT, the number of blocks = deep VPT."""
    num_prompts: int = 10
    """Prompts inserted before each prompted block."""
    prompts_per_layer: Optional[list[int]] = None
    """Explicit prompts per block ([n0, n1, ...]; 0 = none), instead of prompt_depth x num_prompts."""
    embed_dim: Optional[int] = None
    """Embedding size of the trained head (null = the backbone's projection size, else its width)."""
    head_init: Literal["projection", "random"] = "projection"
    """Start the head from the backbone's own projection (CLIP towers) or randomly."""


@dataclass
class ProxyConfig:
    lr: float = 1e-2
    """Learning rate of the learnable proxies (their own; the rest uses train.lr)."""
    semantic: bool = False
    """Add semantic proxies: class prompts re-encode each image, and the class representations accumulate."""
    alpha: float = 0.4
    """Weight of the learnable proxies when combined with the semantic ones (1 = learnable only)."""
    accumulate: Literal["ema", "gru"] = "gru"
    """How class representations accumulate across steps: exponential moving average or a GRU cell."""
    momentum: float = 0.9
    """EMA only: weight of the stored representation (the batch's gets 1 - momentum)."""
    class_prompt_depth: int = 1
    """Blocks (from the first) that receive the class prompts."""
    class_prompts: int = 5
    """Class prompts per block."""


@dataclass
class DMLLossConfig:
    name: Literal["proxy_anchor", "normalized_softmax"] = "proxy_anchor"
    """Proxy-Anchor (Kim et al. 2020) or normalized softmax (Zhai & Wu 2019)."""
    scale: float = 32.0
    """Proxy-Anchor's α (scale = 1/τ; 32 means τ = 1/32)."""
    margin: float = 0.1
    """Proxy-Anchor's margin δ."""
    temperature: float = 0.05
    """Normalized softmax's temperature τ (scale = 1/τ)."""
    metrix: bool = False
    """Add the Metrix mixup term (mixed embeddings of two classes with soft targets)."""
    metrix_weight: float = 1.0
    """Weight of the Metrix term."""
    metrix_beta: float = 2.0
    """λ ~ Beta(metrix_beta, metrix_beta) for each mixed embedding."""
    compact: Optional[CompactConfig] = None
    """Also train nested prefixes (Matryoshka) and int8 / binary precisions (null = off); see CompactConfig."""


@dataclass
class DMLDataConfig:
    path: str = ""
    """A metadata file (.jsonl/.json/.csv with image and label columns) or a folder of class folders."""
    image_column: str = "image"
    """Metadata column holding the image path (relative to the metadata file's folder)."""
    label_column: str = "label"
    """Metadata column holding the class."""
    class_split: Literal["random", "sorted"] = "random"
    """Which classes train: a seeded random part, or the first part of the sorted names (CUB: 1-100)."""
    train_class_fraction: float = 0.5
    """Fraction of the classes used for training; the others are the unseen test classes."""
    split_seed: int = 0
    """Seed of the random class split."""
    samples_per_class: int = 4
    """Images of each class in a batch (m); a batch holds batch_size / m classes."""
    batch_size: int = 64
    """Images per batch (a multiple of samples_per_class)."""
    augment: Literal["none", "flip", "crop_flip"] = "crop_flip"
    """Training augmentation: none, horizontal flip, or random resized crop + flip."""
    min_crop_scale: float = 0.5
    """Smallest image area kept by the random resized crop."""
    resize: Optional[int] = None
    """Evaluation: resize the shorter side to this before the centre crop (null = the image size)."""
    preload: bool = True
    """Decode every image once into memory (small datasets); false = read files in every epoch."""
    num_workers: int = 0
    """DataLoader worker processes."""


@dataclass
class DMLModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    """The ViT."""
    tuning: TuningConfig = field(default_factory=TuningConfig)
    """What is trained besides the head."""
    proxies: ProxyConfig = field(default_factory=ProxyConfig)
    """Class proxies."""


@dataclass
class DMLEvalConfig(EvalConfig):
    batch_size: int = 256
    """Images per forward pass when embedding the test classes."""
    recall_at: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """K values of Recall@K."""
    metric: str = "recall@1"
    """Metric that selects the best checkpoint: recall@K for a K of recall_at, or map@r."""


DMLRecipe = recipe_type(
    "DMLRecipe", "dml", model=DMLModelConfig, data=DMLDataConfig, loss=DMLLossConfig, eval=DMLEvalConfig,
    docs={"kind": "Recipe type: an image embedding trained by metric learning, evaluated on unseen classes.",
          "model": "The ViT, what is tuned, and the class proxies.", "data": "Labelled images and the class split.",
          "eval": "Zero-shot evaluation on the test classes.",
          "output": "Where results go: metrics.jsonl, results.json, checkpoints and the final model in <dir>/model."}, module=__name__)


# --------------------------------------------------------------------------------------
# Value checks
# --------------------------------------------------------------------------------------


def _check_values(r: DMLRecipe, problems: list[str], files: bool = True) -> None:
    b, tu, pr = r.model.backbone, r.model.tuning, r.model.proxies
    lo, d, e = r.loss, r.data, r.eval
    if not b.name_or_path:
        problems.append("model.backbone.name_or_path: missing; give an open_clip folder, a timm model name or a transformers model")
    elif files and b.kind == "open_clip":
        p = Path(resolve_path(b.name_or_path))
        if not p.is_dir():
            problems.append(f"model.backbone.name_or_path: folder {p} does not exist; give an open_clip model folder "
                            "(open_clip_config.json + open_clip_model.safetensors)")
        elif not (p / "open_clip_config.json").is_file():
            problems.append(f"model.backbone.name_or_path: {p} has no open_clip_config.json; it is not an open_clip model folder")
    if files and b.weights and not Path(resolve_path(b.weights)).is_file():
        problems.append(f"model.backbone.weights: file {b.weights} does not exist")
    if b.weights and b.kind != "timm":
        problems.append("model.backbone.weights: only used with model.backbone.kind: timm")
    if tu.prompt_depth < 0:
        problems.append(f"model.tuning.prompt_depth: must be 0 or more, got {tu.prompt_depth}")
    if tu.num_prompts < 1:
        problems.append(f"model.tuning.num_prompts: must be at least 1, got {tu.num_prompts}")
    if tu.prompts_per_layer is not None and any(n < 0 for n in tu.prompts_per_layer):
        problems.append(f"model.tuning.prompts_per_layer: counts must be 0 or more, got {tu.prompts_per_layer}")
    if tu.embed_dim is not None and tu.embed_dim < 1:
        problems.append(f"model.tuning.embed_dim: must be at least 1, got {tu.embed_dim}")
    if pr.lr <= 0:
        problems.append(f"model.proxies.lr: must be positive, got {pr.lr}")
    if not 0 <= pr.alpha <= 1:
        problems.append(f"model.proxies.alpha: must be in [0, 1], got {pr.alpha}")
    if not 0 <= pr.momentum < 1:
        problems.append(f"model.proxies.momentum: must be in [0, 1), got {pr.momentum}")
    if pr.class_prompt_depth < 1:
        problems.append(f"model.proxies.class_prompt_depth: must be at least 1, got {pr.class_prompt_depth}")
    if pr.class_prompts < 1:
        problems.append(f"model.proxies.class_prompts: must be at least 1, got {pr.class_prompts}")
    if lo.scale <= 0:
        problems.append(f"loss.scale: must be positive, got {lo.scale}")
    if lo.margin < 0:
        problems.append(f"loss.margin: must be 0 or more, got {lo.margin}")
    if lo.temperature <= 0:
        problems.append(f"loss.temperature: must be positive, got {lo.temperature}")
    if lo.metrix_weight < 0:
        problems.append(f"loss.metrix_weight: must be 0 or more, got {lo.metrix_weight}")
    if lo.metrix_beta <= 0:
        problems.append(f"loss.metrix_beta: must be positive, got {lo.metrix_beta}")
    check_compact(lo.compact, problems, roles=False)
    if not d.path:
        problems.append("data.path: missing; give a metadata file (.jsonl/.json/.csv) or a folder of class folders")
    elif files:
        p = Path(resolve_path(d.path))
        if not p.exists():
            problems.append(f"data.path: {p} does not exist; check the path")
        elif p.is_file() and p.suffix.lower() not in (".jsonl", ".json", ".csv"):
            problems.append(f"data.path: {p} has an unsupported format; use .jsonl, .json, .csv or a folder of class folders")
    if not 0 < d.train_class_fraction < 1:
        problems.append(f"data.train_class_fraction: must be in (0, 1), got {d.train_class_fraction}")
    if d.samples_per_class < 1:
        problems.append(f"data.samples_per_class: must be at least 1, got {d.samples_per_class}")
    elif d.batch_size < 2 * d.samples_per_class or d.batch_size % d.samples_per_class:
        problems.append(f"data.batch_size: must be a multiple of data.samples_per_class ({d.samples_per_class}) "
                        f"holding at least 2 classes, got {d.batch_size}")
    if not 0 < d.min_crop_scale <= 1:
        problems.append(f"data.min_crop_scale: must be in (0, 1], got {d.min_crop_scale}")
    if d.resize is not None and d.resize < 1:
        problems.append(f"data.resize: must be at least 1, got {d.resize}")
    if d.num_workers < 0:
        problems.append(f"data.num_workers: must be 0 or more, got {d.num_workers}")
    check_train(r.train, problems)
    check_unused(r.train, "train", ("compile", "gradient_cache_chunk_size", "gradient_cache_query_chunk_size",
                                    "gradient_cache_document_chunk_size", "gather_across_processes",
                                    "forward_token_budget"),
                 "metric-learning", problems)
    check_eval(e, problems)
    if not e.recall_at or any(k < 1 for k in e.recall_at):
        problems.append(f"eval.recall_at: give one or more K of at least 1, got {e.recall_at}")
    metrics = [f"recall@{k}" for k in e.recall_at] + ["map@r"]
    if e.metric not in metrics:
        match = RECALL.match(e.metric)
        hint = f"; add {match.group(1)} to eval.recall_at or " if match else "; "
        problems.append(f"eval.metric: {e.metric!r} is not measured{did_you_mean(e.metric, metrics)}{hint}"
                        f"choose one of: {', '.join(metrics)}")
    check_output(r.output, problems)
