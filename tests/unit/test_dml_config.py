"""Metric-learning recipes (kind: dml): strict loading, value checks, and every shipped DML recipe loads."""

import pytest

from embedtrain.config import DMLRecipe, TrainConfig, load_recipe, read_yaml, recipe_from_dict
from embedtrain.errors import ConfigError

from conftest import REPO

# the train defaults of metric-learning recipes before they shared the train section; shipped recipes
# and tests now write them out, so that their runs do not move
OLD_DML_TRAIN = {"lr": 1e-3, "weight_decay": 1e-4, "scheduler": "cosine", "warmup_ratio": 0.0, "epochs": 10,
                 "max_grad_norm": 10.0}


def minimal(tmp_path):
    (tmp_path / "backbone").mkdir()
    (tmp_path / "backbone" / "open_clip_config.json").write_text("{}")
    (tmp_path / "meta.jsonl").write_text("")
    return {"kind": "dml", "model": {"backbone": {"name_or_path": str(tmp_path / "backbone")}},
            "data": {"path": str(tmp_path / "meta.jsonl")}, "output": {"dir": str(tmp_path / "run")}}


def test_minimal_recipe_takes_the_defaults(tmp_path):
    r = recipe_from_dict(minimal(tmp_path))
    assert isinstance(r, DMLRecipe)
    assert (r.loss.name, r.loss.scale, r.loss.margin) == ("proxy_anchor", 32.0, 0.1)
    assert r.model.tuning.train_backbone == "frozen" and r.model.proxies.semantic is False
    assert type(r.train) is TrainConfig and r.train == TrainConfig()  # the section every kind shares
    assert r.eval.batch_size == 256 and r.eval.metric == "recall@1" and r.eval.before_training


def test_unknown_keys_and_bad_values_are_reported_together(tmp_path):
    data = minimal(tmp_path)
    data["model"]["tuning"] = {"prompt_dept": 2, "train_backbone": "partial"}
    data["data"].update(batch_size=30, samples_per_class=4)
    data["model"]["proxies"] = {"alpha": 1.5, "accumulate": "lstm", "lr": 0}
    data["loss"] = {"name": "proxy_anchr"}
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(data)
    text = "\n".join(err.value.problems)
    assert "model.tuning.prompt_dept: unknown key (did you mean 'prompt_depth'?)" in text
    assert "model.tuning.train_backbone: 'partial' is not allowed" in text
    assert "data.batch_size: must be a multiple of data.samples_per_class (4)" in text
    assert "model.proxies.alpha: must be in [0, 1], got 1.5" in text
    assert "model.proxies.accumulate: 'lstm' is not allowed" in text
    assert "model.proxies.lr: must be positive, got 0" in text
    assert "loss.name: 'proxy_anchr' is not allowed (did you mean 'proxy_anchor'?)" in text


def test_missing_backbone_folder_names_the_field(tmp_path):
    data = minimal(tmp_path)
    data["model"]["backbone"]["name_or_path"] = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"model\.backbone\.name_or_path: folder .*nowhere does not exist"):
        recipe_from_dict(data)
    assert recipe_from_dict(data, check_files=False).model.backbone.name_or_path.endswith("nowhere")
    data["model"]["backbone"]["name_or_path"] = ""
    with pytest.raises(ConfigError, match=r"^model\.backbone\.name_or_path: missing"):
        recipe_from_dict(data, check_files=False)


def test_eval_metric_must_be_measured(tmp_path):
    data = minimal(tmp_path)
    for metric in ("recall@8", "map@r"):
        data["eval"] = {"metric": metric}
        assert recipe_from_dict(data).eval.metric == metric
    data["eval"] = {"metric": "recall@16", "recall_at": [1, 2]}
    with pytest.raises(ConfigError, match=r"eval\.metric: 'recall@16' is not measured.*add 16 to eval\.recall_at"):
        recipe_from_dict(data)
    data["eval"] = {"metric": "ndcg@10"}
    with pytest.raises(ConfigError, match=r"eval\.metric: 'ndcg@10' is not measured; choose one of: recall@1, "):
        recipe_from_dict(data)


def test_every_shipped_dml_recipe_loads():
    recipes = [p for p in sorted((REPO / "recipes").rglob("*.yaml")) if "kind: dml\n" in p.read_text()]
    names = {p.relative_to(REPO).as_posix() for p in recipes}
    assert {"recipes/dml/vpt_proxies_emoji.yaml", "recipes/vit-b16/vpt_proxies_cub.yaml"} <= names
    for path in recipes:
        # the backbone (a trained CLIP tower, timm weights) and CUB-200 live elsewhere; the files are checked below
        recipe = load_recipe(path, check_files=False)
        assert isinstance(recipe, DMLRecipe)
        assert path.read_text().splitlines()[0].startswith(f"# embedtrain train {path.relative_to(REPO).as_posix()}")
        # every train value the recipe took from the metric-learning defaults is written out, unchanged
        written = read_yaml(path)["train"]
        assert set(OLD_DML_TRAIN) <= set(written), (path, set(OLD_DML_TRAIN) - set(written))
    emoji = load_recipe(REPO / "recipes/dml/vpt_proxies_emoji.yaml", check_files=False)
    assert (REPO / emoji.data.path).is_file() and emoji.data.label_column == "subgroup"
    cub = load_recipe(REPO / "recipes/vit-b16/vpt_proxies_cub.yaml", check_files=False)
    assert cub.model.backbone.kind == "timm" and cub.data.class_split == "sorted"
    # the resolved train sections, as they were before the shared train section
    common = {"momentum": 0.9, "scheduler": "cosine", "warmup_ratio": 0.0, "max_grad_norm": 10.0, "keep_last": 2,
              "max_consecutive_nonfinite": 5, "log_every": 50}
    expected = [
        (emoji, dict(common, lr=3e-3, optimizer="adamw", weight_decay=1e-4, max_steps=800, epochs=10,
                    mixed_precision="no", seed=42, eval_every=None, save_every=None, torch_threads=1)),
        (cub, dict(common, lr=1e-3, optimizer="sgd", weight_decay=1e-6, max_steps=None, epochs=60,
                  mixed_precision="bf16", seed=0, eval_every=500, save_every=2000, torch_threads=None)),
    ]
    for recipe, values in expected:
        assert {key: getattr(recipe.train, key) for key in values} == values


def test_a_rescore_term_is_refused_without_queries_and_documents(tmp_path):
    data = minimal(tmp_path)
    data["loss"] = {"compact": {"precisions": ["float32", "binary"], "rescore_weight": 0.5}}
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(data)
    assert any(p.startswith("loss.compact.rescore_weight: this kind's loss has no queries and documents")
               for p in err.value.problems)
