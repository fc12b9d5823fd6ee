"""embedtrain: train text and multimodal embedding models on the Hugging Face stack.

The package's top-level functions import their machinery when called, so ``import embedtrain`` stays
light (no torch).
"""

__version__ = "0.1.0"

# ``embedtrain.train(recipe, ...)`` runs a recipe: the subpackage embedtrain.train is callable (see its
# __init__), which keeps the name meaning one thing whether or not embedtrain.train.loop was imported.
from embedtrain import train  # noqa: E402  (light: the loop is imported when called)


def load(path, **options):
    """The trained model saved in folder ``path``, of any kind (text, MoE, decoder, CLIP, VLM2Vec,
    metric learning), ready to encode; see :func:`embedtrain.models.loading.load_model` for ``options``.

    >>> encoder = embedtrain.load("runs/quickstart/model")  # doctest: +SKIP
    >>> encoder.encode(["how do plants make food?"], role="query").shape  # doctest: +SKIP
    """
    from embedtrain.models.loading import load_model

    return load_model(path, **options)
