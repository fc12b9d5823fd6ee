"""Text recipes (``kind: text``, the default): a text encoder trained on query/document pairs.

Sections: the encoder (``model``, optionally an MoE or a bidirectional decoder with LoRA), the
training ``data``, the ``loss``, the shared ``train`` and ``output`` sections, and ``eval`` on
local BEIR-style tasks. This module does not import torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from embedtrain.config.common import DatasetMixConfig, DatasetSource, EvalConfig, EvalTaskSource, LoraSettings, recipe_type
from embedtrain.config.common import check_data_mix, check_datasets, check_eval, check_local_model, check_lora, check_output, check_streaming, check_train
from embedtrain.config.compact import CompactConfig, check_compact
from embedtrain.config.schema import check_beir_folder, resolve_path
from embedtrain.errors import did_you_mean

RETRIEVAL_METRICS = ("ndcg@10", "mrr@10", "recall@10")


@dataclass
class MoEConfig:
    domains: list[str] = field(default_factory=list)
    """Domain names, one expert each, in expert order (empty = the training datasets' names, in order)."""
    layers: list[int] = field(default_factory=list)
    """Layers whose feed-forward block becomes experts (negative = from the end; empty = every layer)."""
    routing: Literal["enforced", "learned"] = "enforced"
    """enforced: a batch's domain (its dataset's name) picks the expert; learned: the router picks, top_k per text."""
    router: bool = True
    """Train a router that predicts the domain from the input, so texts given without a domain are routed."""
    top_k: int = 1
    """Experts per text under learned routing (outputs mixed with the router's weights renormalised over the k)."""
    router_loss_weight: float = 0.01
    """Weight of the router's cross-entropy against the known domain, added to the loss."""
    router_lr: Optional[float] = 1.0e-3
    """Learning rate of the router (null = train.lr): a linear classifier on fixed features needs larger steps."""
    load_balancing_weight: float = 0.01
    """Weight of the load-balancing loss N·Σ f_e·P_e under learned routing."""
    domain_tokens: bool = False
    """Insert a token naming the domain after the input's first token ([CLS] [wordnet] ...)."""


@dataclass
class LatentAttentionConfig:
    num_latents: int = 512
    """Rows of the trainable latent array (keys and values of the cross-attention)."""
    num_heads: int = 8
    """Attention heads; must divide the backbone's hidden size."""
    intermediate_size: Optional[int] = None
    """Width of the MLP after the attention (null = 4 x hidden size)."""


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """Hub id, local folder (sentence-transformers or transformers layout), or pkg://module/sub/dir."""
    pooling: Literal["mean", "cls", "last_token", "latent_attention", "eos"] = "mean"
    """Token states to one vector: mean, first token, last real token, latent attention (decoders) or an appended EOS token (decoders)."""
    normalize: bool = True
    """L2-normalise embeddings (cosine similarity)."""
    max_length: int = 256
    """Token limit for any text; longer texts are truncated."""
    query_max_length: Optional[int] = None
    """Token limit for queries (defaults to max_length)."""
    document_max_length: Optional[int] = None
    """Token limit for positives and negatives (defaults to max_length)."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel passed to transformers."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (backbones that support it)."""
    trust_remote_code: bool = False
    """Allow a Hub model's own Python code to run. Off unless you trust the repository."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) for name_or_path."""
    moe: Optional[MoEConfig] = None
    """Upcycle the feed-forward blocks into one expert per domain (null = a dense model); see MoEConfig."""
    bidirectional: bool = False
    """Load name_or_path as a decoder LLM (Mistral, Llama, Qwen2/3, Gemma) with its causal mask removed (NV-Embed)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision the backbone's weights are loaded in (bfloat16 halves a 7B model's memory): decoders
    (model.bidirectional), and other encoders under model.lora, whose weights it freezes."""
    latent_attention: LatentAttentionConfig = field(default_factory=LatentAttentionConfig)
    """Sizes of the latent-attention pooling head (pooling: latent_attention)."""
    lora: Optional[LoraSettings] = None
    """Train LoRA adapters on the decoder instead of all its weights (null = full fine-tuning); the pooling head is trained in full."""
    instruction_masking: bool = False
    """Leave each text's prompt (the query instruction) out of pooling; the prompt still conditions every token."""
    previous_stage: Optional[str] = None
    """Recipe of the stage before this one: start from its output model (<its output.dir>/model), training it first if missing."""


@dataclass
class DatasetConfig(DatasetSource):
    query_column: str = "anchor"
    """Column holding the query text."""
    positive_column: str = "positive"
    """Column holding the positive document."""
    negative_columns: list[str] = field(default_factory=list)
    """Columns holding hard negatives (zero or more)."""
    query_prompt: str = ""
    """Text prepended to every query (an instruction such as 'query: ')."""
    instruction: Optional[str] = None
    """NV-Embed task description: queries become 'Instruct: {instruction}\\nQuery: {text}' (instead of query_prompt)."""
    document_prompt: str = ""
    """Text prepended to every positive and negative."""
    subset: Optional[str] = None
    """Configuration (subset) name of a Hub dataset."""
    label_column: Optional[str] = None
    """Rows are (text, label): build example-based pairs (positive: another text of the label; negatives: other labels)."""
    text_column: str = "text"
    """Column holding the text of labelled rows (with label_column)."""
    example_negatives: int = 1
    """Negatives per example-based pair, each from a different other label (with label_column)."""
    streaming: bool = False
    """Read the dataset as a stream (local shards, a folder or glob of them, or a Hub id) instead of loading it whole: tokenized on the fly in the DataLoader workers, split across processes and workers, resumed at the same row; needs train.max_steps."""


@dataclass
class MinedNegativesConfig:
    num_negatives: int = 1
    """Hard negatives mined per row by the model being trained, added after the row's own negative_columns."""
    every: Optional[int] = None
    """Mine again every this many steps, with that step's weights (null = once, with the starting weights)."""
    top_k: int = 30
    """Candidates kept per row: the top_k corpus texts closest to the query that pass the factor rule (a candidate that repeats a text of its batch is passed over for the next)."""
    factor: float = 0.95
    """Positive-aware rule (NV-Embed's TopK-PercPos): a candidate scoring factor x s(query, positive) or more is a likely unlabelled positive and is never a negative."""


@dataclass
class DataConfig(DatasetMixConfig):
    train: list[DatasetConfig] = field(default_factory=list)  # documented in DatasetMixConfig
    length_grouping: bool = True
    """Group rows of similar length into batches (less padding); batches stay random across the epoch."""
    length_grouping_window: int = 64
    """Batches per pool that are sorted by length together; larger = less padding, less randomness."""
    pretokenize: bool = True
    """Tokenize once with datasets.map (cached on disk) instead of in every step."""
    num_workers: int = 0
    """DataLoader worker processes."""
    mined_negatives: Optional[MinedNegativesConfig] = None
    """Hard negatives mined from each dataset's own positives by the model being trained, at step 0 and every N steps (null = off); see MinedNegativesConfig."""


@dataclass
class LossConfig:
    name: str = "infonce"
    """Loss name from the registry (embedtrain info lists them)."""
    temperature: float = 0.05
    """Softmax temperature τ (scale = 1/τ)."""
    learnable_temperature: bool = False
    """Train log(1/τ) as a parameter starting from `temperature`."""
    symmetric: bool = False
    """Add the document→query term (positives retrieve their queries)."""
    in_batch_negatives: bool = True
    """Use other rows' positives and negatives as negatives; off = only the row's own hard negatives."""
    mask_false_negatives: bool = True
    """Ignore a negative whose text equals the row's positive."""
    hardness_weight: float = 0.0
    """infonce and gte: weight each negative by exp(β·similarity), normalised to mean 1 per row (β; 0 = off)."""
    compact: Optional[CompactConfig] = None
    """Also train nested prefixes (Matryoshka) and int8 / binary precisions, and evaluate each (null = off); see CompactConfig."""


@dataclass
class EvalTaskConfig(EvalTaskSource):
    query_prompt: str = ""
    """Text prepended to every query."""
    instruction: Optional[str] = None
    """NV-Embed task description: queries become 'Instruct: {instruction}\\nQuery: {text}' (instead of query_prompt)."""
    document_prompt: str = ""
    """Text prepended to every corpus document."""
    domain: Optional[str] = None
    """MoE models: route this task's texts to this domain's expert (null = the model's router)."""


@dataclass
class TextEvalConfig(EvalConfig):
    tasks: list[EvalTaskConfig] = field(default_factory=list)
    """Local retrieval tasks evaluated during and after training."""
    metric: str = "ndcg@10"
    """Metric that selects the best checkpoint: ndcg@10, mrr@10 or recall@10 (mean over tasks)."""


TextRecipe = recipe_type("TextRecipe", "text", model=ModelConfig, data=DataConfig, loss=LossConfig, eval=TextEvalConfig,
                         docs={"kind": "Recipe type: a text encoder (the default when a recipe has no kind).",
                               "model": "The encoder.", "data": "Training data."}, module=__name__)


# --------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------


def dataset_name(ds: DatasetConfig) -> str:
    if ds.name:
        return ds.name
    p = Path(ds.path)
    # data/wordnet/train.jsonl -> wordnet ; my_pairs.jsonl -> my_pairs
    return p.parent.name if p.stem in {"train", "data"} and p.parent.name else p.stem or ds.path


def moe_domains(recipe: TextRecipe) -> list[str]:
    """The MoE's domains: model.moe.domains, or the training datasets' names."""
    moe = recipe.model.moe
    return list(moe.domains) if moe is not None and moe.domains else [dataset_name(ds) for ds in recipe.data.train]


# --------------------------------------------------------------------------------------
# Value checks
# --------------------------------------------------------------------------------------


def _check_streaming(d: DataConfig, t, problems: list[str]) -> None:
    """Streaming datasets: all or none of them, a step budget, pairs as they are (see embedtrain.data.streaming)."""
    check_streaming(d.train, t.max_steps, problems)
    for i, ds in enumerate(d.train):
        if ds.streaming and ds.label_column is not None:
            problems.append(f"data.train[{i}].label_column: labelled rows are made into pairs from the whole "
                            "dataset, which a stream never holds; set streaming: false for this dataset")


def _check_mined(d: DataConfig, problems: list[str]) -> None:
    """data.mined_negatives: sizes, and datasets it can mine (read whole, query/positive pairs)."""
    m, where = d.mined_negatives, "data.mined_negatives"
    if m is None:
        return
    if m.num_negatives < 1:
        problems.append(f"{where}.num_negatives: must be at least 1, got {m.num_negatives}")
    if m.top_k < max(m.num_negatives, 1):
        problems.append(f"{where}.top_k: {m.top_k} candidates cannot give {m.num_negatives} negatives per row; "
                        f"set top_k to at least num_negatives")
    if m.every is not None and m.every < 1:
        problems.append(f"{where}.every: must be at least 1 step (or null: mine once, at step 0), got {m.every}")
    if not 0 < m.factor <= 1:
        problems.append(f"{where}.factor: must be in (0, 1], got {m.factor}; 0.95 keeps candidates scoring below "
                        "95% of the positive's score")
    for i, ds in enumerate(d.train):
        if ds.streaming:
            problems.append(f"data.train[{i}].streaming: negatives are mined from a dataset read whole; set "
                            f"streaming: false or remove {where}")
        if ds.label_column is not None:
            problems.append(f"data.train[{i}].label_column: labelled rows take their negatives from other labels; "
                            f"mined negatives could share the row's label, so remove {where} or label_column")


def _check_values(recipe: TextRecipe, problems: list[str], files: bool = True) -> None:
    m, d, lo, t, e = recipe.model, recipe.data, recipe.loss, recipe.train, recipe.eval
    if m.previous_stage is not None:
        if m.name_or_path:
            problems.append("model.name_or_path: give either name_or_path or previous_stage (which supplies the model), not both")
        elif files and not os.path.isfile(resolve_path(m.previous_stage)):
            problems.append(f"model.previous_stage: recipe {m.previous_stage} does not exist; check the path")
    else:
        check_local_model(m.name_or_path, "model.name_or_path", problems, files)
    for name in ("max_length", "query_max_length", "document_max_length"):
        v = getattr(m, name)
        if v is not None and v < 1:
            problems.append(f"model.{name}: must be at least 1, got {v}")
    _check_decoder_values(m, d, problems)
    if not d.train:
        problems.append("data.train: no datasets; add at least one {path: ...}")
    check_datasets(d.train, "data.train", dataset_name, problems, files)
    check_data_mix(d, problems)
    if d.batch_size < 2:
        problems.append(f"data.batch_size: must be at least 2 for in-batch contrast, got {d.batch_size}")
    if d.length_grouping_window < 1:
        problems.append(f"data.length_grouping_window: must be at least 1, got {d.length_grouping_window}")
    if d.num_workers < 0:
        problems.append(f"data.num_workers: must be 0 or more, got {d.num_workers}")
    for i, ds in enumerate(d.train):
        where = f"data.train[{i}]"
        if ds.instruction is not None and not ds.instruction.strip():
            problems.append(f"{where}.instruction: empty; give a task description or remove the key")
        elif ds.instruction is not None and ds.query_prompt:
            problems.append(f"{where}.instruction: set either instruction or query_prompt, not both")
        if ds.label_column is not None:
            if ds.negative_columns:
                problems.append(f"{where}.negative_columns: labelled rows (label_column) get their negatives from "
                                "other labels; remove negative_columns")
            if ds.example_negatives < 1:
                problems.append(f"{where}.example_negatives: must be at least 1, got {ds.example_negatives}")
    _check_streaming(d, t, problems)
    _check_mined(d, problems)
    if lo.temperature <= 0:
        problems.append(f"loss.temperature: must be positive, got {lo.temperature}")
    if not lo.in_batch_negatives and lo.name == "infonce":
        if d.mined_negatives is None and not any(ds.negative_columns or ds.label_column for ds in d.train):
            problems.append("loss.in_batch_negatives: false needs hard negatives; set data.train[*].negative_columns")
    if lo.hardness_weight < 0:
        problems.append(f"loss.hardness_weight: must be 0 or more, got {lo.hardness_weight}")
    elif lo.hardness_weight and lo.name not in ("infonce", "gte"):
        problems.append(f"loss.hardness_weight: the {lo.name} loss has no softmax over negatives to weight; "
                        "use loss.name infonce or gte, or set it to 0")
    if lo.name == "gte" and lo.symmetric:
        problems.append("loss.symmetric: the gte loss holds the document→query term already; set it to false")
    if lo.name == "gte" and not lo.in_batch_negatives:
        problems.append("loss.in_batch_negatives: the gte loss is made of in-batch negatives; set it to true")
    if lo.symmetric and not lo.in_batch_negatives:
        problems.append("loss.symmetric: needs loss.in_batch_negatives: true (a positive's only candidate would be its query)")
    check_compact(lo.compact, problems, centers=True)
    if lo.compact is not None and lo.compact.center and (m.moe is not None or m.bidirectional):
        problems.append("loss.compact.center: BERT-class encoders only (not model.moe or model.bidirectional); set it to false")
    if lo.compact is not None and lo.compact.center and any(ds.streaming for ds in d.train):
        problems.append("loss.compact.center: the centre is computed from datasets read whole; set "
                        "data.train[*].streaming to false or loss.compact.center to false")
    check_train(t, problems)
    if e.metric not in RETRIEVAL_METRICS:
        problems.append(f"eval.metric: {e.metric!r} is not allowed{did_you_mean(e.metric, RETRIEVAL_METRICS)}; "
                        f"choose {', '.join(RETRIEVAL_METRICS[:-1])} or {RETRIEVAL_METRICS[-1]}")
    check_eval(e, problems)
    for i, task in enumerate(e.tasks):
        check_beir_folder(task.path, f"eval.tasks[{i}].path", problems, files)
    if m.moe is not None:
        _check_moe(recipe, problems)
    check_output(recipe.output, problems)


def _check_moe(recipe: TextRecipe, problems: list[str]) -> None:
    moe, where = recipe.model.moe, "model.moe"
    domains = moe_domains(recipe)
    source = "" if moe.domains else " (the training datasets' names)"
    if len(domains) < 2:
        problems.append(f"{where}.domains: an MoE needs at least 2 domains, one expert each; got {domains}{source}")
    if len(set(domains)) != len(domains):
        problems.append(f"{where}.domains: {domains} names a domain twice")
    if moe.routing == "enforced":
        for i, ds in enumerate(recipe.data.train):
            if dataset_name(ds) not in domains:
                problems.append(
                    f"data.train[{i}].name: '{dataset_name(ds)}' is not a domain of {where}.domains "
                    f"({', '.join(domains)}); enforced routing sends each dataset to the expert of its name"
                )
    elif not moe.router:
        problems.append(f"{where}.router: learned routing needs the router; set router: true")
    if not 1 <= moe.top_k <= max(len(domains), 1):
        problems.append(f"{where}.top_k: must be between 1 and {len(domains)} (the experts), got {moe.top_k}")
    elif moe.top_k > 1 and moe.routing != "learned":
        problems.append(f"{where}.top_k: {moe.top_k} experts per text needs routing: learned")
    for name in ("router_loss_weight", "load_balancing_weight"):
        if getattr(moe, name) < 0:
            problems.append(f"{where}.{name}: must be 0 or more, got {getattr(moe, name)}")
    if moe.router_lr is not None and moe.router_lr <= 0:
        problems.append(f"{where}.router_lr: must be positive or null, got {moe.router_lr}")
    if recipe.model.bidirectional:
        problems.append("model.moe: not available with model.bidirectional yet (decoder encoders are upcycled "
                        "through embedtrain.models.moe.upcycle, not by the trainer); remove one of them")
    if recipe.model.lora is not None and moe.domain_tokens:
        problems.append("model.moe.domain_tokens: not available with model.lora (the domain tokens' embeddings would "
                        "stay frozen at their random start); set domain_tokens: false or remove model.lora")
    for i, task in enumerate(recipe.eval.tasks):
        if task.domain is not None and task.domain not in domains:
            problems.append(f"eval.tasks[{i}].domain: '{task.domain}' is not a domain{did_you_mean(task.domain, domains)}; "
                            f"choose one of: {', '.join(domains)}")


def _check_decoder_values(m: ModelConfig, d: DataConfig, problems: list[str]) -> None:
    """Settings that only make sense for bidirectional decoders (NV-Embed), and the sizes they take."""
    decoder_only = []
    if m.pooling in ("latent_attention", "eos"):
        decoder_only.append(("model.pooling", f"pooling '{m.pooling}'"))
    if m.instruction_masking:
        decoder_only.append(("model.instruction_masking", "instruction masking"))
    if not m.bidirectional:
        for where, what in decoder_only:
            problems.append(f"{where}: {what} needs a decoder LLM; set model.bidirectional: true or remove it")
        if m.dtype != "float32" and m.lora is None:
            problems.append("model.dtype: an encoder's weights load in another precision only under model.lora "
                            "(which freezes them) or as a decoder (model.bidirectional: true); use "
                            "train.mixed_precision to compute in it")
    elif m.pooling == "cls":
        problems.append("model.pooling: 'cls' reads the first token, which a decoder cannot make a summary of; "
                        "use latent_attention, mean, last_token or eos")
    if m.instruction_masking and m.pooling in ("last_token", "eos"):
        problems.append(f"model.instruction_masking: has no effect with pooling {m.pooling} (one token is pooled); "
                        "use mean or latent_attention pooling, or set it to false")
    la = m.latent_attention
    for name in ("num_latents", "num_heads", "intermediate_size"):
        v = getattr(la, name)
        if v is not None and v < 1:
            problems.append(f"model.latent_attention.{name}: must be at least 1, got {v}")
    if m.lora is not None:
        check_lora(m.lora, problems)
