"""Multimodal recipes (kind: clip | vlm2vec): strict loading, kind-specific checks, every shipped one loads."""

import pytest
import yaml

from embedtrain.config import ClipRecipe, Vlm2VecRecipe, load_recipe, recipe_from_dict, recipe_kind, role_columns
from embedtrain.errors import ConfigError

from conftest import REPO

CLIP_RECIPE = REPO / "recipes" / "clip" / "emoji_clip.yaml"


def clip_dict(tmp_path) -> dict:
    data = yaml.safe_load(CLIP_RECIPE.read_text())
    data["output"]["dir"] = str(tmp_path / "run")
    return data


def test_every_shipped_multimodal_recipe_loads():
    found = []
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if "accelerate" in path.parts or "merge" in path.parts or recipe_kind(data) not in ("clip", "vlm2vec"):
            continue
        assert path.read_text().splitlines()[0].startswith("# "), f"{path} must start with a comment giving its command"
        # GPU recipes name Hub models and data prepared by scripts (as is the emoji webdataset recipe's: its shards
        # come from scripts/make_webdataset.py): their files are checked when they run
        files = (REPO / "recipes" / "clip") in path.parents and "webdataset" not in path.stem
        recipe = load_recipe(path, check_files=files)
        assert isinstance(recipe, (ClipRecipe, Vlm2VecRecipe))
        found.append((path.name, recipe.kind))
    assert ("emoji_clip.yaml", "clip") in found and ("vlm2vec.yaml", "vlm2vec") in found


def test_clip_recipe_defaults_and_roles(tmp_path):
    r = recipe_from_dict(clip_dict(tmp_path))
    assert isinstance(r, ClipRecipe)
    assert r.loss.learnable_temperature is True and r.model.image_tower == "train"
    assert role_columns(r.data.train[0]) == {"query": ("name", None), "positive": (None, "image")}


def test_unknown_keys_and_kinds_suggest(tmp_path):
    data = clip_dict(tmp_path)
    data["model"]["image_towr"] = "frozen"
    data["data"]["bad_image"] = "skip"
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(data)
    text = "\n".join(err.value.problems)
    assert "model.image_towr: unknown key (did you mean 'image_tower'?)" in text
    assert "data.bad_image: unknown key (did you mean 'bad_images'?)" in text
    with pytest.raises(ConfigError, match="kind: 'clipp' is not a recipe kind \\(did you mean 'clip'\\?\\)"):
        recipe_from_dict({**data, "kind": "clipp"})


def test_clip_specific_problems_are_reported_together(tmp_path):
    data = clip_dict(tmp_path)
    data["model"]["image_tower"] = "frozen"
    data["model"]["text_tower"] = "frozen"
    data["model"]["architecture"]["patch_size"] = 7
    data["data"]["train"][0]["positive_text_column"] = "keywords"
    data["data"]["train"][0]["document_template"] = "{txt}"
    data["loss"]["name"] = "sigmoid"
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(data)
    text = "\n".join(err.value.problems)
    assert "model: both towers are frozen" in text
    assert "model.architecture.patch_size: 7 does not divide image_size 64" in text
    assert "a CLIP positive is a text or an image, not both" in text
    assert "data.train[0].document_template: unknown placeholder {txt} (did you mean 'text'?)" in text
    assert "loss.name: 'sigmoid' is not allowed (did you mean 'siglip'?); choose one of: infonce, siglip" in text


def test_vlm_template_needs_image_placeholder(tmp_path):
    data = {
        "kind": "vlm2vec",
        "model": {"name_or_path": "Qwen/Qwen2-VL-2B-Instruct"},
        "data": {"train": [{"path": str(REPO / "data/emoji/train.jsonl"), "query_image_column": "image",
                            "positive_text_column": "name", "query_template": "Instruct: x\nQuery: {text}"}]},
        "train": {"gradient_cache_query_chunk_size": 0},
        "output": {"dir": str(tmp_path / "run")},
    }
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(data)
    text = "\n".join(err.value.problems)
    assert "query_template: the query has an image but the template has no {image} placeholder" in text
    assert "train.gradient_cache_query_chunk_size: must be at least 1 or null, got 0" in text
    data["data"]["train"][0]["query_template"] = "{image}Instruct: x\nQuery: {text}"
    data["train"] = {}
    r = recipe_from_dict(data)
    assert isinstance(r, Vlm2VecRecipe) and r.loss.temperature == 0.02 and r.model.finetune == "lora"


def test_shared_train_section_and_what_multimodal_kinds_refuse(tmp_path):
    data = clip_dict(tmp_path)
    r = recipe_from_dict(data)
    assert r.model.lora.dropout == 0.05 and r.model.lora.target_modules == [] and r.model.lora.r == 16
    data["train"].update(compile=True, optimizer="sgd", gradient_cache_document_chunk_size=0)
    data["model"].update(image_tower="lora", lora={"r": 0})
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(data)
    text = "\n".join(err.value.problems)
    assert "train.compile: not supported for multimodal recipes yet" in text
    assert "optimizer" not in text  # the shared loop's SGD is available to every kind
    assert "train.gradient_cache_document_chunk_size: must be at least 1 or null, got 0" in text
    assert "model.lora.r: must be at least 1, got 0" in text and "target_modules" not in text


def test_vlm2vec_takes_the_gte_loss_and_hardness_weights(tmp_path):
    from embedtrain.losses import GTELoss, InfoNCELoss
    from embedtrain.train.tasks.multimodal import build_loss

    data = {
        "kind": "vlm2vec",
        "model": {"name_or_path": "Qwen/Qwen2-VL-2B-Instruct"},
        "data": {"train": [{"path": str(REPO / "data/emoji/train.jsonl"), "query_image_column": "image",
                            "positive_text_column": "name"}]},
        "loss": {"name": "gte", "hardness_weight": 2.0},
        "output": {"dir": str(tmp_path / "run")},
    }
    loss = build_loss(recipe_from_dict(data))
    assert isinstance(loss, GTELoss) and loss.hardness_weight == 2.0
    data["loss"] = {"name": "infonce", "hardness_weight": 1.5}
    loss = build_loss(recipe_from_dict(data))
    assert type(loss) is InfoNCELoss and loss.hardness_weight == 1.5
    data["loss"] = {"name": "gte", "symmetric": True, "hardness_weight": -1}
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(data)
    text = "\n".join(err.value.problems)
    assert "the gte loss holds the document→query term" in text and "loss.hardness_weight: must be 0 or more" in text


def test_streamed_image_text_datasets_are_checked(tmp_path):
    data = clip_dict(tmp_path)
    first = dict(data["data"]["train"][0])
    data["data"]["train"] = [{**first, "streaming": True, "max_rows": 10}, {**first, "name": "other"}]
    data["train"].pop("max_steps", None)
    data["train"]["epochs"] = 1
    data["data"]["stream_pool_batches"] = 0
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(data)
    problems = err.value.problems
    assert any(p.startswith("data.train[1].streaming: false while other datasets stream") for p in problems)
    assert "train.max_steps: a streaming dataset has no epochs to count; set train.max_steps" in problems
    assert any(p.startswith("data.train[0].max_rows: a stream is not cut by rows") for p in problems)
    assert "data.stream_pool_batches: must be at least 1, got 0" in problems
    data["data"]["train"] = [{**first, "streaming": True}]
    data["data"]["train"][0].pop("max_rows", None)
    data["data"]["stream_pool_batches"] = 4
    data["train"]["max_steps"] = 10
    r = recipe_from_dict(data)
    assert r.data.train[0].streaming and r.data.stream_pool_batches == 4
