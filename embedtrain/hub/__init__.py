"""Model cards and pushing trained models to the Hugging Face Hub."""

from embedtrain.hub.model_card import (
    GRADCACHE_CITATION,
    LOSS_CITATIONS,
    SENTENCE_BERT_CITATION,
    EvalEntry,
    ModelCardData,
    render_model_card,
    write_model_card,
)
from embedtrain.hub.push import push_model

__all__ = [
    "GRADCACHE_CITATION",
    "LOSS_CITATIONS",
    "SENTENCE_BERT_CITATION",
    "EvalEntry",
    "ModelCardData",
    "push_model",
    "render_model_card",
    "write_model_card",
]
