"""Training from webdataset shards: the tiny CLIP and VLM2Vec recipes read shards written from a JSONL and its
image folder and train exactly as they do from the folder form (same rows, same order, same image bytes)."""

import json

import torch
from safetensors.torch import load_file

from embedtrain.cli import main

from conftest import REPO
from multimodal_support import tiny_vlm, write_image_text_rows, write_image_text_shards  # noqa: F401  (fixture)

CLIP_TINY = str(REPO / "recipes" / "clip" / "emoji_clip_tiny.yaml")
VLM_TINY = str(REPO / "recipes" / "qwen2-vl-2b" / "vlm2vec_tiny_cpu.yaml")


def _forms(tmp_path, n, broken=None):
    jsonl = write_image_text_rows(tmp_path / "rows", n=n, broken=broken)
    return jsonl, write_image_text_shards(tmp_path / "shards", jsonl, rows_per_shard=16)


def _losses(run) -> list[float]:
    return [e["loss"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in e]


def test_clip_from_shards_trains_to_the_weights_of_the_folder_form(tmp_path):
    jsonl, shards = _forms(tmp_path, n=48)
    common = ["data.train.0.max_rows=null", "eval.tasks=[]"]
    assert main(["train", CLIP_TINY, f"data.train.0.path={jsonl}", f"output.dir={tmp_path / 'folder'}", *common]) == 0
    assert main(["train", CLIP_TINY, f"data.train.0.path={shards}/train-*.tar", "data.train.0.query_text_column=txt",
                 "data.train.0.positive_image_column=png", f"output.dir={tmp_path / 'shards_run'}", *common]) == 0
    a = load_file(str(tmp_path / "folder" / "model" / "open_clip_model.safetensors"))
    b = load_file(str(tmp_path / "shards_run" / "model" / "open_clip_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        # the same rows in the same order and the same image bytes, on one pinned thread: the same operations
        assert torch.equal(a[key], b[key]), key
    assert _losses(tmp_path / "folder") == _losses(tmp_path / "shards_run")


def test_a_corrupt_member_is_counted_in_the_run_results(tmp_path, capsys):
    _, shards = _forms(tmp_path, n=48, broken={20: "garbage"})
    overrides = [f"data.train.0.path={shards}", "data.train.0.query_text_column=txt",
                 "data.train.0.positive_image_column=png", "data.train.0.max_rows=null", "eval.tasks=[]",
                 "train.max_steps=1", f"output.dir={tmp_path / 'run'}"]
    assert main(["train", CLIP_TINY, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train-00001.tar sample 000020: image 000020.png" in err
    assert main(["train", CLIP_TINY, *overrides, "data.bad_images=skip"]) == 0
    assert "skipped: " in capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["data"][0]["dropped"] == {"bad_images": 1} and results["data"][0]["rows_read"] == 48
    assert results["bad_images"]["skipped_before_training"] == 1


def test_vlm2vec_reads_shards_as_it_reads_the_folder_form(tiny_vlm, tmp_path):
    jsonl, shards = _forms(tmp_path, n=24)
    common = [f"model.name_or_path={tiny_vlm}", "eval.tasks=[]", "train.max_steps=2", "data.train.0.max_rows=null",
              "data.train.1.max_rows=null"]
    assert main(["train", VLM_TINY, *common, f"data.train.0.path={jsonl}", f"data.train.1.path={jsonl}",
                 f"output.dir={tmp_path / 'folder'}"]) == 0
    # both datasets from the shards: images as queries (data.train[0]) and as documents (data.train[1])
    assert main(["train", VLM_TINY, *common, f"data.train.0.path={shards}", "data.train.0.query_image_column=png",
                 "data.train.0.positive_text_column=txt", f"data.train.1.path={shards}",
                 "data.train.1.query_text_column=txt", "data.train.1.positive_image_column=png",
                 f"output.dir={tmp_path / 'shards_run'}"]) == 0
    folder, from_shards = _losses(tmp_path / "folder"), _losses(tmp_path / "shards_run")
    assert len(from_shards) == 2 and all(v == v for v in from_shards)
    assert from_shards == folder  # the same rows, order and image bytes: the same computation
