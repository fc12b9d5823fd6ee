"""Backbones, pooling, and saving/loading as sentence-transformers folders.

Import direction inside the package (each module imports only from those above it):
``pooling``, ``instructions``, ``lora``, ``images``, ``folders`` (files on disk, the folder detector) →
``encoder``, ``bidirectional``, ``latent_attention``, ``vit_backbones`` → ``moe``, ``decoder``,
``visual_prompts`` → ``semantic_proxies``, ``clip``, ``vlm`` → ``loading`` (one loader for every kind).
"""

from embedtrain.models.encoder import TextEncoder
from embedtrain.models.loading import MODEL_KINDS, detect_model_kind, load_model, load_text_encoder
from embedtrain.models.pooling import POOLERS

__all__ = ["MODEL_KINDS", "POOLERS", "TextEncoder", "detect_model_kind", "load_model", "load_text_encoder"]
