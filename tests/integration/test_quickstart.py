"""The quickstart recipe on the real all-MiniLM-L6-v2 weights and WordNet data (shortened)."""

import json
import re

import pytest
import torch

from embedtrain.cli import main

from conftest import REPO

pytestmark = pytest.mark.slow


def test_quickstart_recipe_improves_saves_and_documents(tmp_path, capsys, monkeypatch):
    from huggingface_hub import ModelCard
    from sentence_transformers import SentenceTransformer

    from embedtrain.models import load_text_encoder

    monkeypatch.chdir(REPO)
    out = tmp_path / "qs"
    # 15 steps of the recipe's 128-row batches (its warm-up and decay shortened with it)
    code = main(["train", "recipes/minilm/wordnet_quickstart.yaml", f"output.dir={out}", "train.max_steps=15",
                 "train.log_every=5"])
    printed = capsys.readouterr().out
    assert code == 0
    # the base model's held-out figure, evaluated under the recipe's bf16 autocast: 41.10 here (41.09 in float32);
    # bf16 kernels differ between CPUs, so the second decimal is not asserted
    before = re.search(r"wordnet ndcg@10: before (\d+\.\d+) -> after", printed)
    assert before and abs(float(before.group(1)) - 41.1) < 0.1
    results = json.loads((out / "results.json").read_text())
    assert results["final"]["wordnet/ndcg@10"] > results["baseline"]["wordnet/ndcg@10"] + 0.01

    # the saved folder is a sentence-transformers model giving embedtrain's embeddings
    texts = ["a domesticated carnivorous mammal", "dog, domestic dog, Canis familiaris"]
    ours = load_text_encoder(str(out / "model")).encode(texts)
    theirs = SentenceTransformer(str(out / "model"), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(ours, theirs, atol=1e-5)

    # its card parses and carries the evaluation results
    card = ModelCard.load(out / "model" / "README.md")
    assert card.data.library_name == "sentence-transformers"
    values = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert values[("wordnet", "ndcg_at_10")] == pytest.approx(results["final"]["wordnet/ndcg@10"])
    assert "## Evaluation" in card.text or "Evaluation" in card.text
