"""Every shipped recipe is planned before it costs GPU hours: against local stand-ins of its data (the real schema
and label sets) and local copies of the real models' config.json, every plan passes with no dataset dropped, and
the GPU recipes count exactly the real models' published parameters."""

import json
from pathlib import Path

import pytest

from embedtrain.config import load_recipe
from embedtrain.plan import PlanSettings, make_plan

from conftest import REPO

CONFIGS = REPO / "recipes" / "model_configs"
MULTI_GPU = str(REPO / "recipes" / "accelerate" / "multi_gpu.yaml")
EMOTIONS = ["sadness", "joy", "love", "anger", "fear", "surprise"]  # mteb/emotion's six labels
# MMEB-train's classification subsets and the size of their label sets (the positives are the label strings)
MMEB_LABELS = {"ImageNet_1K": 1000, "N24News": 24, "HatefulMemes": 2, "VOC2007": 20, "SUN397": 397}
MMEB_ROWS = 1100  # above the recipe's global batch on 8 GPUs (1,024)


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Local stand-ins for data and models the recipes name but this machine cannot have."""
    from PIL import Image

    from multimodal_support import write_image_text_rows  # noqa: F401  (tiny VLM builder lives beside it)
    from vpt_support import build_tiny_open_clip

    root = tmp_path_factory.mktemp("plan-stand-ins")
    images = root / "images"
    images.mkdir()
    for i in range(MMEB_ROWS):
        Image.new("RGB", (4, 4), (i % 256, (i // 256) % 256, 7)).save(images / f"{i}.png")
    mmeb = {}
    for name in ["ImageNet_1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "OK-VQA", "A-OKVQA", "DocVQA",
                 "InfographicsVQA", "ChartQA", "Visual7W", "VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t",
                 "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA", "MSCOCO"]:
        rows = []
        for i in range(MMEB_ROWS):
            img = str(images / f"{(i * 7 + len(name)) % MMEB_ROWS}.png")
            if name in MMEB_LABELS:  # classification: an instruction and an image; the label string is the positive
                row = {"query_text": "Represent the given image for classification", "query_image": img,
                       "positive_text": f"label {i % MMEB_LABELS[name]}"}
            elif "VQA" in name or name in ("ChartQA", "Visual7W"):  # answers repeat ("yes", "2", ...)
                row = {"query_text": f"Represent the given image with the question: question {i}", "query_image": img,
                       "positive_text": ["yes", "no", "2", "red"][i % 4]}
            else:
                row = {"query_text": f"Find the matching image for caption {i}", "query_image": img,
                       "positive_text": f"caption {i}", "positive_image": str(images / f"{(i + 3) % MMEB_ROWS}.png")}
            rows.append(row)
        mmeb[name] = _jsonl(root / "mmeb" / f"{name}.jsonl", rows)
    msmarco = _jsonl(root / "msmarco.jsonl", [
        {"query": f"what is thing {i}", "positive": f"thing {i} is a passage about {i}",
         **{f"negative_{j}": f"passage {i}-{j} about something else" for j in range(1, 8)}} for i in range(400)])
    emotion = _jsonl(root / "emotion.jsonl", [{"text": f"i feel message number {i}", "label_text": EMOTIONS[i % 6]}
                                              for i in range(600)])
    cub = root / "CUB_200_2011" / "images"
    for c in range(1, 201):  # CUB-200-2011's 200 class folders
        folder = cub / f"{c:03d}.Bird_{c}"
        folder.mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (4, 4), (c, k, 0)).save(folder / f"Bird_{c}_{k}.jpg")
    from embedtrain.models.tiny_vlm import build_tiny_qwen2_vl

    return {"mmeb": mmeb, "msmarco": msmarco, "emotion": emotion, "cub": cub,
            "open_clip": build_tiny_open_clip(root / "emoji_clip_model"),
            "tiny_vlm": build_tiny_qwen2_vl(root / "tiny-qwen2-vl")}


def _recipes():
    return sorted(p.relative_to(REPO).as_posix() for p in (REPO / "recipes").rglob("*.yaml")
                  if p.parts[-2] not in ("accelerate", "merge", "model_configs"))


def _plan_inputs(path: str, s: dict):
    """(overrides pointing the recipe at the stand-ins, plan settings) for one recipe."""
    raw = __import__("yaml").safe_load((REPO / path).read_text())
    overrides, settings = [], PlanSettings()
    for i, ds in enumerate((raw.get("data") or {}).get("train") or []):
        if ds["path"].startswith("sentence-transformers/msmarco"):
            overrides += [f"data.train.{i}.path={s['msmarco']}", f"data.train.{i}.subset=null"]
        elif ds["path"] == "mteb/emotion":
            overrides.append(f"data.train.{i}.path={s['emotion']}")
        elif ds["path"].startswith("data/mmeb/"):
            overrides.append(f"data.train.{i}.path={s['mmeb'][ds['name']]}")
    if path.startswith("recipes/mistral-7b/"):
        settings = PlanSettings(accelerate_config=MULTI_GPU, device_memory_gb=80,
                                model_config=str(CONFIGS / "mistral-7b-v0.1"))
    elif path == "recipes/qwen2-vl-2b/vlm2vec.yaml":
        settings = PlanSettings(accelerate_config=MULTI_GPU, device_memory_gb=80,
                                model_config=str(CONFIGS / "qwen2-vl-2b-instruct"))
    elif path == "recipes/qwen2-vl-2b/vlm2vec_tiny_cpu.yaml":
        overrides.append(f"model.name_or_path={s['tiny_vlm']}")
    elif path == "recipes/vit-b16/vpt_proxies_cub.yaml":
        overrides.append(f"data.path={s['cub']}")
        settings = PlanSettings(device_memory_gb=80)
    elif path == "recipes/dml/vpt_proxies_emoji.yaml":
        overrides.append(f"model.backbone.name_or_path={s['open_clip']}")
    return overrides, settings


@pytest.mark.parametrize("path", _recipes())
def test_every_recipe_plans_with_no_dataset_dropped(path, stand_ins, monkeypatch):
    monkeypatch.chdir(REPO)
    overrides, settings = _plan_inputs(path, stand_ins)
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
        # Qwen2-VL-2B-Instruct: 2,208,985,600 (its head is tied to the token embeddings)
        "recipes/qwen2-vl-2b/vlm2vec.yaml": 2_208_985_600,
        # timm vit_base_patch16_224.augreg_in21k: 102,595,923 with its 21,843-class head (768 x 21,843 + 21,843)
        "recipes/vit-b16/vpt_proxies_cub.yaml": 102_595_923 - 768 * 21_843 - 21_843,
    }
    for path, count in expected.items():
        overrides, settings = _plan_inputs(path, stand_ins)
        plan = make_plan(load_recipe(path, overrides), settings)
        assert plan["model"]["base_total"] == count, path
        # LoRA (decoder, VLM) and prompts with BitFit (ViT) train a small share; the decoder's head is trained whole
        assert plan["model"]["trainable"] < 0.05 * plan["model"]["total"], path


def test_label_string_datasets_train_in_full_on_eight_gpus(stand_ins, monkeypatch):
    """MMEB's classification subsets at a global batch of 1,024: every subset trains, none loses a row to duplicates."""
    monkeypatch.chdir(REPO)
    overrides, settings = _plan_inputs("recipes/qwen2-vl-2b/vlm2vec.yaml", stand_ins)
    plan = make_plan(load_recipe("recipes/qwen2-vl-2b/vlm2vec.yaml", overrides), settings)
    by_name = {d["name"]: d for d in plan["data"]["datasets"]}
    assert plan["data"]["global_batch"] == 1024
    for name in MMEB_LABELS:
        assert by_name[name]["batches_per_epoch"] == 1 and "duplicates" not in by_name[name]["dropped"], by_name[name]
