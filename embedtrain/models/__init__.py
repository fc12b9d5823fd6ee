"""Backbones, pooling, and saving/loading as sentence-transformers folders."""

from embedtrain.models.encoder import TextEncoder, load_text_encoder
from embedtrain.models.pooling import POOLERS

__all__ = ["TextEncoder", "load_text_encoder", "POOLERS"]
