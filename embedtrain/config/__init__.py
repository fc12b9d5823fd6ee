"""Recipe configuration: one schema, a ``kind`` picks the model/data/loss sections.

A recipe is a YAML instance of one of :data:`RECIPE_TYPES`, chosen by its top-level ``kind``
(``text`` when absent). Every kind shares the ``train`` and ``output`` sections and the checks of
:mod:`embedtrain.config.common`. Defaults live only in the dataclasses, each field with a one-line
docstring. Loading reports every problem at once (unknown keys with a did-you-mean suggestion,
wrong types and bad values with their dotted path, missing files) before anything heavy is
imported. Merge documents (:func:`load_merge_recipe`) use the same machinery. No torch import.

Modules: ``schema`` (strict conversion, overrides, paths), ``common`` (shared sections and checks),
``text``, ``multimodal``, ``dml`` (the kinds), ``merge`` (merge documents).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Union

import yaml

from embedtrain.config import dml, multimodal, text
from embedtrain.config.common import (
    DatasetMixConfig,
    DatasetSource,
    EvalConfig,
    EvalTaskSource,
    LoraSettings,
    OutputConfig,
    OutputFolderConfig,
    TrainConfig,
    task_name,
)
from embedtrain.config.dml import (
    BackboneConfig,
    DMLDataConfig,
    DMLEvalConfig,
    DMLLossConfig,
    DMLModelConfig,
    DMLRecipe,
    ProxyConfig,
    TuningConfig,
)
from embedtrain.config.merge import (
    METRICS,
    BaseModelConfig,
    MergeEvalConfig,
    MergeMethodConfig,
    MergeOutputConfig,
    MergeParams,
    MergeRecipe,
    ProbeConfig,
    SearchConfig,
    TaskModelConfig,
    given_params,
    load_merge_recipe,
    merge_recipe_from_dict,
    method_label,
    searches,
    task_model_name,
)
from embedtrain.config.multimodal import (
    ClipArchitecture,
    ClipLoraSettings,
    ClipLossConfig,
    ClipModelConfig,
    ClipRecipe,
    MultimodalDataConfig,
    MultimodalDatasetConfig,
    MultimodalEvalConfig,
    MultimodalEvalTaskConfig,
    MultimodalRecipe,
    Vlm2VecRecipe,
    VlmLossConfig,
    VlmModelConfig,
    mm_dataset_name,
    mm_task_name,
    role_columns,
)
from embedtrain.config.schema import (
    PACKAGE_SCHEME,
    apply_override,
    build_checked,
    check_beir_folder,
    field_docs,
    looks_local,
    read_overridden,
    read_yaml,
    resolve_path,
    to_dict,
)
from embedtrain.config.text import (
    DataConfig,
    DatasetConfig,
    EvalTaskConfig,
    LatentAttentionConfig,
    LossConfig,
    ModelConfig,
    MoEConfig,
    TextEvalConfig,
    TextRecipe,
    dataset_name,
    moe_domains,
)
from embedtrain.errors import ConfigError, did_you_mean

KINDS = ("text", "clip", "vlm2vec", "dml")
Recipe = Union[TextRecipe, ClipRecipe, Vlm2VecRecipe, DMLRecipe]
RECIPE_TYPES: dict[str, type] = {"text": TextRecipe, "clip": ClipRecipe, "vlm2vec": Vlm2VecRecipe, "dml": DMLRecipe}
_CHECKS: dict[str, Callable[..., None]] = {
    "text": text._check_values,
    "clip": multimodal._check_values,
    "vlm2vec": multimodal._check_values,
    "dml": dml._check_values,
}
OLD_DML_SECTIONS = ("backbone", "tuning", "proxies")


def recipe_kind(data: dict) -> str:
    """The ``kind`` of a recipe's plain data (``text`` when absent).

    An unknown kind is a :class:`ConfigError` with a did-you-mean suggestion; so is a
    metric-learning recipe in the form from before ``kind: dml`` (top-level backbone/tuning/proxies).
    """
    if "kind" not in data:
        if any(key in data for key in OLD_DML_SECTIONS):
            raise ConfigError(["kind: missing; a metric-learning recipe starts with kind: dml and puts backbone, "
                               "tuning and proxies under model (see recipes/dml/vpt_proxies_emoji.yaml)"])
        if "models" in data and ("methods" in data or "base" in data):
            raise ConfigError(["this is a merge document (models, methods), not a training recipe; run it with "
                               "embedtrain merge RECIPE"])
        return "text"
    kind = data["kind"]
    if kind not in KINDS:
        raise ConfigError([f"kind: {kind!r} is not a recipe kind{did_you_mean(str(kind), KINDS)}; "
                           f"choose one of: {', '.join(KINDS)} (no kind = text)"])
    return kind


def recipe_from_dict(data: dict, check_values: bool = True, check_files: bool = True) -> Recipe:
    """Build the recipe of ``data``'s kind, raising one ConfigError with every problem.

    ``check_files=False`` skips only the checks that models, data files and folders exist (for
    recipes meant for another machine).
    """
    kind = recipe_kind(data)
    check = _CHECKS[kind]
    return build_checked(RECIPE_TYPES[kind], data,
                         (lambda recipe, problems: check(recipe, problems, check_files)) if check_values else None)


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), check_files: bool = True) -> Recipe:
    """Load a YAML recipe of any kind, apply ``key=value`` overrides, validate everything."""
    return recipe_from_dict(read_overridden(path, overrides), check_files=check_files)


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the resolved recipe (every field, defaults included) as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False), encoding="utf-8")


# --------------------------------------------------------------------------------------
# Names kept for importers written before the one schema; new code calls load_recipe
# --------------------------------------------------------------------------------------

all_field_docs = field_docs  # field_docs includes the docs of base classes


def _of_kinds(data: dict, kinds: tuple[str, ...], what: str) -> dict:
    kind = recipe_kind(data)
    if kind not in kinds:
        got = repr(kind) if "kind" in data else "missing"
        raise ConfigError([f"kind: {got}; {what} starts with kind: {' or kind: '.join(kinds)}"])
    return data


def multimodal_recipe_from_dict(data: dict, check_values: bool = True, check_files: bool = True) -> MultimodalRecipe:
    """:func:`recipe_from_dict` for data that must be a ``clip`` or ``vlm2vec`` recipe."""
    return recipe_from_dict(_of_kinds(data, ("clip", "vlm2vec"), "a multimodal recipe"), check_values, check_files)


def load_multimodal_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                           check_files: bool = True) -> MultimodalRecipe:
    return multimodal_recipe_from_dict(read_overridden(path, overrides), check_files=check_files)


def is_multimodal_recipe(path: str | os.PathLike) -> bool:
    """True when the YAML file at ``path`` declares kind clip or vlm2vec (errors for an unknown kind)."""
    return recipe_kind(read_yaml(path)) in ("clip", "vlm2vec")


def dml_recipe_from_dict(data: dict, check_values: bool = True, check_files: bool = True) -> DMLRecipe:
    """:func:`recipe_from_dict` for data that must be a ``dml`` recipe."""
    return recipe_from_dict(_of_kinds(data, ("dml",), "a metric-learning recipe"), check_values, check_files)


def load_dml_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                    check_files: bool = True) -> DMLRecipe:
    return dml_recipe_from_dict(read_overridden(path, overrides), check_files=check_files)


__all__ = [
    # entry points
    "KINDS", "RECIPE_TYPES", "Recipe", "recipe_kind", "recipe_from_dict", "load_recipe", "save_recipe",
    "load_merge_recipe", "merge_recipe_from_dict",
    # machinery
    "PACKAGE_SCHEME", "apply_override", "build_checked", "check_beir_folder", "field_docs", "looks_local",
    "read_overridden", "read_yaml", "resolve_path", "to_dict",
    # shared sections
    "DatasetMixConfig", "DatasetSource", "EvalConfig", "EvalTaskSource", "LoraSettings", "OutputConfig",
    "OutputFolderConfig", "TrainConfig",
    # text
    "TextRecipe", "ModelConfig", "MoEConfig", "LatentAttentionConfig", "DatasetConfig", "DataConfig", "LossConfig",
    "EvalTaskConfig", "TextEvalConfig", "dataset_name", "task_name", "moe_domains",
    # multimodal
    "ClipRecipe", "Vlm2VecRecipe", "MultimodalRecipe", "ClipArchitecture", "ClipLoraSettings", "ClipLossConfig",
    "ClipModelConfig", "MultimodalDataConfig", "MultimodalDatasetConfig", "MultimodalEvalConfig",
    "MultimodalEvalTaskConfig", "VlmLossConfig", "VlmModelConfig", "mm_dataset_name", "mm_task_name", "role_columns",
    # metric learning
    "DMLRecipe", "DMLModelConfig", "BackboneConfig", "TuningConfig", "ProxyConfig", "DMLDataConfig", "DMLLossConfig",
    "DMLEvalConfig",
    # merge documents
    "MergeRecipe", "BaseModelConfig", "TaskModelConfig", "MergeParams", "MergeMethodConfig", "ProbeConfig",
    "SearchConfig", "MergeEvalConfig", "MergeOutputConfig", "METRICS", "given_params", "method_label", "searches",
    "task_model_name",
    # kept for earlier importers
    "all_field_docs", "multimodal_recipe_from_dict", "load_multimodal_recipe", "is_multimodal_recipe",
    "dml_recipe_from_dict", "load_dml_recipe",
]
