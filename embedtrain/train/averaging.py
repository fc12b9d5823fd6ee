"""Weight averaging as callbacks of the one loop: an exponential moving average of the weights, and the
average of the last checkpoints. Either becomes the final model (evaluated and saved in place of the
last weights) when the recipe asks for it (``train.ema_decay``, ``train.average_last_checkpoints``).

Both average the trainable parameters of the unwrapped model, which every process holds whole under
DDP (the same values on every process, so every process computes the same average); a sharded model
(FSDP, DeepSpeed ZeRO-3) holds shards only, and is refused.
"""

from __future__ import annotations

from pathlib import Path
import torch

from embedtrain.errors import EmbedtrainError
from embedtrain.train import checkpoint as ckpt
from embedtrain.train.callbacks import Callback

EMA_FILE = "ema.safetensors"


@torch.no_grad()
def ema_update(shadow: dict[str, torch.Tensor], params: dict[str, torch.Tensor], decay: float) -> None:
    r"""In place, for every name: :math:`\bar\theta \leftarrow d\,\bar\theta + (1 - d)\,\theta`."""
    names = list(shadow)
    torch._foreach_mul_([shadow[n] for n in names], decay)
    torch._foreach_add_([shadow[n] for n in names], [params[n].detach().float() for n in names], alpha=1.0 - decay)


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of ``states`` key by key (float32 sums, in the first state's dtype), through the model-soup
    merge of :mod:`embedtrain.merge` with equal weights."""
    from embedtrain.merge.methods import linear_merge

    return linear_merge(states[0], states)


def _trainable(trainer) -> dict[str, torch.nn.Parameter]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class ExponentialMovingAverage(Callback):
    r"""Keeps :math:`\bar\theta_t = d\,\bar\theta_{t-1} + (1 - d)\,\theta_t` after every applied update
    (a skipped step leaves it as it is), starting from the weights at step 0; the final model is
    :math:`\bar\theta`. The average is written into every checkpoint (``ema.safetensors``) and read back
    on resume, so a resumed run ends with the same average as an uninterrupted one. Evaluations during
    training (``train.eval_every``) score the live weights; the final evaluation scores the average.
    """

    def __init__(self, decay: float, log=print):
        self.decay, self.log = float(decay), log
        self.shadow: dict[str, torch.Tensor] = {}

    def on_train_begin(self, trainer) -> None:
        params = _trainable(trainer)
        saved = getattr(trainer, "resumed_from", None)
        if saved is not None and (Path(saved) / EMA_FILE).is_file():
            from safetensors.torch import load_file

            loaded = load_file(str(Path(saved) / EMA_FILE), device=str(next(iter(params.values())).device))
            if loaded.keys() != params.keys():
                raise EmbedtrainError(f"--resume: {saved / EMA_FILE} holds other weights than the model's trainable "
                                      "ones; resume with the recipe that wrote it, or start again with --overwrite")
            self.shadow = loaded
            return
        if saved is not None:
            self.log(f"train.ema_decay: checkpoint {saved} has no {EMA_FILE}; the average starts from its weights")
        self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    def on_step_end(self, trainer, figures: dict) -> None:
        if figures.get("finite", True):
            ema_update(self.shadow, _trainable(trainer), self.decay)

    def on_checkpoint_files(self, trainer, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({n: t.detach().cpu().contiguous() for n, t in self.shadow.items()}, str(path / EMA_FILE))

    def on_train_loop_end(self, trainer, step: int) -> None:
        with torch.no_grad():
            for name, p in _trainable(trainer).items():
                p.copy_(self.shadow[name].to(p.dtype))
        trainer.final_weights = f"exponential moving average of the weights, decay {self.decay}"
        self.log(f"final model: the {trainer.final_weights}")


class CheckpointAverage(Callback):
    """At the end of training the weights become the mean of the last ``count`` checkpoints: the weights
    of the final step and the ``count - 1`` newest checkpoints written before it (``train.save_every``;
    ``train.keep_last`` must keep them). Fewer checkpoints than that are averaged with a log line."""

    def __init__(self, count: int, log=print):
        self.count, self.log = int(count), log

    def on_train_loop_end(self, trainer, step: int) -> None:
        from safetensors.torch import load_file

        chosen = [(s, path) for s, path in ckpt.list_checkpoints(trainer.out) if s < step][-(self.count - 1):]
        if len(chosen) < self.count - 1:
            self.log(f"train.average_last_checkpoints: {len(chosen)} checkpoints before the last step "
                     f"(asked for {self.count - 1}); averaging {len(chosen) + 1} weights")
        params = _trainable(trainer)
        device = str(next(iter(params.values())).device)
        states = []
        for _, path in chosen:
            saved = load_file(str(path / "model.safetensors"), device=device)
            missing = sorted(set(params) - set(saved))
            if missing:
                raise EmbedtrainError(f"train.average_last_checkpoints: {path} lacks {', '.join(missing[:3])}; "
                                      "it was written by another model")
            states.append({n: saved[n] for n in params})
        averaged = average_state_dicts(states + [{n: p.detach() for n, p in params.items()}])
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(averaged[name])
        trainer.final_weights = f"mean of the weights at steps {', '.join(str(s) for s, _ in chosen + [(step, None)])}"
        self.log(f"final model: the {trainer.final_weights}")


def averaging_callbacks(train, log=print) -> list[Callback]:
    """The callbacks a recipe's ``train`` section asks for (none by default)."""
    callbacks: list[Callback] = []
    if train.ema_decay is not None:
        callbacks.append(ExponentialMovingAverage(train.ema_decay, log))
    if train.average_last_checkpoints > 1:
        callbacks.append(CheckpointAverage(train.average_last_checkpoints, log))
    return callbacks
