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
    # 1e-6: a resumed run repeats the same operations in the same order
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


def test_python_api_trains_a_recipe_path_with_overrides_and_callbacks(tiny_bert, pairs_file, beir_dir, tmp_path):
    import embedtrain
    from embedtrain.train.loop import Callback

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_bert, pairs_file, tmp_path / "unused", beir_dir)))
    seen: dict[str, list] = {}

    class Record(Callback):
        def __getattribute__(self, name):
            if name.startswith("on_"):
                return lambda trainer, *args: seen.setdefault(name, []).append(args)
            return super().__getattribute__(name)

    out = tmp_path / "run"
    result = embedtrain.train(path, [f"output.dir={out}", "train.max_steps=4", "train.save_every=2"],
                              callbacks=[Record()], log=lambda *_: None)
    assert result.steps == 4 and result.model_dir == out / "model"
    assert len(seen["on_train_begin"]) == 1 and len(seen["on_train_end"]) == 1
    assert len(seen["on_step_begin"]) == len(seen["on_step_end"]) == 4 == len(seen["on_log"])
    assert [args[0]["step"] for args in seen["on_step_end"]] == [1, 2, 3, 4]
    assert all("input_ids" in args[0]["query"] for args in seen["on_step_begin"])  # the batch, on its device
    assert [p.name for (p,) in seen["on_save"]] == ["step-0000002", "step-0000004"]
    assert len(seen["on_evaluate"]) == 2  # before training and at the end
    # the saved model comes back through embedtrain.load, whatever its kind, with the same embeddings
    encoder = embedtrain.load(result.model_dir)
    texts = ["how do plants make food", "light and water"]
    from embedtrain.models import load_text_encoder

    direct = load_text_encoder(str(result.model_dir))
    assert torch.allclose(encoder.encode(texts), direct.encode(texts), atol=1e-6)


def test_corrupt_recipe_given_to_the_python_api_is_one_error(tmp_path):
    import embedtrain
    from embedtrain.errors import EmbedtrainError

    path = tmp_path / "recipe.yaml"
    path.write_text("train: {lr: -1}\n")
    with pytest.raises(EmbedtrainError, match="train.lr: must be positive"):
        embedtrain.train(path)


def test_the_engine_is_recorded_in_metrics_results_and_card(tiny_bert, pairs_file, tmp_path):
    result = train(recipe_from_dict(tiny_recipe(tiny_bert, pairs_file, tmp_path / "run")), log=lambda *_: None)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    engine = {"distributed_type": "NO", "processes": 1, "device": "cpu", "sharding": None, "mixed_precision": "no",
              "launcher_mixed_precision": None}
    assert first == {"step": 0, "engine": engine}
    assert json.loads((tmp_path / "run" / "results.json").read_text())["engine"] == engine
    assert "NO, 1 process, cpu, mixed precision no" in (result.model_dir / "README.md").read_text()


def test_an_engine_that_cannot_be_had_is_one_line(tiny_bert, pairs_file, tmp_path, monkeypatch, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_bert, pairs_file, tmp_path / "run")))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what accelerate launch sets for a DeepSpeed config
    assert main(["train", str(path)]) == 2
    assert capsys.readouterr().err.strip() == ("error: accelerate config: DeepSpeed needs GPUs (this machine has none); "
                                               "use recipes/accelerate/fsdp_cpu.yaml or multi_cpu.yaml here, or run on GPUs")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert main(["train", str(path)]) == 2
    assert "FSDP shards a model across processes, but this run has one process on CPU" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
