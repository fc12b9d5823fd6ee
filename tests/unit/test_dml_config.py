"""DML recipes: strict loading, value checks, and every shipped DML recipe loads."""

import pytest

from embedtrain.dml_config import DMLRecipe, dml_recipe_from_dict, is_dml_recipe, load_dml_recipe
from embedtrain.errors import ConfigError

from conftest import REPO


def minimal(tmp_path):
    (tmp_path / "backbone").mkdir()
    (tmp_path / "backbone" / "open_clip_config.json").write_text("{}")
    (tmp_path / "meta.jsonl").write_text("")
    return {"backbone": {"name_or_path": str(tmp_path / "backbone")}, "data": {"path": str(tmp_path / "meta.jsonl")},
            "output": {"dir": str(tmp_path / "run")}}


def test_minimal_recipe_takes_the_defaults(tmp_path):
    r = dml_recipe_from_dict(minimal(tmp_path))
    assert isinstance(r, DMLRecipe)
    assert (r.loss.name, r.loss.scale, r.loss.margin) == ("proxy_anchor", 32.0, 0.1)
    assert r.tuning.train_backbone == "frozen" and r.proxies.semantic is False


def test_unknown_keys_and_bad_values_are_reported_together(tmp_path):
    data = minimal(tmp_path)
    data["tuning"] = {"prompt_dept": 2, "train_backbone": "partial"}
    data["data"].update(batch_size=30, samples_per_class=4)
    data["proxies"] = {"alpha": 1.5, "accumulate": "lstm"}
    data["loss"] = {"name": "proxy_anchr"}
    with pytest.raises(ConfigError) as err:
        dml_recipe_from_dict(data)
    text = "\n".join(err.value.problems)
    assert "tuning.prompt_dept: unknown key (did you mean 'prompt_depth'?)" in text
    assert "tuning.train_backbone: 'partial' is not allowed" in text
    assert "data.batch_size: must be a multiple of data.samples_per_class (4)" in text
    assert "proxies.alpha: must be in [0, 1], got 1.5" in text
    assert "proxies.accumulate: 'lstm' is not allowed" in text
    assert "loss.name: 'proxy_anchr' is not allowed (did you mean 'proxy_anchor'?)" in text


def test_missing_backbone_folder_names_the_field(tmp_path):
    data = minimal(tmp_path)
    data["backbone"]["name_or_path"] = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"backbone.name_or_path: folder .*nowhere does not exist"):
        dml_recipe_from_dict(data)
    assert dml_recipe_from_dict(data, check_files=False).backbone.name_or_path.endswith("nowhere")


def test_every_shipped_dml_recipe_loads():
    recipes = [p for p in sorted((REPO / "recipes").rglob("*.yaml")) if is_dml_recipe(p)]
    names = {p.relative_to(REPO).as_posix() for p in recipes}
    assert {"recipes/dml/vpt_proxies_emoji.yaml", "recipes/vit-b16/vpt_proxies_cub.yaml"} <= names
    for path in recipes:
        # the backbone (a trained CLIP tower, timm weights) and CUB-200 live elsewhere; the files are checked below
        recipe = load_dml_recipe(path, check_files=False)
        assert path.read_text().splitlines()[0].startswith(f"# embedtrain dml {path.relative_to(REPO).as_posix()}")
    emoji = load_dml_recipe(REPO / "recipes/dml/vpt_proxies_emoji.yaml", check_files=False)
    assert (REPO / emoji.data.path).is_file() and emoji.data.label_column == "subgroup"
    cub = load_dml_recipe(REPO / "recipes/vit-b16/vpt_proxies_cub.yaml", check_files=False)
    assert cub.backbone.kind == "timm" and cub.data.class_split == "sorted" and recipe is not None
