"""The Accelerator every embedtrain run uses."""

from __future__ import annotations

import os

import torch


def build_accelerator(mixed_precision: str = "no", log_with=None, project_dir: str | None = None):
    """An Accelerator that steps the scheduler once per optimizer step, and that also forms a process
    group on CPU-only machines under ``torchrun`` (accelerate only does so when told the run is on CPU)."""
    from accelerate import Accelerator

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        mixed_precision=mixed_precision,
        log_with=log_with,
        project_dir=project_dir,
        step_scheduler_with_optimizer=False,  # one scheduler step per optimizer step, whatever the world size
        cpu=launched and not torch.cuda.is_available(),
    )
