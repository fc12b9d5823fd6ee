"""The ``loss.compact`` section: train the embedding for the prefixes and precisions it is served at.

Shared by every kind whose model produces a vector; this module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from embedtrain.errors import did_you_mean

PRECISIONS = ("float32", "int8", "binary")
BINARY_GRADIENTS = ("identity", "tanh")
BASES = ("identity", "pca")
BINARY_ROTATIONS = ("none", "random")


@dataclass
class CompactConfig:
    dims: list[int] = field(default_factory=list)
    """Prefix lengths to train (Matryoshka), largest first, e.g. [384, 256, 128, 64]; empty = the whole embedding only."""
    dim_weights: list[float] = field(default_factory=list)
    """Weight of each prefix's loss, one per entry of dims (empty = 1 each)."""
    precisions: list[str] = field(default_factory=lambda: ["float32"])
    """Precisions trained (straight-through) at every prefix and evaluated: float32, int8, binary."""
    precision_weights: list[float] = field(default_factory=list)
    """Weight of each precision's loss, one per entry of precisions (empty = 1 each)."""
    center: bool = False
    """Text encoders: subtract a fixed centre (the mean embedding of up to center_rows training rows' query and
    positive texts under the starting model) from every embedding, then normalise again, in training and in the
    saved model (a Dense layer: identity weight, bias = -centre), so that each sign bit splits its dimension
    near the middle of the data."""
    center_rows: int = 2048
    """Rows (evenly spaced over the training datasets) whose query and positive texts give the centre (and the
    basis below)."""
    basis: str = "identity"
    """With center: identity, or pca: the centred embedding is also rotated onto the principal axes of the centre's
    embeddings, largest variance first. A rotation: the full-size float scores are unchanged at the start, and every
    prefix starts as the best subspace of its size. Fixed for the run and saved in the centre's Dense layer."""
    binary_rotation: str = "none"
    """none (a binary code is the sign of each dimension of the unit prefix) or random: the sign of the unit prefix
    times a fixed random orthogonal matrix of its size (embedtrain.losses.compact.random_rotation), in the binary
    terms, the rescore term, evaluation and serving alike (saved in the model as binary_rotations.safetensors)."""
    rescore_weight: float = 0.0
    """Weight of one more term at every prefix (times the prefix's weight): the loss with the float32 query
    against the documents' binary codes (straight-through), the score by which binary+rescore re-ranks the
    Hamming search's candidates; 0 = off. Kinds with queries and documents (text, CLIP and VLM2Vec)."""
    binary_gradient: str = "identity"
    """Backward rule of the binary terms' sign: identity (straight-through) or tanh (the gradient of
    tanh(sqrt(d) x) / sqrt(d): it fades for coordinates far from a sign change)."""
    rescore_top_k: int = 40
    """Evaluation: binary search keeps this many documents per query, then float32 embeddings re-rank them."""


def compact_dims(c: CompactConfig) -> list[Optional[int]]:
    """The prefixes a run trains and evaluates; None stands for the whole embedding."""
    return list(c.dims) if c.dims else [None]


def compact_weights(c: CompactConfig) -> tuple[list[float], list[float]]:
    """(weight per prefix, weight per precision), 1 where the recipe gives none."""
    return (list(c.dim_weights) or [1.0] * len(compact_dims(c)),
            list(c.precision_weights) or [1.0] * len(c.precisions))


def check_compact(c: Optional[CompactConfig], problems: list[str], where: str = "loss.compact",
                  centers: bool = False, roles: bool = True) -> None:
    """Recipe problems of ``loss.compact``; ``centers``: the kind can apply ``center`` (text encoders);
    ``roles``: its loss takes queries and documents (a rescore term can keep the query float)."""
    if c is None:
        return

    def not_one_of(name: str, value: str, choices: tuple[str, ...], noun: str = "choice") -> str:
        return (f"{where}.{name}: {value!r} is not a {noun}{did_you_mean(value, choices)}; "
                f"choose from {', '.join(choices)}")

    trains_binary = "binary" in c.precisions or bool(c.rescore_weight)  # some term takes binary codes
    if c.rescore_weight < 0:
        problems.append(f"{where}.rescore_weight: must be 0 or more, got {c.rescore_weight}")
    elif c.rescore_weight and not roles:
        problems.append(f"{where}.rescore_weight: this kind's loss has no queries and documents to score "
                        "against each other; set it to 0")
    if c.center and not centers:
        problems.append(f"{where}.center: only text encoders (kind text) take a centre; set it to false")
    if any(d < 1 for d in c.dims):
        problems.append(f"{where}.dims: every prefix must be at least 1 dimension, got {c.dims}")
    if len(set(c.dims)) != len(c.dims):
        problems.append(f"{where}.dims: {c.dims} names a prefix twice")
    if c.dim_weights and len(c.dim_weights) != len(c.dims):
        problems.append(f"{where}.dim_weights: {len(c.dim_weights)} weights for {len(c.dims)} dims; give one per prefix")
    if not c.precisions:
        problems.append(f"{where}.precisions: empty; give at least one of {', '.join(PRECISIONS)}")
    for p in c.precisions:
        if p not in PRECISIONS:
            problems.append(not_one_of("precisions", p, PRECISIONS, "precision"))
    if len(set(c.precisions)) != len(c.precisions):
        problems.append(f"{where}.precisions: {c.precisions} names a precision twice")
    if c.precision_weights and len(c.precision_weights) != len(c.precisions):
        problems.append(f"{where}.precision_weights: {len(c.precision_weights)} weights for {len(c.precisions)} "
                        "precisions; give one per precision")
    for name in ("dim_weights", "precision_weights"):
        if any(w < 0 for w in getattr(c, name)):
            problems.append(f"{where}.{name}: weights must be 0 or more, got {getattr(c, name)}")
    if c.binary_gradient not in BINARY_GRADIENTS:
        problems.append(not_one_of("binary_gradient", c.binary_gradient, BINARY_GRADIENTS, "rule"))
    elif c.binary_gradient != "identity" and not trains_binary:
        problems.append(f"{where}.binary_gradient: {c.binary_gradient} changes the gradient of binary codes, and no "
                        "term takes any; add binary to precisions (or a rescore_weight) or leave it out")
    if c.basis not in BASES:
        problems.append(not_one_of("basis", c.basis, BASES))
    elif c.basis == "pca" and not c.center:
        problems.append(f"{where}.basis: pca is computed from the centre's embeddings; set {where}.center to true or "
                        "basis to identity")
    if c.binary_rotation not in BINARY_ROTATIONS:
        problems.append(not_one_of("binary_rotation", c.binary_rotation, BINARY_ROTATIONS))
    elif c.binary_rotation == "random" and not trains_binary:
        problems.append(f"{where}.binary_rotation: random rotates binary codes, and no term trains any; add binary to "
                        "precisions (or a rescore_weight) or set binary_rotation to none")
    if c.basis == "pca" and trains_binary and c.binary_rotation == "none":
        problems.append(f"{where}.basis: pca orders the dimensions by variance, and the sign of each one makes poor "
                        "binary codes (the last ones carry little of it); set binary_rotation to random")
    if c.center_rows < 1:
        problems.append(f"{where}.center_rows: must be at least 1, got {c.center_rows}")
    if c.rescore_top_k < 1:
        problems.append(f"{where}.rescore_top_k: must be at least 1, got {c.rescore_top_k}")
