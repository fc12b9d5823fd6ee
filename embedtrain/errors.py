"""User-facing errors.

Anything the user can fix (a recipe key, a data file, a command-line flag) raises
:class:`EmbedtrainError`. The CLI prints its message on one line and exits with status 2;
everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class EmbedtrainError(Exception):
    """A problem with the user's input, reported as one line (or one line per problem)."""

    exit_code = 2


class ConfigError(EmbedtrainError):
    """One or more problems in a recipe; ``problems`` lists them all."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


# Names other tools use for the same setting, so a user coming from them gets the right suggestion.
ALIASES = {
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size",
    "warmup_steps": "warmup_ratio",
    "lr_scheduler_type": "scheduler",
    "output_dir": "dir",
    "model_name": "name_or_path",
    "model_name_or_path": "name_or_path",
    "max_seq_length": "max_length",
    "scale": "temperature",
    "max_grad_norm_clip": "max_grad_norm",
    # peft's LoraConfig names
    "rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
}


def did_you_mean(name: str, choices) -> str:
    """A ``" (did you mean 'x'?)"`` suffix for the closest of ``choices``, or ``""``."""
    import difflib

    choices = list(choices)
    if ALIASES.get(name) in choices:
        return f" (did you mean '{ALIASES[name]}'?)"
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def print_error(err: EmbedtrainError) -> int:
    """Print a user error as ``error: ...`` lines on stderr (one per recipe problem); return its exit code."""
    import sys

    for problem in err.problems if isinstance(err, ConfigError) else [str(err)]:
        print(f"error: {problem}", file=sys.stderr)
    return err.exit_code
