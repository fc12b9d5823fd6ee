"""The Accelerator every embedtrain run uses."""

from __future__ import annotations

import os

import torch


def build_accelerator(mixed_precision: str = "no", log_with=None, project_dir: str | None = None,
                      find_unused_parameters: bool = False):
    """An Accelerator that steps the scheduler once per optimizer step, and that also forms a process
    group on CPU-only machines under ``torchrun`` (accelerate only does so when told the run is on CPU).

    ``find_unused_parameters``: tell DDP that a step may leave parameters without gradient (the experts of
    the domains a Mixture-of-Experts step does not route to)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        mixed_precision=mixed_precision,
        log_with=log_with,
        project_dir=project_dir,
        step_scheduler_with_optimizer=False,  # one scheduler step per optimizer step, whatever the world size
        cpu=launched and not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else None,
    )
