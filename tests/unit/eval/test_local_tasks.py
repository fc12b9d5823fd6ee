"""Local BEIR folders as mteb retrieval tasks, scored by mteb's own code."""

from __future__ import annotations

import math
from pathlib import Path

import mteb
import numpy as np
import pytest
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.types import PromptType
from torch.utils.data import DataLoader

from embedtrain.errors import EmbedtrainError
from embedtrain.eval.local_tasks import default_task_name, folder_revision, make_local_retrieval_task
from embedtrain.eval.mteb_adapter import MtebEncoder
from embedtrain.eval.retrieval import evaluate_retrieval, load_beir

from mteb_eval_support import graded_beir_dir, make_beir, tiny_model_dir  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def adapter(tiny_model_dir: Path) -> MtebEncoder:
    return MtebEncoder.from_pretrained(str(tiny_model_dir))


def embed(adapter: MtebEncoder, task, texts: list[str], prompt_type: PromptType) -> np.ndarray:
    batches = DataLoader([{"text": t} for t in texts], batch_size=8)
    return np.asarray(
        adapter.encode(batches, task_metadata=task.metadata, hf_split="test", hf_subset="default", prompt_type=prompt_type)
    )


def ndcg_at_10(query_emb: np.ndarray, corpus_emb: np.ndarray, query_ids, corpus_ids, qrels) -> float:
    """nDCG@10 with linear gain, averaged over queries with a relevant document."""
    q = query_emb / np.linalg.norm(query_emb, axis=1, keepdims=True)
    c = corpus_emb / np.linalg.norm(corpus_emb, axis=1, keepdims=True)
    scores = q.astype(np.float64) @ c.astype(np.float64).T
    values = []
    for row, qid in zip(scores, query_ids):
        grades = qrels.get(qid, {})
        if not any(g > 0 for g in grades.values()):
            continue
        top = np.argsort(-row, kind="stable")[:10]
        dcg = sum(grades.get(corpus_ids[j], 0) / math.log2(rank + 2) for rank, j in enumerate(top))
        ideal = sorted((g for g in grades.values() if g > 0), reverse=True)[:10]
        idcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal))
        values.append(dcg / idcg)
    return float(np.mean(values))


def test_metadata_is_complete(graded_beir_dir: Path) -> None:
    task = make_local_retrieval_task(graded_beir_dir)
    md = task.metadata
    assert isinstance(task, AbsTaskRetrieval)
    assert md.name == "toy" == default_task_name(graded_beir_dir)
    assert md.type == "Retrieval" and md.category == "t2t" and md.modalities == ["text"]
    assert md.eval_splits == ["test"] and md.eval_langs == ["eng-Latn"] and md.main_score == "ndcg_at_10"
    assert md.dataset == {"path": str(graded_beir_dir.resolve()), "revision": folder_revision(graded_beir_dir)}
    assert md.license == "not specified" and md.domains == [] and md.bibtex_citation == ""

    other = make_local_retrieval_task(graded_beir_dir, name="toy2", split="dev", main_score="recall_at_100")
    assert type(other) is not type(task)  # one class per folder / name
    assert (other.metadata.name, other.metadata.eval_splits, other.metadata.main_score) == ("toy2", ["dev"], "recall_at_100")


def test_load_data_fills_retrieval_split_without_the_hub(graded_beir_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub must not be used")

    monkeypatch.setattr(AbsTaskRetrieval, "load_data", no_hub)
    monkeypatch.setattr("mteb.abstasks.retrieval.RetrievalDatasetLoader", no_hub)
    task = make_local_retrieval_task(graded_beir_dir)
    task.load_data()
    data = load_beir(graded_beir_dir)
    split = task.dataset["default"]["test"]
    assert split["corpus"]["id"] == data.corpus_ids and split["corpus"]["text"] == data.corpus_texts
    # q7 has only a 0-graded judgment: left out, as the trainer's evaluation does
    assert split["queries"]["id"] == [f"q{i}" for i in range(7)]
    assert split["relevant_docs"] == {q: data.qrels[q] for q in split["queries"]["id"]}
    assert split["top_ranked"] is None and task.data_loaded


def test_revision_follows_the_files(make_beir) -> None:
    folder = make_beir("a/eval")
    before = folder_revision(folder)
    assert folder_revision(folder) == before
    with (folder / "qrels.tsv").open("a", encoding="utf-8") as f:
        f.write("q0\td5\t1\n")
    assert folder_revision(folder) != before


def test_ndcg_through_mteb_equals_own_computation_and_trainer_evaluation(adapter: MtebEncoder, graded_beir_dir: Path) -> None:
    task = make_local_retrieval_task(graded_beir_dir)
    result = mteb.evaluate(adapter, task, cache=None, show_progress_bar=False, co2_tracker=False,
                           encode_kwargs={"batch_size": 8})
    scores = result.task_results[0].scores["test"][0]
    assert scores["main_score"] == scores["ndcg_at_10"]

    data = load_beir(graded_beir_dir)
    own = ndcg_at_10(
        embed(adapter, task, data.query_texts, PromptType.query),
        embed(adapter, task, data.corpus_texts, PromptType.document),
        data.query_ids,
        data.corpus_ids,
        data.qrels,
    )
    trainer = evaluate_retrieval(adapter.encoder, data, batch_size=8)["ndcg@10"]
    assert 0.0 < own < 1.0
    # mteb rounds its retrieval metrics to 5 decimals
    assert abs(scores["ndcg_at_10"] - round(own, 5)) <= 1e-6
    assert abs(scores["ndcg_at_10"] - round(trainer, 5)) <= 1e-6


def test_broken_folders(make_beir, tmp_path: Path) -> None:
    with pytest.raises(EmbedtrainError, match="no such folder"):
        make_local_retrieval_task(tmp_path / "missing")
    folder = make_beir("broken/eval")
    with pytest.raises(EmbedtrainError, match="main score"):
        make_local_retrieval_task(folder, main_score="ndcg_at_7")
    with pytest.raises(EmbedtrainError, match="local task name"):
        make_local_retrieval_task(folder, name="a b")
    (folder / "qrels.tsv").unlink()
    task = make_local_retrieval_task(folder)  # the data is read when the task runs
    with pytest.raises(EmbedtrainError, match="no qrels.tsv"):
        task.load_data()
    (folder / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t0\n", encoding="utf-8")
    with pytest.raises(EmbedtrainError, match="no query has a relevant document"):
        make_local_retrieval_task(folder).load_data()


def test_generic_folder_names_are_skipped(tmp_path: Path) -> None:
    assert default_task_name(tmp_path / "wordnet" / "eval") == "wordnet"
    assert default_task_name(tmp_path / "scifact" / "data" / "test") == "scifact"
    assert default_task_name(tmp_path / "mine") == "mine"
