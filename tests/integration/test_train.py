"""Short real trainings of a tiny BERT: learning, saving, exact resume, and bad input through the CLI."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from embedtrain.cli import main
from embedtrain.config import recipe_from_dict
from embedtrain.train.loop import train

from conftest import REPO, tiny_recipe, write_pairs


def run(recipe: dict, resume=None):
    return train(recipe_from_dict(recipe), resume=resume, log=lambda *_: None)


def weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


def test_loss_decreases_and_model_reloads(tiny_bert, pairs_file, beir_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    from embedtrain.models import load_text_encoder

    recipe = tiny_recipe(tiny_bert, pairs_file, tmp_path / "run", beir_dir,
                         train={"max_steps": 30, "lr": 3e-3, "log_every": 5})
    result = run(recipe)
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [l["loss"] for l in lines if "loss" in l]
    assert losses[-1] < 0.7 * losses[0], losses
    assert result.baseline and result.final
    assert (tmp_path / "run" / "recipe.yaml").is_file()
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved["train"]["max_steps"] == 30 and saved["loss"]["symmetric"] is False
    texts = ["small red tree", "computer network data"]
    ours = load_text_encoder(str(result.model_dir)).encode(texts)
    theirs = SentenceTransformer(str(result.model_dir), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("chunk", [None, 3])
def test_resume_after_interruption_gives_identical_weights(tiny_bert, pairs_file, tmp_path, chunk):
    common = dict(train={"max_steps": 6, "save_every": 3, "keep_last": 5, "gradient_cache_chunk_size": chunk})
    full = run(tiny_recipe(tiny_bert, pairs_file, tmp_path / "full", **common))

    # the same run, killed right after step 3's checkpoint: everything after it is gone
    interrupted = tmp_path / "interrupted"
    run(tiny_recipe(tiny_bert, pairs_file, interrupted, **common))
    for later in ("model", "results.json"):
        shutil.rmtree(interrupted / later, ignore_errors=True) if (interrupted / later).is_dir() else (interrupted / later).unlink()
    shutil.rmtree(interrupted / "checkpoints" / "step-0000006")
    # a checkpoint that was being written when the process died must be ignored
    (interrupted / "checkpoints" / ".tmp-step-0000006").mkdir()

    resumed = run(tiny_recipe(tiny_bert, pairs_file, interrupted, **common), resume="auto")
    assert resumed.steps == 6
    a, b = weights(full.model_dir), weights(resumed.model_dir)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    steps = [json.loads(l)["step"] for l in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6


def _cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def _write(tmp_path, recipe):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.parametrize("case", ["unknown_key", "wrong_type", "missing_file", "missing_column", "empty_text",
                                  "too_few_rows", "output_exists"])
def test_bad_input_is_one_line_exit_2_and_no_output(case, tiny_bert, pairs_file, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = tiny_recipe(tiny_bert, pairs_file, out)
    expect = {
        "unknown_key": "train.learning_rate: unknown key (did you mean 'lr'?)",
        "wrong_type": "data.batch_size: expected an integer, got str 'big'",
        "missing_file": "data.train[0].path: file",
        "missing_column": "data.train[0].positive_column: missing 'pos'",
        "empty_text": "row 3: column 'anchor' is empty",
        "too_few_rows": "has 5 rows, fewer than one batch",
        "output_exists": "already exists and is not empty",
    }[case]
    if case == "unknown_key":
        recipe["train"]["learning_rate"] = 0.1
    elif case == "wrong_type":
        recipe["data"]["batch_size"] = "big"
    elif case == "missing_file":
        recipe["data"]["train"][0]["path"] = str(tmp_path / "nope.jsonl")
    elif case == "missing_column":
        recipe["data"]["train"][0]["positive_column"] = "pos"
    elif case == "empty_text":
        bad = tmp_path / "empty.jsonl"
        rows = [json.dumps({"anchor": "a b", "positive": "c", "negative": "d"})] * 2
        rows.append(json.dumps({"anchor": "  ", "positive": "c", "negative": "d"}))
        bad.write_text("\n".join(rows) + "\n")
        recipe["data"]["train"][0]["path"] = str(bad)
    elif case == "too_few_rows":
        recipe["data"]["train"][0]["path"] = str(write_pairs(tmp_path / "five.jsonl", rows=5))
    elif case == "output_exists":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    code, err = _cli(["train", _write(tmp_path, recipe)], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    if case == "output_exists":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    else:
        assert not out.exists()


def test_cli_subprocess_exit_status_and_no_traceback(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name_or_path: x}\ntrain: {lrr: 1}\n")
    proc = subprocess.run([sys.executable, "-m", "embedtrain", "train", str(path)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "train.lrr: unknown key (did you mean 'lr'?)" in proc.stderr
