"""Training for compact embeddings: nested prefixes (Matryoshka) and the precision they are served at.

:class:`CompactLoss` wraps any loss that takes embeddings and applies it to every (prefix, precision) pair
of the recipe; :func:`binarize_straight_through` and :func:`int8_straight_through` are the quantizers it
trains through.
"""

from __future__ import annotations

import inspect
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from embedtrain.losses.distributed import global_ranges

PRECISIONS = ("float32", "int8", "binary")
"""Precisions an embedding is trained and served at: float32, int8 (256 levels per dimension), binary (1 bit)."""


BINARY_GRADIENTS = ("identity", "tanh")
"""Backward rules of the binary code: see :func:`binarize_straight_through`."""

BINARY_ROTATIONS = ("none", "random")
"""What a prefix is multiplied by before its sign is taken: nothing, or :func:`random_rotation`."""

ROTATION_SEED = 0
"""Seed of :func:`random_rotation` (with the dimension): the same matrix in every run, process and saved model."""


def random_rotation(d: int, seed: int = ROTATION_SEED) -> torch.Tensor:
    r"""A (d, d) orthogonal matrix drawn uniformly (Haar) from a fixed seed: the Q of the QR decomposition of a
    standard normal matrix, its columns' signs fixed by R's diagonal (Mezzadri, "How to generate random matrices
    from the classical compact groups", arXiv:math-ph/0609050), computed in float64 on the CPU.

    The binary code of a unit prefix e is then :math:`\operatorname{sign}(e\,Q)`: d random orthogonal
    hyperplanes, whose Hamming distance estimates the angle whatever the variance of each dimension (Charikar,
    "Similarity estimation techniques from rounding algorithms", STOC 2002). A basis that orders dimensions by
    variance (``basis: pca``) otherwise makes its last bits mostly noise."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + d)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def binarize_straight_through(x: torch.Tensor, gradient: str = "identity") -> torch.Tensor:
    r"""The sign code of ``x`` scaled to unit length, with the straight-through gradient.

    Forward: :math:`b = \operatorname{sign}(x) / \sqrt{d}` with sign(0) = -1 (a bit is 1 where x > 0, as
    ``quantize_embeddings(..., "ubinary")`` packs it), so :math:`b \cdot b' = 1 - 2\,\mathrm{hamming}(b, b')/d`
    ranks exactly as the Hamming distance does. Backward: :math:`\partial b / \partial x = I` (Bengio et al.,
    "Estimating or Propagating Gradients Through Stochastic Neurons", arXiv:1308.3432; binary embedding
    retrieval trained this way as in Gan et al., "Binary Embedding-based Retrieval at Tencent", arXiv:2302.08714).
    With ``gradient="tanh"`` the backward pass is that of the surrogate :math:`\tanh(\sqrt{d}\,x)/\sqrt{d}`:
    :math:`\partial b_i / \partial x_i = \operatorname{sech}^2(\sqrt{d}\,x_i)`, which is 1 at a sign change and
    fades for coordinates far from one (a unit vector's coordinates are about :math:`1/\sqrt{d}`), so the
    binary terms move the coordinates whose bit can flip (the smooth sign of Cao et al., "HashNet",
    arXiv:1702.00758, used only for the gradient). Shapes: (..., d) -> (..., d).
    """
    if gradient not in BINARY_GRADIENTS:
        raise ValueError(f"unknown binary gradient {gradient!r}; choose from {', '.join(BINARY_GRADIENTS)}")
    d = x.shape[-1]
    code = torch.where(x > 0, 1.0, -1.0).to(x.dtype) / d ** 0.5
    path = x if gradient == "identity" else torch.tanh(x * d ** 0.5) / d ** 0.5
    return path + (code - path).detach()


def int8_straight_through(x: torch.Tensor, ranges: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""``x`` quantized to 256 levels per dimension and dequantized, with the straight-through gradient.

    The levels are those of ``sentence_transformers.quantization.quantize_embeddings(..., "int8")``: with
    per-dimension ``ranges`` = (min, max) of shape (2, d) (default: of this batch on every process together,
    detached: :func:`~embedtrain.losses.distributed.global_ranges`), step
    :math:`s = (\max - \min)/255` and code :math:`c = \lfloor (x - \min)/s \rfloor - 128` (cast to int8);
    the value is :math:`(c + 128)\,s + \min`. Backward: identity. Shapes: (N, d) -> (N, d).
    """
    if ranges is None:
        ranges = global_ranges(x)
    start, steps = ranges[0], (ranges[1] - ranges[0]) / 255
    steps = torch.where(steps > 0, steps, torch.ones_like(steps))  # a constant dimension keeps its one level
    # floor((x - start)/steps) - 128, saturated to int8, as numpy's astype(int8) keeps values in [0, 255] - 128
    codes = (torch.floor((x.detach() - start) / steps) - 128).clamp(-128, 127)
    value = (codes + 128) * steps + start
    return x + (value - x).detach()


class CompactLoss(nn.Module):
    r"""A loss applied at nested prefixes of the embedding and at the precisions it is served at.

    For prefix lengths :math:`d_1 > \dots > d_m` with weights :math:`w_j`, precisions :math:`p` with weights
    :math:`v_p`, and the wrapped loss :math:`\mathcal{L}` (InfoNCE, sigmoid, a proxy loss, ...):

    .. math::
        \mathcal{L}_{\text{compact}} = \sum_j w_j \sum_p v_p\,
            \mathcal{L}\bigl(Q_p(\operatorname{norm}(e_{1:d_j})) \text{ for every embedding argument } e\bigr)

    where :math:`e_{1:d}` keeps the first d dimensions, norm re-normalises it to unit length when the model
    normalises its embeddings (``normalize``; else the identity), and :math:`Q_p` is the identity for
    float32, :func:`int8_straight_through` for int8 and :func:`binarize_straight_through` for binary.
    Matryoshka representation learning: Kusupati et al., arXiv:2205.13147.

    With ``binary_rotation="random"``, :math:`Q_{\text{binary}}(x) = \operatorname{binary}(x\,R_d)` with
    :math:`R_d` = :func:`random_rotation` (d), and the rescore term's query is :math:`q_{1:d}\,R_d` (a rotation:
    the same float scores against the codes' basis).

    With ``rescore_weight`` :math:`r > 0`, every prefix adds :math:`w_j\,r\,\mathcal{L}(q_{1:d_j},
    Q_{\text{binary}}(\text{documents}_{1:d_j}))`: the float query (the ``query_arguments``) against the
    documents' binary codes, the score by which ``binary+rescore`` re-ranks Hamming candidates.

    ``embedding_arguments`` names the wrapped loss's arguments that are embeddings (shape (N, d), the same d
    for all; None passes through); the others (ids, labels) are passed unchanged. Under GradCache the wrapper
    sees the cached embeddings like any loss, and across processes the wrapped loss gathers each prefix as
    it gathers whole embeddings; the int8 ranges of each embedding argument are those of its rows on every
    process together (:func:`~embedtrain.losses.distributed.global_ranges`), so that a term quantizes as one process
    holding the whole batch would. Returns the wrapped loss's figures at the first prefix and precision (the full float embedding,
    in the usual recipe), with ``loss`` the weighted sum and ``loss/<d>/<precision>`` for every term
    (``loss/<d>/rescore`` for the rescore terms).
    """

    def __init__(self, inner: nn.Module, dims: Sequence[int], dim_weights: Sequence[float],
                 precisions: Sequence[str], precision_weights: Sequence[float], normalize: bool,
                 embedding_arguments: Sequence[str], rescore_weight: float = 0.0,
                 query_arguments: Sequence[str] = (), binary_gradient: str = "identity",
                 binary_rotation: str = "none"):
        super().__init__()
        if binary_gradient not in BINARY_GRADIENTS:
            raise ValueError(f"unknown binary_gradient {binary_gradient!r}; choose from {', '.join(BINARY_GRADIENTS)}")
        if binary_rotation not in BINARY_ROTATIONS:
            raise ValueError(f"unknown binary_rotation {binary_rotation!r}; choose from {', '.join(BINARY_ROTATIONS)}")
        if rescore_weight < 0:
            raise ValueError(f"rescore_weight must be 0 or more, got {rescore_weight}")
        if rescore_weight and not (query_arguments and set(query_arguments) < set(embedding_arguments)):
            raise ValueError(f"a rescore term needs query_arguments among {list(embedding_arguments)} that leave "
                             f"documents, got {list(query_arguments)}")
        if len(dims) != len(dim_weights) or not dims:
            raise ValueError(f"dims {list(dims)} and dim_weights {list(dim_weights)} need the same, non-zero length")
        if len(precisions) != len(precision_weights) or not precisions:
            raise ValueError(f"precisions {list(precisions)} and precision_weights {list(precision_weights)} "
                             "need the same, non-zero length")
        unknown = [p for p in precisions if p not in PRECISIONS]
        if unknown:
            raise ValueError(f"unknown precisions {unknown}; choose from {', '.join(PRECISIONS)}")
        self.inner = inner
        self.dims, self.dim_weights = list(dims), [float(w) for w in dim_weights]
        self.precisions, self.precision_weights = list(precisions), [float(w) for w in precision_weights]
        self.normalize = normalize
        self.embedding_arguments = tuple(embedding_arguments)
        self.rescore_weight, self.query_arguments = float(rescore_weight), tuple(query_arguments)
        self.binary_gradient = binary_gradient
        self.binary_rotation = binary_rotation
        self._rotations: dict[tuple, torch.Tensor] = {}  # random_rotation(d) per (d, device, dtype), made once
        self._names = list(inspect.signature(inner.forward).parameters)

    def __getattr__(self, name: str):
        # what the trainer asks of a loss (masks_repeated_documents, in_batch_negatives, ...) is the wrapped loss's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def rotation(self, dim: int, like: torch.Tensor) -> torch.Tensor:
        """The prefix's :func:`random_rotation`, on ``like``'s device and dtype."""
        key = (dim, like.device, like.dtype)
        if key not in self._rotations:
            self._rotations[key] = random_rotation(dim).to(like.device, like.dtype)
        return self._rotations[key]

    def prefix(self, x: torch.Tensor, dim: int, precision: str, rotate: bool = False) -> torch.Tensor:
        """One embedding argument as the term (dim, precision) sees it; ``rotate``: a float query scored against
        rotated binary codes (the rescore term)."""
        x = x[..., :dim]
        if self.normalize:
            x = F.normalize(x, dim=-1)
        if self.binary_rotation == "random" and (precision == "binary" or rotate):
            x = x @ self.rotation(dim, x)
        if precision == "binary":
            return binarize_straight_through(x, self.binary_gradient)
        if precision == "int8":  # the ranges of the whole batch, on every process alike
            return int8_straight_through(x)
        return x

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        named = dict(zip(self._names, args), **kwargs)
        full = next(named[a].shape[-1] for a in self.embedding_arguments if named.get(a) is not None)
        if max(self.dims) > full:
            raise ValueError(f"a prefix of {max(self.dims)} dimensions is longer than the embedding ({full})")

        def term(dim: int, query_precision: str, document_precision: str) -> dict:
            """The wrapped loss on every embedding argument's prefix, the query arguments at their own precision."""
            def argument(k: str, t):
                if k not in self.embedding_arguments or t is None:
                    return t
                if k in self.query_arguments:  # against binary documents, a float query is taken in their basis
                    return self.prefix(t, dim, query_precision, rotate=document_precision == "binary")
                return self.prefix(t, dim, document_precision)

            return self.inner(**{k: argument(k, t) for k, t in named.items()})

        total, first, terms = 0.0, None, {}
        for dim, w in zip(self.dims, self.dim_weights):
            for precision, v in zip(self.precisions, self.precision_weights):
                out = term(dim, precision, precision)
                total = total + w * v * out["loss"]
                terms[f"loss/{dim}/{precision}"] = out["loss"].detach()
                first = out if first is None else first
            if self.rescore_weight:
                out = term(dim, "float32", "binary")
                total = total + w * self.rescore_weight * out["loss"]
                terms[f"loss/{dim}/rescore"] = out["loss"].detach()
        return {**first, "loss": total, **terms}
