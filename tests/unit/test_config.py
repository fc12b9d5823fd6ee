from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from embedtrain.config import Recipe, apply_override, load_recipe, recipe_from_dict
from embedtrain.dml_config import is_dml_recipe
from embedtrain.errors import ConfigError, EmbedtrainError

from conftest import REPO, tiny_recipe


@pytest.fixture
def recipe_dict(tiny_bert, pairs_file, beir_dir, tmp_path):
    return tiny_recipe(tiny_bert, pairs_file, tmp_path / "run", beir_dir)


def test_valid_recipe_loads(recipe_dict):
    r = recipe_from_dict(recipe_dict)
    assert isinstance(r, Recipe)
    assert r.data.train[0].negative_columns == ["negative"]
    assert r.train.max_steps == 6
    assert r.loss.symmetric is False  # default from the dataclass


def test_unknown_key_suggests(recipe_dict):
    recipe_dict["train"]["learning_rate"] = 1e-4
    recipe_dict["trian"] = {}
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(recipe_dict)
    msgs = err.value.problems
    assert any(m.startswith("train.learning_rate: unknown key") for m in msgs)
    assert any("did you mean 'train'" in m for m in msgs)


def test_all_problems_reported_together(recipe_dict):
    recipe_dict["train"]["lr"] = "fast"
    recipe_dict["data"]["batch_size"] = 1
    recipe_dict["data"]["train"][0]["path"] = "nope/missing.jsonl"
    recipe_dict["model"]["pooling"] = "meen"
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(recipe_dict)
    text = "\n".join(err.value.problems)
    assert "train.lr: expected a number, got str 'fast'" in text
    assert "data.batch_size: must be at least 2" in text
    assert "data.train[0].path: file nope/missing.jsonl does not exist" in text
    assert "model.pooling: 'meen' is not allowed (did you mean 'mean'?)" in text


def test_wrong_type_names_dotted_path(recipe_dict):
    recipe_dict["data"]["train"][0]["negative_columns"] = "negative"
    with pytest.raises(ConfigError, match=r"data\.train\[0\]\.negative_columns: expected a list"):
        recipe_from_dict(recipe_dict)


def test_overrides(recipe_dict, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict))
    r = load_recipe(path, ["train.lr=1e-5", "output.dir=/tmp/x", "data.train.0.max_rows=10", "loss.symmetric=true"])
    assert r.train.lr == 1e-5 and r.output.dir == "/tmp/x" and r.data.train[0].max_rows == 10 and r.loss.symmetric
    with pytest.raises(ConfigError, match="train.lrr: unknown key"):
        load_recipe(path, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_recipe(path, ["train.lr"])
    # YAML 1.1 reads an unquoted `no` as false; the choice named "no" is still meant
    assert load_recipe(path, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.scheduler: False is not allowed"):
        load_recipe(path, ["train.scheduler=no"])


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name_or_path: [unclosed\n")
    with pytest.raises(EmbedtrainError, match=r"malformed YAML at line \d+"):
        load_recipe(path)
    with pytest.raises(EmbedtrainError, match="recipe file not found"):
        load_recipe(tmp_path / "none.yaml")


def test_every_shipped_recipe_loads():
    recipes = sorted((REPO / "recipes").rglob("*.yaml"))
    # accelerate launcher configs, merge and DML recipes have their own formats (DML: test_dml_config.py)
    recipes = [p for p in recipes if "accelerate" not in p.parts and "merge" not in p.parts and not is_dml_recipe(p)]
    # multimodal recipes (kind: clip | vlm2vec) are loaded by tests/unit/test_multimodal_config.py
    recipes = [p for p in recipes if "kind" not in (yaml.safe_load(p.read_text()) or {})]
    assert recipes
    for path in recipes:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# "), f"{path} must start with a comment giving its command"
        load_recipe(path)


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5))
trees = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=8), c, max_size=3)), max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["model", "data", "loss", "train", "eval", "output", "other"]), trees, max_size=4))
def test_loader_never_crashes(data):
    """Any YAML-shaped input either loads or raises ConfigError with dotted-path problems."""
    try:
        recipe_from_dict(data)
    except ConfigError as err:
        assert err.problems and all(":" in p for p in err.problems)


@settings(max_examples=100, deadline=None)
@given(st.floats(min_value=1e-8, max_value=1.0), st.integers(min_value=2, max_value=4096))
def test_override_roundtrip(lr, batch):
    data = {}
    apply_override(data, f"train.lr={lr!r}")
    apply_override(data, f"data.batch_size={batch}")
    recipe = recipe_from_dict(data, check_values=False)
    assert recipe.train.lr == lr and recipe.data.batch_size == batch
