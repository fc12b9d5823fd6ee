"""Losses by short name, as recipes refer to them (``loss: {name: infonce}``)."""

from torch import nn

from embedtrain.registry import Registry

LOSSES: Registry[type[nn.Module]] = Registry("loss")

PROXY_LOSSES: Registry[type[nn.Module]] = Registry("proxy loss")
"""Metric-learning losses on embeddings, labels and class proxies (see losses/proxy.py)."""
