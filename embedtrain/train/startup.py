"""The start-up of a run, timed by phase: what a run does before its first step, and how long each part took.

A phase that can take seconds says so as it begins (one progress line, e.g. ``loading model ... ``), so a run
is never silent for long; just before the first step one line gives every phase's seconds, and metrics.jsonl
keeps them (``startup_seconds``).

The loop marks the end of each of its own stages with :meth:`StartupPhases.lap` (everything since the
previous mark belongs to it, so the laps add up to the whole start-up); a task or a callback times a part of
a stage with :meth:`StartupPhases.phase`, which is reported inside its stage.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, Optional


class StartupPhases:
    """Seconds per start-up stage (``laps``, in order) and per named part of a stage (``parts``)."""

    def __init__(self, log: Callable[..., None] = print, clock: Callable[[], float] = time.perf_counter):
        self.log, self.clock = log, clock
        self.started = self._last = clock()
        self.laps: dict[str, float] = {}
        self.parts: dict[str, dict[str, float]] = {}
        """Per stage, its timed parts (a part belongs to the stage whose lap comes next)."""
        self._open: dict[str, float] = {}

    def lap(self, name: str) -> float:
        """End stage ``name`` now: the seconds since the previous lap (or the start) are its own."""
        now = self.clock()
        seconds, self._last = now - self._last, now
        self.laps[name] = self.laps.get(name, 0.0) + seconds
        if self._open:
            stage = self.parts.setdefault(name, {})
            for part, s in self._open.items():
                stage[part] = stage.get(part, 0.0) + s
            self._open = {}
        return seconds

    @contextlib.contextmanager
    def phase(self, name: str, line: Optional[str] = None) -> Iterator[None]:
        """Time the block as part ``name`` of the current stage; ``line`` is logged as it begins (a progress
        line, for parts that can take seconds)."""
        if line:
            self.log(line)
        start = self.clock()
        try:
            yield
        finally:
            self._open[name] = self._open.get(name, 0.0) + self.clock() - start

    @property
    def seconds(self) -> float:
        """Seconds from the start to the last lap."""
        return self._last - self.started

    def to_dict(self) -> dict:
        """What metrics.jsonl records (rounded to milliseconds): the total, each stage, each stage's parts."""
        return {"total": round(self.seconds, 3), "stages": {k: round(v, 3) for k, v in self.laps.items()},
                "parts": {stage: {k: round(v, 3) for k, v in parts.items()} for stage, parts in self.parts.items()}}

    def line(self) -> str:
        """One line: the whole start-up, each stage (and its timed parts) that took 0.1 s or more."""
        stages = []
        for name, seconds in self.laps.items():
            if seconds < 0.05:
                continue
            parts = ", ".join(f"{k} {v:.1f}" for k, v in self.parts.get(name, {}).items() if v >= 0.05)
            stages.append(f"{name} {seconds:.1f}" + (f": {parts}" if parts else ""))
        return f"start-up: {self.seconds:.1f} s before the first step ({'; '.join(stages)})"
