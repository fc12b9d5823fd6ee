"""End-to-end multimodal runs through the command line: CLIP (open_clip) and VLM2Vec (tiny Qwen2-VL)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from embedtrain.cli import main

from conftest import REPO, accelerate_launch
from multimodal_support import EMOJI, emoji_rows, tiny_vlm, write_image_text_rows  # noqa: F401  (fixture)

CLIP_TINY = str(REPO / "recipes" / "clip" / "emoji_clip_tiny.yaml")
VLM_TINY = str(REPO / "recipes" / "qwen2-vl-2b" / "vlm2vec_tiny_cpu.yaml")


def test_clip_recipe_trains_evaluates_and_saves_for_open_clip(tmp_path, capsys):
    import open_clip
    from PIL import Image

    from embedtrain.models.clip import load_clip_encoder

    out = tmp_path / "run"
    assert main(["train", CLIP_TINY, f"output.dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "emoji/t2i/recall@10: after" in printed and "emoji/i2t/recall@10: after" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 4
    assert {f"emoji/{d}/recall@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)} <= set(results["final"])
    assert sorted(p.name for p in (out / "model").iterdir()) == [
        "embedtrain.json", "open_clip_config.json", "open_clip_model.safetensors"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines if "loss" in e] == [1, 2, 3, 4]

    # open_clip loads the folder and computes what embedtrain computes
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out / 'model'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out / 'model'}")
    ours = load_clip_encoder(str(out / "model"))
    rows = emoji_rows(3, 500)
    paths = [str(EMOJI / r["image"]) for r in rows]
    model.eval()
    with torch.no_grad():
        theirs = model.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths]), normalize=True)
        theirs_text = model.encode_text(tokenizer([r["name"] for r in rows]), normalize=True)
    torch.testing.assert_close(theirs, ours.encode_items(images=paths), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(theirs_text, ours.encode_items(texts=[r["name"] for r in rows]), atol=1e-5, rtol=1e-4)
    # embedtrain eval scores the folder as the trainer did
    assert main(["eval", "--model", str(out / "model"), "--local-task", str(REPO / "data" / "emoji" / "eval"),
                 "--output", str(tmp_path / "eval")]) == 0
    scores = json.loads((tmp_path / "eval" / "multimodal_results.json").read_text())["results"]["emoji-eval"]
    for key in ("t2i/recall@10", "i2t/recall@1", "t2i/ndcg@10"):
        assert scores[key] == pytest.approx(results["final"][f"emoji/{key}"], abs=1e-6)
    # the trained temperature went into the model
    loss_state = load_file(str(sorted((out / "checkpoints").iterdir())[-1] / "loss.safetensors"))
    assert model.logit_scale.item() == pytest.approx(loss_state["log_scale"].item())


def test_siglip_with_a_lora_image_tower_and_a_frozen_text_tower(tmp_path):
    from embedtrain.models.clip import load_clip_encoder

    out = tmp_path / "run"
    assert main(["train", CLIP_TINY, f"output.dir={out}", "loss.name=siglip", "loss.temperature=0.1",
                 "model.image_tower=lora", "model.text_tower=frozen", "model.lora.r=2", "train.max_steps=2",
                 "eval.tasks=[]"]) == 0
    saved = load_file(str(out / "model" / "open_clip_model.safetensors"))
    assert "logit_bias" in saved and not any("lora" in k for k in saved)
    # the frozen text tower is the one built from the seed; the image tower moved
    torch.manual_seed(0)
    from accelerate.utils import set_seed

    from embedtrain.config import load_recipe
    from embedtrain.train.tasks.multimodal import build_encoder

    set_seed(0)
    initial = build_encoder(load_recipe(CLIP_TINY, [f"output.dir={tmp_path / 'x'}", "loss.name=siglip"]))
    start = initial._base().state_dict()
    assert torch.equal(saved["text_projection"], start["text_projection"])
    assert torch.equal(saved["transformer.resblocks.0.mlp.c_fc.weight"], start["transformer.resblocks.0.mlp.c_fc.weight"])
    assert not torch.equal(saved["visual.transformer.resblocks.0.mlp.c_fc.weight"],
                           start["visual.transformer.resblocks.0.mlp.c_fc.weight"])
    assert load_clip_encoder(str(out / "model")).model_cfg["init_logit_bias"] == pytest.approx(saved["logit_bias"].item())


def _rows_recipe(tmp_path, broken):
    path = write_image_text_rows(tmp_path / "data", n=40, broken=broken)
    return [f"data.train.0.path={path}", "data.train.0.max_rows=null", f"output.dir={tmp_path / 'run'}",
            "train.max_steps=2", "eval.tasks=[]"]


def test_bad_image_stops_before_training_with_row_and_path(tmp_path, capsys):
    overrides = _rows_recipe(tmp_path, {7: "garbage"})
    assert main(["train", CLIP_TINY, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ")
    assert "train.jsonl row 8: image " in err and "garbage-0007.png (column 'image') cannot be decoded" in err
    assert "data.bad_images: skip" in err
    assert not (tmp_path / "run").exists()


def test_bad_images_skipped_and_counted(tmp_path, capsys):
    overrides = _rows_recipe(tmp_path, {3: "missing", 9: "garbage"})
    # 2 of the 40 rows (5%) are more than a recipe allowing 4% may lose: an error before training that says so
    assert main(["train", CLIP_TINY, *overrides, "data.bad_images=skip", "data.max_dropped_share=0.04"]) == 2
    err = capsys.readouterr().err
    assert "2 by bad_images" in err and "data.max_dropped_share" in err
    assert main(["train", CLIP_TINY, *overrides, "data.bad_images=skip"]) == 0  # the default allows 5%
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["bad_images"] == {"skipped_before_training": 2, "replaced_during_training": 0}
    assert results["data"][0]["dropped"] == {"bad_images": 2} and results["data"][0]["rows_read"] == 40


def test_resume_continues_to_the_same_weights(tmp_path):
    # a constant schedule, so that the 2-step run's scheduler is the 4-step run's at step 2
    common = ["eval.tasks=[]", "train.save_every=2", "data.num_workers=1", "train.scheduler=constant"]
    assert main(["train", CLIP_TINY, f"output.dir={tmp_path / 'straight'}", *common]) == 0
    assert main(["train", CLIP_TINY, f"output.dir={tmp_path / 'resumed'}", *common, "train.max_steps=2"]) == 0
    assert main(["train", CLIP_TINY, f"output.dir={tmp_path / 'resumed'}", *common, "train.max_steps=4",
                 "--resume", "auto"]) == 0
    a = load_file(str(tmp_path / "straight" / "model" / "open_clip_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model" / "open_clip_model.safetensors"))
    for key in a:
        # a resumed run repeats the same operations in the same order
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_vlm2vec_recipe_trains_with_lora_and_grad_cache_and_saves_for_sentence_transformers(tiny_vlm, tmp_path,
                                                                                            capsys):
    from PIL import Image
    from sentence_transformers import SentenceTransformer

    from embedtrain.models.vlm import load_vlm_encoder

    out = tmp_path / "run"
    assert main(["train", VLM_TINY, f"model.name_or_path={tiny_vlm}", f"output.dir={out}"]) == 0
    assert "emoji/t2i/recall@10: after" in capsys.readouterr().out
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in lines if "loss" in e]
    assert len(losses) == 4 and all(v == v for v in losses)
    assert not any("lora" in k for k in load_file(str(out / "model" / "model.safetensors")))

    st = SentenceTransformer(str(out / "model"), device="cpu")
    ours = load_vlm_encoder(str(out / "model"), finetune="full")
    row = emoji_rows(1, 900)[0]
    path = str(EMOJI / row["image"])
    got = st.encode_document([Image.open(path)], convert_to_tensor=True).cpu()
    torch.testing.assert_close(got, ours.encode_items(images=[path], role="document"), atol=1e-5, rtol=1e-4)
    got = st.encode_query([row["name"]], convert_to_tensor=True).cpu()
    torch.testing.assert_close(got, ours.encode_items(texts=[row["name"]], role="query"), atol=1e-5, rtol=1e-4)


def test_vlm2vec_bad_image_names_row_and_file(tiny_vlm, tmp_path, capsys):
    path = write_image_text_rows(tmp_path / "data", n=24, broken={4: "missing"})
    overrides = [f"model.name_or_path={tiny_vlm}", f"output.dir={tmp_path / 'run'}", f"data.train.0.path={path}",
                 f"data.train.1.path={path}", "eval.tasks=[]"]
    assert main(["train", VLM_TINY, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.jsonl row 5: image " in err and "missing-0004.png (column 'image') not found" in err


@pytest.mark.slow
def test_clip_on_two_cpu_processes(tmp_path):
    """Two processes (DDP on gloo), each half of the global batch, a frozen text tower and the shared gather."""
    import os
    import subprocess

    out = tmp_path / "run"
    cmd = accelerate_launch("multi_cpu.yaml") + ["-m", "embedtrain", "train", CLIP_TINY, f"output.dir={out}",
                                                 "model.text_tower=frozen", "train.save_every=2", "data.batch_size=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("model saved to") == 1  # one voice per run
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 4 and "emoji/t2i/recall@10" in results["final"]


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_image_that_breaks_during_training(tmp_path, capsys, policy):
    """With data.verify_images off, a file that exists but does not decode is met by the collator."""
    path = write_image_text_rows(tmp_path / "data", n=32, broken={5: "garbage"})
    overrides = [f"data.train.0.path={path}", "data.train.0.max_rows=null", f"output.dir={tmp_path / 'run'}",
                 "train.max_steps=4", "eval.tasks=[]", "data.verify_images=false", f"data.bad_images={policy}",
                 "data.num_workers=1"]
    code = main(["train", CLIP_TINY, *overrides])
    captured = capsys.readouterr()
    if policy == "stop":
        assert code == 2
        err = captured.err.strip().splitlines()[-1]
        assert err.startswith("error: training stopped at step ") and "train.jsonl row 6: image " in err
        assert "garbage-0005.png (column 'image') cannot be decoded" in err and "--resume auto" in err
    else:
        assert code == 0
        results = json.loads((tmp_path / "run" / "results.json").read_text())
        assert results["bad_images"]["replaced_during_training"] >= 1
        assert "row 6: image " in captured.out
