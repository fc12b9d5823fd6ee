"""Stopping cleanly: SIGINT/SIGTERM ask the loop to finish the current step, checkpoint and exit, and
every process agrees on when to stop."""

from __future__ import annotations

import signal
import time

import torch


class StopRequest:
    """SIGINT/SIGTERM ask the loop to finish the current step, checkpoint and exit.

    A second signal at least ``repeat_after`` seconds after the first stops at once (no checkpoint);
    one arriving sooner is taken for the same request (a launcher such as torchrun forwards the
    signal it received to processes that got it already).
    """

    repeat_after = 2.0

    def __init__(self):
        self.requested = False
        self._first = 0.0
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            if time.monotonic() - self._first >= self.repeat_after:  # a second request stops at once
                raise KeyboardInterrupt
            return
        self.requested, self._first = True, time.monotonic()

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def any_process(accelerator, flag: bool) -> bool:
    """Whether ``flag`` is true on any process (all processes must take the same branch)."""
    if accelerator.num_processes == 1:
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)
