"""The model card of a finished training run, built from its recipe and results."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Optional

from embedtrain.config import TextRecipe, dataset_name, looks_local, to_dict
from embedtrain.hub.folder_card import embedding_dim, has_custom_modules, lora_record, moe_summary
from embedtrain.hub.model_card import GRADCACHE_CITATION, LOSS_CITATIONS, EvalEntry, ModelCardData
from embedtrain.models.compact_record import read_record
from embedtrain.models.folders import read_instructions, read_metadata

INFONCE_EQUATION = (
    r"\mathcal{L} = -\frac{1}{N}\sum_i \log \frac{\exp(s(q_i,p_i)/\tau)}{\sum_{d \in D_i} \exp(s(q_i,d)/\tau)}"
)


def hardware_description() -> str:
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n} x {torch.cuda.get_device_name(0)}"
    import os

    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def card_for_run(
    recipe: TextRecipe,
    model_dir: str | Path,
    baseline: dict[str, float],
    final: dict[str, float],
    seconds: float,
    steps: int,
    processes: int = 1,
    engine: Optional[str] = None,
) -> ModelCardData:
    """Card data for ``model_dir``; ``baseline``/``final`` are the trainer's ``<task>/<metric>`` scores;
    ``engine`` describes what the run ran on (distributed type, processes, sharding, precision)."""
    meta = read_metadata(model_dir)
    base = recipe.model.name_or_path
    hub_datasets = [d.path for d in recipe.data.train if not looks_local(d.path)]
    local_datasets = [f"{dataset_name(d)} ({d.path})" for d in recipe.data.train if looks_local(d.path)]
    entries = []
    for key, value in final.items():
        task, metric = key.split("/", 1)
        if task == "mean":
            continue
        entries.append(EvalEntry(
            task_name=task, dataset_id=task, metric_name=metric, value=value, split="test",
            main_score=metric == recipe.eval.metric, baseline=baseline.get(key),
        ))
    loss = recipe.loss
    losses = [{
        "name": loss.name,
        "description": (
            f"InfoNCE with τ = {loss.temperature}{' (learnable)' if loss.learnable_temperature else ''}, "
            f"{'in-batch and hard negatives' if loss.in_batch_negatives else 'only the row’s hard negatives'}"
            f"{', symmetric' if loss.symmetric else ''}"
            f"{', false negatives masked' if loss.mask_false_negatives else ''}"
        ),
        "equation": INFONCE_EQUATION if loss.name == "infonce" else None,
        "citation": LOSS_CITATIONS.get(loss.name),
    }]
    t = recipe.train
    hyper = {
        "steps": steps,
        "batch size (per process)": recipe.data.batch_size,
        "processes": processes,
        "engine": engine,
        "learning rate": t.lr,
        "schedule": f"{t.scheduler}, warmup {t.warmup_ratio:.0%}",
        "weight decay": t.weight_decay,
        "max grad norm": t.max_grad_norm,
        "mixed precision": t.mixed_precision,
        "GradCache chunk": t.gradient_cache_chunk_size,
        "seed": t.seed,
    }
    citations = {"GradCache": GRADCACHE_CITATION} if t.gradient_cache_chunk_size else {}
    return ModelCardData(
        summary=moe_summary(model_dir),
        model_name=Path(recipe.output.dir).name or "embedtrain-model",
        base_model=None if base.startswith("pkg://") else base,
        datasets=hub_datasets,
        local_datasets=local_datasets,
        repo_id=recipe.output.push_to_hub,
        recipe=to_dict(recipe),
        losses=losses,
        hyperparameters={k: v for k, v in hyper.items() if v is not None},
        hardware=hardware_description(),
        training_time_s=seconds,
        embedding_dim=embedding_dim(model_dir),
        max_length=max(meta["query_max_length"], meta["document_max_length"]),
        pooling=meta["pooling"],
        normalize=meta["normalize"],
        prompts={k: v for k, v in meta["prompts"].items() if v},
        eval_results=entries,
        citations=citations,
        custom_modules=has_custom_modules(model_dir),
        compact=read_record(model_dir),
        instructions=read_instructions(model_dir) or {},
        lora=lora_record(model_dir),
    )
