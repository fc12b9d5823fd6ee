"""Checkpoint files on a small torch model: atomic writes, partial folders, disk space, safe loading."""

import errno
import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from embedtrain.config import ModelConfig
from embedtrain.errors import EmbedtrainError
from embedtrain.train import checkpoint as ckpt

from conftest import REPO

DiskUsage = namedtuple("DiskUsage", "total used free")


@pytest.fixture
def trained():
    """An Accelerator with a prepared linear model, AdamW (one step taken) and a scheduler."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(16, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return accelerator, model, optimizer


def _save(accelerator, run, step, **kw):
    return ckpt.save_checkpoint(accelerator, run, step, {"step": step}, {"recipe.yaml": "a: 1\n"}, **kw)


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_checkpoint_is_complete_and_weights_are_safetensors(trained, tmp_path):
    accelerator, model, optimizer = trained
    path = _save(accelerator, tmp_path, 2)
    assert path == tmp_path / "checkpoints" / "step-0000002"
    names = {p.name for p in path.iterdir()}
    assert {"COMPLETE", "trainer_state.json", "recipe.yaml", "model.safetensors", "optimizer.bin"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) and "model" in n for n in names)  # weights only as safetensors
    assert ckpt.list_checkpoints(tmp_path) == [(2, path)]
    assert ckpt.incomplete_checkpoints(tmp_path) == []
    assert ckpt.read_state(path) == {"step": 2}


def test_a_write_cut_short_is_never_taken_for_a_checkpoint(trained, tmp_path, monkeypatch):
    accelerator, _, _ = trained
    good = _save(accelerator, tmp_path, 2)

    def killed(path):  # the process dies after the files and before the marker
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "_fsync_tree", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(accelerator, tmp_path, 4)
    partial = tmp_path / "checkpoints" / ".tmp-step-0000004"
    assert (partial / "trainer_state.json").is_file() and not (partial / "COMPLETE").exists()
    assert ckpt.list_checkpoints(tmp_path) == [(2, good)]
    assert ckpt.resolve_resume(tmp_path, "auto") == good
    assert ckpt.incomplete_checkpoints(tmp_path) == [partial]
    with pytest.raises(EmbedtrainError, match="is incomplete"):
        ckpt.resolve_resume(tmp_path, str(partial))
    assert ckpt.remove_incomplete(tmp_path) == [partial]
    assert not partial.exists() and good.is_dir()


def test_rewriting_a_step_replaces_it_whole(trained, tmp_path):
    accelerator, _, _ = trained
    _save(accelerator, tmp_path, 2)
    ckpt.save_checkpoint(accelerator, tmp_path, 2, {"step": 2, "again": True}, {})
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-0000002"]
    assert ckpt.read_state(root / "step-0000002") == {"step": 2, "again": True}
    # a replacement interrupted after moving the old folder aside leaves a leftover that is cleaned
    (root / ".old-step-0000002").mkdir()
    (root / ".old-step-0000002" / "COMPLETE").write_text("ok\n")
    assert ckpt.incomplete_checkpoints(tmp_path) == [root / ".old-step-0000002"]


def test_not_enough_free_space_is_refused_before_anything_is_touched(trained, tmp_path, monkeypatch):
    accelerator, model, optimizer = trained
    first = _save(accelerator, tmp_path, 2)
    before = _snapshot(tmp_path / "checkpoints")
    needed = ckpt.estimate_bytes([model], [optimizer])
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: DiskUsage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(EmbedtrainError) as err:
        _save(accelerator, tmp_path, 4, needed_bytes=needed)
    message = str(err.value)
    assert "\n" not in message
    assert f"not enough free disk space in {tmp_path / 'checkpoints'}" in message
    assert f"({int(needed * ckpt.SAFETY_FACTOR)} bytes) needed" in message and "(1000 bytes) free" in message
    monkeypatch.setattr(shutil, "disk_usage", real)
    assert _snapshot(tmp_path / "checkpoints") == before  # nothing new, nothing removed
    assert ckpt.list_checkpoints(tmp_path) == [(2, first)]


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    Exception("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),  # torch.save, disk full
])
def test_disk_full_during_the_write_removes_the_partial_folder(trained, tmp_path, monkeypatch, error):
    accelerator, _, _ = trained
    first = _save(accelerator, tmp_path, 2)
    before = _snapshot(tmp_path / "checkpoints")

    def fails_half_way(output_dir, **kw):
        (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 100)
        raise error

    monkeypatch.setattr(accelerator, "save_state", fails_half_way)
    if isinstance(error, RuntimeError):  # torch.save hides the errno; the disk is seen to be full
        monkeypatch.setattr(shutil, "disk_usage", lambda p: DiskUsage(10**9, 10**9, 0))
    with pytest.raises(EmbedtrainError) as err:
        _save(accelerator, tmp_path, 4)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("checkpoint step-0000004: the disk of")
    assert "is full (No space left on device); the partial write was removed" in str(err.value)
    monkeypatch.undo()
    assert _snapshot(tmp_path / "checkpoints") == before
    assert ckpt.list_checkpoints(tmp_path) == [(2, first)]


def test_disk_full_while_writing_the_state_file(trained, tmp_path, monkeypatch):
    accelerator, _, _ = trained

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(EmbedtrainError, match="is full"):
        ckpt.save_checkpoint(accelerator, tmp_path, 2, {"step": 2}, {}, write_extra=full)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_other_write_errors_keep_their_traceback(trained, tmp_path, monkeypatch):
    accelerator, _, _ = trained

    def bug(output_dir, **kw):
        raise RuntimeError("a bug, not a full disk")

    monkeypatch.setattr(accelerator, "save_state", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        _save(accelerator, tmp_path, 2)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_size_estimate_counts_parameters_and_optimizer_state(trained):
    accelerator, model, optimizer = trained
    params = sum(p.numel() * 4 for p in model.parameters())
    after_step = ckpt.estimate_bytes([model], [optimizer])
    assert 3 * params <= after_step <= 3 * params + 64  # weights, two moments, step counters
    fresh = torch.optim.AdamW(model.parameters())
    assert ckpt.estimate_bytes([model], [fresh]) == 3 * params  # moments not allocated yet: assumed


def test_prune_keeps_newest_and_best_and_drops_partials(trained, tmp_path):
    accelerator, _, _ = trained
    for step in (1, 2, 3, 4):
        _save(accelerator, tmp_path, step)
    (tmp_path / "checkpoints" / ".tmp-step-0000005").mkdir()
    ckpt.prune_checkpoints(tmp_path, keep_last=2, keep_step=1)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 3, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-0000001", "step-0000003", "step-0000004"]


def test_resume_path_must_be_a_checkpoint(tmp_path):
    assert ckpt.resolve_resume(tmp_path / "none", "auto") is None
    with pytest.raises(EmbedtrainError, match="is not a checkpoint folder"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "missing"))


class _Payload:
    """Unpickling this would create a file: code execution through a pickle."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_loading_refuses_pickled_code(trained, tmp_path):
    accelerator, _, _ = trained
    path = _save(accelerator, tmp_path, 2)
    sentinel = tmp_path / "code-ran"
    torch.save({"state": {}, "param_groups": [], "x": _Payload(sentinel)}, path / "optimizer.bin")
    with pytest.raises(EmbedtrainError) as err:
        ckpt.load_checkpoint(accelerator, path)
    assert not sentinel.exists()
    assert "\n" not in str(err.value) and f"checkpoint {path} cannot be loaded (UnpicklingError" in str(err.value)


def test_damaged_checkpoint_is_one_line(trained, tmp_path):
    accelerator, _, _ = trained
    path = _save(accelerator, tmp_path, 2)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EmbedtrainError, match=r"cannot be loaded .*resume from an older checkpoint"):
        ckpt.load_checkpoint(accelerator, path)


def test_atomic_write_text_replaces_whole(tmp_path):
    target = tmp_path / "results.json"
    ckpt.atomic_write_text(target, json.dumps({"a": 1}))
    ckpt.atomic_write_text(target, json.dumps({"a": 2}))
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_test_pause_hook(monkeypatch):
    slept = []
    monkeypatch.setattr(ckpt.time, "sleep", slept.append)
    monkeypatch.setenv(ckpt.PAUSE_ENV, "1.5@4")
    ckpt._test_pause(2)
    ckpt._test_pause(4)
    monkeypatch.setenv(ckpt.PAUSE_ENV, "0.25")
    ckpt._test_pause(7)
    monkeypatch.delenv(ckpt.PAUSE_ENV)
    ckpt._test_pause(8)
    assert slept == [1.5, 0.25]


def _unsafe_uses(tree) -> list[tuple[int, str]]:
    import ast

    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                if name.split(".")[0] in {"pickle", "dill", "cloudpickle", "joblib"}:
                    found.append((node.lineno, f"import {name}"))
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and \
                        isinstance(value, ast.Constant) and value.value is True:
                    found.append((node.lineno, "trust_remote_code=True"))
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "load" and getattr(func.value, "id", None) == "torch":
                found.append((node.lineno, "torch.load"))
            for kw in node.keywords:
                if isinstance(kw.value, ast.Constant) and (kw.arg, kw.value.value) in {
                        ("weights_only", False), ("trust_remote_code", True)}:
                    found.append((node.lineno, f"{kw.arg}={kw.value.value}"))
    return found


def test_unsafe_use_finder_finds_them():
    import ast

    code = "import pickle\nimport torch\ntorch.load(f, weights_only=False)\nAutoModel.from_pretrained(p, trust_remote_code=True)\n"
    code += "kw = {'trust_remote_code': True}\n"
    assert sorted(what for _, what in _unsafe_uses(ast.parse(code))) == sorted([
        "import pickle", "torch.load", "weights_only=False", "trust_remote_code=True", "trust_remote_code=True"])


def test_source_loads_nothing_through_pickle():
    """Weights load through safetensors: no code of the package calls torch.load or pickle itself, and
    no model repository's code runs unless a recipe sets model.trust_remote_code."""
    import ast

    hits = []
    for path in sorted((REPO / "embedtrain").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        hits += [f"{path.relative_to(REPO)}:{line}: {what}" for line, what in _unsafe_uses(tree)]
    assert hits == []
    assert ModelConfig().trust_remote_code is False


def test_prune_keeps_every_checkpoint_while_there_are_fewer_than_keep_last(trained, tmp_path):
    accelerator, _, _ = trained
    for step in (2, 4):
        _save(accelerator, tmp_path, step)
    ckpt.prune_checkpoints(tmp_path, keep_last=3, keep_step=None)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4]
