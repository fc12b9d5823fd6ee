"""Tiny open_clip folders and tiny labelled image sets for the visual-prompt tests (all offline)."""

from __future__ import annotations

import json
import random
from pathlib import Path

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def build_tiny_open_clip(folder: Path, seed: int = 0, model_cfg: dict | None = None) -> Path:
    """An open_clip model folder (open_clip_config.json + open_clip_model.safetensors), random weights,
    in the layout ``open_clip.create_model('local-dir:FOLDER')`` loads."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    cfg = json.loads(json.dumps(model_cfg or TINY_OPEN_CLIP))
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    size = cfg["vision_cfg"]["image_size"]
    config = {"model_cfg": cfg, "preprocess_cfg": {"size": size, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def write_labelled_images(folder: Path, classes: int = 8, per_class: int = 6, size: int = 32, seed: int = 0,
                          rgba: bool = True) -> Path:
    """``images/NNNN.png`` + ``metadata.jsonl`` (image, name, label): each class is a colour and a shape,
    with noise, so a small model can tell classes apart. Returns the metadata path."""
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    index = 0
    for c in range(classes):
        colour = [rng.randint(0, 255) for _ in range(3)]
        for k in range(per_class):
            img = nrng.integers(0, 60, size=(size, size, 4), dtype=np.uint8)
            img[..., 3] = 255
            lo, hi = size // 4 + (c % 3), size - size // 4 - (c // 3) % 3
            img[lo:hi, lo:hi, :3] = colour
            if rgba and k % 2:
                img[: size // 8, :, 3] = 0  # a transparent band: alpha must be composited
            name = f"images/{index:04d}.png"
            Image.fromarray(img, mode="RGBA" if rgba else None).convert("RGBA" if rgba else "RGB").save(folder / name)
            rows.append({"image": name, "name": f"item {index}", "label": f"class-{c}"})
            index += 1
    path = folder / "metadata.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
