"""Crash-safe checkpoints.

A checkpoint is written into ``checkpoints/.tmp-step-N`` by every process (accelerate saves the
model as safetensors, the optimizer, the scheduler and each process's random state), completed by
``trainer_state.json`` and the resolved recipe, marked with a ``COMPLETE`` file, and only then
renamed to ``checkpoints/step-N`` by the main process. A folder without the marker (a run killed
mid-write) is never taken for a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from embedtrain.errors import EmbedtrainError

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / STATE_FILE).is_file()


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    root = checkpoint_root(run_dir)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = _STEP_DIR.match(child.name)
            if m and child.is_dir() and is_complete(child):
                found.append((int(m.group(1)), child))
    return sorted(found)


def incomplete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(c for c in root.iterdir() if c.is_dir() and not is_complete(c))


def resolve_resume(run_dir: str | os.PathLike, resume: str) -> Optional[Path]:
    """``auto`` → the newest complete checkpoint of the run (None if there is none); else a path."""
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise EmbedtrainError(f"--resume: {path} is not a checkpoint folder; give a checkpoints/step-N folder or 'auto'")
    if not is_complete(path):
        raise EmbedtrainError(f"--resume: {path} is incomplete (no {MARKER} marker; the run was stopped while writing it); use an older checkpoint or 'auto'")
    return path


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


def save_checkpoint(accelerator, run_dir: str | os.PathLike, step: int, state: dict, extra_files: dict[str, str],
                    write_extra=None) -> Path:
    """Write checkpoint ``step`` atomically; every process must call this.

    ``extra_files`` maps file names to text written by the main process (e.g. the recipe);
    ``write_extra(path)`` is called on the main process to add other files (e.g. loss weights).
    """
    root = checkpoint_root(run_dir)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if write_extra is not None:
            write_extra(tmp)
        for name, text in extra_files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        _fsync_tree(tmp)
        (tmp / MARKER).write_text("ok\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int, keep_step: Optional[int]) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints and the one of ``keep_step``."""
    found = list_checkpoints(run_dir)
    keep = {p for _, p in found[len(found) - keep_last :]} if keep_last > 0 else set()
    for step, path in found:
        if path not in keep and step != keep_step:
            shutil.rmtree(path, ignore_errors=True)
    for path in incomplete_checkpoints(run_dir):
        shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for child in path.rglob("*"):
        if child.is_file():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)
