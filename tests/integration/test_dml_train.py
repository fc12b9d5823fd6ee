"""Short real DML runs: VPT + semantic proxies on a tiny open_clip tower, saving, reloading, resuming."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from embedtrain.cli import main as cli_main
from embedtrain.config import DMLRecipe, recipe_from_dict
from embedtrain.models.semantic_proxies import load_dml_model
from embedtrain.train.loop import train

from vpt_support import build_tiny_open_clip, write_labelled_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dml")
    return build_tiny_open_clip(root / "tower"), write_labelled_images(root / "images", classes=8, per_class=6)


def recipe(assets, out, **sections):
    tower, meta = assets
    data = {
        "kind": "dml",
        "model": {
            "backbone": {"kind": "open_clip", "name_or_path": str(tower)},
            "tuning": {"prompt_depth": 2, "num_prompts": 2},
            "proxies": {"semantic": True, "accumulate": "gru", "class_prompt_depth": 1, "class_prompts": 2},
        },
        "loss": {"metrix": True},
        "data": {"path": str(meta), "samples_per_class": 2, "batch_size": 4, "augment": "crop_flip"},
        # the metric-learning train defaults from before the shared train section, written out
        "train": {"max_steps": 8, "log_every": 2, "save_every": 4, "eval_every": 4, "lr": 1e-2,
                  "weight_decay": 1e-4, "scheduler": "cosine", "warmup_ratio": 0.0, "epochs": 10, "max_grad_norm": 10.0},
        "output": {"dir": str(out), "plot": False},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    recipe = recipe_from_dict(data)
    assert isinstance(recipe, DMLRecipe)
    return recipe


def test_vpt_with_semantic_proxies_trains_saves_and_reloads(assets, tmp_path):
    tower, _ = assets
    result = train(recipe(assets, tmp_path / "run"), log=lambda *a: None)
    assert result.steps == 8 and 0 <= result.final["recall@1"] <= 1 and result.baseline
    summary = json.loads((tmp_path / "run" / "results.json").read_text())
    assert summary["train_classes"] == 4 and summary["test_classes"] == 4
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/recall@1" in l and l["step"] == 4 for l in lines) and any("mixed_loss" in l for l in lines)
    # the saved backbone is the original tower, bit for bit (it was frozen)
    saved = load_file(str(result.model_dir / "model.safetensors"))
    original = load_file(str(tower / "open_clip_model.safetensors"))
    for key, value in original.items():
        if key.startswith("visual."):
            assert torch.equal(saved["encoder.backbone.model." + key[len("visual."):]], value), key
    # the folder reloads without the original tower and embeds the test classes the same way
    model, config = load_dml_model(result.model_dir)
    assert len(config["test_classes"]) == 4
    from embedtrain.data.images import ImageClassDataset, build_transform, collate_images, read_labelled_images

    images = read_labelled_images(str(assets[1]), "image", "label")
    subset, labels = images.subset(config["test_classes"])
    b = model.encoder.backbone
    ds = ImageClassDataset(subset, labels, build_transform(b.image_size, b.mean, b.std, False, "none"))
    batch = collate_images([ds[i] for i in range(len(ds))])
    from embedtrain.eval.dml import dml_metrics

    with torch.no_grad():
        scores = dml_metrics(model.eval().encoder(batch["pixels"]), batch["labels"])
    assert scores["recall@1"] == pytest.approx(result.final["recall@1"])


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(assets, tmp_path):
    full = train(recipe(assets, tmp_path / "full"), log=lambda *a: None)
    # the same run stopped after its step-4 checkpoint: keep only that checkpoint and resume
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "model")
    (part / "results.json").unlink()
    shutil.rmtree(part / "checkpoints" / "step-0000008")
    resumed = train(recipe(assets, part), resume="auto", log=lambda *a: None)
    a = load_file(str(full.model_dir / "model.safetensors"))
    b = load_file(str(resumed.model_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key  # a resume repeats the same operations
    assert resumed.final == pytest.approx(full.final)


def test_cli_reports_recipe_problems_on_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("# embedtrain train bad.yaml\nkind: dml\nmodel: {backbone: {name_or_path: nowhere}}\n"
                    "data: {path: none.jsonl}\ntrain: {lr: -1}\n")
    assert cli_main(["dml", str(path)]) == 2
    err = capsys.readouterr().err
    assert "error: train.lr: must be positive, got -1" in err
    assert "error: output.dir: missing" in err


def test_emoji_comparison_script_reports_every_row(assets, tmp_path):
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("dml_emoji", REPO / "scripts" / "dml_emoji.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    tower, meta = assets
    args = ["--backbone", str(tower), "--output", str(tmp_path / "runs"), "--seeds", "1",
            "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md"),
            "--set", f"data.path={meta}", "data.label_column=label", "data.samples_per_class=2", "data.batch_size=4",
            "train.max_steps=2", "model.proxies.class_prompts=2"]
    assert script.main(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report["rows"]) == ["head", "full", "vpt", "vpt_sp"]
    for row in report["rows"].values():
        assert set(row["mean"]) == {"recall@1", "recall@2", "recall@4", "recall@8", "map@r"}
    # head-only trains far fewer parameters than full fine-tuning
    assert report["rows"]["head"]["trainable_parameters"] < report["rows"]["full"]["trainable_parameters"]
    table = (tmp_path / "r.md").read_text()
    assert len(table.strip().splitlines()) == 7 and "VPT + semantic proxies" in table and "no training" in table
    # a second call with --reuse trains nothing and gives the same report
    assert script.main(["--reuse"] + args) == 0
    again = json.loads((tmp_path / "r.json").read_text())
    assert again["rows"]["vpt_sp"]["mean"] == report["rows"]["vpt_sp"]["mean"]


def test_the_probe_is_same_class_pairs_of_unseen_classes(tmp_path):
    """Metric learning measures the diagnostics on pairs of same-class images of the unseen classes, so no
    training image is held out: 4 unseen classes of 10 images give 20 pairs. The run measures them at step 0,
    every eval.diagnostics.every steps and at the end, and its last measurement is that of the saved model's own
    embeddings of those pairs. With fewer than 16 pairs (4 classes of 6 images) it says why it measures none."""
    from embedtrain.data.images import ImageClassDataset, build_transform, collate_images, read_labelled_images
    from embedtrain.data.probe import same_class_pairs
    from embedtrain.eval.diagnostics import diagnose

    tower = build_tiny_open_clip(tmp_path / "tower")
    meta = write_labelled_images(tmp_path / "images", classes=8, per_class=10)
    said = []
    result = train(recipe((tower, meta), tmp_path / "run", eval={"diagnostics": {"every": 4}}), log=said.append)
    assert "diagnostics probe: 20 pairs of same-class images from 4 unseen classes; no training image held out" in said
    summary = json.loads((tmp_path / "run" / "results.json").read_text())
    assert summary["diagnostics_probe"]["rows"] == 20 and summary["diagnostics_probe"]["classes"] == 4
    assert summary["diagnostics_probe"]["excluded_training_rows"] == 0 and summary["train_images"] == 40
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    measured = [l for l in lines if "diag/rankme" in l]
    assert [l["step"] for l in measured] == [0, 4, 8]
    # measuring changes nothing in training (no image held out, no random draw): the weights of a run without it
    unmeasured = train(recipe((tower, meta), tmp_path / "unmeasured", eval={"diagnostics": {"probe_rows": 0}}),
                       log=lambda *_: None)
    a, b = (load_file(str(r.model_dir / "model.safetensors")) for r in (result, unmeasured))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    model, config = load_dml_model(result.model_dir)
    images = read_labelled_images(str(meta), "image", "label")
    subset, labels = images.subset(config["test_classes"])
    b = model.encoder.backbone
    ds = ImageClassDataset(subset, labels, build_transform(b.image_size, b.mean, b.std, False, "none"))
    pairs = same_class_pairs(labels, 256)
    assert len(pairs) == 20 and all(labels[a] == labels[c] for a, c in pairs)
    with torch.no_grad():
        embed = lambda idx: model.eval().encoder(collate_images([ds[i] for i in idx])["pixels"])  # noqa: E731
        queries, positives = embed([a for a, _ in pairs]), embed([c for _, c in pairs])
    expected = diagnose(torch.cat([queries, positives]), queries, positives)
    for key, value in expected.items():  # the same images and weights, embedded in other batches: float32 rounding
        assert measured[-1][f"diag/{key}"] == pytest.approx(value, rel=1e-4, abs=1e-5), key

    small = write_labelled_images(tmp_path / "small", classes=8, per_class=6)
    said = []
    train(recipe((tower, small), tmp_path / "small_run", train={"max_steps": 2}), log=said.append)
    assert "diagnostics: off; the 4 unseen classes' 24 images make fewer than 16 same-class pairs; add images or " \
           "set eval.diagnostics.probe_rows=0" in said
    assert not any("holds out no probe" in s for s in said)
    assert json.loads((tmp_path / "small_run" / "results.json").read_text())["diagnostics_probe"] == {
        "off": "the 4 unseen classes' 24 images make fewer than 16 same-class pairs"}
