"""The Accelerator every embedtrain run uses, and the engine it really runs on.

An engine asked for by the launcher (``accelerate launch --config_file``: FSDP, DeepSpeed) is either the
engine the run gets or a one-line error; never a silent fall-back to plain data parallelism. On a
machine without GPUs accelerate forms no FSDP state (it treats CPU processes as MULTI_CPU); FSDP 2
(``fully_shard``) works on CPU processes over gloo, so embedtrain turns the FSDP plugin on itself there.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch

from embedtrain.errors import EmbedtrainError


@dataclass
class Engine:
    """What a run really ran on; recorded in results.json, metrics.jsonl's first line and the model card."""

    distributed_type: str
    """accelerate's distributed type: NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED, ..."""
    processes: int
    device: str
    sharding: Optional[str]
    """How weights, gradients and optimizer states are split across processes (None: replicated)."""
    mixed_precision: str
    launcher_mixed_precision: Optional[str] = None
    """The precision the accelerate config asked for, when the recipe's train.mixed_precision overrode it."""

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        parts = [self.distributed_type, f"{self.processes} process{'es' if self.processes > 1 else ''}", self.device]
        if self.sharding:
            parts.append(self.sharding)
        parts.append(f"mixed precision {self.mixed_precision}")
        return ", ".join(parts)


def engine_problems(distributed_type: str, train, loss_parameters: Sequence[str]) -> list[str]:
    """Recipe settings an engine (accelerate's distributed type) cannot run, one line each: ``embedtrain train``
    stops on them before it loads the model, ``embedtrain plan`` lists them for its accelerate config.
    ``loss_parameters``: the names of the loss's own learnable parameters (:attr:`Task.loss_parameters`)."""
    problems = []
    if distributed_type in ("FSDP", "DEEPSPEED"):
        shard = f"is not available under {distributed_type} (each process holds a shard of the weights); remove it " \
                "or train without sharding"
        if train.ema_decay is not None:
            problems.append(f"train.ema_decay: an exponential moving average of the weights {shard}")
        if train.average_last_checkpoints > 1:
            problems.append(f"train.average_last_checkpoints: averaging checkpoints {shard}")
    if distributed_type == "DEEPSPEED" and loss_parameters:
        # DeepSpeed scales the fp16 loss in its engine: the loss's own gradients, outside it, would stay scaled
        problems.append(f"loss: a learnable temperature or bias ({', '.join(loss_parameters)}) is not available under "
                        "DeepSpeed yet; set loss.learnable_temperature (and loss.learnable_bias) to false")
    return problems


def requested_engine() -> Optional[str]:
    """The engine the launcher asked for through accelerate's environment (None: plain data parallelism)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "DEEPSPEED"
    return None


def _cpu_process_group() -> bool:
    """Whether this process was launched with others (``torchrun``, ``accelerate launch``) on a machine without
    GPUs: accelerate forms their process group only when told the run is on CPU."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def process_state():
    """accelerate's ``PartialState`` (the processes of the launch, their ranks and barriers) for work that needs
    no ``Accelerator`` (``embedtrain mine``), with the process group formed on CPU-only machines too."""
    from accelerate import PartialState

    return PartialState(cpu=_cpu_process_group())


def build_accelerator(mixed_precision: str = "no", log_with=None, project_dir: str | None = None,
                      find_unused_parameters: bool = False):
    """An Accelerator that steps the scheduler once per optimizer step, and that also forms a process
    group on CPU-only machines under ``torchrun`` (accelerate only does so when told the run is on CPU).

    ``find_unused_parameters``: tell DDP that a step may leave parameters without gradient (the experts of
    the domains a Mixture-of-Experts step does not route to)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    on_cpu = not torch.cuda.is_available()
    wanted = requested_engine()
    if wanted == "DEEPSPEED" and on_cpu:
        raise EmbedtrainError("accelerate config: DeepSpeed needs GPUs (this machine has none); use "
                              "recipes/accelerate/fsdp_cpu.yaml or multi_cpu.yaml here, or run on GPUs")
    if wanted == "FSDP" and on_cpu and not launched:
        raise EmbedtrainError("accelerate config: FSDP shards a model across processes, but this run has one process "
                              "on CPU; set num_processes to 2 or more, or use recipes/accelerate/one_cpu.yaml")
    if wanted == "FSDP" and on_cpu and os.environ.get("FSDP_VERSION", "1") != "2":
        raise EmbedtrainError("accelerate config: fsdp_config.fsdp_version 1 needs GPUs; set fsdp_version: 2 "
                              "(FSDP 2 runs on CPU processes too)")
    from accelerate.state import AcceleratorState

    # each run sets its own precision and engine: forget an earlier run's in this process (the process group,
    # PartialState, stays)
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        log_with=log_with,
        project_dir=project_dir,
        step_scheduler_with_optimizer=False,  # one scheduler step per optimizer step, whatever the world size
        cpu=_cpu_process_group(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else None,
    )
    if wanted == "FSDP" and accelerator.distributed_type == DistributedType.MULTI_CPU:
        _enable_fsdp_on_cpu(mixed_precision)
    if mixed_precision == "fp16" and accelerator.device.type == "cpu" and accelerator.scaler is None:
        # accelerate leaves fp16 off on the CPU (no autocast, no scaler) without a word; torch has both there
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu")
    got = accelerator.distributed_type.name
    if wanted is not None and got != wanted:
        raise EmbedtrainError(f"accelerate config: asked for {wanted}, but accelerate set up {got} here; "
                              "check the accelerate config and the launch command")
    return accelerator


def _enable_fsdp_on_cpu(mixed_precision: str) -> None:
    """Turn accelerate's FSDP plugin on for CPU processes (gloo): accelerate builds the plugin from the
    launcher's environment but keeps it only for GPU-family distributed types. Both shared states are set,
    since every new ``AcceleratorState()`` copies ``PartialState``'s."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin


def engine_of(accelerator) -> Engine:
    """The engine ``accelerator`` runs: distributed type, processes, device, sharding, precision."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    sharding = None
    if kind == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        sharding = (f"FSDP {plugin.fsdp_version}, reshard after forward: {bool(plugin.reshard_after_forward)}, "
                    f"state dict: {getattr(plugin.state_dict_type, 'name', plugin.state_dict_type)}")
    elif kind == DistributedType.DEEPSPEED:
        sharding = f"ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    return Engine(kind.name, accelerator.num_processes, accelerator.device.type, sharding,
                  str(accelerator.mixed_precision),
                  launcher if launcher and launcher != str(accelerator.mixed_precision) else None)
