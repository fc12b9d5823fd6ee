"""Every shipped recipe is planned before it costs GPU hours: against local stand-ins of its data (the real schema
and label sets) and local copies of the real models' config.json, every plan passes with no dataset dropped, and
the GPU recipes count exactly the real models' published parameters."""

import pytest

from embedtrain.config import load_recipe
from embedtrain.plan import make_plan

from conftest import REPO
from plan_support import MMEB_LABELS, build_stand_ins, plan_inputs, shipped_recipes


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    return build_stand_ins(tmp_path_factory.mktemp("plan-stand-ins"))


@pytest.mark.parametrize("path", shipped_recipes())
def test_every_recipe_plans_with_no_dataset_dropped(path, stand_ins, monkeypatch):
    monkeypatch.chdir(REPO)
    overrides, settings = plan_inputs(path, stand_ins)
    plan = make_plan(load_recipe(path, overrides), settings)
    assert plan["problems"] == [], plan["problems"]
    for ds in plan["data"].get("datasets", []):
        assert ds["batches_per_epoch"] > 0 and ds["lost_share"] <= 0.05, ds
    assert plan["model"]["trainable"] > 0 and plan["memory_per_device"]["total"] > 0
    assert plan["compute"]["flops_per_step_per_device"] > 0


def test_gpu_recipes_count_the_real_models_published_parameters(stand_ins, monkeypatch):
    monkeypatch.chdir(REPO)
    expected = {
        # Mistral-7B-v0.1: 7,241,732,096 with its language-model head (32,000 x 4,096), which the encoder drops
        "recipes/mistral-7b/nv_embed_stage1.yaml": 7_241_732_096 - 32_000 * 4_096,
        # Qwen3-Embedding-0.6B: 595,776,512 (the model card's 0.6B; 596M on its Hub page; no language-model head)
        "recipes/qwen3-embedding-0.6b/lora_msmarco.yaml": 595_776_512,
        # Qwen3-Embedding-8B: 8,188,515,328 counted with its untied output embedding (151,665 x 4,096), which the
        # encoder does not load: 7,567,295,488 (7.57B)
        "recipes/qwen3-embedding-8b/lora_msmarco.yaml": 8_188_515_328 - 151_665 * 4_096,
        # Qwen2-VL-2B-Instruct: 2,208,985,600 (its head is tied to the token embeddings)
        "recipes/qwen2-vl-2b/vlm2vec.yaml": 2_208_985_600,
        # timm vit_base_patch16_224.augreg_in21k: 102,595,923 with its 21,843-class head (768 x 21,843 + 21,843)
        "recipes/vit-b16/vpt_proxies_cub.yaml": 102_595_923 - 768 * 21_843 - 21_843,
    }
    for path, count in expected.items():
        overrides, settings = plan_inputs(path, stand_ins)
        plan = make_plan(load_recipe(path, overrides), settings)
        assert plan["model"]["base_total"] == count, path
        # LoRA (decoder, VLM) and prompts with BitFit (ViT) train a small share; the decoder's head is trained whole
        assert plan["model"]["trainable"] < 0.05 * plan["model"]["total"], path


def test_label_string_datasets_train_in_full_on_eight_gpus(stand_ins, monkeypatch):
    """MMEB's classification subsets at a global batch of 1,024: every subset trains, none loses a row to duplicates."""
    monkeypatch.chdir(REPO)
    overrides, settings = plan_inputs("recipes/qwen2-vl-2b/vlm2vec.yaml", stand_ins)
    plan = make_plan(load_recipe("recipes/qwen2-vl-2b/vlm2vec.yaml", overrides), settings)
    by_name = {d["name"]: d for d in plan["data"]["datasets"]}
    assert plan["data"]["global_batch"] == 1024
    for name in MMEB_LABELS:
        assert by_name[name]["batches_per_epoch"] == 1 and "duplicates" not in by_name[name]["dropped"], by_name[name]


def test_a_merge_document_is_not_planned_but_named(capsys, monkeypatch):
    """Merge documents are run by `embedtrain merge`; plan (and train) say so in one line."""
    from embedtrain.cli import main

    monkeypatch.chdir(REPO)
    assert main(["plan", "recipes/merge/wordnet_foldoc_self_positioning.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "merge document" in err[0] and "embedtrain merge" in err[0]


def test_a_causal_decoder_is_planned_as_a_decoder(stand_ins, monkeypatch):
    """Qwen3-Embedding keeps its causal attention (no model.bidirectional): its blocks are still a decoder's (gated
    MLP, rotary, RMSNorm), and its texts' lengths come from characters, not from a tokenizer built with no
    vocabulary out of a folder that holds config.json alone."""
    monkeypatch.chdir(REPO)
    path = "recipes/qwen3-embedding-0.6b/lora_msmarco.yaml"
    overrides, settings = plan_inputs(path, stand_ins)
    plan = make_plan(load_recipe(path, overrides), settings)
    tower = plan["model"]["towers"][0]
    assert (tower["family"], tower["gated"], tower["dropout"]) == ("decoder", True, False)
    assert plan["memory_per_device"]["token_lengths"].startswith("estimated from characters")
    assert plan["compute"]["flops_per_step_per_device"] > 0
