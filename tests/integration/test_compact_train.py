"""A short run with loss.compact: every term is logged, the saved folder records its prefixes and precisions, and
sentence-transformers reproduces the truncated and quantized embeddings embedtrain evaluates."""

import json

import numpy as np

from embedtrain.config import recipe_from_dict
from embedtrain.train.loop import train

from conftest import tiny_recipe

COMPACT = {"dims": [32, 16, 8], "dim_weights": [1.0, 0.5, 0.5], "precisions": ["float32", "int8", "binary"]}


def test_compact_run_saves_a_folder_sentence_transformers_truncates_and_quantizes_alike(tiny_bert, pairs_file, beir_dir,
                                                                                      tmp_path, capsys):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util.quantization import quantize_embeddings

    from embedtrain.eval.compact import prefix, quantize
    from embedtrain.models import load_text_encoder

    recipe = tiny_recipe(tiny_bert, pairs_file, tmp_path / "run", loss={"compact": COMPACT},
                         train={"gradient_cache_chunk_size": 4})
    result = train(recipe_from_dict(recipe), log=lambda *_: None)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = next(line for line in lines if "loss" in line)
    assert {f"loss/{d}/{p}" for d in COMPACT["dims"] for p in COMPACT["precisions"]} <= set(logged)

    record = json.loads((result.model_dir / "compact_embeddings.json").read_text())
    assert record["dims"] == [32, 16, 8] and record["precisions"] == COMPACT["precisions"]
    assert record["sentence_transformers_precision"]["binary"] == "ubinary"
    card = (result.model_dir / "README.md").read_text()
    assert "| Trained prefixes (`truncate_dim`) | 32, 16, 8 |" in card
    assert "`float32`, `int8`, `ubinary`" in card

    texts = ["small red tree", "computer network data", "the river is dark", "music and sound", "open a road",
             "a fast child", "blue water", "read and write", "the city light", "green plant", "slow machine",
             "break the tool"]
    ours = load_text_encoder(str(result.model_dir)).encode(texts).numpy()
    for dim in record["dims"]:
        st = SentenceTransformer(str(result.model_dir), device="cpu", truncate_dim=dim)
        theirs = st.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
        mine = prefix(ours, dim)
        assert theirs.shape == (len(texts), dim)
        # 1e-5: the same float32 forward through two wrappers, normalised once more after truncation
        assert np.allclose(mine, theirs, atol=1e-5)
        # the codes agree wherever a value is not within that 1e-5 of a bucket edge (where either side may round)
        sure = np.abs(mine) > 1e-5
        np.testing.assert_array_equal(np.unpackbits(quantize(mine, "binary"), axis=-1)[sure],
                                      np.unpackbits(quantize_embeddings(theirs, "ubinary"), axis=-1)[sure])
        lo, step = mine.min(0), (mine.max(0) - mine.min(0)) / 255
        position = (mine - lo) / step
        sure = np.abs(position - np.round(position)) > 1e-5 / step  # per dimension: 1e-5 in bucket units
        ours_int8 = quantize(mine, "int8", mine)
        theirs_int8 = quantize_embeddings(theirs, "int8", calibration_embeddings=theirs)
        assert sure.mean() > 0.5 and np.array_equal(ours_int8[sure], theirs_int8[sure])

    # embedtrain eval --compact reports the table at the prefixes and precisions the folder records
    from embedtrain.cli import main

    assert main(["eval", "--model", str(result.model_dir), "--local-task", str(beir_dir), "--compact",
                 "--output", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "compact.json").read_text())
    rows = {(r["dims"], r["precision"]) for r in report[0]["table"]}
    assert rows == {(d, p) for d in (32, 16, 8)
                    for p in ("float32", "int8", "binary", "binary+rescore", "binary+float_rescore")}
    assert "| 8 | binary | 1 |" in capsys.readouterr().out
    assert main(["eval", "--model", str(result.model_dir), "--compact", "--output", str(tmp_path / "e2")]) == 2
    assert "--compact: give the BEIR folders" in capsys.readouterr().err


def test_a_prefix_longer_than_the_embedding_is_one_error(tiny_bert, pairs_file, tmp_path):
    import pytest

    from embedtrain.errors import EmbedtrainError

    recipe = tiny_recipe(tiny_bert, pairs_file, tmp_path / "run", loss={"compact": {"dims": [64, 16]}})
    with pytest.raises(EmbedtrainError, match=r"loss.compact.dims: 64 is longer than the model's 32-dimensional"):
        train(recipe_from_dict(recipe), log=lambda *_: None)


def test_a_centred_run_trains_with_a_fixed_centre_and_saves_it_for_sentence_transformers(tiny_bert, pairs_file,
                                                                                      tmp_path):
    import torch
    from sentence_transformers import SentenceTransformer

    from embedtrain.data.readers import column_list
    from embedtrain.models import load_text_encoder
    from embedtrain.train.checkpoint import list_checkpoints

    center = {**COMPACT, "center": True, "center_rows": 10}
    recipe = tiny_recipe(tiny_bert, pairs_file, tmp_path / "run", loss={"compact": center},
                         train={"gradient_cache_chunk_size": 4, "save_every": 3})
    result = train(recipe_from_dict(recipe), log=lambda *_: None)

    # the centre is the mean embedding of 10 evenly spaced rows' queries and positives under the starting model
    start = load_text_encoder(str(tiny_bert), max_length=32)
    trained = recipe_from_dict(recipe)
    from embedtrain.train.tasks.text import TextTask

    task = TextTask(trained, log=lambda *_: None)
    task.read_training_data()
    data = task.datasets[0]
    picks = [i * len(data) // 10 for i in range(10)]
    chosen = data.rows.select(picks)
    expected = torch.cat([start.encode(column_list(chosen, "query"), role="query"),
                          start.encode(column_list(chosen, "positive"))]).mean(0)
    saved = load_text_encoder(str(result.model_dir))
    assert saved.center is not None
    assert "| Centre | the mean training embedding is subtracted" in (result.model_dir / "README.md").read_text()
    # float32 means of the same 20 embeddings, summed in float64 by the trainer: agree to float32 rounding
    assert torch.allclose(saved.center, expected, atol=1e-6)

    texts = ["small red tree", "computer network data", "the river is dark", "music and sound", "open a road"]
    ours, centre = saved.encode(texts), saved.center.clone()
    saved.set_center(None)
    raw = saved.encode(texts)
    assert torch.allclose(ours, torch.nn.functional.normalize(raw - expected, dim=-1), atol=1e-5)
    st = SentenceTransformer(str(result.model_dir), device="cpu")
    assert [m.__class__.__name__ for m in st] == ["Transformer", "Pooling", "Normalize", "Dense", "Normalize"]
    assert np.allclose(st.encode(texts, convert_to_numpy=True), ours.numpy(), atol=1e-5)
    # checkpoints hold the centre (a resumed run continues with it, not with a recomputed one)
    from safetensors.torch import load_file

    _, checkpoint = list_checkpoints(tmp_path / "run")[-1]
    weights = next(checkpoint.rglob("model*.safetensors"))
    assert torch.equal(load_file(str(weights))["center"], centre)

    # a resume takes the centre from the checkpoint instead of embedding the centre's texts again, and ends with it
    (step, first), *_ = list_checkpoints(tmp_path / "run")
    assert step < 6  # the resumed run trains on from step 3
    lines = []
    resumed = train(recipe_from_dict(recipe), resume=str(first), log=lambda *a: lines.append(" ".join(map(str, a))))
    assert "loss.compact.center: the centre is read from the checkpoint" in lines
    assert not any("embedding the centre's texts" in line for line in lines)
    assert torch.equal(load_text_encoder(str(resumed.model_dir)).center, centre)


def test_a_dense_layer_that_is_not_a_centre_is_refused(tiny_bert, tmp_path):
    import pytest
    import torch
    from sentence_transformers.sentence_transformer.modules import Dense

    from embedtrain.errors import EmbedtrainError
    from embedtrain.models import load_text_encoder

    encoder = load_text_encoder(str(tiny_bert), max_length=32)
    st = encoder.sentence_transformer()
    st.add_module(str(len(st._modules)), Dense(32, 32))  # tanh, random weight: not what the encoder computes
    st.save(str(tmp_path / "m"), safe_serialization=True)
    with pytest.raises(EmbedtrainError, match="its Dense layer is not a centre"):
        load_text_encoder(str(tmp_path / "m"))


def test_a_pca_basis_and_random_binary_rotations_are_saved_and_served_alike(tiny_bert, pairs_file, beir_dir, tmp_path):
    """basis: pca rotates the centred embedding onto the principal axes of the calibration rows (a rotation in the
    Dense layer sentence-transformers runs); binary_rotation: random multiplies each unit prefix by a fixed random
    rotation before its sign, saved beside the model; the evaluation and sentence-transformers' quantization give
    the same codes."""
    import pytest
    import torch

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util.quantization import quantize_embeddings

    from embedtrain.errors import EmbedtrainError
    from embedtrain.eval.compact import prefix, quantize
    from embedtrain.losses.compact import random_rotation
    from embedtrain.models import load_text_encoder
    from embedtrain.models.compact_record import read_binary_rotations
    from embedtrain.train import compact
    from embedtrain.train.checkpoint import list_checkpoints
    from embedtrain.train.tasks.text import TextTask

    # 64 rows: 128 calibration embeddings, more than the 32 dimensions, so that every principal axis is determined
    rotated = {"dims": [32, 16, 8], "precisions": ["float32", "binary"], "center": True, "center_rows": 64,
               "basis": "pca", "binary_rotation": "random", "rescore_weight": 0.5}
    recipe = tiny_recipe(tiny_bert, pairs_file, tmp_path / "run", loss={"compact": rotated}, train={"save_every": 3})
    result = train(recipe_from_dict(recipe), log=lambda *_: None)

    # the basis is that of the starting model's calibration embeddings, computed again here
    task = TextTask(recipe_from_dict(recipe), log=lambda *_: None)
    task.read_training_data()
    start = load_text_encoder(str(tiny_bert), max_length=32)
    emb = compact.calibration_embeddings(start, task.datasets, 64, log=lambda *_: None)
    expected = compact.principal_basis(emb - emb.double().mean(0).float())
    saved = load_text_encoder(str(result.model_dir))
    # 1e-5 on |entries|: the same eigendecomposition of the same float32 embeddings (an axis may flip its sign)
    assert saved.basis is not None and torch.allclose(saved.basis.abs(), expected.abs(), atol=1e-5)
    record = json.loads((result.model_dir / "compact_embeddings.json").read_text())
    assert record["basis"] == "pca" and record["binary_rotation"] == "random"
    card = (result.model_dir / "README.md").read_text()
    assert "| Basis |" in card and "| Binary codes |" in card and "binary_rotations.safetensors" in card

    # the saved rotations are the ones the binary terms trained through
    rotations = read_binary_rotations(result.model_dir)
    assert sorted(rotations) == [8, 16, 32]
    for d, r in rotations.items():
        assert np.array_equal(r, random_rotation(d).numpy())

    # sentence-transformers computes the same embedding, and its quantization of the rotated prefix the same codes
    texts = ["small red tree", "computer network data", "the river is dark", "music and sound", "open a road",
             "a fast child", "blue water", "read and write"]
    ours = saved.encode(texts).numpy()
    st = SentenceTransformer(str(result.model_dir), device="cpu")
    assert [m.__class__.__name__ for m in st] == ["Transformer", "Pooling", "Normalize", "Dense", "Normalize"]
    theirs = st.encode(texts, convert_to_numpy=True)
    assert np.allclose(ours, theirs, atol=1e-5)  # 1e-5: the same float32 forward through two wrappers
    for d, r in rotations.items():
        mine, other = prefix(ours, d) @ r, prefix(theirs, d) @ r
        sure = np.abs(mine) > 1e-5  # a value within the forward's 1e-5 of 0 may take either sign
        np.testing.assert_array_equal(np.unpackbits(quantize(mine, "binary"), axis=-1)[sure],
                                      np.unpackbits(quantize_embeddings(other, "ubinary"), axis=-1)[sure])

    # embedtrain eval --compact searches the rotated codes
    from embedtrain.cli import main

    assert main(["eval", "--model", str(result.model_dir), "--local-task", str(beir_dir), "--compact",
                 "--output", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "compact.json").read_text())
    assert all(r.get("rotated") for r in report[0]["table"] if r["precision"].startswith("binary"))

    # a resume reads the basis from the checkpoint
    (step, first), *_ = list_checkpoints(tmp_path / "run")
    lines = []
    resumed = train(recipe_from_dict(recipe), resume=str(first), log=lambda *a: lines.append(" ".join(map(str, a))))
    assert "loss.compact.center: the centre and basis are read from the checkpoint" in lines
    assert torch.equal(load_text_encoder(str(resumed.model_dir)).basis, saved.basis)

    # a rotations file the record names but the folder lacks is one clear error
    (result.model_dir / "binary_rotations.safetensors").unlink()
    with pytest.raises(EmbedtrainError, match="binary_rotations.safetensors is missing"):
        read_binary_rotations(result.model_dir)
