"""Crash-safe checkpoints.

A checkpoint is written into ``checkpoints/.tmp-step-N`` by every process (accelerate saves the
model as safetensors, the optimizer, the scheduler and each process's random state), completed by
``trainer_state.json`` and the resolved recipe, flushed to disk, marked with a ``COMPLETE`` file,
and only then renamed to ``checkpoints/step-N`` by the main process. A folder without the marker
(a run killed mid-write) is never taken for a checkpoint; :func:`remove_incomplete` deletes it.

Before writing, the free space of the disk is compared with an estimate of the checkpoint's size;
a disk that fills up during the write (``ENOSPC``) is reported as one line and the partial folder
is removed. In both cases the earlier checkpoints are left as they were.

Loading (``accelerator.load_state``) reads the model from safetensors and the optimizer, scheduler
and random states through ``torch.load`` with ``weights_only=True``, which refuses pickled code.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from embedtrain.errors import EmbedtrainError

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
SAFETY_FACTOR = 1.2
"""Free space asked for, as a multiple of the estimated checkpoint size."""
PAUSE_ENV = "EMBEDTRAIN_TEST_PAUSE_IN_CHECKPOINT"
"""For tests only: ``SECONDS`` or ``SECONDS@STEP`` makes the main process sleep after a checkpoint's
files are written and before its ``COMPLETE`` marker (at every checkpoint, or only at STEP), so that a
test can kill the run at a known point of the write."""
_STEP_DIR = re.compile(r"^step-(\d+)$")
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28")


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
    """Folders under ``checkpoints/`` that are not complete ``step-N`` checkpoints (partial writes,
    and leftovers of a replacement that was interrupted)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(c for c in root.iterdir() if c.is_dir() and not (_STEP_DIR.match(c.name) and is_complete(c)))


def remove_incomplete(run_dir: str | os.PathLike) -> list[Path]:
    """Delete what :func:`incomplete_checkpoints` lists; returns the deleted folders (main process only)."""
    removed = incomplete_checkpoints(run_dir)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


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


LOSS_FILE = "loss.safetensors"
LOSS_OPTIMIZER_FILE = "loss_optimizer.safetensors"


def save_loss(path: Path, loss_fn, loss_optimizer) -> None:
    """The loss's own parameters and buffers (``loss.safetensors``) and, when it learns some, their optimizer's
    state (``loss_optimizer.safetensors``, see :class:`embedtrain.train.optim.LossOptimizer`)."""
    from safetensors.torch import save_file

    params = dict(loss_fn.state_dict())
    if params:
        save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, str(path / LOSS_FILE))
    if loss_optimizer.optimizer is not None:
        save_file(loss_optimizer.state_tensors(), str(path / LOSS_OPTIMIZER_FILE))


def load_checkpoint(accelerator, path: Path, loss_fn=None, loss_optimizer=None) -> dict:
    """Restore model, optimizer, scheduler, random states (and the loss's own parameters and their optimizer)
    from ``path``; returns its trainer state. Weights come from safetensors; the optimizer, scheduler and random
    states go through ``torch.load`` with ``weights_only=True``. A file that cannot be read (damaged, or one that
    asks to run code) is reported as one line naming the checkpoint."""
    try:
        state = read_state(path)
        accelerator.load_state(str(path))
        from safetensors.torch import load_file

        loss_path = path / LOSS_FILE
        if loss_fn is not None and loss_path.is_file():
            loss_fn.load_state_dict(load_file(str(loss_path)), strict=False)
        if loss_optimizer is not None and loss_optimizer.optimizer is not None:
            if not (path / LOSS_OPTIMIZER_FILE).is_file():
                raise FileNotFoundError(f"{LOSS_OPTIMIZER_FILE} is missing (the loss learns "
                                        f"{', '.join(loss_optimizer.names)})")
            loss_optimizer.load_tensors(load_file(str(path / LOSS_OPTIMIZER_FILE)))
    except Exception as err:
        first = (str(err).strip().splitlines() or [err.__class__.__name__])[0][:200]
        raise EmbedtrainError(
            f"--resume: checkpoint {path} cannot be loaded ({err.__class__.__name__}: {first}); "
            "resume from an older checkpoint with --resume PATH, or start again with --overwrite"
        ) from None
    return state


# -- disk space -------------------------------------------------------------------------------


def estimate_bytes(modules=(), optimizers=()) -> int:
    """Bytes a checkpoint of these modules and optimizers takes: every parameter and buffer, and every
    optimizer state tensor (AdamW's two moments per parameter before its first step)."""
    import torch

    total = 0
    for module in modules:
        for tensor in module.state_dict().values():
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    for optimizer in optimizers:
        state = optimizer.state_dict().get("state", {})
        if state:
            for per_param in state.values():
                for value in per_param.values():
                    if isinstance(value, torch.Tensor):
                        total += value.numel() * value.element_size()
        else:
            for group in optimizer.param_groups:
                total += sum(2 * p.numel() * p.element_size() for p in group["params"])
    return total


def free_space_problem(folder: Path, needed: int) -> Optional[str]:
    """A one-line message when the disk of ``folder`` has less than ``needed`` bytes free, else None."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return None  # cannot tell; the write itself will report a full disk
    if free >= needed:
        return None
    return (
        f"checkpoint: not enough free disk space in {folder}: about {_size(needed)} ({needed} bytes) needed, "
        f"{_size(free)} ({free} bytes) free; free some space or set output.dir on a larger disk "
        "(the earlier checkpoints are kept)"
    )


def is_disk_full(err: BaseException) -> bool:
    """True for the errors a full disk (or exhausted quota) produces, whatever library raised them."""
    if isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS:
        return True
    return any(text in str(err) for text in _DISK_FULL_TEXT)


@contextlib.contextmanager
def cleaned_on_failure(partial: Path, what: str, folder: Path) -> Iterator[None]:
    """Remove ``partial`` if the block fails; a full disk becomes a one-line :class:`EmbedtrainError`.

    Some writers hide the errno (``torch.save`` raises a bare RuntimeError), so a failure while the
    disk has (almost) no space left is taken for a full disk too.
    """
    try:
        yield
    except EmbedtrainError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except Exception as err:
        full = is_disk_full(err) or _nearly_full(folder)
        shutil.rmtree(partial, ignore_errors=True)
        if not full:
            raise
        raise EmbedtrainError(
            f"{what}: the disk of {folder} is full (No space left on device); the partial write was removed; "
            "free some space or set output.dir on a larger disk, then resume with --resume auto"
        ) from None


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


# -- writing ----------------------------------------------------------------------------------


def save_checkpoint(accelerator, run_dir: str | os.PathLike, step: int, state: dict, extra_files: dict[str, str],
                    write_extra: Optional[Callable[[Path], None]] = None, needed_bytes: int = 0) -> Path:
    """Write checkpoint ``step`` atomically; every process must call this.

    ``extra_files`` maps file names to text written by the main process (e.g. the recipe);
    ``write_extra(path)`` is called on the main process to add other files (e.g. loss weights).
    ``needed_bytes`` is the estimated size (:func:`estimate_bytes`); the write is refused, before
    anything is touched, when the disk has less than ``SAFETY_FACTOR`` times that free. Every process
    raises the same :class:`EmbedtrainError` when one of them cannot write.
    """
    root = checkpoint_root(run_dir)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    problem = None
    if accelerator.is_main_process:
        problem = free_space_problem(root, int(needed_bytes * SAFETY_FACTOR)) if needed_bytes else None
        if problem is None:
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            except OSError as err:
                problem = _write_problem(err, root)
    raise_if_any(accelerator, problem)

    problem = None
    try:
        with cleaned_on_failure(tmp, f"checkpoint step-{step:07d}", root):
            accelerator.save_state(str(tmp), safe_serialization=True)
    except EmbedtrainError as err:
        problem = str(err)
    raise_if_any(accelerator, problem, cleanup=tmp)

    problem = None
    if accelerator.is_main_process:
        try:
            with cleaned_on_failure(tmp, f"checkpoint step-{step:07d}", root):
                if write_extra is not None:
                    write_extra(tmp)
                for name, text in extra_files.items():
                    (tmp / name).write_text(text, encoding="utf-8")
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
                _fsync_tree(tmp)
                _test_pause(step)
                (tmp / MARKER).write_text("ok\n", encoding="utf-8")
                _fsync_file(tmp / MARKER)
            replace_dir(tmp, final)
        except EmbedtrainError as err:
            problem = str(err)
    raise_if_any(accelerator, problem)
    return final


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename the completed ``tmp`` to ``final``. An existing ``final`` is moved aside first and deleted
    last, so no folder is ever half deleted under a checkpoint's name (a kill between the two renames
    leaves both under temporary names; the resume then takes the previous checkpoint)."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_problem(err: OSError, root: Path) -> str:
    if is_disk_full(err):
        return (f"checkpoint: the disk of {root} is full (No space left on device); free some space or set "
                "output.dir on a larger disk, then resume with --resume auto")
    return f"checkpoint: cannot write to {root} ({err.strerror or err}); check the folder's permissions"


def raise_if_any(accelerator, problem: Optional[str], cleanup: Optional[Path] = None) -> None:
    """Raise ``problem`` on every process when any process has one (no process is left waiting)."""
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        problems = [p for p in gather_object([problem]) if p]
        problem = problems[0] if problems else None
    if problem:
        if cleanup is not None and accelerator.is_main_process:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise EmbedtrainError(problem)


def _test_pause(step: int) -> None:
    value = os.environ.get(PAUSE_ENV, "").strip()
    if not value:
        return
    seconds, _, only = value.partition("@")
    if only and int(only) != step:
        return
    time.sleep(float(seconds))


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int, keep_step: Optional[int]) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints and the one of ``keep_step``,
    and any partial folder."""
    found = list_checkpoints(run_dir)
    # the newest keep_last (all of them while there are fewer)
    keep = {p for _, p in found[max(0, len(found) - keep_last) :]} if keep_last > 0 else set()
    for step, path in found:
        if path not in keep and step != keep_step:
            shutil.rmtree(path, ignore_errors=True)
    remove_incomplete(run_dir)


# -- small file-system helpers ----------------------------------------------------------------


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old or the new
    content, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


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
            _fsync_file(child)
    _fsync_dir(path)


# -- resume bookkeeping -----------------------------------------------------------------------


def last_good(run_dir: str | os.PathLike) -> str:
    """Words naming the newest complete checkpoint, for error messages that stop a run."""
    found = list_checkpoints(run_dir)
    if not found:
        return "no checkpoint was written"
    return f"the last good checkpoint {found[-1][1]} is kept"


def truncate_metrics(path: Path, step: int, lines: Optional[int]) -> int:
    """Drop metric lines written after the checkpoint we resume from; returns the lines kept.

    ``lines`` is the count the checkpoint recorded (None for checkpoints that predate it: then lines
    up to ``step`` are kept). A line cut short by a kill is dropped too.
    """
    if not path.is_file():
        return 0
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if lines is not None and len(kept) >= lines:
            break
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and (lines is not None or entry.get("step", 0) <= step):
            kept.append(line)
    atomic_write_text(path, "".join(l + "\n" for l in kept))
    return len(kept)


def recipe_changes(saved: Path, current: dict) -> list[str]:
    """Dotted keys whose values differ between a checkpoint's recipe and ``current`` (output.* aside)."""
    import yaml

    try:
        old = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(old, dict):
        return []
    a, b = flatten(old), flatten(current)
    return sorted(k for k in set(a) | set(b) if not k.startswith("output.") and a.get(k) != b.get(k))


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested mapping as ``{"a.b.c": value}`` (values other than numbers, strings and booleans as text)."""
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat
