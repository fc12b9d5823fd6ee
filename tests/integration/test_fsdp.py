"""FSDP 2 on two CPU processes (gloo) through `accelerate launch --config_file recipes/accelerate/fsdp_cpu.yaml`:
the same final weights as DDP (multi_cpu.yaml) for every kind of model that shards, a sharded checkpoint that
resumes exactly, and a saved folder gathered complete."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, accelerate_launch, kill_tree, subprocess_env
from kinds_support import build_assets, recipe_data, saved_weights
from multimodal_support import tiny_vlm  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow  # two or three launches of two processes per kind
STEPS = 3


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_vlm):  # noqa: F811
    return build_assets(tmp_path_factory.mktemp("fsdp"), tiny_vlm)


def _launch(config: str, recipe: dict, path: Path, *args: str) -> subprocess.CompletedProcess:
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    env = subprocess_env()
    cmd = accelerate_launch(config) + ["-m", "embedtrain", "train", str(path), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=REPO)


def _recipe(kind: str, assets: dict, out: Path) -> dict:
    budget = kind.endswith("+token_budget")  # every role's texts in length-sorted chunks: many calls of each layer
    recipe = recipe_data(kind.split("+")[0], assets, out)
    if budget:
        recipe["train"]["forward_token_budget"] = 16
    if kind.endswith("+bf16"):  # frozen bfloat16 weights and float32 adapters in one sharded module
        recipe["model"]["dtype"] = "bfloat16"
    if kind == "moe+lora":  # adapters on each expert, the router in full
        recipe["model"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "up", "down"]}
    if kind.endswith("+siglip"):  # SigLIP's loss learns a bias besides the temperature
        recipe["loss"] = {"name": "siglip", "temperature": 0.1}
    # SGD with momentum: AdamW's step m/sqrt(v) turns the float32 rounding of a gradient that is zero in exact
    # arithmetic (the key bias of attention: softmax ignores it) into a full lr-sized step, which would compare
    # rounding noise rather than sharding (seen: 6e-5 on CLIP's in_proj_bias, every other tensor within 1e-7)
    recipe["train"].update(max_steps=STEPS, save_every=1, optimizer="sgd", momentum=0.9)
    return recipe


@pytest.mark.parametrize("kind", ["text", "text+token_budget", "decoder", "text_lora", "text_lora+bf16", "moe",
                                  "moe+lora", "clip", "clip+siglip", "vlm2vec"])
def test_fsdp_gives_the_weights_of_ddp(kind, assets, tmp_path):
    from conftest import write_beir

    runs, finals = {}, {}
    for name, config in (("ddp", "multi_cpu.yaml"), ("fsdp", "fsdp_cpu.yaml")):
        out = tmp_path / name
        recipe = _recipe(kind, assets, out)
        if kind.startswith("text"):  # a sharded model is evaluated too (every process runs the forward)
            recipe["eval"] = {"tasks": [{"path": str(write_beir(tmp_path / "beir")), "name": "tiny"}]}
        proc = _launch(config, recipe, tmp_path / f"{name}.yaml")
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads((out / "results.json").read_text())
        engine = results["engine"]
        assert engine["distributed_type"] == {"ddp": "MULTI_CPU", "fsdp": "FSDP"}[name] and engine["processes"] == 2
        runs[name], finals[name] = saved_weights(out / "model"), results["final"]
    if kind.startswith("text"):
        assert finals["ddp"] and finals["fsdp"].keys() == finals["ddp"].keys()
        assert all(abs(finals["fsdp"][k] - finals["ddp"][k]) < 1e-6 for k in finals["ddp"]), finals
    a, b = runs["ddp"], runs["fsdp"]
    assert a.keys() == b.keys()
    if kind.startswith("clip"):  # the learnable temperature (outside the sharded model, its own optimizer) was trained
        learnt = {"logit_scale": math.log(1 / (0.1 if kind.endswith("siglip") else 0.07))}
        if kind.endswith("siglip"):
            learnt["logit_bias"] = -10.0  # SigLIP's starting bias
        for name, start in learnt.items():
            key = next(k for k in b if k.endswith(name))
            moved = abs(float(b[key]) - start)
            # three SGD steps at lr 1e-3 moved them 2.2e-6 (SigLIP's scale) to 6.2e-5 here: more than 4 float32
            # spacings at their value (2.4e-7 near 2.5, 9.5e-7 near 10), so a parameter left untrained fails
            assert moved > 4 * float(np.spacing(np.float32(start))), (name, moved)
            # the weights it is learnt from differ by 1e-5 at most, and a step moves it by lr x its gradient: far
            # below 1e-6, which would still catch a sharded run that updates it otherwise than DDP (seen: 0.0)
            assert float((a[key] - b[key]).abs()) <= 1e-6, name
    # 1e-5: both average the same float32 gradients, in another order (all-reduce vs reduce-scatter)
    diffs = sorted(((float((a[k].float() - b[k].float()).abs().max()), k) for k in a), reverse=True)
    assert diffs[0][0] <= 1e-5, diffs[:5]


@pytest.mark.parametrize("kind", ["text", "text_lora", "clip"])
def test_a_killed_fsdp_run_resumes_to_the_uninterruptedsaved_weights(kind, assets, tmp_path):
    """SIGKILL inside the step-2 checkpoint write (a sharded checkpoint), then --resume auto under FSDP again:
    the weights of an uninterrupted FSDP run (1e-6: the same operations in the same order on both sides). CLIP's
    learnable temperature is outside the sharded model: its value and optimizer state come from the checkpoint's
    loss files (a resume that lost the optimizer state ends with another temperature)."""
    import time

    from embedtrain.train import checkpoint as ckpt

    full = tmp_path / "full"
    proc = _launch("fsdp_cpu.yaml", _recipe(kind, assets, full), tmp_path / "full.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "killed"
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(_recipe(kind, assets, out)), encoding="utf-8")
    env = subprocess_env(**{ckpt.PAUSE_ENV: "120@2"})
    cmd = accelerate_launch("fsdp_cpu.yaml") + ["-m", "embedtrain", "train", str(path)]
    with (tmp_path / "killed.log").open("w") as log:
        run = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        partial = out / "checkpoints" / ".tmp-step-0000002" / ckpt.STATE_FILE
        end = time.time() + 600
        try:
            while not partial.is_file():
                assert run.poll() is None and time.time() < end, (tmp_path / "killed.log").read_text()[-3000:]
                time.sleep(0.05)
        finally:
            if run.poll() is None:
                kill_tree(run.pid)  # workers of a launcher too (each in a session of its own)
            run.wait(timeout=60)
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1]
    assert (out / "checkpoints" / "step-0000001" / "pytorch_model_fsdp_0").is_dir()  # a sharded checkpoint
    assert (out / "checkpoints" / "step-0000001" / ckpt.LOSS_OPTIMIZER_FILE).is_file() == (kind == "clip")

    proc = _launch("fsdp_cpu.yaml", _recipe(kind, assets, out), path, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    a, b = saved_weights(full / "model"), saved_weights(out / "model")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_a_sharded_decoder_folder_loads_in_sentence_transformers(assets, tmp_path):
    from sentence_transformers import SentenceTransformer

    import embedtrain

    out = tmp_path / "run"
    proc = _launch("fsdp_cpu.yaml", _recipe("decoder", assets, out), tmp_path / "r.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    texts = ["a small red tree", "the river by the hill"]
    ours = embedtrain.load(out / "model").encode(texts, role="document")
    st = SentenceTransformer(str(out / "model"), device="cpu", trust_remote_code=True)
    theirs = torch.as_tensor(st.encode(texts, prompt_name="document") if "document" in st.prompts else st.encode(texts))
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())


def test_a_sharded_text_encoder_with_lora_saves_merged_weights(assets, tmp_path):
    """A causal decoder read as a sentence-transformers model (the Qwen3-Embedding way) with LoRA on two of its
    projections, trained under FSDP: the folder is merged from the gathered weights exactly as in one process
    (the adapted layers alone changed, plain sentence-transformers and base + adapter give embedtrain's
    embeddings)."""
    from lora_support import check_folder

    out = tmp_path / "run"
    recipe = _recipe("text_lora", assets, out)
    recipe["model"]["lora"].update(target_modules=["q_proj", "v_proj"])
    proc = _launch("fsdp_cpu.yaml", recipe, tmp_path / "r.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["engine"]["distributed_type"] == "FSDP"
    check_folder(out / "model", Path(recipe["model"]["name_or_path"]), ("self_attn.q_proj", "self_attn.v_proj"))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_under_fsdp_trains(precision, assets, tmp_path):
    """FSDP's float16 parameters compute every layer in float16, so the first loss scale (65,536) overflows the
    gradients: each such step is skipped and halves the scale without counting towards
    train.max_consecutive_nonfinite (3 here, fewer than the back-offs), both processes alike (the gradient norm and
    the loss are reduced across them). bfloat16 needs no scale and skips nothing. Then each run trains: finite
    losses that fall, weights that moved, a float32 folder that sentence-transformers loads."""
    from sentence_transformers import SentenceTransformer

    import embedtrain

    out = tmp_path / "run"
    recipe = _recipe("text", assets, out)
    recipe["train"].update(mixed_precision=precision, max_steps=12, max_consecutive_nonfinite=3, log_every=1,
                           optimizer="adamw", lr=3e-3)
    proc = _launch("fsdp_cpu.yaml", recipe, tmp_path / "r.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["engine"]["distributed_type"] == "FSDP" and results["engine"]["mixed_precision"] == precision
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if "loss" in l and "step" in l]
    assert len(steps) == 12
    overflows = (proc.stdout + proc.stderr).count("fp16 gradient overflow (the loss is finite); step skipped")
    if precision == "fp16":
        assert overflows == results["skipped_steps"] > 3 and steps[0]["loss"] is None
    else:
        assert overflows == results["skipped_steps"] == 0
    losses = [l["loss"] for l in steps if l["loss"] is not None]
    assert len(losses) >= 5 and all(math.isfinite(v) for v in losses) and min(losses[-4:]) < losses[0], losses
    trained = saved_weights(out / "model")
    assert all(w.dtype == torch.float32 and bool(torch.isfinite(w).all()) for w in trained.values())
    base = saved_weights(Path(recipe["model"]["name_or_path"]))
    assert any(not torch.equal(trained[k], base[k]) for k in base if k in trained)
    texts = ["a small red tree", "the river by the hill"]
    ours = embedtrain.load(out / "model").encode(texts)
    theirs = SentenceTransformer(str(out / "model"), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_what_fsdp_cannot_run_stops_the_run_before_the_model_loads(assets, tmp_path):
    """A setting the engine cannot run (an average of sharded weights) is one line from every process before any
    weights are read or any output written (embedtrain plan lists the same line)."""
    out = tmp_path / "out"
    recipe = _recipe("text", assets, out)
    recipe["train"]["ema_decay"] = 0.99
    proc = _launch("fsdp_cpu.yaml", recipe, tmp_path / "ema.yaml")
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    line = "error: train.ema_decay: an exponential moving average of the weights is not available under FSDP"
    assert text.count(line) == 2  # each process, in one line (the launcher then reports its failed children)
    assert "loading model" not in text and f'File "{REPO / "embedtrain"}' not in text
    assert not out.exists()
