"""Model cards: metadata that huggingface_hub reads back, and the body's sections."""

from __future__ import annotations

import re

import pytest
import yaml
from huggingface_hub import ModelCard, metadata_load

from embedtrain.errors import EmbedtrainError
from embedtrain.hub import (
    GRADCACHE_CITATION,
    LOSS_CITATIONS,
    EvalEntry,
    ModelCardData,
    render_model_card,
    write_model_card,
)

RECIPE = {
    "model": {"name_or_path": "sentence-transformers/all-MiniLM-L6-v2", "pooling": "mean", "normalize": True},
    "data": {"train": [{"path": "data/wordnet/train.jsonl", "query_prompt": "query: "}], "batch_size": 64},
    "loss": {"name": "infonce", "temperature": 0.05},
}


def _data(**overrides) -> ModelCardData:
    fields = dict(
        model_name="minilm-wordnet",
        base_model="sentence-transformers/all-MiniLM-L6-v2",
        datasets=["sentence-transformers/natural-questions"],
        local_datasets=["wordnet"],
        tags=["retrieval"],
        repo_id="alice/minilm-wordnet",
        recipe=RECIPE,
        losses=[{"name": "infonce", "description": "In-batch negatives.", "equation": r"-\log p(d^+ \mid q)"}],
        hyperparameters={"lr": 5e-5, "batch_size": 64, "mixed_precision": "bf16", "max_grad_norm": None},
        hardware="1 x NVIDIA H200",
        training_time_s=3725.0,
        embedding_dim=384,
        max_length=256,
        pooling="mean",
        normalize=True,
        prompts={"query": "query: ", "document": ""},
        eval_results=[
            EvalEntry(
                "SciFact", "mteb/scifact", "ndcg_at_10", 0.6512, main_score=True, source="mteb", baseline=0.6203
            ),
            EvalEntry("wordnet-eval", "wordnet-eval", "mrr@10", 0.4375, split="dev", baseline=0.31),
        ],
    )
    fields.update(overrides)
    return ModelCardData(**fields)


def _body(text: str) -> str:
    return ModelCard(text).text


def test_metadata_parses_back_with_huggingface_hub():
    card = ModelCard(render_model_card(_data()))
    meta = card.data

    assert meta.library_name == "sentence-transformers"
    assert meta.pipeline_tag == "sentence-similarity"
    assert meta.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta.license == "apache-2.0"
    assert meta.language == ["en"]
    assert meta.datasets == ["sentence-transformers/natural-questions"]
    assert meta.tags == [
        "sentence-transformers", "embedtrain", "feature-extraction", "sentence-similarity", "retrieval"
    ]
    assert meta.model_name == "minilm-wordnet"

    scifact, wordnet = meta.eval_results
    assert (scifact.task_type, scifact.task_name) == ("text-retrieval", "Retrieval")
    assert (scifact.dataset_type, scifact.dataset_name, scifact.dataset_split) == ("mteb/scifact", "SciFact", "test")
    assert (scifact.metric_type, scifact.metric_value) == ("ndcg_at_10", 0.6512)
    assert (scifact.source_name, scifact.source_url) == ("MTEB", "https://github.com/embeddings-benchmark/mteb/")
    assert (wordnet.dataset_type, wordnet.dataset_split) == ("wordnet-eval", "dev")
    assert (wordnet.metric_type, wordnet.metric_value) == ("mrr_at_10", 0.4375)
    assert (wordnet.source_name, wordnet.source_url) == ("embedtrain", "https://huggingface.co/alice/minilm-wordnet")


def test_card_file_loads_with_modelcard_load_and_metadata_load(tmp_path):
    path = write_model_card(tmp_path, _data())

    assert path == tmp_path / "README.md"
    values = [r.metric_value for r in ModelCard.load(path).data.eval_results]
    assert values == [0.6512, 0.4375]
    meta = metadata_load(path)
    assert meta["library_name"] == "sentence-transformers"
    assert meta["model-index"][0]["name"] == "minilm-wordnet"
    assert len(meta["model-index"][0]["results"]) == 2


def test_body_sections():
    body = _body(render_model_card(_data()))

    assert body.lstrip().startswith("# minilm-wordnet")
    assert "| Embedding dimension | 384 |" in body
    assert "| Max tokens | 256 |" in body
    assert "| Similarity | cosine |" in body
    assert 'model = SentenceTransformer("alice/minilm-wordnet")' in body
    assert "model.encode_query(" in body and "model.encode_document(" in body
    assert "# (1, 384)" in body
    assert "- query: `query: `" in body
    assert "| SciFact | Retrieval | `mteb/scifact` | test | **ndcg_at_10** | 0.6203 | **0.6512** |" in body
    assert "| wordnet-eval | Retrieval | `wordnet-eval` | dev | mrr_at_10 | 0.3100 | 0.4375 |" in body
    hub_dataset = "sentence-transformers/natural-questions"
    assert f"- [{hub_dataset}](https://huggingface.co/datasets/{hub_dataset})" in body
    assert "- `wordnet` (local file)" in body
    assert "$$\n-\\log p(d^+ \\mid q)\n$$" in body
    assert "| `lr` | `5e-05` |" in body and "| `max_grad_norm` | `null` |" in body
    assert "- Hardware: 1 x NVIDIA H200" in body
    assert "- Training time: 1 h 02 min 05 s" in body
    # the loss named 'infonce' picks up the CPC citation; Sentence-BERT is always cited
    assert "arXiv" in body and "1807.03748" in body and "Reimers, Nils and Gurevych, Iryna" in body


def test_recipe_is_shown_as_yaml():
    body = _body(render_model_card(_data()))
    block = re.search(r"### Recipe\n.*?```yaml\n(.*?)\n```", body, re.S)
    assert block is not None
    assert yaml.safe_load(block.group(1)) == RECIPE


def test_code_fences_survive_backticks_in_the_recipe():
    recipe = {"data": {"train": [{"query_prompt": "```python\n"}]}}
    body = _body(render_model_card(_data(recipe=recipe)))
    block = re.search(r"````yaml\n(.*?)\n````", body, re.S)
    assert block is not None and yaml.safe_load(block.group(1)) == recipe


def test_minimal_card():
    text = render_model_card(ModelCardData(model_name="bare"))
    card = ModelCard(text)
    assert card.data.eval_results is None
    assert set(card.data.to_dict()) == {"language", "library_name", "license", "pipeline_tag", "tags"}
    assert card.data.tags == ["sentence-transformers", "embedtrain", "feature-extraction", "sentence-similarity"]
    assert "## Evaluation" not in card.text and "### Recipe" not in card.text
    assert 'SentenceTransformer("path/to/model")' in card.text


def test_local_base_model_stays_out_of_the_metadata(tmp_path):
    card = ModelCard(render_model_card(_data(base_model=str(tmp_path))))
    assert card.data.base_model is None
    assert f"| Base model | `{tmp_path}` |" in card.text


def test_loss_citations_by_name():
    assert set(LOSS_CITATIONS) == {"infonce", "clip", "siglip"}
    body = _body(render_model_card(_data(losses=[{"name": "CLIP"}], citations={"GradCache": GRADCACHE_CITATION})))
    assert "2103.00020" in body and "2101.06983" in body
    assert "1807.03748" not in body


def test_eval_entry_normalises_metric_names_and_checks_the_source():
    assert EvalEntry("t", "d", "ndcg@10", 1).metric_name == "ndcg_at_10"
    with pytest.raises(ValueError, match="source"):
        EvalEntry("t", "d", "ndcg_at_10", 0.5, source="leaderboard")


def test_write_model_card_replaces_the_existing_readme(tmp_path):
    (tmp_path / "README.md").write_text("---\ntags: [old]\n---\n# written by sentence-transformers\n")

    write_model_card(tmp_path, _data())

    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "written by sentence-transformers" not in text
    assert text == render_model_card(_data())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # no temporary file left
    (tmp_path / "other").write_text("")
    assert (tmp_path / "README.md").stat().st_mode == (tmp_path / "other").stat().st_mode  # usual permissions


def test_write_model_card_needs_the_folder(tmp_path):
    with pytest.raises(EmbedtrainError, match="model folder not found"):
        write_model_card(tmp_path / "missing", _data())


def test_a_card_without_a_leading_yaml_block_has_no_metadata():
    """Why the template keeps '{{ card_data }}' first: huggingface_hub drops metadata found elsewhere."""
    card = ModelCard("# Title\n\n---\nlibrary_name: sentence-transformers\n---\n")
    assert card.data.to_dict() == {}


def test_custom_module_folders_are_loaded_with_trust_remote_code(tmp_path):
    """A folder whose modules.json names embedtrain classes (decoder, latent attention, experts) cannot be
    loaded by sentence-transformers without trust_remote_code=True; the card's snippet must say so."""
    import json

    from embedtrain.hub.folder_card import has_custom_modules

    plain = render_model_card(ModelCardData(model_name="m"))
    assert "trust_remote_code" not in plain
    custom = render_model_card(ModelCardData(model_name="m", custom_modules=True))
    assert 'SentenceTransformer("path/to/model", trust_remote_code=True)' in custom
    assert "pip install -U sentence-transformers embedtrain\n```" in custom
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"}]))
    assert not has_custom_modules(tmp_path)
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "embedtrain.models.bidirectional.BidirectionalTransformer"}]))
    assert has_custom_modules(tmp_path)
