"""Memory per device, FLOPs and time of a training step, from the model's shape and the step's inputs.

Memory (bytes per device) is the sum of
- weights, gradients (trainable parameters) and optimizer states (AdamW: two per trainable parameter, SGD with
  momentum: one; in the parameter's dtype, as torch keeps them), each divided by the processes that shard it:
  FSDP (full shard) and DeepSpeed ZeRO-3 shard all three, ZeRO-2 gradients and states, DDP none;
- DDP's gradient buckets (a second copy of the gradients) with more than one process, or FSDP's gathered
  blocks (the largest block's weights, twice: the current one and the prefetched next);
- autocast's low-precision copies of float32 weights under bf16/fp16 mixed precision;
- activations kept for the backward pass, per transformer layer and token (Korthikanti et al., "Reducing
  Activation Recomputation in Large Transformer Models", 2022, counted tensor by tensor for the block types
  here): the inputs of both norms and of the residual adds, queries/keys/values, the attention output, the MLP's
  hidden activations (three of width ``intermediate`` for a gated MLP, two otherwise), one-byte dropout masks
  where dropout is on, and the attention scores and probabilities (heads x length per token) unless a fused
  kernel computes attention. With gradient checkpointing only each layer's input is kept, plus one layer's
  activations while it is recomputed. Under GradCache a role is embedded in chunks, so only one chunk's
  activations are alive at a time.

FLOPs: a matmul over ``n`` weights costs ``2 n`` per token forward; backward costs the same again for the
activation gradients, plus ``2 n`` per token for the trainable weights' gradients; attention adds ``4 L s^2 h``
per sequence forward. Gradient checkpointing and GradCache's first pass each add a forward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from embedtrain.plan.model import ModelShape, Tower


DDP_KINDS = ("MULTI_GPU", "MULTI_CPU", "MULTI_NPU", "MULTI_XPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_HPU")
"""accelerate's distributed types that wrap the model in DistributedDataParallel."""


@dataclass
class Engine:
    distributed_type: str = "NO"
    processes: int = 1
    mixed_precision: str = "no"
    zero_stage: Optional[int] = None
    source: str = "one process"
    wrap: Optional[str] = None
    """FSDP's ``fsdp_auto_wrap_policy``: NO_WRAP shards the model as one unit, any other policy its blocks one by one."""

    @property
    def ddp(self) -> bool:
        """Replicated weights kept equal by DistributedDataParallel (accelerate's MULTI_* kinds, on any device):
        its gradient buckets and its one all-reduce a step."""
        return self.distributed_type in DDP_KINDS and self.processes > 1

    @property
    def shards(self) -> dict[str, int]:
        """How many processes share the weights, gradients and optimizer states."""
        n = self.processes
        if self.distributed_type == "FSDP":
            return {"weights": n, "gradients": n, "optimizer": n}
        if self.distributed_type == "DEEPSPEED":
            stage = self.zero_stage or 0
            return {"weights": n if stage >= 3 else 1, "gradients": n if stage >= 2 else 1,
                    "optimizer": n if stage >= 1 else 1}
        return {"weights": 1, "gradients": 1, "optimizer": 1}

    def to_dict(self) -> dict:
        return asdict(self)


def engine_from_accelerate_config(path: Optional[str], devices: Optional[int], mixed_precision: str) -> Engine:
    """The engine an accelerate config file asks for (``devices`` overrides its process count); without a
    file, one process, or DDP on ``devices`` processes."""
    import yaml

    from embedtrain.errors import EmbedtrainError

    if path is None:
        n = devices or 1
        return Engine("MULTI_GPU" if n > 1 else "NO", n, mixed_precision,
                      source="DDP (no accelerate config)" if n > 1 else "one process")
    try:
        data = yaml.safe_load(open(path)) or {}
    except FileNotFoundError:
        raise EmbedtrainError(f"--accelerate-config: {path} not found") from None
    except yaml.YAMLError:
        raise EmbedtrainError(f"--accelerate-config: {path} is not valid YAML") from None
    if not isinstance(data, dict):
        raise EmbedtrainError(f"--accelerate-config: {path} holds no mapping; give an accelerate config file")
    kind = str(data.get("distributed_type", "NO"))
    n = int(devices or data.get("num_processes") or 1)
    stage = (data.get("deepspeed_config") or {}).get("zero_stage")
    wrap = (data.get("fsdp_config") or {}).get("fsdp_auto_wrap_policy") if kind == "FSDP" else None
    # the recipe's train.mixed_precision is what the run uses (the launcher's value is logged and ignored)
    return Engine(kind, n, mixed_precision, int(stage) if stage is not None else None, source=str(path),
                  wrap=str(wrap) if wrap else None)


@dataclass
class Work:
    """One role's inputs to one tower in a step on one device."""

    tower: str
    role: str
    rows: int
    length: int
    """Tokens per row (padded to the longest of the batch)."""


PER_TOKEN = {
    # elements autograd keeps per token and block, counted from the saved tensors of one training step of each
    # layout (scripts/plan_memory.py measures the same step); h: hidden, f: MLP width, kv: key/value width
    "bert": lambda h, f, kv: 8 * h + 2 * f,  # q/k/v and context copies, both norms, two adds, fc + GELU
    "decoder": lambda h, f, kv: 13 * h + 3 * kv + 4 * f,  # two RMSNorms (3 each), rotary q/k, repeated k/v, gated MLP
    "vit": lambda h, f, kv: 9 * h + 2 * f,  # pre-norm block: fused qkv split, attention out, fc + GELU
}


def _act_bytes(tower: Tower, b: int) -> tuple[int, int]:
    """(bytes per token per layer, bytes per (row x head x length^2) of attention scores) kept for backward."""
    h, f = tower.hidden, tower.intermediate
    elements = PER_TOKEN[tower.family](h, f, tower.kv_dim)
    if tower.dropout:
        elements += 2 * h  # the masks of the two hidden dropouts (kept in the activation dtype)
    if tower.lora_dropout:
        elements += 2 * tower.lora_inputs  # each LoRA branch keeps its dropped-out input and the mask
    # a fused kernel keeps no scores; the eager path with dropout keeps probabilities, mask and their product
    scores = 0 if tower.fused_attention else (3 if tower.dropout else 2)
    return b * elements, b * scores


def activation_bytes(towers: dict[str, Tower], work: Sequence[Work], b: int, checkpointing: bool,
                     chunks: Optional[dict[str, int]] = None) -> int:
    """Activations alive at once for ``work`` (see the module docstring); ``chunks``: GradCache's rows per chunk
    by role (then one chunk of one role is alive at a time)."""

    def one(w: Work, rows: int) -> int:
        t = towers[w.tower]
        per_token, scores = _act_bytes(t, b)
        layer = rows * w.length * per_token + rows * t.heads * w.length ** 2 * scores
        if not t.backward:
            return rows * w.length * (t.hidden + t.intermediate) * b  # inference: one layer's tensors at a time
        if checkpointing:
            return t.layers * rows * w.length * t.hidden * b + layer
        return t.layers * layer

    if chunks:
        return max((one(w, min(w.rows, chunks.get(w.role) or w.rows)) for w in work), default=0)
    return sum(one(w, w.rows) for w in work)


def forward_flops(tower: Tower, rows: int, length: int) -> float:
    """FLOPs of one forward pass of ``rows`` texts of ``length`` tokens through ``tower`` (weights and attention)."""
    return 2.0 * tower.params * rows * length + 4.0 * tower.layers * rows * length ** 2 * tower.hidden


def step_flops(towers: dict[str, Tower], work: Sequence[Work], checkpointing: bool, grad_cache: bool) -> float:
    total = 0.0
    for w in work:
        t = towers[w.tower]
        tokens = w.rows * w.length
        forward = forward_flops(t, w.rows, w.length)
        passes = 1 + (1 if grad_cache else 0) + (1 if checkpointing and t.backward else 0)
        backward = (forward + 2.0 * t.trainable * tokens) if t.backward else 0.0
        total += passes * forward + backward
    return total


@dataclass
class Estimate:
    memory: dict[str, int] = field(default_factory=dict)
    """Bytes per device, by part, and ``total``."""
    flops_per_step: float = 0.0
    """FLOPs of one optimizer step on one device."""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def estimate(shape: ModelShape, engine: Engine, work: Sequence[Work], optimizer: str, checkpointing: bool,
             chunks: Optional[dict[str, int]], first_step: bool = False) -> Estimate:
    """Memory and FLOPs of one step. The peak is the higher of two moments: the end of the forward pass (weights,
    the optimizer states of earlier steps, activations, transient copies; under GradCache also the gradients of
    the chunks replayed so far) and the optimizer update (weights, gradients, states, and the update's temporaries
    of the size of the trainable weights). ``first_step``: no optimizer state exists before it."""
    shards = engine.shards
    towers = {t.name: t for t in shape.towers}
    states_per_param = {"adamw": 2, "sgd": 1}.get(optimizer, 2)
    low = engine.mixed_precision in ("bf16", "fp16")
    float32_weights = shape.weight_bytes >= 4 * shape.total
    b = 2 if low or not float32_weights else 4  # activations in 16 bits under autocast or in a 16-bit model
    grads = shape.trainable_bytes // shards["gradients"]
    states = states_per_param * shape.trainable_bytes // shards["optimizer"]
    memory = {"weights": shape.weight_bytes // shards["weights"], "gradients": grads, "optimizer_states": states}
    if engine.ddp:
        memory["ddp_buckets"] = shape.trainable_bytes
    transient = 0
    if engine.distributed_type == "FSDP" and engine.processes > 1:
        memory["fsdp_gathered_blocks"] = transient = 2 * shape.largest_layer_bytes
    if low and float32_weights:
        memory["autocast_copies"] = shape.total * 2
        transient += shape.total * 2
    memory["activations"] = activation_bytes(towers, work, b, checkpointing, chunks)
    memory["update_temporaries"] = shape.trainable_bytes // shards["optimizer"]
    resident = memory["weights"] + memory.get("ddp_buckets", 0)
    forward_end = memory["activations"] + transient + (0 if first_step else states) + (grads if chunks else 0)
    update = grads + states + memory["update_temporaries"]
    memory["total"] = resident + max(forward_end, update)
    return Estimate(memory, step_flops(towers, work, checkpointing, bool(chunks)))


def _calls(w: Work, chunks: Optional[dict[str, int]]) -> int:
    """Forward calls that embed ``w``: one, or one per GradCache chunk of its role."""
    size = (chunks or {}).get(w.role) or w.rows
    return -(-w.rows // size) if chunks else 1


def step_communication(shape: ModelShape, engine: Engine, work: Sequence[Work],
                       chunks: Optional[dict[str, int]]) -> dict[str, int]:
    r"""Bytes of the buffers each device's collectives move in one step, by kind: ``all_gather`` (the gathered
    buffer), ``reduce_scatter`` (the buffer before it is scattered) and ``all_reduce``; and ``sent``, what one
    device sends over its links with ring algorithms: :math:`\frac{N-1}{N}` of an all-gather or reduce-scatter
    buffer, :math:`2\frac{N-1}{N}` of an all-reduce buffer (N processes).

    A step's forward calls are one per ``Work`` (a role, a token-budget group), or one per GradCache chunk; a
    step's backward passes are one, or one per chunk replayed through a trained tower.
    - DDP: the trainable gradients are all-reduced once a step (GradCache replays accumulate first).
    - FSDP 2 (reshard after forward), as measured on its hooks: each block is gathered at every forward call
      (GradCache's first pass included) and again at every backward one; the root (all but the blocks; the whole
      model under NO_WRAP) stays gathered from its first forward to the end of a backward pass, so it is gathered
      once per backward pass; every backward pass reduce-scatters the root's and its tower's blocks' trainable
      gradients.
    - DeepSpeed ZeRO-3 is counted like FSDP; ZeRO-1 and 2 reduce-scatter the trainable gradients at every backward
      pass and all-gather the updated trainable weights once a step.
    The loss's gathers of embeddings (rows x width per role) are left out: small beside the weights'."""
    n = engine.processes
    out = {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 0}
    if n > 1:
        towers = {t.name: t for t in shape.towers}
        trained = [w for w in work if towers[w.tower].backward]
        # backward passes, each with the towers it goes through
        passes = [[w.tower] for w in trained for _ in range(_calls(w, chunks))] if chunks else \
            [sorted({w.tower for w in trained})] if trained else []
        sharded = engine.shards["weights"] > 1  # FSDP, ZeRO-3
        if engine.ddp and passes:
            out["all_reduce"] = shape.trainable_bytes
        elif sharded:
            per_block = engine.distributed_type == "DEEPSPEED" or engine.wrap != "NO_WRAP"
            blocks = {t.name: (t.block_bytes, t.block_trainable_bytes) if per_block else (0, 0) for t in shape.towers}
            root = shape.weight_bytes - sum(b for b, _ in blocks.values())
            root_trainable = shape.trainable_bytes - sum(b for _, b in blocks.values())
            for w in work:
                forward = _calls(w, chunks) * (2 if chunks and towers[w.tower].backward else 1)
                backward = _calls(w, chunks) if towers[w.tower].backward else 0
                out["all_gather"] += blocks[w.tower][0] * (forward + backward)
            out["all_gather"] += root * max(1, len(passes))
            out["reduce_scatter"] = sum(root_trainable + sum(blocks[t][1] for t in p) for p in passes)
        elif engine.distributed_type == "DEEPSPEED" and passes:
            out["reduce_scatter"] = shape.trainable_bytes * len(passes)
            out["all_gather"] = shape.trainable_bytes
    out["sent"] = (n - 1) * (out["all_gather"] + out["reduce_scatter"] + 2 * out["all_reduce"]) // max(1, n)
    return out
