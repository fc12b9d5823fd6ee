"""Weight averaging: the EMA update, the mean of checkpoints, and both as the final model of a real tiny run
(a resumed run with EMA ends exactly where an uninterrupted one does)."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from embedtrain.config import recipe_from_dict
from embedtrain.errors import ConfigError
from embedtrain.train.averaging import EMA_FILE, average_state_dicts, ema_update
from embedtrain.train.checkpoint import list_checkpoints
from embedtrain.train.loop import train

from conftest import tiny_recipe


def test_ema_update_is_the_formula():
    g = torch.Generator().manual_seed(0)
    shadow = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    params = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    expected = {k: 0.9 * shadow[k] + 0.1 * params[k] for k in shadow}
    ema_update(shadow, params, 0.9)
    for k in shadow:
        # 1e-6: one float32 multiply-add against another rounding of the same
        assert torch.allclose(shadow[k], expected[k], atol=1e-6), k


def test_average_of_state_dicts_is_their_mean():
    g = torch.Generator().manual_seed(1)
    states = [{"w": torch.randn(4, 4, generator=g), "b": torch.randn(4, generator=g)} for _ in range(3)]
    mean = average_state_dicts(states)
    for k in ("w", "b"):
        # 1e-6: float32 sums of three terms in another order
        assert torch.allclose(mean[k], (states[0][k] + states[1][k] + states[2][k]) / 3, atol=1e-6)
    assert states[0]["w"] is not mean["w"]  # inputs are not changed


def _run(recipe, resume=None):
    return train(recipe_from_dict(recipe), resume=resume, log=lambda *_: None)


def _checkpoint_weights(run_dir, step):
    path = dict(list_checkpoints(run_dir))[step]
    return load_file(str(path / "model.safetensors"))


def test_ema_final_model_is_the_average_of_every_steps_weights(tiny_bert, pairs_file, tmp_path, one_torch_thread):
    from embedtrain.models import load_text_encoder

    decay = 0.7
    plain = _run(tiny_recipe(tiny_bert, pairs_file, tmp_path / "plain", train={"save_every": 1, "keep_last": 10}))
    assert plain.steps == 6
    start = load_text_encoder(str(tiny_bert), max_length=32).state_dict()
    names = list(_checkpoint_weights(tmp_path / "plain", 1))
    shadow = {n: start[n].float().clone() for n in names}
    for step in range(1, 7):
        weights = _checkpoint_weights(tmp_path / "plain", step)
        shadow = {n: decay * shadow[n] + (1 - decay) * weights[n] for n in names}

    _run(tiny_recipe(tiny_bert, pairs_file, tmp_path / "ema", train={"ema_decay": decay}))
    final = _checkpoint_weights(tmp_path / "ema", 6)
    assert (dict(list_checkpoints(tmp_path / "ema"))[6] / EMA_FILE).is_file()
    # 1e-5: six float32 multiply-adds per element, in another order than this loop takes them
    assert max(float((final[n] - shadow[n]).abs().max()) for n in names) <= 1e-5
    # the average is not the last weights (seen: 8.7e-4 apart; 1e-4 is ten times the tolerance above)
    assert max(float((final[n] - _checkpoint_weights(tmp_path / "plain", 6)[n]).abs().max()) for n in names) > 1e-4
    import json
    assert "moving average" in json.loads((tmp_path / "ema" / "results.json").read_text())["final_weights"]


def test_resume_with_ema_is_exact(tiny_bert, pairs_file, tmp_path, one_torch_thread):
    common = dict(train={"save_every": 3, "keep_last": 5, "ema_decay": 0.8})
    full = _run(tiny_recipe(tiny_bert, pairs_file, tmp_path / "full", **common))
    interrupted = tmp_path / "interrupted"
    _run(tiny_recipe(tiny_bert, pairs_file, interrupted, **common))
    for later in ("model", "results.json"):
        target = interrupted / later
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    shutil.rmtree(interrupted / "checkpoints" / "step-0000006")
    resumed = _run(tiny_recipe(tiny_bert, pairs_file, interrupted, **common), resume="auto")
    a = load_file(str(full.model_dir / "model.safetensors"))
    b = load_file(str(resumed.model_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    # 1e-6: a resumed run repeats the same operations in the same order (the average included)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_final_model_is_the_mean_of_the_last_checkpoints(tiny_bert, pairs_file, tmp_path, one_torch_thread):
    plain = _run(tiny_recipe(tiny_bert, pairs_file, tmp_path / "plain", train={"save_every": 2, "keep_last": 5}))
    _run(tiny_recipe(tiny_bert, pairs_file, tmp_path / "avg",
                     train={"save_every": 2, "keep_last": 2, "average_last_checkpoints": 3}))
    raw = [_checkpoint_weights(tmp_path / "plain", s) for s in (2, 4, 6)]
    final = _checkpoint_weights(tmp_path / "avg", 6)
    for n in raw[0]:
        # 1e-6: float32 mean of three tensors
        assert torch.allclose(final[n], (raw[0][n] + raw[1][n] + raw[2][n]) / 3, atol=1e-6), n
    # the saved model folder holds the averaged weights too
    from embedtrain.models import load_text_encoder

    saved = load_text_encoder(str(tmp_path / "avg" / "model")).state_dict()
    name = "backbone.encoder.layer.1.output.dense.weight"
    assert torch.allclose(saved[name], final[name], atol=0)
    assert plain.steps == 6


@pytest.mark.parametrize("train_section, message", [
    ({"average_last_checkpoints": 3}, "set train.save_every"),
    ({"average_last_checkpoints": 4, "save_every": 2, "keep_last": 2}, "at least 3"),
    ({"average_last_checkpoints": 2, "save_every": 2, "ema_decay": 0.9}, "choose one final average"),
    ({"ema_decay": 1.0}, "train.ema_decay"),
    ({"layerwise_lr_decay": 0.0}, "train.layerwise_lr_decay"),
])
def test_bad_averaging_settings_are_refused(tiny_bert, pairs_file, tmp_path, train_section, message):
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict(tiny_recipe(tiny_bert, pairs_file, tmp_path / "x", train=train_section))
