"""A short run with loss.compact: every term is logged, the saved folder records its prefixes and precisions, and
sentence-transformers reproduces the truncated and quantized embeddings embedtrain evaluates."""

import json

import numpy as np

from embedtrain.config import recipe_from_dict
from embedtrain.train.loop import train

from conftest import tiny_recipe

COMPACT = {"dims": [32, 16, 8], "dim_weights": [1.0, 0.5, 0.5], "precisions": ["float32", "int8", "binary"]}


def test_compact_run_saves_a_folder_sentence_transformers_truncates_and_quantizes_alike(tiny_bert, pairs_file, tmp_path):
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

    texts = ["small red tree", "computer network data", "the river is dark", "music and sound", "open a road"]
    ours = load_text_encoder(str(result.model_dir)).encode(texts).numpy()
    for dim in record["dims"]:
        st = SentenceTransformer(str(result.model_dir), device="cpu", truncate_dim=dim)
        theirs = st.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
        mine = prefix(ours, dim)
        assert theirs.shape == (len(texts), dim)
        # 1e-5: the same float32 forward through two wrappers, normalised once more after truncation
        assert np.allclose(mine, theirs, atol=1e-5)
        np.testing.assert_array_equal(quantize(mine, "binary"), quantize_embeddings(theirs, "ubinary"))
        np.testing.assert_array_equal(quantize(mine, "int8", mine),
                                      quantize_embeddings(theirs, "int8", calibration_embeddings=theirs))


def test_a_prefix_longer_than_the_embedding_is_one_error(tiny_bert, pairs_file, tmp_path):
    import pytest

    from embedtrain.errors import EmbedtrainError

    recipe = tiny_recipe(tiny_bert, pairs_file, tmp_path / "run", loss={"compact": {"dims": [64, 16]}})
    with pytest.raises(EmbedtrainError, match=r"loss.compact.dims: 64 is longer than the model's 32-dimensional"):
        train(recipe_from_dict(recipe), log=lambda *_: None)
