"""Stand-ins for what the shipped recipes read but a test (or this project's machines) cannot have: the real data's
schemas and label sets in tiny local files, and tiny local models; used by the plan tests and by
scripts/plan_gpu_recipes.py."""

import importlib.util
import json
from pathlib import Path

import yaml

from embedtrain.plan import PlanSettings

REPO = Path(__file__).resolve().parents[1]
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


def build_stand_ins(root: Path) -> dict:
    """Local stand-ins, under ``root``, for data and models the recipes name but this machine cannot have: the real
    schemas and label sets, tiny files."""
    from PIL import Image

    from vpt_support import build_tiny_open_clip

    images = root / "images"
    images.mkdir(parents=True)
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
    msmarco_rows = [{"query": f"what is thing {i}", "positive": f"thing {i} is a passage about {i}",
                     **{f"negative_{j}": f"passage {i}-{j} about something else" for j in range(1, 8)}}
                    for i in range(1200)]
    msmarco = _jsonl(root / "msmarco.jsonl", msmarco_rows[:400])
    # a global batch of 512 (8 GPUs x 64) needs more rows; the other recipes keep the 400 their plans were made with
    msmarco_large = _jsonl(root / "msmarco_large.jsonl", msmarco_rows)
    emotion = _jsonl(root / "emotion.jsonl", [{"text": f"i feel message number {i}", "label_text": EMOTIONS[i % 6]}
                                              for i in range(600)])
    cub = root / "CUB_200_2011" / "images"
    for c in range(1, 201):  # CUB-200-2011's 200 class folders
        folder = cub / f"{c:03d}.Bird_{c}"
        folder.mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (4, 4), (c, k, 0)).save(folder / f"Bird_{c}_{k}.jpg")
    from embedtrain.models.tiny_vlm import build_tiny_qwen2_vl

    # the emoji shards recipes/clip/emoji_clip_webdataset.yaml reads (written by a script, not committed)
    spec = importlib.util.spec_from_file_location("make_webdataset", REPO / "scripts" / "make_webdataset.py")
    make_webdataset = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_webdataset)
    emoji = REPO / "data" / "emoji"
    emoji_rows = [json.loads(line) for line in (emoji / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    make_webdataset.write_shards(emoji_rows, root / "emoji_wds", "name", "image", emoji)

    return {"mmeb": mmeb, "msmarco": msmarco, "msmarco_large": msmarco_large, "emotion": emotion, "cub": cub, "emoji_wds": root / "emoji_wds",
            "open_clip": build_tiny_open_clip(root / "emoji_clip_model"),
            "tiny_vlm": build_tiny_qwen2_vl(root / "tiny-qwen2-vl")}


def shipped_recipes():
    return sorted(p.relative_to(REPO).as_posix() for p in (REPO / "recipes").rglob("*.yaml")
                  if p.parts[-2] not in ("accelerate", "merge", "model_configs"))


def plan_inputs(path: str, s: dict):
    """(overrides pointing the recipe at the stand-ins, plan settings) for one recipe."""
    raw = yaml.safe_load((REPO / path).read_text())
    overrides, settings = [], PlanSettings()
    for i, ds in enumerate((raw.get("data") or {}).get("train") or []):
        if ds["path"].startswith("sentence-transformers/msmarco"):
            stand_in = s["msmarco_large"] if path.startswith("recipes/qwen3-embedding-8b/") else s["msmarco"]
            overrides += [f"data.train.{i}.path={stand_in}", f"data.train.{i}.subset=null"]
        elif ds["path"] == "mteb/emotion":
            overrides.append(f"data.train.{i}.path={s['emotion']}")
        elif ds["path"].startswith("data/emoji_wds/"):
            overrides.append(f"data.train.{i}.path={s['emoji_wds'] / Path(ds['path']).name}")
        elif ds["path"].startswith("data/mmeb/"):
            overrides.append(f"data.train.{i}.path={s['mmeb'][ds['name']]}")
    if path.startswith("recipes/mistral-7b/"):
        settings = PlanSettings(accelerate_config=MULTI_GPU, device_memory_gb=80,
                                model_config=str(CONFIGS / "mistral-7b-v0.1"))
    elif path == "recipes/qwen3-embedding-0.6b/lora_msmarco.yaml":
        settings = PlanSettings(device_memory_gb=80, model_config=str(CONFIGS / "qwen3-embedding-0.6b"))
    elif path == "recipes/qwen3-embedding-8b/lora_msmarco.yaml":
        settings = PlanSettings(accelerate_config=MULTI_GPU, device_memory_gb=80,
                                model_config=str(CONFIGS / "qwen3-embedding-8b"))
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


