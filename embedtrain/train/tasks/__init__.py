"""The task of each recipe kind: what the one training loop plugs in (see :mod:`embedtrain.train.task`)."""

from __future__ import annotations


def task_for(recipe, log=print, chain: tuple[str, ...] = (), run_stage=None):
    """The task object of ``recipe.kind``; ``run_stage(recipe, resume, chain)`` trains a previous stage."""
    if recipe.kind == "text":
        from embedtrain.train.tasks.text import TextTask

        return TextTask(recipe, log, chain=chain, run_stage=run_stage)
    if recipe.kind in ("clip", "vlm2vec"):
        from embedtrain.train.tasks.multimodal import MultimodalTask

        return MultimodalTask(recipe, log)
    if recipe.kind == "dml":
        from embedtrain.train.tasks.dml import MetricLearningTask

        return MetricLearningTask(recipe, log)
    raise ValueError(f"no task for recipe kind {recipe.kind!r}")  # the config admits no other kind
