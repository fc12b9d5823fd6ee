"""Recipe checks of the NV-Embed settings (decoder-only fields, LoRA, instructions, labelled data, stages)."""

import pytest

from embedtrain.config import recipe_from_dict
from embedtrain.errors import ConfigError

from conftest import REPO, tiny_recipe

DECODER = str(REPO / "data/tiny_decoders/mistral")


@pytest.fixture
def recipe(pairs_file, tmp_path):
    r = tiny_recipe(DECODER, pairs_file, tmp_path / "run")
    r["model"].update(bidirectional=True, pooling="latent_attention", lora={"r": 4}, instruction_masking=True)
    r["data"]["train"][0]["instruction"] = "Retrieve the matching words"
    return r


def _problems(r) -> str:
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(r)
    return "\n".join(err.value.problems)


def test_nv_embed_recipe_loads_with_defaults_from_the_dataclasses(recipe):
    r = recipe_from_dict(recipe)
    assert r.model.lora.alpha == 32 and r.model.lora.dropout == 0.1 and "down_proj" in r.model.lora.target_modules
    assert r.model.latent_attention.num_latents == 512 and r.model.latent_attention.num_heads == 8


def test_decoder_settings_need_a_decoder(recipe):
    recipe["model"]["bidirectional"] = False
    recipe["model"]["dtype"] = "bfloat16"
    text = _problems(recipe)
    assert "model.pooling: pooling 'latent_attention' needs a decoder LLM; set model.bidirectional: true" in text
    assert "model.lora" not in text  # any text encoder takes LoRA
    assert "model.instruction_masking: instruction masking needs a decoder LLM" in text
    assert "model.dtype" not in text  # LoRA freezes the weights: they may load in bfloat16
    del recipe["model"]["lora"]
    assert "model.dtype: an encoder's weights load in another precision only under model.lora" in _problems(recipe)


def test_bad_values_are_reported_together(recipe, tmp_path):
    recipe["model"]["lora"] = {"r": 0, "alpha": -1, "dropout": 1.5, "target_modules": [], "rank": 3}
    recipe["model"]["latent_attention"] = {"num_latents": 0}
    recipe["model"]["pooling"] = "cls"
    recipe["data"]["train"][0]["query_prompt"] = "query: "
    text = _problems(recipe)
    assert "model.lora.rank: unknown key (did you mean 'r'?)" in text
    recipe["model"]["lora"].pop("rank")
    text = _problems(recipe)
    for expected in ("model.lora.r: must be at least 1", "model.lora.alpha: must be positive",
                     "model.lora.dropout: must be in [0, 1)", "model.lora.target_modules: empty",
                     "model.latent_attention.num_latents: must be at least 1", "model.pooling: 'cls'",
                     "data.train[0].instruction: set either instruction or query_prompt"):
        assert expected in text, expected


def test_stages_and_labelled_data(recipe, tmp_path):
    recipe["model"]["previous_stage"] = str(tmp_path / "missing.yaml")
    assert "model.name_or_path: give either name_or_path or previous_stage" in _problems(recipe)
    recipe["model"]["name_or_path"] = ""
    assert "model.previous_stage: recipe" in _problems(recipe)
    (tmp_path / "stage1.yaml").write_text("# stage 1\n")
    recipe["model"]["previous_stage"] = str(tmp_path / "stage1.yaml")
    recipe["data"]["train"][0].update(label_column="group", example_negatives=0)
    recipe["loss"]["in_batch_negatives"] = False
    text = _problems(recipe)
    assert "data.train[0].negative_columns: labelled rows" in text
    assert "data.train[0].example_negatives: must be at least 1" in text
    assert "in_batch_negatives" not in text  # labelled rows bring their own negatives
