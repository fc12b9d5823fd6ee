"""Mixed precision on the CPU: bf16 autocast trains; fp16 autocast with a gradient scaler that backs off on an
overflow, skips that update (logged and counted) and carries on."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from embedtrain.config import recipe_from_dict
from embedtrain.train.loop import train

from conftest import tiny_recipe
from helpers_parity import scale_loss_at

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def _overflow_at(monkeypatch, steps: set[int]) -> None:
    """Make the loss so large at the given 1-based steps that its scaled gradients overflow float16."""
    scale_loss_at(monkeypatch, steps, 1e30)


def test_bf16_autocast_trains_with_a_finite_decreasing_loss(tiny_bert, pairs_file, tmp_path):
    recipe = tiny_recipe(tiny_bert, pairs_file, tmp_path / "run",
                         train={"max_steps": 16, "lr": 3e-3, "mixed_precision": "bf16", "log_every": 1})
    train(recipe_from_dict(recipe), log=lambda *_: None)
    losses = [m["loss"] for m in _metrics(tmp_path / "run")]
    assert len(losses) == 16 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) < sum(losses[:4]), losses
    engine = json.loads((tmp_path / "run" / "results.json").read_text())["engine"]
    assert engine["mixed_precision"] == "bf16"


def test_fp16_overflow_halves_the_scale_skips_the_step_and_training_goes_on(tiny_bert, pairs_file, tmp_path,
                                                                           monkeypatch):
    _overflow_at(monkeypatch, {3})
    out = tmp_path / "run"
    lines = []
    recipe = tiny_recipe(tiny_bert, pairs_file, out, train={"max_steps": 6, "mixed_precision": "fp16", "log_every": 1})
    result = train(recipe_from_dict(recipe), log=lines.append)
    assert result.steps == 6
    by_step = {m["step"]: m for m in _metrics(out)}
    assert by_step[3]["skipped_steps"] == 1 and by_step[3]["loss"] is None
    assert by_step[3]["loss_scale"] == by_step[2]["loss_scale"] / 2  # backed off on the overflow
    assert f"step 3: fp16 gradient overflow (the loss is finite); step skipped; fp16 loss scale lowered to " \
           f"{by_step[3]['loss_scale']:g}" in lines, lines
    assert all(by_step[s]["loss"] is not None for s in (4, 5, 6))  # it goes on
    results = json.loads((out / "results.json").read_text())
    assert results["skipped_steps"] == 1 and results["engine"]["mixed_precision"] == "fp16"
    assert all(bool(torch.isfinite(w).all()) for w in load_file(str(result.model_dir / "model.safetensors")).values())


def test_an_fp16_step_skipped_for_overflow_is_a_step_not_taken(tiny_bert, pairs_file, tmp_path, monkeypatch):
    """Four fp16 steps with an overflow at the last end with the weights of three (a constant schedule, so the
    learning rates agree): the skipped update changed neither the weights nor the optimizer state."""
    common = {"mixed_precision": "fp16", "scheduler": "constant", "warmup_ratio": 0.0, "lr": 1e-3}
    three = train(recipe_from_dict(tiny_recipe(tiny_bert, pairs_file, tmp_path / "three",
                                               train={**common, "max_steps": 3})), log=lambda *_: None)
    _overflow_at(monkeypatch, {4})
    four = train(recipe_from_dict(tiny_recipe(tiny_bert, pairs_file, tmp_path / "four",
                                              train={**common, "max_steps": 4})), log=lambda *_: None)
    a = load_file(str(three.model_dir / "model.safetensors"))
    b = load_file(str(four.model_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_overflows_back_off_past_the_limit_until_the_scale_reaches_1(tiny_bert, pairs_file, tmp_path,
                                                                         monkeypatch):
    """Overflows of the loss scale (a finite loss, gradients beyond float16) are not a diverging run: seven in a row
    back off the scale seven times with a limit of 3, and training goes on. Gradients that overflow float16 at every
    scale are counted once the scale is down to 1: from 65,536, 16 overflows reach it, and steps 17 to 19 stop the
    run."""
    from embedtrain.errors import EmbedtrainError

    common = {"mixed_precision": "fp16", "log_every": 1, "max_consecutive_nonfinite": 3}
    _overflow_at(monkeypatch, set(range(1, 8)))
    lines = []
    out = tmp_path / "backs_off"
    result = train(recipe_from_dict(tiny_recipe(tiny_bert, pairs_file, out, train={**common, "max_steps": 9})),
                   log=lines.append)
    assert result.steps == 9
    scales = {m["step"]: m["loss_scale"] for m in _metrics(out)}
    assert scales[7] == 65536 / 2 ** 7 and sum(l.startswith("step ") and "fp16 gradient overflow" in l
                                               for l in lines) == 7
    assert json.loads((out / "results.json").read_text())["skipped_steps"] == 7

    monkeypatch.undo()
    _overflow_at(monkeypatch, set(range(1, 40)))
    lines = []
    recipe = tiny_recipe(tiny_bert, pairs_file, tmp_path / "stops", train={**common, "max_steps": 30})
    with pytest.raises(EmbedtrainError, match=r"3 steps in a row had a non-finite loss or gradient \(steps 17-19\)"):
        train(recipe_from_dict(recipe), log=lines.append)
    assert "step 16: fp16 gradient overflow (the loss is finite); step skipped; fp16 loss scale lowered to 1" in lines
    assert "step 17: non-finite loss or gradient; step skipped (1 in a row, limit 3); fp16 loss scale lowered to 0.5" \
        in lines
