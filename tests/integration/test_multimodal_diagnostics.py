"""Diagnostics for image-text kinds: the probe is held out of CLIP and VLM2Vec data as it is of text pairs (by
content, the same rows on every start, no training row keeping a text or image of the probe) and measured with the
model's own embeddings of its queries and positives."""

import json

import pytest
import torch

from embedtrain.config import recipe_from_dict
from embedtrain.data.multimodal import carve_probe, read_multimodal_pairs
from embedtrain.eval.diagnostics import diagnose
from embedtrain.models import load_model
from embedtrain.train.loop import train

from multimodal_support import tiny_vlm, write_image_text_rows  # noqa: F401  (a fixture)

ROWS = 340  # 5% is 17 probe pairs, above the 16 a probe needs
CLIP = {"embed_dim": 16, "image_size": 32, "patch_size": 8, "vision_width": 16, "vision_layers": 1,
        "vision_head_width": 8, "text_width": 16, "text_layers": 1, "text_heads": 2, "context_length": 16}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return write_image_text_rows(tmp_path_factory.mktemp("mm-probe"), n=ROWS)


def read(path, columns):
    return read_multimodal_pairs(str(path), "data.train[0]", "emoji", columns, None, "{image}{text}",
                                 "{image}{text}", 1.0, "train", None, "stop", False)


def test_the_probe_is_held_out_by_content(rows):
    pairs = read(rows, {"query": ("name", None), "positive": (None, "image")})
    probe, kept = carve_probe([pairs], 256)
    assert probe.rows == 17 and len(kept[0]) == ROWS - probe.excluded_rows[0] and kept[0].held_out == probe.excluded_rows[0]
    assert all(t is not None and i is None for t, i in probe.queries[0])  # a text query, an image positive
    assert all(t is None and isinstance(i, str) for t, i in probe.positives[0])
    names, images = {t for t, _ in probe.queries[0]}, {i for _, i in probe.positives[0]}
    assert not names & set(kept[0].texts["query"]) and not images & set(kept[0].images["positive"])
    assert len(kept[0].row_keys) == len(kept[0]) and set(kept[0].row_keys) <= set(pairs.row_keys)
    again, _ = carve_probe([read(rows, {"query": ("name", None), "positive": (None, "image")})], 256)
    assert again.queries == probe.queries  # by content: the same rows on every read


def test_a_clip_run_measures_its_probe(rows, tmp_path):
    recipe = {
        "kind": "clip", "model": {"architecture": CLIP},
        "data": {"train": [{"path": str(rows), "name": "emoji", "query_text_column": "name",
                            "positive_image_column": "image"}], "batch_size": 16},
        "train": {"lr": 1e-3, "max_steps": 4, "warmup_ratio": 0.0, "log_every": 1, "seed": 0, "torch_threads": 1},
        "eval": {"diagnostics": {"every": 2}}, "output": {"dir": str(tmp_path / "run"), "plot": False},
    }
    said = []
    result = train(recipe_from_dict(recipe), log=said.append)
    assert any(s.startswith("diagnostics probe: 17 pairs held out of training") for s in said)
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    measured = [l for l in lines if "diag/rankme" in l]
    assert [l["step"] for l in measured] == [0, 2, 4]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["diagnostics_probe"]["rows"] == 17
    assert results["data"][0]["held_out"] == results["diagnostics_probe"]["excluded_training_rows"]

    # the last line is the saved model's probe, embedded as the saved open_clip model embeds
    model = load_model(str(result.model_dir))
    pairs = read(rows, {"query": ("name", None), "positive": (None, "image")})
    probe, _ = carve_probe([pairs], 256)
    queries = model.encode_items(texts=[t for t, _ in probe.queries[0]], role="query")
    positives = model.encode_items(images=[i for _, i in probe.positives[0]], role="document")
    expected = diagnose(torch.cat([queries, positives]), queries, positives)
    for key, value in expected.items():
        assert measured[-1][f"diag/{key}"] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_a_vlm2vec_run_measures_items_of_text_and_image(rows, tiny_vlm, tmp_path):  # noqa: F811
    recipe = {
        "kind": "vlm2vec", "model": {"name_or_path": str(tiny_vlm), "max_length": 32, "finetune": "full"},
        "data": {"train": [{"path": str(rows), "name": "emoji", "query_image_column": "image",
                            "query_text_column": "name", "positive_text_column": "name",
                            "query_template": "{image}Name it\nQuery: {text}", "document_template": "{text}"}],
                 "batch_size": 8},
        "train": {"lr": 1e-4, "max_steps": 2, "warmup_ratio": 0.0, "log_every": 1, "seed": 0, "torch_threads": 1},
        "output": {"dir": str(tmp_path / "run"), "plot": False},
    }
    said = []
    train(recipe_from_dict(recipe), log=said.append)
    assert any(s.startswith("diagnostics probe: 17 pairs held out") for s in said)
    measured = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "diag/rankme" in l]
    assert [l["step"] for l in measured] == [0, 2] and all(l["diag/rankme"] > 1 for l in measured)


def test_a_table_and_its_webdataset_shards_hold_out_the_same_probe(rows, tmp_path):
    from multimodal_support import write_image_text_shards

    shards = write_image_text_shards(tmp_path / "shards", rows, rows_per_shard=64)
    table, _ = carve_probe([read(rows, {"query": ("name", None), "positive": (None, "image")})], 256)
    wds, kept = carve_probe([read(shards, {"query": ("txt", None), "positive": (None, "png")})], 256)
    assert [t for t, _ in wds.queries[0]] == [t for t, _ in table.queries[0]]
    assert len(kept[0]) == ROWS - 17


def test_an_unverified_bad_probe_image_is_one_line(tmp_path):
    from embedtrain.errors import EmbedtrainError

    rows = write_image_text_rows(tmp_path / "data", n=ROWS)
    probe, _ = carve_probe([read(rows, {"query": ("name", None), "positive": (None, "image")})], 256)
    bad = probe.positives[0][3][1]
    open(bad, "wb").write(b"not an image")
    recipe = {
        "kind": "clip", "model": {"architecture": CLIP},
        "data": {"train": [{"path": str(rows), "name": "emoji", "query_text_column": "name",
                            "positive_image_column": "image"}], "batch_size": 16, "verify_images": False},
        "train": {"lr": 1e-3, "max_steps": 2, "warmup_ratio": 0.0, "seed": 0},
        "output": {"dir": str(tmp_path / "run"), "plot": False},
    }
    with pytest.raises(EmbedtrainError, match=rf"diagnostics probe: image {bad} cannot be decoded .*verify_images: true"):
        train(recipe_from_dict(recipe), log=lambda *_: None)
