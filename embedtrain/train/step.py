"""One contrastive forward/backward on a collated batch: plain, or GradCache.

Both return the loss dict (detached) after gradients have been accumulated into the parameters.
GradCache (Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup",
arXiv:2101.06983) keeps the whole batch as negatives while only one chunk's activations are ever
alive:

1. embed every chunk without a graph, remembering the random state before each chunk;
2. compute the loss on the cached embeddings (leaf tensors) and backpropagate to them only;
3. for each chunk, restore its random state (same dropout mask), embed again with a graph and
   backpropagate ``<embedding, cached gradient>``, which gives that chunk's exact share of the
   parameter gradient.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch

from embedtrain.errors import EmbedtrainError

ROLES = ("query", "positive", "negative")


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors of a collated batch (and of its per-role dicts) on ``device``; other values as they are."""
    moved = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            moved[k] = {kk: vv.to(device, non_blocking=True) for kk, vv in v.items()}
        elif isinstance(v, torch.Tensor):
            moved[k] = v.to(device, non_blocking=True)
        else:
            moved[k] = v
    return moved


def chunk_sizes(train) -> Optional[dict[str, int]]:
    """GradCache chunk per role from a recipe's ``train`` section, or None when GradCache is off."""
    query = train.gradient_cache_query_chunk_size or train.gradient_cache_chunk_size
    document = train.gradient_cache_document_chunk_size or train.gradient_cache_chunk_size
    if query is None and document is None:
        return None
    big = 1 << 30  # a role without a chunk size is embedded in one piece
    return {"query": query or big, "positive": document or big, "negative": document or big}


def _loss_inputs(batch: dict, emb: dict[str, Optional[torch.Tensor]]) -> dict:
    return {
        "query": emb["query"],
        "positive": emb["positive"],
        "negative": emb["negative"],
        "positive_ids": batch["positive_ids"],
        "negative_ids": batch["negative_ids"],
    }


def plain_step(model, loss_fn, batch: dict, backward: Callable[[torch.Tensor], None],
               token_budget: Optional[int] = None) -> dict:
    """Embed every role with a graph (in one forward call, see TextEncoder.forward), compute the loss,
    backpropagate. With ``token_budget`` (tokenized text only), the roles' rows are embedded together in
    length-sorted chunks (:func:`length_sorted_chunks`) instead of one padded batch per role."""
    present = [r for r in ROLES if batch[r] is not None]
    inputs = [batch[r] for r in present]
    if token_budget:
        chunks, order = length_sorted_chunks(inputs, token_budget)
        # back to the roles' own row order: position order[j] holds the j-th chunk row
        flat = torch.cat(model(many=chunks))[torch.argsort(order)]
        embedded = flat.split([x["attention_mask"].shape[0] for x in inputs])
    else:
        embedded = model(many=inputs)
    emb = dict.fromkeys(ROLES)
    emb.update(zip(present, embedded))
    out = loss_fn(**_loss_inputs(batch, emb))
    backward(out["loss"])
    return {k: v.detach() for k, v in out.items()}


def length_groups(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices of ``lengths``, sorted by length (stable) and cut into groups: a group takes the next index while
    ``indices x longest <= token_budget`` (one index at least). The rule of ``train.forward_token_budget``, which
    the trainer (:func:`length_sorted_chunks`) and ``embedtrain plan`` share."""
    if token_budget < 1:
        raise EmbedtrainError(f"train.forward_token_budget: must be at least 1, got {token_budget}")
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * lengths[order[end]] <= token_budget:
            end += 1
        groups.append(order[start:end])
        start = end
    return groups


def length_sorted_chunks(inputs: Sequence[dict[str, torch.Tensor]], token_budget: int) -> tuple[list[dict], torch.Tensor]:
    """The rows of several right-padded tokenized batches (one per role), regrouped into chunks of similar length.

    Every value of a batch is per token, (rows, columns) like its ``attention_mask``. The rows of all batches,
    numbered in concatenation order, are grouped by :func:`length_groups`, and each chunk is cut to its own
    longest row. A row then sees the same tokens, positions and mask as in its own batch, so its embedding is the
    same (up to the rounding of another matrix shape), with less compute spent on padding.

    Returns the chunks and ``order`` (a long tensor): the concatenation-order number of each chunk row, chunk
    after chunk; ``cat(chunk embeddings)[argsort(order)]`` are the embeddings in concatenation order.
    """
    keys = set(inputs[0])
    lengths = []
    for inp in inputs:
        mask = inp["attention_mask"]
        if set(inp) != keys or any(v.shape[:2] != mask.shape or v.dim() != 2 for v in inp.values()):
            raise EmbedtrainError("train.forward_token_budget: needs tokenized text whose every input is per token "
                                  f"(got {sorted(inp)} beside {sorted(keys)}); set it to null for this model")
        n = mask.sum(1)
        if not torch.equal(mask.bool(), torch.arange(mask.shape[1], device=mask.device)[None] < n[:, None]):
            raise EmbedtrainError("train.forward_token_budget: needs right-padded batches; set it to null")
        lengths.append(n)
    lens = torch.cat(lengths).tolist()
    groups = length_groups(lens, token_budget)
    width = max(inp["attention_mask"].shape[1] for inp in inputs)
    # one (rows, width) tensor per key; the values past a row's length are masked, so the filling is irrelevant
    whole = {k: torch.cat([torch.nn.functional.pad(inp[k], (0, width - inp[k].shape[1])) for inp in inputs])
             for k in keys}
    device = inputs[0]["attention_mask"].device
    chunks = []
    for group in groups:
        rows, longest = torch.tensor(group, device=device), max(1, max(lens[i] for i in group))
        chunks.append({k: v[rows, :longest] for k, v in whole.items()})
    return chunks, torch.tensor([i for g in groups for i in g], device=device)


class _RandomState:
    """Captures CPU and (if used) CUDA random state so a forward can be replayed identically."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    @contextlib.contextmanager
    def replay(self):
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def _chunks(inputs: dict[str, torch.Tensor], size: int):
    n = inputs["input_ids"].shape[0]
    for start in range(0, n, size):
        part = {k: v[start : start + size] for k, v in inputs.items()}
        # drop padding columns that no row in this chunk uses
        longest = int(part["attention_mask"].sum(1).max())
        yield {k: v[:, :longest] for k, v in part.items()} if longest < part["input_ids"].shape[1] else part


def grad_cache_step(
    model,
    loss_fn,
    batch: dict,
    chunk_size: Union[int, dict[str, int]],
    backward: Callable[[torch.Tensor], None],
    no_sync: Callable[[], contextlib.AbstractContextManager],
    split: Optional[Callable[[dict, int], Iterable[dict]]] = None,
    after_replays: Callable[[], None] = lambda: None,
) -> dict:
    """GradCache step. Every replay runs under ``no_sync()``, then ``after_replays()`` reduces the gradients
    across processes (see :func:`replay_sync`, which gives the pair for the run's engine): a last chunk
    touches one role's tower only, so letting DDP reduce on it would leave the other tower unreduced.

    ``backward`` is the run's backward (the Accelerator's: it scales the loss under fp16); it
    backpropagates the loss to the cached embeddings, whose gradients then carry the loss scale into the
    replays, which backpropagate without scaling again.

    ``chunk_size`` is one size for every role or a size per role ('query', 'positive', 'negative').
    ``split(inputs, size)`` cuts one role's inputs into chunks of rows (default: tokenized text,
    sliced by rows with padding columns trimmed per chunk; with right padding this changes no
    embedding); multimodal inputs (images) bring their own.
    """
    split = split or _chunks
    sizes = chunk_size if isinstance(chunk_size, dict) else dict.fromkeys(ROLES, chunk_size)
    device = next(iter(batch["query"].values())).device
    chunks: list[tuple[str, dict, _RandomState, int]] = []
    cached: dict[str, Optional[torch.Tensor]] = {}
    # 1. embeddings without graph
    with torch.no_grad():
        for role in ROLES:
            if batch[role] is None:
                cached[role] = None
                continue
            parts = []
            for chunk in split(batch[role], sizes[role]):
                state = _RandomState(device)
                parts.append(model(**chunk))
                chunks.append((role, chunk, state, parts[-1].shape[0]))
            cached[role] = torch.cat(parts).float().requires_grad_()
    # 2. loss on the cached embeddings; gradients stop at them (and at the loss's own parameters)
    out = loss_fn(**_loss_inputs(batch, cached))
    backward(out["loss"])
    grads = {r: (e.grad if e is not None else None) for r, e in cached.items()}
    # 3. replay each chunk with a graph and push its cached gradient into the parameters
    offsets = {r: 0 for r in ROLES}
    for role, chunk, state, n in chunks:
        grad = grads[role][offsets[role] : offsets[role] + n]
        offsets[role] += n
        with no_sync(), state.replay():
            emb = model(**chunk)
            torch.autograd.backward(emb.float(), grad)
    after_replays()
    return {k: v.detach() for k, v in out.items()}


def replay_sync(accelerator, model) -> tuple[Callable[[], contextlib.AbstractContextManager], Callable[[], None]]:
    """(no_sync, after_replays) for :func:`grad_cache_step` under the run's engine.

    - one process: nothing to reduce;
    - FSDP: every replay reduces its own share (FSDP accumulates the sharded gradients across backwards);
    - DDP: replays accumulate locally, then every gradient that any process has is averaged in one
      all-reduce (a gradient no process has stays None, as DDP leaves it).
    """
    from accelerate.utils import DistributedType

    if accelerator.num_processes == 1 or accelerator.distributed_type == DistributedType.FSDP:
        return contextlib.nullcontext, lambda: None
    params = [p for p in model.parameters() if p.requires_grad]
    return (lambda: accelerator.no_sync(model)), (lambda: average_gradients(params, accelerator.num_processes))


def average_gradients(params: list, world_size: int) -> None:
    """Average the gradients of ``params`` over the processes in one flat all-reduce. A gradient that only
    some processes have counts as zero on the others; one that none has stays None."""
    import torch.distributed as dist

    if not params:
        return
    device = params[0].device
    present = torch.tensor([float(p.grad is not None) for p in params], device=device)
    dist.all_reduce(present)
    used = [p for p, n in zip(params, present.tolist()) if n > 0]
    if not used:
        return
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in used])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p in used:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


# -- the update after backward ------------------------------------------------------------------


def apply_update(accelerator, optimizer, scheduler, loss: torch.Tensor, params: list, loss_optimizer,
                 max_grad_norm: Optional[float], state, max_consecutive_nonfinite: int, step: int,
                 last_good: str, log) -> tuple[bool, Any, torch.Tensor]:
    """Finish one step after backward: average the loss's own gradients, clip, and step the optimizers
    (the model's, then ``loss_optimizer``, a :class:`~embedtrain.train.optim.LossOptimizer`) and the scheduler
    unless the loss or gradient is not finite. Returns (finite, grad_norm, mean loss).

    ``params`` are all the model's parameters (frozen ones have no gradient). The gradient norm, and clipping, take
    the model's and the loss's gradients together, through accelerate (which unscales fp16 gradients first; the
    loss's own it does not hold, so they are unscaled here). Under FSDP with a learnable loss parameter the model's
    norm is measured on its own: accelerate's FSDP path recognises the model only by its whole parameter list (given
    more, it unscales fp16 gradients twice), and both are then clipped with the combined norm, as accelerate clips
    DTensor and plain gradients. Under DeepSpeed the engine clips by itself and reports its norm. ``state`` carries
    ``consecutive_nonfinite``. A non-finite step leaves weights and optimizer state those of the last good step;
    too many in a row stop training with an error naming ``last_good``.

    Under fp16, a step whose loss is finite but whose scaled gradients are not is an overflow of the loss scale:
    skipped, the scale halved, and not counted towards the limit while the scale is above 1. A run whose first
    scale (65,536) is too large for its gradients, as under FSDP, whose float16 parameters compute every layer in
    float16, therefore backs off as many times as it takes; a step whose gradients overflow at a scale of 1 or
    less, or whose loss is not finite, is counted as before.
    """
    from accelerate.utils import DistributedType

    loss_params = loss_optimizer.params
    # the loss's own parameters are outside the model (and DDP / FSDP): average by hand
    if accelerator.num_processes > 1:
        for p in loss_params:
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, reduction="mean")
    scaler = accelerator.scaler  # fp16: gradients carry the loss scale until unscaled
    if scaler is not None:  # the accelerator unscales its own optimizer's gradients (in clip_grad_norm_); these by hand
        for p in loss_params:
            if p.grad is not None:
                p.grad.div_(scaler.get_scale())
    if accelerator.distributed_type == DistributedType.FSDP and loss_params:
        grad_norm = _clip_beside_a_sharded_model(accelerator, params, loss_params, max_grad_norm)
    elif max_grad_norm:
        grad_norm = accelerator.clip_grad_norm_(params + loss_params, max_grad_norm)  # unscales first
    else:
        if scaler is not None:
            accelerator.unscale_gradients()
        grad_norm = grad_norm_of(params + loss_params)
    if grad_norm is None:  # DeepSpeed clips inside its engine and reports no norm here
        grad_norm = grad_norm_of(params + loss_params)
    loss_value = accelerator.reduce(loss.detach().float(), reduction="mean")
    finite = bool(torch.isfinite(loss_value)) and bool(torch.isfinite(torch.as_tensor(grad_norm)))
    if finite:
        optimizer.step()  # under fp16 also lets the scaler grow its scale after enough good steps
        loss_optimizer.step(scheduler)  # at this step's rate, before the schedule moves on
        scheduler.step()
        state.consecutive_nonfinite = 0
    else:
        backoff, overflow = "", False
        if scaler is not None:
            # an overflow of the scale, as long as the scale can still tell one from a gradient that is not finite
            overflow = bool(torch.isfinite(loss_value)) and scaler.get_scale() > 1
            # the update is skipped here, not inside the scaler: set the backed-off scale, which also clears the
            # scaler's record of this step's unscaling (else the next step would unscale twice)
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
            backoff = f"; fp16 loss scale lowered to {scaler.get_scale():g}"
        if overflow:
            log(f"step {step + 1}: fp16 gradient overflow (the loss is finite); step skipped{backoff}")
            return finite, grad_norm, loss_value
        state.consecutive_nonfinite += 1
        log(f"step {step + 1}: non-finite loss or gradient; step skipped "
            f"({state.consecutive_nonfinite} in a row, limit {max_consecutive_nonfinite}){backoff}")
        if state.consecutive_nonfinite >= max_consecutive_nonfinite:
            optimizer.zero_grad(set_to_none=True)
            loss_optimizer.zero_grad()
            first = step + 2 - state.consecutive_nonfinite
            raise EmbedtrainError(
                f"training stopped: {state.consecutive_nonfinite} steps in a row had a non-finite loss "
                f"or gradient (steps {first}-{step + 1}); lower train.lr or check the data; {last_good}"
            )
    return finite, grad_norm, loss_value


def _clip_beside_a_sharded_model(accelerator, params: list, loss_params: list, max_grad_norm: Optional[float]):
    """The norm of an FSDP model's gradients (its whole parameter list, as accelerate recognises it) and the loss's
    together; with ``max_grad_norm``, both clipped by it with torch's coefficient."""
    from torch.nn.utils import clip_grads_with_norm_

    model_norm = accelerator.clip_grad_norm_(params, float("inf"))  # inf: measure only
    grads = [p.grad.detach().float().reshape(-1) for p in loss_params if p.grad is not None]
    loss_norm = torch.linalg.vector_norm(torch.cat(grads)) if grads else torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack([model_norm.float().to(loss_norm.device), loss_norm]))
    if max_grad_norm:
        clip_grads_with_norm_([p for p in params if p.grad is not None], max_grad_norm, total)
        clip_grads_with_norm_(loss_params, max_grad_norm, total)
    return total


def grad_norm_of(params) -> torch.Tensor:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.tensor(0.0)
