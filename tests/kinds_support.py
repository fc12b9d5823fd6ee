"""Tiny recipes of every kind of model (text, MoE, decoder with LoRA + latent attention, a causal decoder read as a
sentence-transformers model with LoRA, CLIP, VLM2Vec, metric learning), shared by the tests that run the same thing
on each kind."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import REPO, build_tiny_bert, write_pairs
from multimodal_support import write_image_text_rows
from vpt_support import build_tiny_open_clip, write_labelled_images

KINDS = ["text", "moe", "decoder", "text_lora", "clip", "vlm2vec", "dml"]
STEPS = 8
TRAIN = {"max_steps": STEPS, "save_every": 2, "keep_last": 3, "log_every": 1, "torch_threads": 1, "seed": 3}


def saved_weights(model_dir: Path) -> dict:
    """Every tensor of every safetensors file of a saved model, keyed by file and name (any kind's layout)."""
    from safetensors.torch import load_file

    out = {}
    for path in sorted(model_dir.rglob("*.safetensors")):
        for key, value in load_file(str(path)).items():
            out[f"{path.relative_to(model_dir)}:{key}"] = value
    assert out, f"no weights under {model_dir}"
    return out


def build_assets(root: Path, tiny_vlm: Path) -> dict:
    """The models and data every kind's tiny recipe uses."""
    return {
        "bert": build_tiny_bert(root / "bert"),
        "pairs": write_pairs(root / "pairs" / "train.jsonl", rows=96),
        "pairs_b": write_pairs(root / "pairs_b" / "train.jsonl", rows=96, seed=5),
        "images": write_image_text_rows(root / "images", n=40),
        "vlm": tiny_vlm,
        "tower": build_tiny_open_clip(root / "tower"),
        "labelled": _uneven_labelled_images(root / "labelled"),
    }


def _uneven_labelled_images(folder: Path) -> Path:
    """Labelled images whose training classes (the first three) have 7, 2 and 1 images, so that
    class-balanced epochs differ in length; the last two (4 images each) are the unseen test classes."""
    sizes = [7, 2, 1, 4, 4]
    meta = write_labelled_images(folder, classes=len(sizes), per_class=max(sizes))
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    kept, seen = [], {}
    for row in rows:
        c = int(row["label"].split("-")[1])
        seen[c] = seen.get(c, 0) + 1
        if seen[c] <= sizes[c]:
            kept.append(row)
    meta.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return meta


def recipe_data(kind: str, a: dict, out: Path) -> dict:
    output = {"dir": str(out), "plot": False}
    text_data = {"train": [{"path": str(a["pairs"]), "name": "pairs", "negative_columns": ["negative"]}],
                 "batch_size": 8}
    if kind in ("text", "moe"):
        recipe = {"model": {"name_or_path": str(a["bert"]), "max_length": 32}, "data": text_data,
                  "train": {**TRAIN, "lr": 1e-3, "warmup_ratio": 0.0}, "output": output}
        if kind == "moe":
            recipe["model"]["moe"] = {}
            recipe["data"]["train"].append({"path": str(a["pairs_b"]), "name": "other", "negative_columns": ["negative"]})
            recipe["data"]["mixing"] = "round_robin"
        return recipe
    if kind == "decoder":
        return {
            "model": {"name_or_path": str(REPO / "data" / "tiny_decoders" / "mistral"), "bidirectional": True,
                      "pooling": "latent_attention", "latent_attention": {"num_latents": 8, "num_heads": 2},
                      "lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "instruction_masking": True, "max_length": 32},
            "data": {"train": [{"path": str(a["pairs"]), "name": "pairs", "negative_columns": ["negative"],
                                "instruction": "Retrieve the matching text"}], "batch_size": 8},
            "train": {**TRAIN, "lr": 5e-3, "warmup_ratio": 0.0}, "output": output,
        }
    if kind == "text_lora":  # the Qwen3-Embedding way: causal attention, last-token pooling, LoRA
        return {
            "model": {"name_or_path": str(REPO / "data" / "tiny_decoders" / "mistral"), "pooling": "last_token",
                      "lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "max_length": 32},
            "data": text_data, "train": {**TRAIN, "lr": 5e-3, "warmup_ratio": 0.0}, "output": output,
        }
    if kind == "clip":
        return {
            "kind": "clip",
            "model": {"architecture": {"embed_dim": 16, "image_size": 32, "patch_size": 8, "vision_width": 16,
                                       "vision_layers": 1, "vision_head_width": 8, "text_width": 16, "text_layers": 1,
                                       "text_heads": 2, "context_length": 16}},
            "data": {"train": [{"path": str(a["images"]), "name": "emoji", "query_text_column": "name",
                                "positive_image_column": "image"}], "batch_size": 8},
            "train": {**TRAIN, "lr": 1e-3, "warmup_ratio": 0.0, "gradient_cache_chunk_size": 4},
            "output": output,
        }
    if kind == "vlm2vec":
        return {
            "kind": "vlm2vec",
            "model": {"name_or_path": str(a["vlm"]), "max_length": 32, "finetune": "lora",
                      "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
            "data": {"train": [{"path": str(a["images"]), "name": "emoji", "query_image_column": "image",
                                "positive_text_column": "name", "query_template": "{image}Name it\nQuery: {text}",
                                "document_template": "{text}"}], "batch_size": 4},
            "train": {**TRAIN, "lr": 1e-3, "warmup_ratio": 0.0, "gradient_cache_query_chunk_size": 2},
            "output": output,
        }
    assert kind == "dml"
    return {
        "kind": "dml",
        "model": {"backbone": {"kind": "open_clip", "name_or_path": str(a["tower"])},
                  "tuning": {"prompt_depth": 1, "num_prompts": 2},
                  "proxies": {"semantic": True, "accumulate": "ema", "class_prompts": 2}},
        "data": {"path": str(a["labelled"]), "samples_per_class": 2, "batch_size": 4, "train_class_fraction": 0.6,
                 "class_split": "sorted"},
        "train": {**TRAIN, "lr": 1e-2, "weight_decay": 1e-4, "scheduler": "cosine", "warmup_ratio": 0.0,
                  "epochs": 10, "max_grad_norm": 10.0},
        "eval": {"before_training": False},
        "output": output,
    }


