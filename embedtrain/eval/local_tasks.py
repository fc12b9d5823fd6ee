"""Local BEIR folders as mteb retrieval tasks.

:func:`make_local_retrieval_task` builds an ``AbsTaskRetrieval`` subclass per folder whose
``load_data`` reads the folder with :func:`embedtrain.eval.retrieval.load_beir` instead of going to
the Hugging Face Hub, so a local folder is scored by mteb's own search and metric code (pytrec_eval).

The task's dataset revision is a hash of the folder's files: mteb stores it with each result, and
``embedtrain.eval.mteb_run`` reruns a task whose cached result was computed on other data.
Queries without a relevant document (score > 0) are left out, as the trainer's own evaluation
(:func:`embedtrain.eval.retrieval.retrieval_metrics`) does.
"""

from __future__ import annotations

import datetime
import hashlib
import re
from pathlib import Path
from typing import Any

from datasets import Dataset
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata

from embedtrain.errors import EmbedtrainError
from embedtrain.eval.retrieval import load_beir

DATA_FILES = ("corpus.jsonl", "queries.jsonl", "qrels.tsv", "qrels/test.tsv")
"""The files of a BEIR folder that go into its revision hash (those that exist)."""

MAIN_SCORE_PATTERN = re.compile(r"(ndcg|map|recall|precision|mrr|hit_rate)_at_(\d+)")
"""Retrieval score keys usable as the main score (k must be one of the task's k values)."""

GENERIC_FOLDER_NAMES = frozenset({"eval", "evaluation", "test", "dev", "val", "validation", "data", "beir"})
"""Folder names that say nothing about the data; the task is then named after the parent folder."""


def default_task_name(folder: str | Path) -> str:
    """``data/wordnet/eval`` -> ``wordnet``: the innermost folder name that is not generic."""
    path = Path(folder).resolve()
    for part in (path, *path.parents):
        if part.name and part.name.lower() not in GENERIC_FOLDER_NAMES:
            return part.name
    return path.name or "local"


def folder_revision(folder: str | Path) -> str:
    """First 12 hex digits of a sha256 over the folder's data files (names and contents)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for rel in DATA_FILES:
        path = folder / rel
        if path.is_file():
            digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _data_date(folder: Path) -> str:
    times = [(folder / rel).stat().st_mtime for rel in DATA_FILES if (folder / rel).is_file()]
    stamp = max(times) if times else datetime.datetime.now().timestamp()
    return datetime.date.fromtimestamp(stamp).isoformat()


class LocalRetrievalTask(AbsTaskRetrieval):
    """Base of the per-folder task classes; ``folder`` is set by :func:`make_local_retrieval_task`."""

    folder: Path

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        """Fill ``self.dataset`` from the BEIR folder; never touches the Hub."""
        if self.data_loaded:
            return
        data = load_beir(self.folder, self.metadata.name)
        query_ids = set(data.query_ids)
        relevant = {
            qid: dict(docs)
            for qid, docs in data.qrels.items()
            if qid in query_ids and any(score > 0 for score in docs.values())
        }
        if not relevant:
            raise EmbedtrainError(
                f"{self.folder}: no query has a relevant document in the qrels; check that qrels ids match queries and corpus"
            )
        keep = [i for i, qid in enumerate(data.query_ids) if qid in relevant]
        queries = Dataset.from_dict(
            {"id": [data.query_ids[i] for i in keep], "text": [data.query_texts[i] for i in keep]}
        )
        corpus = Dataset.from_dict({"id": data.corpus_ids, "text": data.corpus_texts})
        split = self.metadata.eval_splits[0]
        self.dataset = {
            "default": {
                split: RetrievalSplitData(corpus=corpus, queries=queries, relevant_docs=relevant, top_ranked=None)
            }
        }
        self.data_loaded = True


def make_local_retrieval_task(
    folder: str | Path,
    name: str | None = None,
    split: str = "test",
    main_score: str = "ndcg_at_10",
    languages: list[str] | None = None,
) -> LocalRetrievalTask:
    """An mteb retrieval task (instance of a new ``LocalRetrievalTask`` subclass) for a BEIR folder.

    Args:
        folder: holds ``corpus.jsonl``, ``queries.jsonl`` and ``qrels.tsv`` (or ``qrels/test.tsv``);
            they are read when mteb runs the task, so a broken folder fails that task only.
        name: task name (default: :func:`default_task_name`); results are stored as ``<name>.json``.
        split: split name the scores are stored under.
        main_score: an mteb retrieval score key, e.g. ``ndcg_at_10``, ``recall_at_100``, ``mrr_at_10``.
        languages: ISO 639-3 + script codes of the data (default ``["eng-Latn"]``).

    Raises:
        EmbedtrainError: the folder does not exist, or the name or main score is not usable.
    """
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise EmbedtrainError(f"local task {folder}: no such folder; give a BEIR folder (corpus.jsonl, queries.jsonl, qrels.tsv)")
    task_name = name or default_task_name(path)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", task_name):
        raise EmbedtrainError(f"local task name {task_name!r}: use letters, digits, '.', '_' and '-' only")
    score = MAIN_SCORE_PATTERN.fullmatch(main_score)
    if score is None or int(score.group(2)) not in LocalRetrievalTask.k_values:
        ks = ", ".join(str(k) for k in LocalRetrievalTask.k_values)
        raise EmbedtrainError(
            f"main score {main_score!r}: use ndcg, map, recall, precision, mrr or hit_rate with _at_<k>, k in {ks}"
        )
    date = _data_date(path)
    metadata = TaskMetadata(
        name=task_name,
        description=f"Local BEIR retrieval folder {path.resolve()}.",
        reference=None,
        dataset={"path": str(path.resolve()), "revision": folder_revision(path)},
        type="Retrieval",
        category="t2t",
        modalities=["text"],
        eval_splits=[split],
        eval_langs=list(languages or ["eng-Latn"]),
        main_score=main_score,
        date=(date, date),
        domains=[],
        task_subtypes=[],
        license="not specified",
        annotations_creators=None,
        dialect=[],
        sample_creation=None,
        bibtex_citation="",
    )
    class_name = "Local_" + re.sub(r"\W", "_", task_name)
    task_class = type(class_name, (LocalRetrievalTask,), {"metadata": metadata, "folder": path, "__module__": __name__})
    return task_class()
