"""Metric-learning recipes (``embedtrain dml RECIPE``): visual prompts and proxies on a ViT.

A DML recipe trains an image embedding on some classes of a labelled image set and evaluates it
zero-shot on the others. Its sections: the ViT ``backbone``, what is ``tuned`` (prompts, biases,
the whole backbone; the head always), the ``proxies`` (learnable, optionally semantic), the
``loss``, the ``data`` and its class split, ``train``, ``eval`` and ``output``. Loading reuses the
strict machinery of :mod:`embedtrain.config` (unknown keys with did-you-mean, wrong types with their
dotted path, every problem reported together before anything loads). A DML recipe's first line is
a comment naming the ``embedtrain dml`` command that runs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from embedtrain.config import _build_dataclass, apply_override, read_yaml, resolve_path
from embedtrain.errors import ConfigError


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
class DMLTrainConfig:
    lr: float = 1e-3
    """Learning rate of prompts, head, biases / backbone and the semantic-proxy modules."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """AdamW, or SGD with momentum."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-4
    """Weight decay (not applied to biases, norms, prompts and proxies)."""
    scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    """Decay after warmup."""
    warmup_ratio: float = 0.0
    """Fraction of the steps spent warming up linearly from 0."""
    max_steps: Optional[int] = None
    """Number of optimizer steps; if unset, epochs x batches per epoch."""
    epochs: int = 10
    """Passes over the training images when max_steps is unset."""
    max_grad_norm: Optional[float] = 10.0
    """Clip the global gradient norm to this value (null = no clipping)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision through accelerate."""
    seed: int = 42
    """Seed for new weights, batches and augmentation."""
    log_every: int = 10
    """Steps between metric lines."""
    eval_every: Optional[int] = None
    """Steps between evaluations (null = only at the end)."""
    save_every: Optional[int] = None
    """Steps between checkpoints (null = only the final model)."""
    keep_last: int = 2
    """Checkpoints kept besides the best one."""
    max_consecutive_nonfinite: int = 5
    """Stop after this many steps in a row with a non-finite loss or gradient."""
    torch_threads: Optional[int] = None
    """Intra-op CPU threads (null = torch's default)."""


@dataclass
class DMLEvalConfig:
    batch_size: int = 256
    """Images per forward pass when embedding the test classes."""
    before_training: bool = True
    """Also evaluate before the first step (the backbone's own embedding through the initial head)."""
    recall_at: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """K values of Recall@K."""


@dataclass
class DMLOutputConfig:
    dir: str = ""
    """Run directory: metrics.jsonl, results.json, checkpoints and the final model in <dir>/model."""
    overwrite: bool = False
    """Replace an existing run directory (otherwise it is an error)."""
    plot: bool = True
    """Write the loss and evaluation curves as PNG."""


@dataclass
class DMLRecipe:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    """The ViT."""
    tuning: TuningConfig = field(default_factory=TuningConfig)
    """What is trained besides the head."""
    proxies: ProxyConfig = field(default_factory=ProxyConfig)
    """Class proxies."""
    loss: DMLLossConfig = field(default_factory=DMLLossConfig)
    """The objective."""
    data: DMLDataConfig = field(default_factory=DMLDataConfig)
    """Labelled images and the class split."""
    train: DMLTrainConfig = field(default_factory=DMLTrainConfig)
    """Optimization."""
    eval: DMLEvalConfig = field(default_factory=DMLEvalConfig)
    """Zero-shot evaluation on the test classes."""
    output: DMLOutputConfig = field(default_factory=DMLOutputConfig)
    """Where results go."""


# --------------------------------------------------------------------------------------
# Value checks
# --------------------------------------------------------------------------------------


def _check_values(r: DMLRecipe, problems: list[str], files: bool) -> None:
    b, tu, pr, lo, d, t, e, o = r.backbone, r.tuning, r.proxies, r.loss, r.data, r.train, r.eval, r.output
    if not b.name_or_path:
        problems.append("backbone.name_or_path: missing; give an open_clip folder, a timm model name or a transformers model")
    elif files and b.kind == "open_clip":
        p = Path(resolve_path(b.name_or_path))
        if not p.is_dir():
            problems.append(f"backbone.name_or_path: folder {p} does not exist; give an open_clip model folder "
                            "(open_clip_config.json + open_clip_model.safetensors)")
        elif not (p / "open_clip_config.json").is_file():
            problems.append(f"backbone.name_or_path: {p} has no open_clip_config.json; it is not an open_clip model folder")
    if files and b.weights and not Path(resolve_path(b.weights)).is_file():
        problems.append(f"backbone.weights: file {b.weights} does not exist")
    if b.weights and b.kind != "timm":
        problems.append("backbone.weights: only used with backbone.kind: timm")
    if tu.prompt_depth < 0:
        problems.append(f"tuning.prompt_depth: must be 0 or more, got {tu.prompt_depth}")
    if tu.num_prompts < 1:
        problems.append(f"tuning.num_prompts: must be at least 1, got {tu.num_prompts}")
    if tu.prompts_per_layer is not None and any(n < 0 for n in tu.prompts_per_layer):
        problems.append(f"tuning.prompts_per_layer: counts must be 0 or more, got {tu.prompts_per_layer}")
    if tu.embed_dim is not None and tu.embed_dim < 1:
        problems.append(f"tuning.embed_dim: must be at least 1, got {tu.embed_dim}")
    if pr.lr <= 0:
        problems.append(f"proxies.lr: must be positive, got {pr.lr}")
    if not 0 <= pr.alpha <= 1:
        problems.append(f"proxies.alpha: must be in [0, 1], got {pr.alpha}")
    if not 0 <= pr.momentum < 1:
        problems.append(f"proxies.momentum: must be in [0, 1), got {pr.momentum}")
    if pr.class_prompt_depth < 1:
        problems.append(f"proxies.class_prompt_depth: must be at least 1, got {pr.class_prompt_depth}")
    if pr.class_prompts < 1:
        problems.append(f"proxies.class_prompts: must be at least 1, got {pr.class_prompts}")
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
    if t.lr <= 0:
        problems.append(f"train.lr: must be positive, got {t.lr}")
    if t.momentum < 0:
        problems.append(f"train.momentum: must be 0 or more, got {t.momentum}")
    if t.weight_decay < 0:
        problems.append(f"train.weight_decay: must be 0 or more, got {t.weight_decay}")
    if not 0 <= t.warmup_ratio < 1:
        problems.append(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    if t.max_steps is not None and t.max_steps < 1:
        problems.append(f"train.max_steps: must be at least 1, got {t.max_steps}")
    if t.epochs < 1:
        problems.append(f"train.epochs: must be at least 1, got {t.epochs}")
    if t.max_grad_norm is not None and t.max_grad_norm <= 0:
        problems.append(f"train.max_grad_norm: must be positive or null, got {t.max_grad_norm}")
    for name in ("log_every", "eval_every", "save_every", "keep_last", "max_consecutive_nonfinite", "torch_threads"):
        v = getattr(t, name)
        low = 0 if name == "keep_last" else 1
        if v is not None and v < low:
            problems.append(f"train.{name}: must be at least {low}, got {v}")
    if e.batch_size < 1:
        problems.append(f"eval.batch_size: must be at least 1, got {e.batch_size}")
    if not e.recall_at or any(k < 1 for k in e.recall_at):
        problems.append(f"eval.recall_at: give one or more K of at least 1, got {e.recall_at}")
    if not o.dir:
        problems.append("output.dir: missing; give a run directory, e.g. output.dir=runs/my-dml-run")


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def dml_recipe_from_dict(data: dict, check_values: bool = True, check_files: bool = True) -> DMLRecipe:
    """Build a :class:`DMLRecipe` from plain data, raising one ConfigError with every problem.

    ``check_files=False`` skips only the checks that the backbone folder and the data exist (for
    recipes meant for another machine, such as the CUB-200 GPU recipe).
    """
    problems: list[str] = []
    recipe = _build_dataclass(DMLRecipe, data, "", problems)
    if check_values:
        extra: list[str] = []
        _check_values(recipe, extra, check_files)
        bad_paths = {p.split(":")[0].split("[")[0] for p in problems}
        problems += [p for p in extra if p.split(":")[0].split("[")[0] not in bad_paths]
    if problems:
        raise ConfigError(problems)
    return recipe


def load_dml_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                    check_files: bool = True) -> DMLRecipe:
    """Load a YAML DML recipe, apply ``key=value`` overrides, validate everything."""
    data = read_yaml(path)
    for assignment in overrides:
        apply_override(data, assignment)
    return dml_recipe_from_dict(data, check_files=check_files)


def is_dml_recipe(path: str | os.PathLike) -> bool:
    """True when the recipe's first line names the ``embedtrain dml`` command."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
    except OSError:
        return False
    return first.startswith("#") and "embedtrain dml " in first

