"""The trainer's side of Mixture-of-Experts models (``model.moe``): upcycling from the recipe, the
domain of each batch, routing of the evaluation tasks, routing statistics for the log.

Batches are task-homogeneous (see :mod:`embedtrain.data.sampler`), so a batch's domain is the name of
the dataset it comes from; the loop routes each step with :func:`routed_batch`.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Optional

from embedtrain.config import TextRecipe, dataset_name, looks_local, moe_domains, resolve_path
from embedtrain.errors import EmbedtrainError
from embedtrain.models.folders import MOE, find_model_kind

# settings a recipe may change when it continues training a saved MoE model
_ROUTING_FIELDS = ("routing", "top_k", "router_loss_weight", "load_balancing_weight")


def is_moe(encoder) -> bool:
    """Whether ``encoder`` is an MoE encoder. embedtrain.models.moe subclasses sentence-transformers' modules,
    so a run without experts never imports it (seconds of start-up); an MoE encoder exists only once it was."""
    moe = sys.modules.get("embedtrain.models.moe")
    return moe is not None and isinstance(encoder, moe.MoETextEncoder)


def uses_experts(recipe: TextRecipe) -> bool:
    """Whether the run trains an MoE model (upcycled now, or loaded as one)."""
    if recipe.model.moe is not None:
        return True
    name = recipe.model.name_or_path
    return looks_local(name) and find_model_kind(Path(resolve_path(name))) == MOE


def prepare_encoder(encoder, recipe: TextRecipe, log=print):
    """Upcycle a dense encoder as ``model.moe`` asks; an MoE model is kept (its routing settings taken
    from the recipe, its experts, layers, router and domain tokens as saved)."""
    moe = recipe.model.moe
    if moe is None:
        return encoder
    from embedtrain.models.moe import upcycle_encoder

    domains = moe_domains(recipe)
    if not is_moe(encoder):
        return upcycle_encoder(
            encoder, domains, layers=moe.layers, routing=moe.routing, router=moe.router, top_k=moe.top_k,
            router_loss_weight=moe.router_loss_weight, load_balancing_weight=moe.load_balancing_weight,
            domain_tokens=moe.domain_tokens,
        )
    settings = encoder.settings
    if settings.domains != domains:
        raise EmbedtrainError(
            f"model.moe.domains: {recipe.model.name_or_path} has experts for {settings.domains}, the recipe asks "
            f"for {domains}; set model.moe.domains to {settings.domains} (or name the datasets so)"
        )
    if moe.router and not encoder.has_router:
        raise EmbedtrainError(f"model.moe.router: {recipe.model.name_or_path} was saved without a router; set router: false")
    for name in _ROUTING_FIELDS:
        setattr(settings, name, getattr(moe, name))
    settings.__post_init__()  # the combination must still be valid
    log(f"model.moe: {recipe.model.name_or_path} is already a mixture of experts ({', '.join(domains)}); "
        "training it further")
    return encoder


def learning_rates(recipe: TextRecipe) -> Optional[dict[str, float]]:
    """The router's own learning rate, as :func:`embedtrain.train.optim.build_optimizer` takes it."""
    moe = recipe.model.moe
    if moe is None or moe.router_lr is None:
        return None
    return {"moe_router.": moe.router_lr}


def dataset_domains(encoder, recipe: TextRecipe) -> Optional[list[Optional[str]]]:
    """The domain of each training dataset (None: left to the router); None for a dense model."""
    if not is_moe(encoder):
        return None
    out: list[Optional[str]] = []
    for i, ds in enumerate(recipe.data.train):
        name = dataset_name(ds)
        if name not in encoder.domains and encoder.settings.routing == "enforced":
            raise EmbedtrainError(
                f"data.train[{i}].name: '{name}' is not a domain of the MoE model ({', '.join(encoder.domains)}); "
                "name the dataset after its domain"
            )
        out.append(name if name in encoder.domains else None)
    return out


def check_eval_tasks(encoder, recipe: TextRecipe) -> None:
    """Every evaluation task must be routable: a domain of the model, or a router to decide."""
    moe = is_moe(encoder)
    for i, task in enumerate(recipe.eval.tasks):
        where = f"eval.tasks[{i}].domain"
        if task.domain is not None and not moe:
            raise EmbedtrainError(f"{where}: routing to a domain needs an MoE model (model.moe); remove the domain")
        if not moe:
            continue
        if task.domain is not None and task.domain not in encoder.domains:
            raise EmbedtrainError(f"{where}: '{task.domain}' is not a domain of the model; choose one of: "
                                  f"{', '.join(encoder.domains)}")
        if task.domain is None and not encoder.has_router:
            raise EmbedtrainError(f"{where}: the MoE model has no router; give the task a domain "
                                  f"(one of: {', '.join(encoder.domains)})")


@contextlib.contextmanager
def routed_batch(encoder, domains: Optional[list[Optional[str]]], batch: dict, loss_scale: float = 1.0):
    """Route a training step to the domain of the dataset its batch comes from; the step's auxiliary routing
    losses count once at their configured weight (``loss_scale``: the fp16 loss scale, else 1)."""
    if domains is None:
        yield
        return
    texts = sum(int(batch[r]["input_ids"].shape[0]) for r in ("query", "positive", "negative") if batch.get(r))
    with encoder.routed_to(domains[batch["dataset"]]), encoder.training_step(texts, loss_scale):
        yield


def routed_task(encoder, domain: Optional[str]):
    """Route an evaluation task's texts (``domain`` None: the router decides)."""
    if not is_moe(encoder):
        return contextlib.nullcontext()
    return encoder.routed_to(domain)


def routing_log(encoder) -> dict[str, float]:
    """Routing figures since the last call (empty for a dense model)."""
    return encoder.routing_statistics() if is_moe(encoder) else {}
