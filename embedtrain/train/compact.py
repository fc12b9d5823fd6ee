"""``loss.compact`` in a run: wrap the recipe's loss in :class:`~embedtrain.losses.compact.CompactLoss`,
check the prefixes against the model, and record what the saved model was trained for."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from embedtrain.config.compact import CompactConfig, compact_dims, compact_weights
from embedtrain.errors import EmbedtrainError
from embedtrain.losses.compact import CompactLoss, random_rotation
from embedtrain.models import compact_record


def wrap_loss(loss: nn.Module, compact: Optional[CompactConfig], normalize: bool,
              embedding_arguments: Sequence[str], query_arguments: Sequence[str] = ()) -> nn.Module:
    """The recipe's loss, applied at every prefix and precision of ``compact`` (the loss itself when None);
    ``query_arguments``: the embedding arguments a rescore term keeps float (the recipe's check refuses
    ``rescore_weight`` for kinds without them)."""
    if compact is None:
        return loss
    dim_weights, precision_weights = compact_weights(compact)
    return CompactLoss(loss, compact_dims(compact), dim_weights, compact.precisions, precision_weights, normalize,
                       embedding_arguments, compact.rescore_weight, query_arguments, compact.binary_gradient,
                       compact.binary_rotation)


def check_dims(compact: Optional[CompactConfig], embedding_dim: int) -> None:
    """A prefix longer than the model's embedding is a recipe error (found once the model is loaded)."""
    if compact is not None and compact.dims and max(compact.dims) > embedding_dim:
        raise EmbedtrainError(f"loss.compact.dims: {max(compact.dims)} is longer than the model's "
                              f"{embedding_dim}-dimensional embedding; use prefixes of at most {embedding_dim}")


def calibration_embeddings(encoder, datasets, rows: int, batch_size: int = 128, log=print) -> torch.Tensor:
    """The embeddings (float32, shape (2·rows, d) at most) of the query and positive texts of ``rows`` rows evenly
    spaced over the training ``datasets`` taken as one list, each text with its role's prompt, under ``encoder`` as
    it is. The same on every process and every start of a run."""
    from embedtrain.data.readers import column_list

    sizes = [len(ds) for ds in datasets]
    total = sum(sizes)
    if not total:
        raise EmbedtrainError("loss.compact.center: the training datasets have no rows to compute the centre from")
    picks = sorted({i * total // min(rows, total) for i in range(min(rows, total))})
    out, offset = [], 0
    for ds, size in zip(datasets, sizes):
        mine = [i - offset for i in picks if offset <= i < offset + size]
        offset += size
        if not mine:
            continue
        chosen = ds.rows.select(mine)
        for column, role, prompt in (("query", "query", ds.query_prompt), ("positive", "document", ds.document_prompt)):
            out.append(encoder.encode(column_list(chosen, column), role=role, prompt=prompt, batch_size=batch_size,
                                      desc=f"centre: {ds.name} {column}"))
    emb = torch.cat(out)
    log(f"loss.compact: {emb.shape[0]} calibration embeddings ({len(picks)} rows' queries and positives, evenly "
        "spaced over the training data)")
    return emb


def calibrate(encoder, datasets, rows: int, batch_size: int = 128, log=print,
              basis: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``loss.compact.center`` (and ``basis: pca``): the mean (float32, shape (d,), summed in float64) of
    :func:`calibration_embeddings` under ``encoder`` as it is (the starting model, before any centre), and with
    ``basis`` the :func:`principal_basis` of those embeddings once centred (else None)."""
    emb = calibration_embeddings(encoder, datasets, rows, batch_size, log)
    center = emb.double().mean(0).float()
    return center, principal_basis(emb - center) if basis else None


def principal_basis(centred: torch.Tensor) -> torch.Tensor:
    """``loss.compact.basis: pca``: the principal axes of the rows of ``centred`` (N, d) as the columns of a (d, d)
    rotation, largest variance first (computed in float64), so that every prefix of ``e @ basis`` is the top
    principal subspace of its size."""
    x = centred.double()
    _, axes = torch.linalg.eigh(x.T @ x / x.shape[0])  # ascending
    return axes.flip(1).float().contiguous()


def served_dims(compact: CompactConfig, embedding_dim: int) -> list[int]:
    """The prefixes, the whole embedding standing for None, largest first."""
    return sorted({d or embedding_dim for d in compact_dims(compact)}, reverse=True)


def write_record(model_dir: Path, compact: Optional[CompactConfig], embedding_dim: int, normalize: bool) -> None:
    """compact_embeddings.json in the saved model (see embedtrain.models.compact_record), with the rotations the
    binary terms trained through (``binary_rotation: random``); nothing when off."""
    if compact is not None:
        dims = served_dims(compact, embedding_dim)
        rotations = {d: random_rotation(d) for d in dims} if compact.binary_rotation == "random" else None
        compact_record.write_record(model_dir, dims, compact.precisions, normalize, compact.rescore_top_k,
                                    compact.center, compact.basis, rotations)
