"""Recipe configuration: one dataclass per recipe section, strict loading, dotted overrides.

A recipe is a YAML instance of :class:`Recipe`. Defaults live only here, each field with a
one-line docstring (the string literal under it). Loading reports every problem at once
(unknown keys with a did-you-mean suggestion, wrong types and bad values with their dotted
path, missing files) before anything heavy is imported. This module does not import torch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from embedtrain.errors import ConfigError, EmbedtrainError, did_you_mean

PACKAGE_SCHEME = "pkg://"


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


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
class LoraSettings:
    r: int = 16
    """LoRA rank."""
    alpha: float = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.1
    """Dropout on the LoRA branch's input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Names of the decoder's linear layers that get adapters (Mistral, Llama, Qwen and Gemma share these)."""


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
    """Precision the backbone's weights are loaded in (bfloat16 halves a 7B model's memory)."""
    latent_attention: LatentAttentionConfig = field(default_factory=LatentAttentionConfig)
    """Sizes of the latent-attention pooling head (pooling: latent_attention)."""
    lora: Optional[LoraSettings] = None
    """Train LoRA adapters on the decoder instead of all its weights (null = full fine-tuning); the pooling head is trained in full."""
    instruction_masking: bool = False
    """Leave each text's prompt (the query instruction) out of pooling; the prompt still conditions every token."""
    previous_stage: Optional[str] = None
    """Recipe of the stage before this one: start from its output model (<its output.dir>/model), training it first if missing."""


@dataclass
class DatasetConfig:
    path: str = ""
    """A local .jsonl/.json/.csv/.parquet file, or a Hub dataset id."""
    name: Optional[str] = None
    """Short name used in logs and for task-homogeneous batching (defaults to the file stem)."""
    split: str = "train"
    """Split to read from a Hub dataset."""
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
    weight: float = 1.0
    """Relative sampling weight when mixing is 'proportional' (scales the dataset's share)."""
    max_rows: Optional[int] = None
    """Use only the first N rows (handy for quick runs)."""
    subset: Optional[str] = None
    """Configuration (subset) name of a Hub dataset."""
    label_column: Optional[str] = None
    """Rows are (text, label): build example-based pairs (positive: another text of the label; negatives: other labels)."""
    text_column: str = "text"
    """Column holding the text of labelled rows (with label_column)."""
    example_negatives: int = 1
    """Negatives per example-based pair, each from a different other label (with label_column)."""


@dataclass
class DataConfig:
    train: list[DatasetConfig] = field(default_factory=list)
    """Training datasets; each batch comes from one of them (task-homogeneous batches)."""
    batch_size: int = 64
    """Queries per batch on each process (the global batch is batch_size x processes)."""
    mixing: Literal["proportional", "round_robin"] = "proportional"
    """How batches from several datasets are interleaved."""
    no_duplicates: bool = True
    """Never put the same text twice in one batch (a duplicate would be a false negative)."""
    length_grouping: bool = True
    """Group rows of similar length into batches (less padding); batches stay random across the epoch."""
    length_grouping_window: int = 64
    """Batches per pool that are sorted by length together; larger = less padding, less randomness."""
    pretokenize: bool = True
    """Tokenize once with datasets.map (cached on disk) instead of in every step."""
    num_workers: int = 0
    """DataLoader worker processes."""


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


@dataclass
class TrainConfig:
    lr: float = 5e-5
    """Peak learning rate for AdamW."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norms)."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warmup."""
    warmup_ratio: float = 0.1
    """Fraction of the steps spent warming up linearly from 0."""
    max_steps: Optional[int] = None
    """Number of optimizer steps; if unset, epochs x batches per epoch."""
    epochs: int = 1
    """Passes over the data when max_steps is unset."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the global gradient norm to this value (null = no clipping)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision through accelerate (bf16 needs hardware support)."""
    gradient_cache_chunk_size: Optional[int] = None
    """Embed in chunks of this many texts without keeping graphs (GradCache); null = off."""
    gather_across_processes: bool = True
    """Use every process's embeddings as negatives (global batch)."""
    seed: int = 42
    """Seed for weights of new layers, data order and dropout."""
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
    compile: bool = False
    """torch.compile the backbone."""


@dataclass
class EvalTaskConfig:
    path: str = ""
    """Folder in BEIR layout: corpus.jsonl, queries.jsonl, qrels.tsv (or qrels/test.tsv)."""
    name: Optional[str] = None
    """Name used in logs and reports (defaults to the folder name)."""
    query_prompt: str = ""
    """Text prepended to every query."""
    instruction: Optional[str] = None
    """NV-Embed task description: queries become 'Instruct: {instruction}\\nQuery: {text}' (instead of query_prompt)."""
    document_prompt: str = ""
    """Text prepended to every corpus document."""
    domain: Optional[str] = None
    """MoE models: route this task's texts to this domain's expert (null = the model's router)."""


@dataclass
class EvalConfig:
    tasks: list[EvalTaskConfig] = field(default_factory=list)
    """Local retrieval tasks evaluated during and after training."""
    before_training: bool = True
    """Also evaluate the model before the first step (the baseline)."""
    batch_size: int = 128
    """Texts per forward pass when encoding."""
    metric: str = "ndcg@10"
    """Metric that selects the best checkpoint: ndcg@10, mrr@10 or recall@10 (mean over tasks)."""


@dataclass
class OutputConfig:
    dir: str = ""
    """Run directory: checkpoints, metrics.jsonl, plots, and the final model in <dir>/model."""
    overwrite: bool = False
    """Replace an existing run directory (otherwise it is an error)."""
    push_to_hub: Optional[str] = None
    """Hub repo id (user/name) to push the final model to."""
    hub_private: bool = True
    """Create the Hub repo as private."""
    plot: bool = True
    """Write loss and evaluation curves as PNG."""
    report_to: list[str] = field(default_factory=list)
    """accelerate trackers to log to, e.g. [tensorboard]."""


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The encoder."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The objective."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimization."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where results go."""


# --------------------------------------------------------------------------------------
# Generic strict conversion from plain data to dataclasses
# --------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return type(value).__name__
    return f"{type(value).__name__} {value!r}"


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Convert ``value`` to ``tp``, appending '<path>: ...' problems instead of raising."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {_describe(value)}")
            return tp()
        return _build_dataclass(tp, value, path, problems)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            problems.append(f"{path}: expected {_type_name(tp)}, got null")
            return None
        non_none = [a for a in args if a is not type(None)]
        trial: list[str] = []
        return _convert(value, non_none[0], path, problems if len(non_none) == 1 else trial)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value is False and "no" in allowed:  # YAML 1.1 reads an unquoted `no` as false
            value = "no"
        if value not in allowed:
            problems.append(
                f"{path}: {value!r} is not allowed{did_you_mean(str(value), [str(a) for a in allowed])}; "
                f"choose one of: {', '.join(map(str, allowed))}"
            )
            return allowed[0]
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {_describe(value)}")
            return []
        return [_convert(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {_describe(value)}")
            return False
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {_describe(value)}")
            return 0
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-5 (no dot) as a string; accept it as the number it clearly is
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {_describe(value)}")
            return 0.0
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {_describe(value)}")
            return ""
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a bug in this module


def _build_dataclass(cls: type, data: dict, path: str, problems: list[str]):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in names:
            problems.append(
                f"{dotted}: unknown key{did_you_mean(str(key), names)}; "
                f"{'allowed' if path else 'sections'}: {', '.join(names)}"
            )
            continue
        kwargs[key] = _convert(value, hints[key], dotted, problems)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain data (for YAML/JSON)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each field of ``cls`` (for `embedtrain info` and docs)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)  # type: ignore[union-attr]
    return docs


# --------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------


def apply_override(data: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to nested plain data in place.

    List items are addressed by index: ``data.train.0.max_rows=100``.
    """
    if "=" not in assignment:
        raise ConfigError([f"override '{assignment}': expected key=value, e.g. train.lr=1e-5"])
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError([f"override '{key}': {'.'.join(parts[: i + 1])} is not an index of the list"])
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError([f"override '{key}': {'.'.join(parts[: i + 1])} is not a section"])
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError([f"override '{key}': {last} is not an index of the list"])
        node[int(last)] = value
    else:
        node[last] = value


# --------------------------------------------------------------------------------------
# Value checks that need more than a type
# --------------------------------------------------------------------------------------


def resolve_path(path: str) -> str:
    """Expand ``pkg://module/sub/dir`` to a folder inside an installed Python package."""
    if not path.startswith(PACKAGE_SCHEME):
        return os.path.expanduser(path)
    module, _, rest = path[len(PACKAGE_SCHEME) :].partition("/")
    spec = importlib.util.find_spec(module) if module else None
    if spec is None or not spec.submodule_search_locations:
        raise EmbedtrainError(f"{path}: Python package '{module}' is not installed; pip install it or give a path")
    return str(Path(list(spec.submodule_search_locations)[0]) / rest)


def looks_local(path: str) -> bool:
    """True for things that are clearly file-system paths rather than Hub ids."""
    return (
        path.startswith((PACKAGE_SCHEME, "/", "./", "../", "~"))
        or os.path.exists(path)
        or Path(path).suffix in {".jsonl", ".json", ".csv", ".parquet"}
        or path.count("/") > 1
    )


def _check_values(recipe: Recipe, problems: list[str]) -> None:
    m, d, lo, t, e, o = recipe.model, recipe.data, recipe.loss, recipe.train, recipe.eval, recipe.output
    if m.previous_stage is not None:
        if m.name_or_path:
            problems.append("model.name_or_path: give either name_or_path or previous_stage (which supplies the model), not both")
        elif not os.path.isfile(resolve_path(m.previous_stage)):
            problems.append(f"model.previous_stage: recipe {m.previous_stage} does not exist; check the path")
    elif not m.name_or_path:
        problems.append("model.name_or_path: missing; give a Hub id or a local model folder")
    elif looks_local(m.name_or_path):
        try:
            p = resolve_path(m.name_or_path)
            if not os.path.isdir(p):
                problems.append(f"model.name_or_path: folder {p} does not exist; check the path")
        except EmbedtrainError as err:
            problems.append(f"model.name_or_path: {err}")
    for name in ("max_length", "query_max_length", "document_max_length"):
        v = getattr(m, name)
        if v is not None and v < 1:
            problems.append(f"model.{name}: must be at least 1, got {v}")
    _check_decoder_values(m, d, problems)
    if not d.train:
        problems.append("data.train: no datasets; add at least one {path: ...}")
    seen_names = set()
    for i, ds in enumerate(d.train):
        where = f"data.train[{i}]"
        if not ds.path:
            problems.append(f"{where}.path: missing; give a local file or a Hub dataset id")
        elif looks_local(ds.path):
            p = resolve_path(ds.path)
            if not os.path.isfile(p):
                problems.append(f"{where}.path: file {p} does not exist; check the path")
            elif Path(p).suffix not in {".jsonl", ".json", ".csv", ".parquet"}:
                problems.append(f"{where}.path: {p} has an unsupported format; use .jsonl, .json, .csv or .parquet")
        name = dataset_name(ds)
        if name in seen_names:
            problems.append(f"{where}.name: '{name}' is used twice; give each dataset its own name")
        seen_names.add(name)
        if ds.weight <= 0:
            problems.append(f"{where}.weight: must be positive, got {ds.weight}")
        if ds.max_rows is not None and ds.max_rows < 1:
            problems.append(f"{where}.max_rows: must be at least 1, got {ds.max_rows}")
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
    if lo.temperature <= 0:
        problems.append(f"loss.temperature: must be positive, got {lo.temperature}")
    if not lo.in_batch_negatives and lo.name == "infonce":
        if not any(ds.negative_columns or ds.label_column for ds in d.train):
            problems.append("loss.in_batch_negatives: false needs hard negatives; set data.train[*].negative_columns")
    if lo.symmetric and not lo.in_batch_negatives:
        problems.append("loss.symmetric: needs loss.in_batch_negatives: true (a positive's only candidate would be its query)")
    if t.lr <= 0:
        problems.append(f"train.lr: must be positive, got {t.lr}")
    if not 0 <= t.warmup_ratio < 1:
        problems.append(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    if t.max_steps is not None and t.max_steps < 1:
        problems.append(f"train.max_steps: must be at least 1, got {t.max_steps}")
    if t.epochs < 1:
        problems.append(f"train.epochs: must be at least 1, got {t.epochs}")
    if t.max_grad_norm is not None and t.max_grad_norm <= 0:
        problems.append(f"train.max_grad_norm: must be positive or null, got {t.max_grad_norm}")
    if t.gradient_cache_chunk_size is not None and t.gradient_cache_chunk_size < 1:
        problems.append(f"train.gradient_cache_chunk_size: must be at least 1 or null, got {t.gradient_cache_chunk_size}")
    for name in ("log_every", "eval_every", "save_every", "keep_last", "max_consecutive_nonfinite", "torch_threads"):
        v = getattr(t, name)
        if v is not None and v < (0 if name == "keep_last" else 1):
            problems.append(f"train.{name}: must be at least {0 if name == 'keep_last' else 1}, got {v}")
    if e.metric not in ("ndcg@10", "mrr@10", "recall@10"):
        problems.append(f"eval.metric: {e.metric!r} is not allowed{did_you_mean(e.metric, ['ndcg@10', 'mrr@10', 'recall@10'])}; choose ndcg@10, mrr@10 or recall@10")
    if e.batch_size < 1:
        problems.append(f"eval.batch_size: must be at least 1, got {e.batch_size}")
    for i, task in enumerate(e.tasks):
        check_beir_folder(task.path, f"eval.tasks[{i}].path", problems)
    if m.moe is not None:
        _check_moe(recipe, problems)
    if not o.dir:
        problems.append("output.dir: missing; give a run directory, e.g. output.dir=runs/my-run")
    if o.push_to_hub is not None and o.push_to_hub.count("/") != 1:
        problems.append(f"output.push_to_hub: {o.push_to_hub!r} is not a repo id; use user/name")


def moe_domains(recipe: Recipe) -> list[str]:
    """The MoE's domains: model.moe.domains, or the training datasets' names."""
    moe = recipe.model.moe
    return list(moe.domains) if moe is not None and moe.domains else [dataset_name(ds) for ds in recipe.data.train]


def _check_moe(recipe: Recipe, problems: list[str]) -> None:
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
    if recipe.model.gradient_checkpointing:
        problems.append("model.gradient_checkpointing: not available with model.moe (a recomputed layer would see "
                        "another forward pass's routing); set it to false")
    for i, task in enumerate(recipe.eval.tasks):
        if task.domain is not None and task.domain not in domains:
            problems.append(f"eval.tasks[{i}].domain: '{task.domain}' is not a domain{did_you_mean(task.domain, domains)}; "
                            f"choose one of: {', '.join(domains)}")


def _check_decoder_values(m: ModelConfig, d: DataConfig, problems: list[str]) -> None:
    """Settings that only make sense for bidirectional decoders (NV-Embed), and the sizes they take."""
    decoder_only = []
    if m.pooling in ("latent_attention", "eos"):
        decoder_only.append(("model.pooling", f"pooling '{m.pooling}'"))
    if m.lora is not None:
        decoder_only.append(("model.lora", "LoRA"))
    if m.instruction_masking:
        decoder_only.append(("model.instruction_masking", "instruction masking"))
    if not m.bidirectional:
        for where, what in decoder_only:
            problems.append(f"{where}: {what} needs a decoder LLM; set model.bidirectional: true or remove it")
        if m.dtype != "float32":
            problems.append("model.dtype: only decoders (model.bidirectional: true) load in another precision; "
                            "use train.mixed_precision for encoders")
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
        if m.lora.r < 1:
            problems.append(f"model.lora.r: must be at least 1, got {m.lora.r}")
        if m.lora.alpha <= 0:
            problems.append(f"model.lora.alpha: must be positive, got {m.lora.alpha}")
        if not 0 <= m.lora.dropout < 1:
            problems.append(f"model.lora.dropout: must be in [0, 1), got {m.lora.dropout}")
        if not m.lora.target_modules:
            problems.append("model.lora.target_modules: empty; name the linear layers to adapt, e.g. [q_proj, v_proj]")


def check_beir_folder(path: str, where: str, problems: list[str], files: bool = True) -> None:
    """Append a problem unless ``path`` is a BEIR folder (only its presence when ``files`` is False)."""
    if not path:
        problems.append(f"{where}: missing; give a BEIR-layout folder")
        return
    if not files:
        return
    p = resolve_path(path)
    if not os.path.isdir(p):
        problems.append(f"{where}: folder {p} does not exist; check the path")
        return
    for f in ("corpus.jsonl", "queries.jsonl"):
        if not os.path.isfile(os.path.join(p, f)):
            problems.append(f"{where}: {p} has no {f}; a BEIR folder needs corpus.jsonl, queries.jsonl, qrels.tsv")
    if not (os.path.isfile(os.path.join(p, "qrels.tsv")) or os.path.isfile(os.path.join(p, "qrels", "test.tsv"))):
        problems.append(f"{where}: {p} has no qrels.tsv (or qrels/test.tsv)")


def dataset_name(ds: DatasetConfig) -> str:
    if ds.name:
        return ds.name
    p = Path(ds.path)
    # data/wordnet/train.jsonl -> wordnet ; my_pairs.jsonl -> my_pairs
    return p.parent.name if p.stem in {"train", "data"} and p.parent.name else p.stem or ds.path


def task_name(task: EvalTaskConfig) -> str:
    if task.name:
        return task.name
    p = Path(task.path.rstrip("/"))
    return f"{p.parent.name}-{p.name}" if p.name in {"eval", "test", "dev"} and p.parent.name else p.name


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping with one-line errors for missing files and bad syntax."""
    p = Path(path)
    if not p.is_file():
        raise EmbedtrainError(f"{p}: recipe file not found; check the path")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise EmbedtrainError(f"{p}: cannot read the recipe ({err.__class__.__name__}); check its permissions and encoding")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise EmbedtrainError(f"{p}: malformed YAML{where}: {problem}; fix the syntax")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise EmbedtrainError(f"{p}: a recipe must be a mapping of sections (model, data, ...), got {_describe(data)}")
    return data


def recipe_from_dict(data: dict, check_values: bool = True) -> Recipe:
    """Build a :class:`Recipe` from plain data, raising one ConfigError with every problem."""
    problems: list[str] = []
    recipe = _build_dataclass(Recipe, data, "", problems)
    if check_values and not problems:
        _check_values(recipe, problems)
    elif check_values:
        # still report value problems of fields that converted cleanly
        extra: list[str] = []
        _check_values(recipe, extra)
        bad_paths = {p.split(":")[0].split("[")[0] for p in problems}
        problems += [p for p in extra if p.split(":")[0].split("[")[0] not in bad_paths]
    if problems:
        raise ConfigError(problems)
    return recipe


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a YAML recipe, apply ``key=value`` overrides, validate everything."""
    data = read_yaml(path)
    for assignment in overrides:
        apply_override(data, assignment)
    return recipe_from_dict(data)


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the resolved recipe (every field, defaults included) as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False), encoding="utf-8")
