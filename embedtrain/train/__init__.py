"""The training loop on Accelerator, its per-kind tasks, GradCache, checkpoints and optimizers.

The package is callable: ``embedtrain.train(recipe, ...)`` is :func:`run` (a module attribute and a
function of the same name would shadow each other as soon as a submodule is imported).
"""

from __future__ import annotations

import os
import sys
import types


def run(recipe, overrides=(), resume=None, callbacks=(), log=print):
    """Train ``recipe`` (a recipe object, or the path of a YAML recipe with dotted ``overrides`` such as
    ``["train.lr=1e-5"]``) of any kind; returns the run's :class:`~embedtrain.train.loop.TrainResult`.
    ``resume`` is None, ``"auto"`` or a checkpoint folder; ``callbacks`` are
    :class:`~embedtrain.train.loop.Callback` objects.

    >>> result = embedtrain.train("recipes/minilm/wordnet_quickstart.yaml", ["train.max_steps=10"])  # doctest: +SKIP
    >>> result.final["wordnet-eval/ndcg@10"]  # doctest: +SKIP
    """
    from embedtrain.config import load_recipe
    from embedtrain.train.loop import train

    if isinstance(recipe, (str, os.PathLike)):
        recipe = load_recipe(recipe, list(overrides))
    elif overrides:
        raise TypeError("overrides apply to a recipe path; change a recipe object's fields directly")
    return train(recipe, resume=resume, log=log, callbacks=callbacks)


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return run(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
