"""loss.compact on every kind of model that produces a vector: each (prefix, precision) term is trained and
logged, and the saved folder records them (GradCache is on in the CLIP and VLM2Vec recipes)."""

from __future__ import annotations

import json

import pytest
import torch

from embedtrain.config import recipe_from_dict
from embedtrain.train.loop import train

from kinds_support import KINDS, build_assets, recipe_data
from multimodal_support import tiny_vlm  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow  # a short training per kind

COMPACT = {"dims": [8, 4], "precisions": ["float32", "binary"]}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_vlm):  # noqa: F811
    return build_assets(tmp_path_factory.mktemp("compact-kinds"), tiny_vlm)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_trains_and_records_its_prefixes_and_precisions(kind, assets, tmp_path):
    threads = torch.get_num_threads()
    recipe = recipe_data(kind, assets, tmp_path / "run")
    recipe.setdefault("loss", {})["compact"] = COMPACT
    recipe["train"].update({"max_steps": 2, "save_every": None})
    try:
        result = train(recipe_from_dict(recipe), log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = next(line for line in lines if "loss" in line)
    terms = {f"loss/{d}/{p}" for d in COMPACT["dims"] for p in COMPACT["precisions"]}
    assert terms <= set(logged)
    # the total is the unweighted sum of the terms, averaged over the logged steps as each term is
    assert logged["loss"] == pytest.approx(sum(logged[t] for t in terms), rel=1e-5)  # float32 sums of 4 terms
    record = json.loads((result.model_dir / "compact_embeddings.json").read_text())
    assert record["dims"] == [8, 4] and record["precisions"] == ["float32", "binary"]
