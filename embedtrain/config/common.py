"""Sections every recipe kind shares, and their value checks (each written once).

``train`` and ``output`` are the same section in every kind, and :func:`recipe_type` declares each
kind's recipe dataclass around them; each kind's ``eval`` extends :class:`EvalConfig`. Text and
multimodal recipes share :class:`DatasetMixConfig` for ``data``, with entries extending
:class:`DatasetSource` (as the probe data of merges do) and evaluation tasks extending
:class:`EvalTaskSource`. A check appends ``'<dotted path>: ...'`` problems to a list.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

from embedtrain.config.schema import local_data_files, looks_local, resolve_path
from embedtrain.errors import EmbedtrainError


@dataclass
class DatasetSource:
    path: str = ""
    """A local .jsonl/.json/.csv/.parquet file, a folder or glob of such shards (or of webdataset .tar shards), or a Hub dataset id."""
    name: Optional[str] = None
    """Short name used in logs and for task-homogeneous batching (defaults to the file stem)."""
    split: str = "train"
    """Split to read from a Hub dataset."""
    weight: float = 1.0
    """Relative sampling weight when mixing is 'proportional' (scales the dataset's share)."""
    max_rows: Optional[int] = None
    """Use only the first N rows (handy for quick runs)."""


@dataclass
class DatasetMixConfig:
    """The ``data`` section of the kinds that mix datasets, one dataset per batch; each kind's entries
    extend :class:`DatasetSource` (the kind redeclares ``train`` with them)."""

    train: list[DatasetSource] = field(default_factory=list)
    """Training datasets; each batch comes from one of them (task-homogeneous batches)."""
    batch_size: int = 64
    """Queries per batch on each process (the global batch is batch_size x processes)."""
    mixing: Literal["proportional", "round_robin"] = "proportional"
    """How batches from several datasets are interleaved."""
    no_duplicates: bool = True
    """Never put the same query twice in one batch, nor a query among the documents; a repeated document (a label string) stays when the loss masks false negatives, else documents are unique too."""
    max_dropped_share: float = 0.05
    """Largest share of a dataset's rows that its rules (duplicates, bad images, example building) may leave out; more is an error."""


@dataclass
class EvalTaskSource:
    path: str = ""
    """Folder in BEIR layout: corpus.jsonl, queries.jsonl, qrels.tsv (or qrels/test.tsv); in multimodal recipes rows may carry an 'image' path besides 'text'."""
    name: Optional[str] = None
    """Name used in logs and reports (defaults to the folder name)."""


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
    """Names of the linear layers that get adapters. The default names a decoder's (Mistral, Llama, Qwen and Gemma
    share these); BERT-class encoders name theirs query, key, value and dense."""


@dataclass
class TrainConfig:
    lr: float = 5e-5
    """Peak learning rate of the optimizer (metric learning: of everything but the proxies, see model.proxies.lr)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """AdamW, or SGD with `momentum` (SGD: metric-learning recipes only, for now)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 0.01
    """Weight decay (not applied to biases and norms, nor to prompts and proxies)."""
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
    """Embed in chunks of this many inputs without keeping graphs (GradCache); null = off."""
    gradient_cache_query_chunk_size: Optional[int] = None
    """Multimodal recipes: GradCache chunk for queries (null = gradient_cache_chunk_size)."""
    gradient_cache_document_chunk_size: Optional[int] = None
    """Multimodal recipes: GradCache chunk for positives and negatives (null = gradient_cache_chunk_size); images run out of memory first."""
    forward_token_budget: Optional[int] = None
    """Text recipes: embed a step's texts, every role together, in length-sorted chunks of at most this many tokens
    counting padding (the same embeddings with less padding; keep it well below a step's tokens, about 1024 on a
    CPU: a chunk fills up to it, so one holding the whole step is padded to its longest text); null = one batch per
    role."""
    gather_across_processes: bool = True
    """Use every process's embeddings as negatives (global batch)."""
    seed: int = 42
    """Seed for weights of new layers, data order, augmentation and dropout."""
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
    """torch.compile the backbone (text recipes only, for now)."""
    layerwise_lr_decay: float = 1.0
    """Layer-wise learning-rate decay: block i of L gets lr·decay^(L-i), the embeddings lr·decay^(L+1) (1 = off)."""
    ema_decay: Optional[float] = None
    """Final model = exponential moving average of the weights with this decay, e.g. 0.99 (null = off)."""
    average_last_checkpoints: int = 1
    """Final model = mean of the last N checkpoints' weights, the final step's included (needs save_every; 1 = off)."""


@dataclass
class DiagnosticsConfig:
    probe_rows: int = 256
    """Training pairs held out as the label-free probe set (at most 5% of the rows, none below 16); 0 = no diagnostics."""
    every: Optional[int] = 50
    """Steps between diagnostics besides those at each evaluation (null = at evaluations and the end only)."""
    rank_warning: float = 0.8
    """Warn when the probe's effective rank falls below this fraction of its step-0 value (0 = never)."""
    uniformity_warning: float = 0.75
    """Warn when the probe's uniformity shrinks below this fraction of its step-0 magnitude (0 = never)."""


@dataclass
class EvalConfig:
    before_training: bool = True
    """Also evaluate the model before the first step (the baseline)."""
    batch_size: int = 128
    """Inputs per forward pass when encoding."""
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    """Label-free diagnostics on a probe set carved from the training data; see DiagnosticsConfig."""


@dataclass
class OutputFolderConfig:
    dir: str = ""
    """Output folder: everything the run writes (a training run's final model is <dir>/model)."""
    overwrite: bool = False
    """Replace an existing output folder (otherwise it is an error)."""


@dataclass
class OutputConfig(OutputFolderConfig):
    push_to_hub: Optional[str] = None
    """Hub repo id (user/name) to push the final model to."""
    hub_private: bool = True
    """Create the Hub repo as private."""
    plot: bool = True
    """Write loss and evaluation curves as PNG."""
    report_to: list[str] = field(default_factory=list)
    """accelerate trackers to log to, e.g. [tensorboard]."""


SECTION_DOCS = {"loss": "The objective.", "train": "Optimization.", "eval": "Evaluation.", "output": "Where results go."}


def recipe_type(name: str, kind: str, *, model: type, data: type, loss: type, eval: type, docs: dict[str, str],
                module: str) -> type:
    """The recipe dataclass of one kind, with the fields in the order a saved recipe.yaml lists them:
    ``kind``, the kind's ``model``, ``data`` and ``loss`` sections, the shared ``train`` section, the kind's
    ``eval`` (an :class:`EvalConfig`) and the shared ``output``. ``docs`` holds each field's one-line doc
    (``kind``, ``model`` and ``data`` at least; the others default to :data:`SECTION_DOCS`), kept in the
    field's metadata, where :func:`~embedtrain.config.schema.field_docs` finds it. ``module`` is the defining
    module's ``__name__`` (for pickling and repr)."""
    docs = {**SECTION_DOCS, **docs}
    sections = {"model": model, "data": data, "loss": loss, "train": TrainConfig, "eval": eval, "output": OutputConfig}
    fields = [("kind", Literal[kind], field(default=kind, metadata={"doc": docs["kind"]}))]
    fields += [(key, tp, field(default_factory=tp, metadata={"doc": docs[key]})) for key, tp in sections.items()]
    cls = dataclasses.make_dataclass(name, fields)
    cls.__module__ = module
    return cls


def task_name(task: EvalTaskSource) -> str:
    """An evaluation task's name: its ``name``, else its folder's (``x/test`` -> ``x-test``)."""
    if task.name:
        return task.name
    p = Path(task.path.rstrip("/"))
    return f"{p.parent.name}-{p.name}" if p.name in {"eval", "test", "dev"} and p.parent.name else p.name


# --------------------------------------------------------------------------------------
# Shared value checks
# --------------------------------------------------------------------------------------


def check_train(t: TrainConfig, problems: list[str]) -> None:
    if t.lr <= 0:
        problems.append(f"train.lr: must be positive, got {t.lr}")
    for name in ("weight_decay", "momentum"):
        if getattr(t, name) < 0:
            problems.append(f"train.{name}: must be 0 or more, got {getattr(t, name)}")
    if not 0 <= t.warmup_ratio < 1:
        problems.append(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    if t.max_steps is not None and t.max_steps < 1:
        problems.append(f"train.max_steps: must be at least 1, got {t.max_steps}")
    if t.epochs < 1:
        problems.append(f"train.epochs: must be at least 1, got {t.epochs}")
    if t.max_grad_norm is not None and t.max_grad_norm <= 0:
        problems.append(f"train.max_grad_norm: must be positive or null, got {t.max_grad_norm}")
    for name in ("gradient_cache_chunk_size", "gradient_cache_query_chunk_size", "gradient_cache_document_chunk_size",
                 "eval_every", "save_every", "torch_threads", "forward_token_budget"):
        v = getattr(t, name)
        if v is not None and v < 1:
            problems.append(f"train.{name}: must be at least 1 or null, got {v}")
    if t.forward_token_budget is not None and (t.gradient_cache_chunk_size or t.gradient_cache_query_chunk_size
                                               or t.gradient_cache_document_chunk_size):
        problems.append("train.forward_token_budget: GradCache embeds in chunks of its own; set "
                        "train.forward_token_budget or train.gradient_cache_chunk_size to null")
    if not 0 < t.layerwise_lr_decay <= 1:
        problems.append(f"train.layerwise_lr_decay: must be in (0, 1], got {t.layerwise_lr_decay}")
    if t.ema_decay is not None and not 0 < t.ema_decay < 1:
        problems.append(f"train.ema_decay: must be in (0, 1) or null, got {t.ema_decay}")
    if t.average_last_checkpoints < 1:
        problems.append(f"train.average_last_checkpoints: must be at least 1, got {t.average_last_checkpoints}")
    elif t.average_last_checkpoints > 1:
        if t.ema_decay is not None:
            problems.append("train.average_last_checkpoints: choose one final average; set it to 1 or train.ema_decay "
                            "to null")
        if not t.save_every:
            problems.append("train.average_last_checkpoints: needs checkpoints during training; set train.save_every")
        elif t.keep_last < t.average_last_checkpoints - 1:
            problems.append(f"train.keep_last: {t.keep_last} keeps too few checkpoints to average the last "
                            f"{t.average_last_checkpoints}; set it to at least {t.average_last_checkpoints - 1}")
    for name, low in (("log_every", 1), ("max_consecutive_nonfinite", 1), ("keep_last", 0)):
        if getattr(t, name) < low:
            problems.append(f"train.{name}: must be at least {low}, got {getattr(t, name)}")


def check_unused(section: object, where: str, names: Sequence[str], kind: str, problems: list[str]) -> None:
    """Refuse settings of a shared section that this kind's trainer does not use (set away from their default)."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                for f in dataclasses.fields(section)}  # type: ignore[arg-type]
    for name in names:
        value = getattr(section, name)
        if value != defaults[name]:
            problems.append(f"{where}.{name}: not used by {kind} recipes yet (got {value!r}); "
                            f"remove it or set it back to {defaults[name]!r}")


def check_output(o: OutputFolderConfig, problems: list[str]) -> None:
    if not o.dir:
        problems.append("output.dir: missing; give an output folder, e.g. output.dir=runs/my-run")
    push = getattr(o, "push_to_hub", None)
    if push is not None and push.count("/") != 1:
        problems.append(f"output.push_to_hub: {push!r} is not a repo id; use user/name")


def check_eval(e, problems: list[str]) -> None:
    if e.batch_size < 1:
        problems.append(f"eval.batch_size: must be at least 1, got {e.batch_size}")
    d = getattr(e, "diagnostics", None)  # a merge's evaluation has no training data to probe
    if d is None:
        return
    if d.probe_rows < 0:
        problems.append(f"eval.diagnostics.probe_rows: must be 0 (off) or more, got {d.probe_rows}")
    if d.every is not None and d.every < 1:
        problems.append(f"eval.diagnostics.every: must be at least 1 or null, got {d.every}")
    for name in ("rank_warning", "uniformity_warning"):
        if not 0 <= getattr(d, name) < 1:
            problems.append(f"eval.diagnostics.{name}: must be in [0, 1), got {getattr(d, name)}")


def check_lora(lora: LoraSettings, problems: list[str], where: str = "model.lora", targets_required: bool = True) -> None:
    """``targets_required=False`` where an empty target_modules means the model's default layers (CLIP)."""
    if lora.r < 1:
        problems.append(f"{where}.r: must be at least 1, got {lora.r}")
    if lora.alpha <= 0:
        problems.append(f"{where}.alpha: must be positive, got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        problems.append(f"{where}.dropout: must be in [0, 1), got {lora.dropout}")
    if targets_required and not lora.target_modules:
        problems.append(f"{where}.target_modules: empty; name the linear layers to adapt, e.g. [q_proj, v_proj]")


def check_datasets(entries: Sequence[DatasetSource], where: str, name_of: Callable[[DatasetSource], str],
                   problems: list[str], files: bool = True) -> None:
    """The fields every dataset entry shares: a path (an existing file of a supported format when local),
    a name no other entry has, a positive weight, max_rows of at least 1. ``files=False`` skips file checks."""
    seen: set[str] = set()
    for i, ds in enumerate(entries):
        at = f"{where}[{i}]"
        if not ds.path:
            problems.append(f"{at}.path: missing; give a local file or a Hub dataset id")
        elif files and looks_local(ds.path):
            try:
                local_data_files(ds.path)
            except EmbedtrainError as err:
                problems.append(f"{at}.path: {err}")
        name = name_of(ds)
        if name in seen:
            problems.append(f"{at}.name: '{name}' is used twice; give each dataset its own name")
        seen.add(name)
        if ds.weight <= 0:
            problems.append(f"{at}.weight: must be positive, got {ds.weight}")
        if ds.max_rows is not None and ds.max_rows < 1:
            problems.append(f"{at}.max_rows: must be at least 1, got {ds.max_rows}")


def check_streaming(entries: Sequence, max_steps: Optional[int], problems: list[str]) -> None:
    """Streaming datasets (entries with ``streaming``): all of them or none, a step budget, no cut by rows."""
    streaming = [ds.streaming for ds in entries]
    if not any(streaming):
        return
    if not all(streaming):
        i = streaming.index(False)
        problems.append(f"data.train[{i}].streaming: false while other datasets stream; a run streams every "
                        "dataset or none, so set streaming: true here too (or turn it off everywhere)")
    if max_steps is None:
        problems.append("train.max_steps: a streaming dataset has no epochs to count; set train.max_steps")
    for i, ds in enumerate(entries):
        if ds.streaming and ds.max_rows is not None:
            problems.append(f"data.train[{i}].max_rows: a stream is not cut by rows; remove max_rows or give "
                            "fewer shards (a folder or glob of them)")


def check_data_mix(d: DatasetMixConfig, problems: list[str]) -> None:
    """The values of a ``data`` section that mixes datasets (see :class:`DatasetMixConfig`)."""
    if not 0.0 <= d.max_dropped_share <= 1.0:
        problems.append(f"data.max_dropped_share: a share between 0 and 1, got {d.max_dropped_share}")


def check_local_model(path: str, where: str, problems: list[str], files: bool = True, missing: str = "") -> None:
    """A model folder or Hub id: present, and an existing folder when it is local (``files``)."""
    if not path:
        problems.append(f"{where}: missing; {missing or 'give a Hub id or a local model folder'}")
        return
    if not (files and looks_local(path)):
        return
    try:
        p = resolve_path(path)
    except EmbedtrainError as err:
        problems.append(f"{where}: {err}")
        return
    if not os.path.isdir(p):
        problems.append(f"{where}: folder {p} does not exist; check the path")
