"""The tiny NV-Embed recipes (recipes/nv_embed_tiny/) run end to end: stage 2 starts from stage 1's model."""

import json

import pytest
import torch
import yaml

from embedtrain.config import recipe_from_dict
from embedtrain.train.loop import train

from conftest import REPO, write_beir


def _localise(recipe: dict, out, beir) -> dict:
    """The shipped recipe with absolute data paths, its output in ``out`` and a small evaluation task."""
    for ds in recipe["data"]["train"]:
        ds["path"] = str(REPO / ds["path"])
    if recipe["model"].get("name_or_path"):
        recipe["model"]["name_or_path"] = str(REPO / recipe["model"]["name_or_path"])
    recipe["output"]["dir"] = str(out)
    recipe["eval"] = {"tasks": [{"path": str(beir), "name": "tiny",
                                 "instruction": "Given a definition, retrieve the words it defines"}]}
    return recipe


def _losses(run) -> list[float]:
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


@pytest.mark.slow
def test_tiny_two_stage_recipe_trains_end_to_end(tmp_path, one_torch_thread):
    from sentence_transformers import SentenceTransformer

    beir = write_beir(tmp_path / "beir" / "eval")
    stage1 = _localise(yaml.safe_load((REPO / "recipes/nv_embed_tiny/stage1.yaml").read_text()), tmp_path / "s1", beir)
    stage1_path = tmp_path / "stage1.yaml"
    stage1_path.write_text(yaml.safe_dump(stage1))
    stage2 = _localise(yaml.safe_load((REPO / "recipes/nv_embed_tiny/stage2.yaml").read_text()), tmp_path / "s2", beir)
    stage2["model"]["previous_stage"] = str(stage1_path)

    lines = []
    result = train(recipe_from_dict(stage2), log=lambda *a: lines.append(" ".join(map(str, a))))
    assert any("previous stage" in line and "training it first" in line for line in lines)
    first = json.loads((tmp_path / "s1" / "results.json").read_text())

    # stage 2 started from stage 1's output: before its first step it scores exactly what stage 1 ended with
    assert result.baseline.keys() == first["final"].keys()
    for key, value in first["final"].items():
        assert result.baseline[key] == pytest.approx(value, abs=1e-9), key
    # both stages learn (stage 2 logs windows of 2 batches from each of its 3 datasets)
    for run in (tmp_path / "s1", tmp_path / "s2"):
        losses = _losses(run)
        third = len(losses) // 3
        assert sum(losses[-third:]) < sum(losses[:third]), (run.name, losses)

    # the stage 2 model: merged decoder + adapter + head, reloaded by sentence-transformers to the same embeddings
    from embedtrain.models import load_text_encoder

    model = result.model_dir
    assert (model / "adapter" / "adapter_config.json").is_file()
    texts = ["a word for a small river", "grinning face"]
    ours = load_text_encoder(str(model)).encode(texts, role="query")
    st = SentenceTransformer(str(model), device="cpu", trust_remote_code=True)
    assert torch.allclose(st.encode(texts, prompt_name="query", convert_to_tensor=True), ours, atol=1e-5)

    # a second stage-2 run reuses the finished stage 1 instead of training it again
    before = (tmp_path / "s1" / "metrics.jsonl").stat().st_mtime_ns
    stage2["output"]["dir"] = str(tmp_path / "s2b")
    stage2["train"]["max_steps"] = 1
    lines.clear()
    train(recipe_from_dict(stage2), log=lambda *a: lines.append(" ".join(map(str, a))))
    assert not any("previous stage" in line for line in lines)
    assert (tmp_path / "s1" / "metrics.jsonl").stat().st_mtime_ns == before
