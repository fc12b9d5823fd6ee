"""The one extension point of the training loop: callbacks with hooks at the run's events."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedtrain.train.loop import Trainer, TrainResult


class Callback:
    """Hooks into a run; every method is optional. ``trainer`` is the running :class:`Trainer`
    (its ``accelerator``, ``model``, ``optimizer``, ``state`` ...)."""

    def on_train_begin(self, trainer: "Trainer") -> None: ...
    def on_step_begin(self, trainer: "Trainer", batch: dict) -> None: ...
    def on_step_end(self, trainer: "Trainer", figures: dict) -> None: ...
    def on_log(self, trainer: "Trainer", entry: dict) -> None: ...
    def on_evaluate(self, trainer: "Trainer", scores: dict) -> None: ...
    def on_checkpoint_files(self, trainer: "Trainer", path: Path) -> None:
        """Add files to a checkpoint being written at ``path`` (main process, before it is marked complete)."""
    def on_save(self, trainer: "Trainer", path: Path) -> None: ...
    def on_train_loop_end(self, trainer: "Trainer", step: int) -> None:
        """After the last step, before the final evaluation and save (every process; not on a resume from
        the final checkpoint): the place to replace the weights by an average."""
    def on_train_end(self, trainer: "Trainer", result: "TrainResult") -> None: ...
