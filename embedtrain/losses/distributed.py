"""The helpers that gather embeddings from every process, keeping gradients, and reduce per-batch statistics.

Forward: all_gather, concatenated in rank order. Backward: the incoming gradient is summed over
processes (all_reduce) and each process keeps the slice of its own rows. With every process
computing the loss of its own queries against the gathered documents, and DDP averaging parameter
gradients over processes, the result is the gradient of the mean loss over the global batch, the
same as one process holding the whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size), or (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        rank, world_size = world()
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (rows, ...) from all processes; identity with one process.

    Every process must pass the same number of rows.
    """
    _, world_size = world()
    if world_size == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all processes without gradient (ids, labels)."""
    _, world_size = world()
    if world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def global_ranges(x: torch.Tensor) -> torch.Tensor:
    """(2, d): the per-dimension (min, max) of the rows of ``x`` (N, d) on every process together (detached), as
    one process holding the whole batch would take them; this process's own rows' with one process."""
    flat = x.detach().reshape(-1, x.shape[-1])
    low, high = flat.min(0).values.contiguous(), flat.max(0).values.contiguous()
    if world()[1] > 1:
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return torch.stack([low, high])
