"""Multimodal recipes: CLIP dual encoders (``kind: clip``) and VLM2Vec encoders (``kind: vlm2vec``).

Both kinds share the training data section (any mix of text and images per role) and the eval
section (retrieval on BEIR-style folders whose rows may carry images); ``train`` and ``output`` are
the sections every kind shares. This module does not import torch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from embedtrain.config.common import DatasetMixConfig, DatasetSource, EvalConfig, EvalTaskSource, LoraSettings, recipe_type, task_name
from embedtrain.config.common import check_data_mix, check_datasets, check_eval, check_local_model, check_lora, check_output, check_streaming, check_train, check_unused
from embedtrain.config.compact import CompactConfig, check_compact
from embedtrain.config.schema import check_beir_folder, looks_local, resolve_path
from embedtrain.errors import did_you_mean

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


# --------------------------------------------------------------------------------------
# Sections shared by both kinds
# --------------------------------------------------------------------------------------


@dataclass
class ClipLoraSettings(LoraSettings):
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=list)
    """Layer names in the LoRA towers to adapt, e.g. [c_fc, c_proj]; empty = attention and MLP layers."""


@dataclass
class MultimodalDatasetConfig(DatasetSource):
    image_root: Optional[str] = None
    """Folder that relative image paths are read from (defaults to the data file's folder)."""
    query_text_column: Optional[str] = None
    """Column holding the query text (null = the query has no text)."""
    query_image_column: Optional[str] = None
    """Column holding the query image: a path, or a datasets Image value (null = no image)."""
    positive_text_column: Optional[str] = None
    """Column holding the positive document's text (null = no text)."""
    positive_image_column: Optional[str] = None
    """Column holding the positive document's image (null = no image)."""
    negative_text_columns: list[str] = field(default_factory=list)
    """Columns holding hard-negative texts (zero or more)."""
    negative_image_columns: list[str] = field(default_factory=list)
    """Columns holding hard-negative images (as many as negative_text_columns when both are given)."""
    query_template: str = "{image}{text}"
    """A query as the model's text: {text} is its text, {image} the image token(s); data.train[0]'s are saved with the model."""
    document_template: str = "{image}{text}"
    """The same for positives and negatives (CLIP: {image} stands for nothing; images go to the image tower)."""
    streaming: bool = False
    """Read the dataset as a stream (local shards: webdataset .tar, Parquet or JSON lines, a folder or glob of them; or a Hub id) instead of loading it whole: images checked as they are read, split across processes and workers, resumed at the same row; needs train.max_steps."""


@dataclass
class MultimodalDataConfig(DatasetMixConfig):
    train: list[MultimodalDatasetConfig] = field(default_factory=list)  # documented in DatasetMixConfig
    num_workers: int = 0
    """DataLoader worker processes; images are read and preprocessed in them."""
    bad_images: Literal["stop", "skip"] = "stop"
    """An image that is missing or cannot be decoded: stop with its row and path, or skip the row and count it."""
    verify_images: bool = True
    """Decode every image once before training (streams: as each row is read), so that bad files are found before a step uses them."""
    stream_pool_batches: int = 4
    """Streams: batches' worth of rows each reader holds at a time (the batches are cut from them, rows that would repeat a text or image of a batch wait for the next pool)."""


@dataclass
class MultimodalEvalTaskConfig(EvalTaskSource):
    query_template: str = "{image}{text}"
    """Template for the task's queries (as in data.train)."""
    document_template: str = "{image}{text}"
    """Template for the task's corpus."""
    both_directions: bool = True
    """Also let the corpus retrieve the queries (image->text besides text->image), with the qrels reversed."""


@dataclass
class MultimodalEvalConfig(EvalConfig):
    tasks: list[MultimodalEvalTaskConfig] = field(default_factory=list)
    """Local retrieval tasks evaluated during and after training."""
    metric: Literal["recall@1", "recall@5", "recall@10", "ndcg@10", "mrr@10"] = "recall@10"
    """Metric that selects the best checkpoint (mean over tasks and directions)."""


# --------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------


@dataclass
class ClipArchitecture:
    embed_dim: int = 64
    """Width of the shared embedding space."""
    image_size: int = 64
    """Input image side in pixels (images are resized and center-cropped to it)."""
    patch_size: int = 8
    """Vision transformer patch side in pixels."""
    vision_width: int = 64
    """Vision transformer width."""
    vision_layers: int = 2
    """Vision transformer blocks."""
    vision_head_width: int = 32
    """Channels per vision attention head (heads = vision_width / vision_head_width)."""
    text_width: int = 64
    """Text transformer width."""
    text_layers: int = 2
    """Text transformer blocks."""
    text_heads: int = 2
    """Text attention heads."""
    context_length: int = 32
    """Text tokens per input (open_clip's BPE tokenizer pads or truncates to it)."""


@dataclass
class ClipModelConfig:
    name_or_path: str = ""
    """An open_clip folder (e.g. a run's model/), a built-in open_clip name such as ViT-B-32, or empty to build `architecture`."""
    pretrained: Optional[str] = None
    """open_clip pretrained tag for a built-in name (downloads from the Hub)."""
    architecture: ClipArchitecture = field(default_factory=ClipArchitecture)
    """The model built from scratch when name_or_path is empty."""
    image_tower: Literal["train", "frozen", "lora"] = "train"
    """Image tower: train every weight, freeze it, or train LoRA adapters on it."""
    text_tower: Literal["train", "frozen", "lora"] = "train"
    """Text tower: train every weight, freeze it, or train LoRA adapters on it."""
    lora: ClipLoraSettings = field(default_factory=ClipLoraSettings)
    """LoRA settings for towers set to 'lora' (default targets: attention and MLP layers)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""


@dataclass
class ClipLossConfig:
    name: Literal["infonce", "siglip"] = "infonce"
    """infonce: CLIP's symmetric softmax loss; siglip: SigLIP's pairwise sigmoid loss."""
    temperature: float = 0.07
    """Starting temperature τ (scale = 1/τ); CLIP starts at 0.07, SigLIP at 0.1."""
    learnable_temperature: bool = True
    """Train log(1/τ) as a parameter (as CLIP and SigLIP do)."""
    bias: float = -10.0
    """siglip: starting logit bias b."""
    learnable_bias: bool = True
    """siglip: train the bias."""
    compact: Optional[CompactConfig] = None
    """Also train nested prefixes (Matryoshka) and int8 / binary precisions (null = off); see CompactConfig."""


ClipRecipe = recipe_type(
    "ClipRecipe", "clip", model=ClipModelConfig, data=MultimodalDataConfig, loss=ClipLossConfig, eval=MultimodalEvalConfig,
    docs={"kind": "Recipe type: a CLIP dual encoder trained through open_clip.", "model": "The two towers.",
          "data": "Training data: each row pairs a text with an image.",
          "output": "Where results go; the model is written to <dir>/model in open_clip's folder layout."}, module=__name__)


# --------------------------------------------------------------------------------------
# VLM2Vec
# --------------------------------------------------------------------------------------


@dataclass
class VlmModelConfig:
    name_or_path: str = ""
    """A transformers image-text-to-text model: Hub id or local folder (weights and processor)."""
    pooling: Literal["last_token", "mean"] = "last_token"
    """How token states become one vector (VLM2Vec: the last real token)."""
    normalize: bool = True
    """L2-normalise embeddings."""
    max_length: int = 256
    """Token limit for the text part of an input (image tokens come on top)."""
    finetune: Literal["lora", "full"] = "lora"
    """Train LoRA adapters (VLM2Vec's default) or every weight of the language model."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings; the target layers are looked for in the language model only (never the vision tower)."""
    train_vision: bool = False
    """With finetune: full, also train the vision encoder (otherwise it stays frozen)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype to load the backbone in (bfloat16 on recent GPUs)."""
    image_max_pixels: Optional[int] = None
    """Largest image area the processor keeps (Qwen2-VL's max_pixels); null = the processor's own."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to transformers."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    trust_remote_code: bool = False
    """Allow a Hub model's own Python code to run. Off unless you trust the repository."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) for name_or_path."""


@dataclass
class VlmLossConfig:
    name: Literal["infonce", "gte"] = "infonce"
    """infonce: InfoNCE over in-batch and hard negatives; gte: GTE's loss (q→d, d→q, q→q, d→d in one softmax)."""
    temperature: float = 0.02
    """Softmax temperature τ (scale = 1/τ); VLM2Vec uses 0.02."""
    learnable_temperature: bool = False
    """Train log(1/τ) as a parameter starting from `temperature`."""
    symmetric: bool = False
    """Add the document→query term."""
    in_batch_negatives: bool = True
    """Use other rows' documents as negatives."""
    mask_false_negatives: bool = True
    """Ignore a negative identical to the row's positive."""
    hardness_weight: float = 0.0
    """Weight each negative by exp(β·similarity), normalised to mean 1 per row (β; 0 = off)."""
    compact: Optional[CompactConfig] = None
    """Also train nested prefixes (Matryoshka) and int8 / binary precisions (null = off); see CompactConfig."""


Vlm2VecRecipe = recipe_type(
    "Vlm2VecRecipe", "vlm2vec", model=VlmModelConfig, data=MultimodalDataConfig, loss=VlmLossConfig, eval=MultimodalEvalConfig,
    docs={"kind": "Recipe type: a vision-language model trained as an embedding model (VLM2Vec).",
          "model": "The vision-language backbone.", "data": "Training data: any mix of text and images per role.",
          "output": "Where results go; the model is written to <dir>/model as a sentence-transformers folder."}, module=__name__)


MultimodalRecipe = Union[ClipRecipe, Vlm2VecRecipe]


# --------------------------------------------------------------------------------------
# Names and helpers
# --------------------------------------------------------------------------------------


def mm_dataset_name(ds: MultimodalDatasetConfig) -> str:
    if ds.name:
        return ds.name
    p = Path(ds.path)
    return p.parent.name if p.stem in {"train", "data", "metadata"} and p.parent.name else p.stem or ds.path


mm_task_name = task_name  # the same rule as text tasks: the folder's name (split folders get their parent's)


def role_columns(ds: MultimodalDatasetConfig) -> dict[str, tuple[Optional[str], Optional[str]]]:
    """{'query': (text column, image column), 'positive': ..., 'negative_0': ...} of a dataset."""
    roles = {
        "query": (ds.query_text_column, ds.query_image_column),
        "positive": (ds.positive_text_column, ds.positive_image_column),
    }
    k = max(len(ds.negative_text_columns), len(ds.negative_image_columns))
    for j in range(k):
        text = ds.negative_text_columns[j] if j < len(ds.negative_text_columns) else None
        image = ds.negative_image_columns[j] if j < len(ds.negative_image_columns) else None
        roles[f"negative_{j}"] = (text, image)
    return roles


# --------------------------------------------------------------------------------------
# Value checks
# --------------------------------------------------------------------------------------


def _check_template(template: str, where: str, allowed: tuple[str, ...], problems: list[str]) -> None:
    for name in PLACEHOLDER.findall(template):
        if name not in allowed:
            problems.append(
                f"{where}: unknown placeholder {{{name}}}{did_you_mean(name, allowed)}; "
                f"use {', '.join('{' + a + '}' for a in allowed)}"
            )


def _check_datasets(recipe: MultimodalRecipe, problems: list[str], files: bool) -> None:
    d = recipe.data
    clip = recipe.kind == "clip"
    if not d.train:
        problems.append("data.train: no datasets; add at least one {path: ...}")
    check_datasets(d.train, "data.train", mm_dataset_name, problems, files)
    check_data_mix(d, problems)
    check_streaming(d.train, recipe.train.max_steps, problems)
    if d.stream_pool_batches < 1:
        problems.append(f"data.stream_pool_batches: must be at least 1, got {d.stream_pool_batches}")
    placeholders = ("image", "text")
    for i, ds in enumerate(d.train):
        where = f"data.train[{i}]"
        if files and ds.image_root is not None and not os.path.isdir(resolve_path(ds.image_root)):
            problems.append(f"{where}.image_root: folder {resolve_path(ds.image_root)} does not exist; check the path")
        if ds.negative_text_columns and ds.negative_image_columns and \
                len(ds.negative_text_columns) != len(ds.negative_image_columns):
            problems.append(
                f"{where}.negative_image_columns: {len(ds.negative_image_columns)} columns for "
                f"{len(ds.negative_text_columns)} negative_text_columns; give one image column per negative "
                "(or leave one of the lists empty)"
            )
        for role, (text, image) in role_columns(ds).items():
            label = role.split("_")[0]
            if text is None and image is None:
                problems.append(f"{where}: the {label} has neither a text nor an image column; "
                                f"set {label}_text_column and/or {label}_image_column")
            elif clip and text is not None and image is not None:
                problems.append(f"{where}: a CLIP {label} is a text or an image, not both; "
                                f"drop {label}_text_column or {label}_image_column")
        if clip:
            q_text, q_image = ds.query_text_column, ds.query_image_column
            p_text, p_image = ds.positive_text_column, ds.positive_image_column
            if (q_text is None) == (p_text is None) and (q_text or p_text or q_image or p_image):
                problems.append(f"{where}: CLIP pairs a text with an image; give the query a text and the "
                                "positive an image (or the other way round)")
            doc_is_image = p_image is not None
            if (ds.negative_image_columns if not doc_is_image else ds.negative_text_columns):
                problems.append(f"{where}: negatives must be of the positive's kind "
                                f"({'images' if doc_is_image else 'texts'})")
        for key in ("query_template", "document_template"):
            _check_template(getattr(ds, key), f"{where}.{key}", placeholders, problems)
        if not clip:
            for role, (text, image) in role_columns(ds).items():
                template = ds.query_template if role == "query" else ds.document_template
                if image is not None and "{image}" not in template:
                    key = "query_template" if role == "query" else "document_template"
                    problems.append(f"{where}.{key}: the {role.split('_')[0]} has an image but the template has no "
                                    "{image} placeholder; add it where the image goes")
    if d.batch_size < 2:
        problems.append(f"data.batch_size: must be at least 2 for in-batch contrast, got {d.batch_size}")
    if d.num_workers < 0:
        problems.append(f"data.num_workers: must be 0 or more, got {d.num_workers}")


def _check_eval(e: MultimodalEvalConfig, problems: list[str], files: bool) -> None:
    check_eval(e, problems)
    placeholders = ("image", "text")
    names: set[str] = set()
    for i, task in enumerate(e.tasks):
        check_beir_folder(task.path, f"eval.tasks[{i}].path", problems, files)
        if mm_task_name(task) in names:
            problems.append(f"eval.tasks[{i}].name: '{mm_task_name(task)}' is used twice; give each task its own name")
        names.add(mm_task_name(task))
        for key in ("query_template", "document_template"):
            _check_template(getattr(task, key), f"eval.tasks[{i}].{key}", placeholders, problems)


def _check_clip(recipe: ClipRecipe, problems: list[str], files: bool) -> None:
    m, a, lo = recipe.model, recipe.model.architecture, recipe.loss
    if m.name_or_path and files and looks_local(m.name_or_path):
        p = resolve_path(m.name_or_path)
        if not os.path.isdir(p):
            problems.append(f"model.name_or_path: folder {p} does not exist; check the path")
        elif not os.path.isfile(os.path.join(p, "open_clip_config.json")):
            problems.append(f"model.name_or_path: {p} has no open_clip_config.json; give a folder written by "
                            "embedtrain or open_clip (open_clip_config.json + weights)")
    if m.pretrained and (not m.name_or_path or looks_local(m.name_or_path)):
        problems.append("model.pretrained: only applies to a built-in open_clip name in model.name_or_path (e.g. ViT-B-32)")
    for name in ("embed_dim", "image_size", "patch_size", "vision_width", "vision_layers", "vision_head_width",
                 "text_width", "text_layers", "text_heads", "context_length"):
        if getattr(a, name) < 1:
            problems.append(f"model.architecture.{name}: must be at least 1, got {getattr(a, name)}")
    if a.patch_size >= 1 and a.image_size % a.patch_size:
        problems.append(f"model.architecture.patch_size: {a.patch_size} does not divide image_size {a.image_size}")
    if a.vision_head_width >= 1 and a.vision_width % a.vision_head_width:
        problems.append(f"model.architecture.vision_head_width: {a.vision_head_width} does not divide vision_width {a.vision_width}")
    if a.text_heads >= 1 and a.text_width % a.text_heads:
        problems.append(f"model.architecture.text_heads: {a.text_heads} does not divide text_width {a.text_width}")
    if m.image_tower == "frozen" and m.text_tower == "frozen":
        problems.append("model: both towers are frozen; set image_tower or text_tower to train or lora")
    if "lora" in (m.image_tower, m.text_tower):
        check_lora(m.lora, problems, targets_required=False)  # empty = attention and MLP layers
    if lo.temperature <= 0:
        problems.append(f"loss.temperature: must be positive, got {lo.temperature}")


def _check_vlm(recipe: Vlm2VecRecipe, problems: list[str], files: bool) -> None:
    m, lo = recipe.model, recipe.loss
    check_local_model(m.name_or_path, "model.name_or_path", problems, files)
    if m.max_length < 1:
        problems.append(f"model.max_length: must be at least 1, got {m.max_length}")
    if m.image_max_pixels is not None and m.image_max_pixels < 1:
        problems.append(f"model.image_max_pixels: must be at least 1, got {m.image_max_pixels}")
    if m.finetune == "lora":
        check_lora(m.lora, problems)
    if m.train_vision and m.finetune != "full":
        problems.append("model.train_vision: needs model.finetune: full (LoRA adapts the language model)")
    if lo.temperature <= 0:
        problems.append(f"loss.temperature: must be positive, got {lo.temperature}")
    if lo.hardness_weight < 0:
        problems.append(f"loss.hardness_weight: must be 0 or more, got {lo.hardness_weight}")
    if lo.name == "gte" and (lo.symmetric or not lo.in_batch_negatives):
        problems.append("loss.name: the gte loss holds the document→query term and is made of in-batch negatives; "
                        "set loss.symmetric: false and loss.in_batch_negatives: true")
    if lo.symmetric and not lo.in_batch_negatives:
        problems.append("loss.symmetric: needs loss.in_batch_negatives: true")
    if not lo.in_batch_negatives and not any(
            ds.negative_text_columns or ds.negative_image_columns for ds in recipe.data.train):
        problems.append("loss.in_batch_negatives: false needs hard negatives; set data.train[*].negative_*_columns")


def _check_values(recipe: MultimodalRecipe, problems: list[str], files: bool = True) -> None:
    if recipe.kind == "clip":
        _check_clip(recipe, problems, files)
    else:
        _check_vlm(recipe, problems, files)
    _check_datasets(recipe, problems, files)
    check_compact(recipe.loss.compact, problems)
    check_train(recipe.train, problems)
    if recipe.train.compile:
        problems.append("train.compile: not supported for multimodal recipes yet; set it to false")
    check_unused(recipe.train, "train", ("forward_token_budget",), "multimodal", problems)
    _check_eval(recipe.eval, problems, files)
    check_output(recipe.output, problems)
