"""`embedtrain merge` end to end on tiny models: merged folders, report, user errors; and the experiment script."""

import importlib.util
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from embedtrain.merge import linear_merge
from embedtrain.models import load_text_encoder
from embedtrain.train.merge_run import main

from conftest import REPO, tiny_recipe, write_beir, write_pairs

METHODS = [
    {"name": "linear"},
    {"name": "task_arithmetic", "params": {"weights": [0.5, 0.8]}},
    {"name": "ties", "params": {"density": 0.5}},
    {"name": "dare", "params": {"drop_rate": 0.3, "seed": 1}},
    {"name": "slerp", "params": {"t": 0.4}},
    {"name": "self_positioning"},
    {"name": "self_positioning", "label": "sp_fixed", "params": {"alphas": [0.3, 0.7], "lam": 0.9}},
]


# tiny tensors: a second intra-op thread only adds synchronisation (and stalls on a busy machine)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tiny_bert, tmp_path_factory):
    """Two "task models" (the tiny BERT perturbed two ways, saved as sentence-transformers folders) and data."""
    tmp = tmp_path_factory.mktemp("merge-world")
    models = []
    for seed in (1, 2):
        encoder = load_text_encoder(str(tiny_bert), max_length=32)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in encoder.backbone.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        encoder.save(tmp / f"task{seed}" / "model")
        models.append(tmp / f"task{seed}" / "model")
    probe = [write_pairs(tmp / "probe_a.jsonl", 48, seed=5), write_pairs(tmp / "probe_b.jsonl", 48, seed=6, negatives=False)]
    tasks = [write_beir(tmp / "beir_a" / "eval", seed=3), write_beir(tmp / "beir_b" / "eval", seed=4)]
    return {"tmp": tmp, "base": tiny_bert, "models": models, "probe": probe, "tasks": tasks}


def merge_recipe(world, out, methods=METHODS) -> dict:
    return {
        "base": {"name_or_path": str(world["base"]), "max_length": 32},
        "models": [{"path": str(world["models"][0]), "name": "a"}, {"path": str(world["models"][1]), "name": "b"}],
        "methods": methods,
        "probe": {"datasets": [{"path": str(world["probe"][0]), "name": "pa", "negative_columns": ["negative"]},
                               {"path": str(world["probe"][1]), "name": "pb"}], "batch_size": 8},
        "search": {"steps": 4, "log_every": 2},
        "eval": {"tasks": [{"path": str(world["tasks"][0]), "name": "ta"}, {"path": str(world["tasks"][1]), "name": "tb"}]},
        "output": {"dir": str(out)},
    }


def write(path, recipe: dict):
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return str(path)


def test_merge_writes_loadable_models_and_report(world, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "merge"
    assert main([write(tmp_path / "m.yaml", merge_recipe(world, out))]) == 0
    printed = capsys.readouterr().out
    assert "| model | kind | ta | tb | mean |" in printed

    report = json.loads((out / "report.json").read_text())
    labels = ["linear", "task_arithmetic", "ties", "dare", "slerp", "self_positioning", "sp_fixed"]
    assert [m["name"] for m in report["models"]] == ["base", "a", "b"] + labels
    assert [m["kind"] for m in report["models"]] == ["base", "task", "task"] + ["merge"] * 7
    for row in report["models"]:
        assert set(row["scores"]) == {"ta", "tb"}
        assert 0 <= row["mean"]["ndcg@10"] <= 1
        assert abs(row["mean"]["ndcg@10"] - (row["scores"]["ta"]["ndcg@10"] + row["scores"]["tb"]["ndcg@10"]) / 2) < 1e-9
    sp = report["self_positioning"]["self_positioning"]
    assert set(sp["alphas"]) == {"a", "b"} and abs(sum(sp["alphas"].values()) - 1) < 1e-6 and sp["lambda"] >= 0
    assert len(sp["history"]) == 4 and sp["probe_rows"] == 96
    assert report["self_positioning"]["sp_fixed"]["alphas"] == {"a": 0.3, "b": 0.7}
    markdown = (out / "report.md").read_text()
    assert "| sp_fixed | merge (self_positioning) |" in markdown and "Self Positioning coefficients" in markdown
    assert yaml.safe_load((out / "merge_recipe.yaml").read_text())["search"]["steps"] == 4

    # every merged folder loads with sentence-transformers and embeds like embedtrain does
    texts = ["small red tree", "computer network data"]
    for label in labels:
        folder = out / "models" / label
        ours = load_text_encoder(str(folder)).encode(texts)
        theirs = SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True)
        assert torch.allclose(ours, theirs, atol=1e-5), label
    # the saved weights are the pure function's result
    base = load_text_encoder(str(world["base"])).backbone.state_dict()
    tasks = [load_text_encoder(str(m)).backbone.state_dict() for m in world["models"]]
    expected = linear_merge(base, tasks)
    saved = load_file(str(out / "models" / "linear" / "model.safetensors"))
    for key, value in expected.items():
        if key in saved:
            assert torch.allclose(saved[key], value, atol=1e-6), key


def test_existing_output_refused_without_overwrite(world, tmp_path, capsys):
    out = tmp_path / "merge"
    out.mkdir()
    (out / "something").write_text("x")
    assert main([write(tmp_path / "m.yaml", merge_recipe(world, out))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]
    assert (out / "something").is_file()


def test_bad_recipes_exit_2_with_one_line_per_problem(world, tmp_path, capsys):
    recipe = merge_recipe(world, tmp_path / "out")
    recipe["methods"] = [{"name": "tie"}, {"name": "linear", "params": {"density": 0.5}}, {"name": "slerp", "params": {"t": 2}}]
    recipe["search"]["stpes"] = 3
    recipe["models"][1]["path"] = str(tmp_path / "nowhere")
    assert main([write(tmp_path / "bad.yaml", recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("error: ") for line in err)
    text = "\n".join(err)
    assert "methods[0].name: 'tie' is not a merge method (did you mean 'ties'?)" in text
    assert "methods[1].params.density: not used by linear (it takes: weights)" in text
    assert "methods[2].params.t: must be in [0, 1], got 2" in text
    assert "search.stpes: unknown key (did you mean 'steps'?)" in text
    assert "models[1].path: folder" in text and "does not exist" in text
    assert not (tmp_path / "out").exists()

    # a probe set smaller than one batch: refused before anything is written
    recipe = merge_recipe(world, tmp_path / "out3", methods=[{"name": "self_positioning"}])
    recipe["probe"]["batch_size"] = 64
    assert main([write(tmp_path / "probe.yaml", recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "probe: dataset pa has 48 rows, fewer than one batch (64)" in err[0]
    assert not (tmp_path / "out3").exists()

    # a model of another architecture: found after loading, reported on one line naming the key
    from transformers import BertConfig, BertModel, BertTokenizer

    other = tmp_path / "other"
    config = BertConfig.from_pretrained(str(world["base"]))
    config.intermediate_size = 16
    BertModel(config).save_pretrained(other)
    BertTokenizer.from_pretrained(str(world["base"])).save_pretrained(other)
    recipe = merge_recipe(world, tmp_path / "out2", methods=[{"name": "linear"}])
    recipe["models"][1] = {"path": str(other), "name": "other"}
    assert main([write(tmp_path / "arch.yaml", recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: models to merge must share an architecture: key 'encoder.layer.0.intermediate.dense.weight' "
                             "has shape (16, 32) in model 'other' but (37, 32) in the base")


def test_experiment_script_trains_then_merges(tiny_bert, world, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("merge_experiment", REPO / "scripts" / "merge_experiment.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    data_a, data_b = write_pairs(tmp_path / "a.jsonl", 64, seed=1), write_pairs(tmp_path / "b.jsonl", 64, seed=2)
    train_paths = []
    for name, data in (("a", data_a), ("b", data_b)):
        recipe = tiny_recipe(tiny_bert, data, tmp_path / f"run_{name}", world["tasks"][0], train={"max_steps": 3})
        train_paths.append(write(tmp_path / f"train_{name}.yaml", recipe))
    recipe = merge_recipe(world, tmp_path / "unused", methods=[{"name": "linear"}, {"name": "self_positioning"}])
    recipe["models"] = [{"path": str(tmp_path / "run_a" / "model"), "name": "a"},
                        {"path": str(tmp_path / "run_b" / "model"), "name": "b"}]
    merge_path = write(tmp_path / "merge.yaml", recipe)
    args = ["--train-recipes", *train_paths, "--merge-recipe", merge_path, "--output", str(tmp_path / "exp"),
            "--set", "search.steps=2"]

    assert script.main(args) == 0
    results = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert [t["trained_now"] for t in results["task_models"]] == [True, True]
    assert results["task_models"][0]["steps"] == 3
    assert [m["name"] for m in results["merge"]["models"]] == ["base", "a", "b", "linear", "self_positioning"]
    assert "## Task models" in (tmp_path / "exp" / "results.md").read_text()
    assert (tmp_path / "exp" / "merge" / "models" / "self_positioning" / "modules.json").is_file()
    assert "self_positioning: alphas a" in capsys.readouterr().out

    # again: the task models are reused, the merge folder is only replaced with --overwrite
    assert script.main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert script.main(args + ["--overwrite"]) == 0
    results = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert [t["trained_now"] for t in results["task_models"]] == [False, False]


def test_shipped_merge_recipes_load():
    from embedtrain.errors import ConfigError
    from embedtrain.config import load_merge_recipe
    from embedtrain.train.merge_run import merge_methods

    paths = sorted((REPO / "recipes" / "merge").glob("*.yaml"))
    assert paths
    for path in paths:
        assert path.read_text().startswith("# embedtrain merge recipes/merge/"), path
        recipe = load_merge_recipe(path, check_files=False, methods=merge_methods())
        assert recipe.models and recipe.methods
        try:  # with the files checked, only task models that are not trained yet may be missing
            load_merge_recipe(path, methods=merge_methods())
        except ConfigError as err:
            assert all(p.startswith("models[") and "does not exist" in p for p in err.problems), err.problems
