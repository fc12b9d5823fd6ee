"""One trainer for every kind of model: the same kill-and-resume guarantee and the same Hub push for each.

For every kind (text, MoE, decoder with LoRA + latent attention, CLIP, tiny VLM2Vec, metric learning
with a class-balanced sampler whose batches per epoch vary), a run is SIGKILLed in the middle of a
checkpoint write, resumed with ``--resume auto``, and must end with the weights of an uninterrupted
run (1e-6: the same float32 operations in the same order, on one thread, so only a bug moves them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from huggingface_hub import constants

from embedtrain.config import recipe_from_dict
from embedtrain.train import checkpoint as ckpt
from embedtrain.train.loop import _position, train

from conftest import REPO, build_tiny_bert, write_pairs
from multimodal_support import tiny_vlm, write_image_text_rows  # noqa: F401  (tiny_vlm is a fixture)
from tests.unit.hub.hub_server import FakeHub
from vpt_support import build_tiny_open_clip, write_labelled_images

pytestmark = pytest.mark.slow  # a subprocess and two short trainings per kind

KINDS = ["text", "moe", "decoder", "clip", "vlm2vec", "dml"]
STEPS = 8
KILL_AT = 6  # killed while writing the step-6 checkpoint: the resume starts from step 4
TRAIN = {"max_steps": STEPS, "save_every": 2, "keep_last": 3, "log_every": 1, "torch_threads": 1, "seed": 3}


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_vlm):  # noqa: F811
    root = tmp_path_factory.mktemp("every-kind")
    return {
        "bert": build_tiny_bert(root / "bert"),
        "pairs": write_pairs(root / "pairs" / "train.jsonl", rows=96),
        "pairs_b": write_pairs(root / "pairs_b" / "train.jsonl", rows=96, seed=5),
        "images": write_image_text_rows(root / "images", n=40),
        "vlm": tiny_vlm,
        "tower": build_tiny_open_clip(root / "tower"),
        "labelled": _uneven_labelled_images(root / "labelled"),
    }


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


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file of a saved model, keyed by file and name."""
    out = {}
    for path in sorted(model_dir.rglob("*.safetensors")):
        for key, value in load_file(str(path)).items():
            out[f"{path.relative_to(model_dir)}:{key}"] = value
    assert out, f"no weights under {model_dir}"
    return out


def _kill_during_checkpoint(recipe_path: Path, out: Path, log: Path) -> None:
    """Start ``embedtrain train`` in its own session, SIGKILL it while it writes the step-KILL_AT checkpoint."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=f"{REPO}:{REPO / 'tests'}",
               **{ckpt.PAUSE_ENV: f"120@{KILL_AT}"})
    env.pop("ACCELERATE_CONFIG_FILE", None)
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "embedtrain", "train", str(recipe_path)], cwd=REPO, env=env,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        partial = out / "checkpoints" / f".tmp-step-{KILL_AT:07d}" / ckpt.STATE_FILE
        end = time.time() + 600
        try:
            while not partial.is_file():
                assert proc.poll() is None, f"exited {proc.returncode} before the kill point:\n{log.read_text()[-3000:]}"
                assert time.time() < end, f"kill point not reached:\n{log.read_text()[-3000:]}"
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A fake Hub on 127.0.0.1 that huggingface_hub talks to, with a token from the environment."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_testtoken_SECRET123")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    with FakeHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        yield hub


@pytest.mark.parametrize("kind", KINDS)
def test_killed_and_resumed_run_ends_with_the_uninterrupted_weights(kind, assets, tmp_path, fake_hub):
    # the uninterrupted run also pushes its model: every kind goes through the trainer's one push
    data = recipe_data(kind, assets, tmp_path / "full")
    data["output"]["push_to_hub"] = f"alice/{kind}"
    lines = []
    full = train(recipe_from_dict(data), log=lines.append)
    assert full.steps == STEPS and not full.stopped
    assert [c.repo_id for c in fake_hub.commits] == [f"alice/{kind}"]
    pushed = fake_hub.commits[0].files
    local = {p.relative_to(full.model_dir).as_posix() for p in full.model_dir.rglob("*") if p.is_file()}
    assert local <= set(pushed), local - set(pushed)
    assert any(line.startswith("pushed to ") for line in lines)
    assert not any("SECRET123" in line for line in lines)

    if kind == "dml":  # the case that a divmod over a fixed epoch length resumed at the wrong batch
        from embedtrain.train.tasks import task_for

        task = task_for(recipe_from_dict(recipe_data(kind, assets, tmp_path / "probe")))
        task.read_data()
        lengths = [task.batches_in_epoch(e) for e in range(4)]
        # resuming after step 4: counting epoch by epoch and dividing by the first epoch's length disagree
        assert len(set(lengths)) > 1 and _position(task.batches_in_epoch, 4) != divmod(4, lengths[0]), lengths

    out = tmp_path / "interrupted"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_data(kind, assets, out)), encoding="utf-8")
    _kill_during_checkpoint(path, out, tmp_path / "log.txt")
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, 4]
    assert ckpt.incomplete_checkpoints(out)  # the half-written step-6 folder

    resumed = train(recipe_from_dict(recipe_data(kind, assets, out)), resume="auto", log=lambda *_: None)
    assert resumed.steps == STEPS
    a, b = _weights(full.model_dir), _weights(resumed.model_dir)
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= 1e-6, worst
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert steps == list(range(1, STEPS + 1))  # every step logged once, in order
    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == recipe_from_dict(recipe_data(kind, assets, out)).kind and results["steps"] == STEPS
