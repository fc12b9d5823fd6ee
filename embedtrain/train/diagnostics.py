"""Label-free diagnostics during training, as a callback of the one loop.

At step 0, every ``eval.diagnostics.every`` steps, at each evaluation and at the last step, the task's
probe pairs (held out of the training rows, see :mod:`embedtrain.data.probe`) are embedded and
:func:`embedtrain.eval.diagnostics.diagnose` measures the space: RankMe, alignment, uniformity, the
random-pair cosine and the similarity gap. Each measurement is a ``diag/...`` line of metrics.jsonl and a
log line; when the effective rank or the uniformity has collapsed relative to step 0, both carry a warning
(``diag/warning``). The step-0 values live in the training state, so a resumed run warns against the
same reference.
"""

from __future__ import annotations

from typing import Optional

import torch

from embedtrain.eval.diagnostics import collapse_warnings, diagnose, format_diagnostics
from embedtrain.train.callbacks import Callback

PREFIX = "diag/"
"""Prefix of the diagnostics' keys in metrics.jsonl."""
WARNING_KEY = PREFIX + "warning"


def diagnostics_callbacks(recipe) -> list[Callback]:
    """The diagnostics callback when the recipe asks for a probe (``eval.diagnostics.probe_rows`` > 0)."""
    settings = getattr(recipe.eval, "diagnostics", None)
    if settings is None or not settings.probe_rows:
        return []
    return [DiagnosticsCallback(settings.every, settings.rank_warning, settings.uniformity_warning)]


class DiagnosticsCallback(Callback):
    """Measures the probe at step 0, every ``every`` steps, at evaluations and at the end (once per step)."""

    def __init__(self, every: Optional[int], rank_warning: float, uniformity_warning: float):
        self.every, self.rank_warning, self.uniformity_warning = every, rank_warning, uniformity_warning
        self.step: Optional[int] = None  # the loop's current step, as its step hooks report it
        self.measured: Optional[int] = None  # the last step measured (an evaluation at the same step reuses it)
        self.announced = False

    def on_evaluate(self, trainer, scores: dict) -> None:
        self.measure(trainer, trainer.state.step if self.step is None else self.step)

    def on_train_begin(self, trainer) -> None:
        if trainer.state.step == 0:  # the baseline evaluation measured step 0 already, unless there was none
            probe = trainer.task.probe
            line = (f"step 0: embedding the diagnostics probe ({probe.rows} pairs) ..."
                    if probe is not None and self.measured != 0 else None)
            with trainer.task.startup.phase("diagnostics at step 0", line):
                self.measure(trainer, 0)
            return
        probe, saved = trainer.task.probe, trainer.state.diagnostics.get("probe_pairs")
        if probe is not None and saved is not None and saved != probe.rows:
            trainer.log(f"diagnostics: the probe now has {probe.rows} pairs, the checkpoint's run held out {saved} "
                        "(eval.diagnostics.probe_rows or the data changed): this run trains on other rows than "
                        "the interrupted one, and its warnings compare against another probe's step 0")

    def on_step_end(self, trainer, figures: dict) -> None:
        self.step = step = figures["step"]
        if (self.every and step % self.every == 0) or step == trainer.total_steps:
            self.measure(trainer, step)

    def measure(self, trainer, step: int) -> Optional[dict]:
        """Embed the probe, record the figures (and warnings) of ``step``; None without a probe."""
        if self.measured == step:
            return None
        self.measured = step
        if trainer.task.probe is None:
            if not self.announced and trainer.task.probe_off is None:  # else said when read
                trainer.log(f"diagnostics: kind {trainer.recipe.kind} holds out no probe set yet; none are measured")
            self.announced = True
            return None
        embeddings = trainer.probe_embeddings()
        if embeddings is None:  # not the main process
            return None
        queries, positives = embeddings
        values = diagnose(torch.cat([queries, positives]), queries, positives)
        state = trainer.state
        if not state.diagnostics:
            state.diagnostics = {**values, "probe_pairs": int(queries.shape[0])}
            if step:  # resumed from a checkpoint written before the run measured its probe
                trainer.log(f"diagnostics: no step-0 values in the checkpoint; step {step} is the warnings' reference")
        warnings = collapse_warnings(values, state.diagnostics, self.rank_warning, self.uniformity_warning)
        entry = {"step": step, **{PREFIX + k: v for k, v in values.items()}}
        if warnings:
            entry[WARNING_KEY] = "; ".join(warnings)
        trainer.record(entry, track=False)
        if trainer.recipe.output.report_to:
            trainer.accelerator.log({PREFIX + k: v for k, v in values.items()}, step=step)
        line = f"step {step}: diagnostics ({queries.shape[0]} probe pairs): {format_diagnostics(values)}"
        trainer.log(line + (f"; WARNING: {entry[WARNING_KEY]}" if warnings else ""))
        return entry
