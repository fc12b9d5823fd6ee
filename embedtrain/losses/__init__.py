"""Contrastive objectives. Each module sees embeddings (tensors) only and returns a dict with 'loss'."""

from embedtrain.losses import gte  # noqa: F401  (registers 'gte')
from embedtrain.losses import infonce  # noqa: F401  (registers 'infonce')
from embedtrain.losses import proxy  # noqa: F401  (registers 'proxy_anchor', 'normalized_softmax')
from embedtrain.losses import sigmoid  # noqa: F401  (registers 'siglip')
from embedtrain.losses.distributed import gather_no_grad, gather_with_grad, world
from embedtrain.losses.gte import GTELoss
from embedtrain.losses.infonce import InfoNCELoss
from embedtrain.losses.proxy import NormalizedSoftmaxLoss, ProxyAnchorLoss, metrix_mix
from embedtrain.losses.registry import LOSSES, PROXY_LOSSES
from embedtrain.losses.sigmoid import SigmoidLoss

__all__ = ["LOSSES", "InfoNCELoss", "GTELoss", "SigmoidLoss", "gather_with_grad", "gather_no_grad", "world", "PROXY_LOSSES",
           "ProxyAnchorLoss", "NormalizedSoftmaxLoss", "metrix_mix"]
