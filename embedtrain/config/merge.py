"""Merge recipes (``embedtrain merge RECIPE``): a document of their own, loaded as strictly as training recipes.

A merge recipe names a base model, the task models fine-tuned from it, the merge methods to run,
the probe data and search settings of Self Positioning, the evaluation tasks and the output folder.
It reuses the text recipe's dataset and task entries and the shared builder and checks. Merge
recipes live in ``recipes/merge/``. This module does not import torch, so it does not know the
merge methods: the caller passes their parameters (``methods``) for the checks that need them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, Mapping, Optional, Sequence

from embedtrain.config.common import (
    OutputFolderConfig,
    check_datasets,
    check_eval,
    check_local_model,
    check_output,
    task_name,
)
from embedtrain.config.schema import build_checked, check_beir_folder, read_overridden
from embedtrain.config.text import RETRIEVAL_METRICS, DatasetConfig, EvalTaskConfig, dataset_name
from embedtrain.errors import did_you_mean

METRICS = RETRIEVAL_METRICS
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class BaseModelConfig:
    name_or_path: str = ""
    """The model every task model was fine-tuned from (θ0): local folder, pkg://module/sub/dir or Hub id."""
    name: str = "base"
    """Name of the base model in the report."""
    max_length: Optional[int] = None
    """Token limit for the probe search and the merged models (null = the folder's own setting)."""


@dataclass
class TaskModelConfig:
    path: str = ""
    """A model folder fine-tuned from the base, e.g. runs/minilm_wordnet/model."""
    name: Optional[str] = None
    """Name in logs and the report (defaults to the run folder: runs/minilm_wordnet/model -> minilm_wordnet)."""


@dataclass
class MergeParams:
    weights: Optional[list[float]] = None
    """linear, task_arithmetic, dare: one weight per task model (null = the method's default)."""
    scale: Optional[float] = None
    """ties: multiplier of the merged task vector (default 1)."""
    density: Optional[float] = None
    """ties: fraction of each task vector kept, by magnitude (default 0.2)."""
    drop_rate: Optional[float] = None
    """dare: probability of dropping each task-vector entry (default 0.5)."""
    seed: Optional[int] = None
    """dare: seed of the drop masks (default 0)."""
    t: Optional[float] = None
    """slerp: 0 gives the first task model, 1 the second (default 0.5)."""
    space: Optional[Literal["weights", "task_vectors"]] = None
    """slerp: interpolate the weights or the task vectors (default weights)."""
    alphas: Optional[list[float]] = None
    """self_positioning: fixed weights of the task vectors; with lam, skips the search."""
    lam: Optional[float] = None
    """self_positioning: fixed scale of the merged task vector; with alphas, skips the search."""
    iterations: Optional[int] = None
    """self_positioning: fixed-point steps of the spherical mean (default 10)."""


@dataclass
class MergeMethodConfig:
    name: str = ""
    """Merge method: linear, task_arithmetic, ties, dare, slerp or self_positioning."""
    label: Optional[str] = None
    """Name of the result in the report and its folder under output.dir/models (defaults to name)."""
    params: MergeParams = field(default_factory=MergeParams)
    """The method's parameters; unset ones take the method's defaults."""


@dataclass
class ProbeConfig:
    datasets: list[DatasetConfig] = field(default_factory=list)
    """Probe data for the Self Positioning search (same fields as data.train of a training recipe)."""
    batch_size: int = 32
    """Rows per probe batch; each batch comes from one dataset."""
    seed: int = 0
    """Seed of the batch plan."""


@dataclass
class SearchConfig:
    steps: int = 40
    """Optimizer steps over the N+1 coefficients (one probe batch each, cycling)."""
    lr: float = 0.05
    """Learning rate of the coefficient optimizer."""
    mu: float = 0.01
    """Penalty mu * lambda on the scale of the merged task vector (the paper: below 0.05 works best)."""
    optimizer: Literal["adam", "sgd"] = "adam"
    """adam (insensitive to the gradient's scale) or sgd (as in the paper)."""
    momentum: float = 0.0
    """Momentum for sgd."""
    init_lambda: float = 1.0
    """Starting lambda (the alphas start equal)."""
    temperature: float = 0.05
    """InfoNCE temperature τ of the probe loss (scale = 1/τ)."""
    chunk_size: Optional[int] = None
    """Embed probe batches in chunks of this many texts (GradCache); null = whole batches."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the gradient norm of the coefficients (null = no clipping)."""
    log_every: int = 5
    """Steps between coefficient log lines (every step is in the report)."""
    torch_threads: Optional[int] = None
    """Intra-op CPU threads (null = torch's default)."""


@dataclass
class MergeEvalConfig:
    tasks: list[EvalTaskConfig] = field(default_factory=list)
    """Local retrieval tasks (BEIR folders) scored for the base, every task model and every merge."""
    batch_size: int = 128
    """Texts per forward pass when encoding."""
    metric: Literal["ndcg@10", "mrr@10", "recall@10"] = "ndcg@10"
    """Metric of the report table (all three are in report.json)."""


@dataclass
class MergeOutputConfig(OutputFolderConfig):
    save_models: bool = True
    """Write every merged model as a sentence-transformers folder in <dir>/models/<label>/ (report.json, report.md and merge_recipe.yaml are always written)."""


@dataclass
class MergeRecipe:
    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    """The common starting point."""
    models: list[TaskModelConfig] = field(default_factory=list)
    """The task models to merge."""
    methods: list[MergeMethodConfig] = field(default_factory=list)
    """Merges to run, each a {name, label, params}."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """Probe data for Self Positioning."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """Self Positioning's coefficient search."""
    eval: MergeEvalConfig = field(default_factory=MergeEvalConfig)
    """Evaluation."""
    output: MergeOutputConfig = field(default_factory=MergeOutputConfig)
    """Where results go."""


# --------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------


def task_model_name(cfg: TaskModelConfig) -> str:
    """runs/minilm_wordnet/model -> minilm_wordnet; other folders -> their own name."""
    if cfg.name:
        return cfg.name
    p = Path(cfg.path.rstrip("/"))
    return p.parent.name if p.name == "model" and p.parent.name else p.name or cfg.path


def method_label(cfg: MergeMethodConfig) -> str:
    return cfg.label or cfg.name


def given_params(params: MergeParams) -> dict:
    """The parameters set in the recipe (the others keep the method's defaults)."""
    return {f.name: getattr(params, f.name) for f in fields(params) if getattr(params, f.name) is not None}


def searches(cfg: MergeMethodConfig) -> bool:
    """True for a Self Positioning entry whose coefficients come from the probe search."""
    return cfg.name == "self_positioning" and cfg.params.alphas is None and cfg.params.lam is None


# --------------------------------------------------------------------------------------
# Value checks
# --------------------------------------------------------------------------------------




def _check_methods(recipe: MergeRecipe, methods: Optional[Mapping[str, Sequence[str]]], problems: list[str]) -> None:
    n = len(recipe.models)
    if not recipe.methods:
        problems.append("methods: none; add at least one {name: ...}, e.g. {name: self_positioning}")
    for i, m in enumerate(recipe.methods):
        where = f"methods[{i}]"
        params = given_params(m.params)
        if methods is not None:
            if m.name not in methods:
                problems.append(f"{where}.name: {m.name!r} is not a merge method{did_you_mean(m.name, methods)}; "
                                f"choose one of: {', '.join(methods)}")
                continue
            for key in params:
                if key not in methods[m.name]:
                    problems.append(f"{where}.params.{key}: not used by {m.name} (it takes: {', '.join(methods[m.name])})")
        for key in ("weights", "alphas"):
            if key in params and n and len(params[key]) != n:
                problems.append(f"{where}.params.{key}: {len(params[key])} values for {n} task models; give one per model")
        if m.name == "slerp" and n != 2:
            problems.append(f"{where}: slerp merges exactly 2 task models, the recipe has {n}")
        if m.name == "self_positioning" and (m.params.alphas is None) != (m.params.lam is None):
            problems.append(f"{where}.params: give both alphas and lam, or neither (then they are searched on probe data)")
        ranges = {
            "density": (lambda v: 0 < v <= 1, "in (0, 1]"),
            "drop_rate": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "t": (lambda v: 0 <= v <= 1, "in [0, 1]"),
            "iterations": (lambda v: v >= 1, "at least 1"),
            "lam": (lambda v: v >= 0, "at least 0"),
        }
        for key, (ok, text) in ranges.items():
            if key in params and not ok(params[key]):
                problems.append(f"{where}.params.{key}: must be {text}, got {params[key]}")
        if "alphas" in params and (any(a < 0 for a in params["alphas"]) or sum(params["alphas"]) <= 0):
            problems.append(f"{where}.params.alphas: must be non-negative with a positive sum, got {params['alphas']}")


def _check_values(recipe: MergeRecipe, problems: list[str], files: bool = True,
                  methods: Optional[Mapping[str, Sequence[str]]] = None) -> None:
    b, s, pr, e = recipe.base, recipe.search, recipe.probe, recipe.eval
    check_local_model(b.name_or_path, "base.name_or_path", problems, files, missing="give a model folder")
    if b.max_length is not None and b.max_length < 1:
        problems.append(f"base.max_length: must be at least 1, got {b.max_length}")
    if not recipe.models:
        problems.append("models: none; list the task models fine-tuned from the base, e.g. [{path: runs/x/model}]")
    for i, m in enumerate(recipe.models):
        check_local_model(m.path, f"models[{i}].path", problems, files, missing="give a model folder")
    rows = [("base.name", b.name)] + [(f"models[{i}]", task_model_name(m)) for i, m in enumerate(recipe.models)]
    rows += [(f"methods[{i}]", method_label(m)) for i, m in enumerate(recipe.methods)]
    seen: dict[str, str] = {}
    for where, name in rows:
        if name in seen:
            problems.append(f"{where}: name '{name}' is also used by {seen[name]}; give each model and merge its own "
                            f"{'label' if where.startswith('methods') else 'name'}")
        seen.setdefault(name, where)
    for i, m in enumerate(recipe.methods):
        if m.label is not None and not LABEL.match(m.label):
            problems.append(f"methods[{i}].label: {m.label!r} must be letters, digits, '_', '-' or '.' (it names a folder)")
    _check_methods(recipe, methods, problems)

    if any(searches(m) for m in recipe.methods) and not pr.datasets:
        problems.append("probe.datasets: none, but self_positioning searches its coefficients on probe data; "
                        "add {path: ...} entries or give params alphas and lam")
    check_datasets(pr.datasets, "probe.datasets", dataset_name, problems, files)
    if pr.batch_size < 2:
        problems.append(f"probe.batch_size: must be at least 2 for in-batch contrast, got {pr.batch_size}")

    for name in ("steps", "mu", "momentum", "init_lambda"):
        if getattr(s, name) < 0:
            problems.append(f"search.{name}: must be 0 or more, got {getattr(s, name)}")
    for name in ("lr", "temperature"):
        if getattr(s, name) <= 0:
            problems.append(f"search.{name}: must be positive, got {getattr(s, name)}")
    for name in ("chunk_size", "log_every", "torch_threads"):
        v = getattr(s, name)
        if v is not None and v < 1:
            problems.append(f"search.{name}: must be at least 1, got {v}")
    if s.max_grad_norm is not None and s.max_grad_norm <= 0:
        problems.append(f"search.max_grad_norm: must be positive or null, got {s.max_grad_norm}")

    check_eval(e, problems)
    task_names: set[str] = set()
    for i, task in enumerate(e.tasks):
        if task_name(task) in task_names:
            problems.append(f"eval.tasks[{i}].name: '{task_name(task)}' is used twice; give each task its own name")
        task_names.add(task_name(task))
        check_beir_folder(task.path, f"eval.tasks[{i}].path", problems, files)
    check_output(recipe.output, problems)


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def merge_recipe_from_dict(data: dict, check_values: bool = True, check_files: bool = True,
                           methods: Optional[Mapping[str, Sequence[str]]] = None) -> MergeRecipe:
    """Build a :class:`MergeRecipe` from plain data, raising one ConfigError with every problem.

    ``check_files=False`` skips only the checks that models, data files and task folders exist (for
    checking a recipe whose task models are not trained yet). ``methods`` maps each merge method's
    name to the parameters it takes (``embedtrain.train.merge_run.merge_methods()``); without it,
    method names and parameter names are not checked.
    """
    check = (lambda r, problems: _check_values(r, problems, check_files, methods)) if check_values else None
    return build_checked(MergeRecipe, data, check)


def load_merge_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), check_files: bool = True,
                      methods: Optional[Mapping[str, Sequence[str]]] = None) -> MergeRecipe:
    """Load a YAML merge recipe, apply ``key=value`` overrides, validate everything (see merge_recipe_from_dict)."""
    return merge_recipe_from_dict(read_overridden(path, overrides), check_files=check_files, methods=methods)
