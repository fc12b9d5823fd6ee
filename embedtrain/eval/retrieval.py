"""Local retrieval evaluation on BEIR-layout folders.

A folder holds ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``)
and ``qrels.tsv`` (``query-id``, ``corpus-id``, ``score`` with a header; ``qrels/test.tsv`` also
works). Metrics follow trec_eval's definitions (linear gain nDCG, as mteb reports them).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from embedtrain.errors import EmbedtrainError


@dataclass
class RetrievalData:
    """A loaded retrieval task: ids and texts in file order, and graded relevance."""

    name: str
    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise EmbedtrainError(f"{path}:{line_no}: not valid JSON; each line must be one JSON object") from None
            missing = [k for k in required if k not in row]
            if missing:
                raise EmbedtrainError(f"{path}:{line_no}: missing {', '.join(missing)} (have: {', '.join(row)})")
            rows.append(row)
    return rows


def qrels_path(folder: Path) -> Path:
    for candidate in (folder / "qrels.tsv", folder / "qrels" / "test.tsv"):
        if candidate.is_file():
            return candidate
    raise EmbedtrainError(f"{folder}: no qrels.tsv (or qrels/test.tsv); a BEIR folder needs corpus, queries and qrels")


def load_beir(folder: str | Path, name: str | None = None) -> RetrievalData:
    """Read a BEIR-layout folder; titles are joined to texts as 'title text' when present."""
    folder = Path(folder)
    for f in ("corpus.jsonl", "queries.jsonl"):
        if not (folder / f).is_file():
            raise EmbedtrainError(f"{folder}: no {f}; a BEIR folder needs corpus.jsonl, queries.jsonl and qrels.tsv")
    corpus = _read_jsonl(folder / "corpus.jsonl", ("_id", "text"))
    queries = _read_jsonl(folder / "queries.jsonl", ("_id", "text"))
    qrels: dict[str, dict[str, int]] = {}
    qpath = qrels_path(folder)
    with qpath.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None:
            raise EmbedtrainError(f"{qpath}: empty; expected a header 'query-id corpus-id score' and rows")
        for line_no, row in enumerate(reader, 2):
            if not row:
                continue
            if len(row) < 3:
                raise EmbedtrainError(f"{qpath}:{line_no}: expected 3 tab-separated fields (query-id, corpus-id, score)")
            try:
                score = int(float(row[2]))
            except ValueError:
                raise EmbedtrainError(f"{qpath}:{line_no}: score {row[2]!r} is not a number") from None
            qrels.setdefault(row[0], {})[row[1]] = score
    corpus_texts = [(f"{r.get('title') or ''} {r['text']}".strip()) for r in corpus]
    return RetrievalData(
        name=name or folder.name,
        corpus_ids=[str(r["_id"]) for r in corpus],
        corpus_texts=corpus_texts,
        query_ids=[str(r["_id"]) for r in queries],
        query_texts=[r["text"] for r in queries],
        qrels=qrels,
    )


def rank(query_emb: torch.Tensor, corpus_emb: torch.Tensor, k: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k corpus indices and cosine scores per query, computed in query chunks."""
    q = torch.nn.functional.normalize(query_emb.float(), dim=-1)
    c = torch.nn.functional.normalize(corpus_emb.float(), dim=-1)
    k = min(k, c.shape[0])
    scores, indices = [], []
    for start in range(0, q.shape[0], chunk):
        s, i = (q[start : start + chunk] @ c.T).topk(k, dim=1)
        scores.append(s)
        indices.append(i)
    return torch.cat(scores), torch.cat(indices)


def retrieval_metrics(
    ranked: dict[str, list[str]], qrels: dict[str, dict[str, int]], k: int = 10
) -> dict[str, float]:
    """nDCG@k, MRR@k and Recall@k averaged over queries that have at least one relevant document.

    nDCG uses linear gain, rel_i / log2(i + 1) for rank i starting at 1; the ideal ranking orders
    the judged documents by relevance. Recall@k counts documents with relevance > 0.
    """
    ndcg = mrr = recall = 0.0
    n = 0
    for qid, rels in qrels.items():
        relevant = {d: r for d, r in rels.items() if r > 0}
        if not relevant or qid not in ranked:
            continue
        n += 1
        top = ranked[qid][:k]
        dcg = sum(relevant.get(d, 0) / math.log2(i + 2) for i, d in enumerate(top))
        ideal = sorted(relevant.values(), reverse=True)[:k]
        idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
        ndcg += dcg / idcg
        mrr += next((1.0 / (i + 1) for i, d in enumerate(top) if d in relevant), 0.0)
        recall += sum(1 for d in top if d in relevant) / len(relevant)
    if n == 0:
        raise EmbedtrainError("no query has a relevant document in the qrels; check that qrels ids match queries and corpus")
    return {f"ndcg@{k}": ndcg / n, f"mrr@{k}": mrr / n, f"recall@{k}": recall / n}


def evaluate_retrieval(
    encoder,
    data: RetrievalData,
    query_prompt: str | None = None,
    document_prompt: str | None = None,
    batch_size: int = 128,
    k: int = 10,
    show_progress: bool = False,
) -> dict[str, float]:
    """Embed queries and corpus with ``encoder.encode`` and score the ranking (metrics on 0-1)."""
    q = encoder.encode(data.query_texts, role="query", prompt=query_prompt, batch_size=batch_size,
                       show_progress=show_progress, desc=f"{data.name} queries")
    c = encoder.encode(data.corpus_texts, role="document", prompt=document_prompt, batch_size=batch_size,
                       show_progress=show_progress, desc=f"{data.name} corpus")
    # a margin past k so that every document tied with the k-th is seen, then ties ordered as
    # trec_eval (and so mteb) orders them: by document id, descending
    scores, idx = rank(q, c, k + 32)
    ranked = {}
    for qid, row_scores, row_idx in zip(data.query_ids, scores.tolist(), idx.tolist()):
        order = sorted(zip(row_scores, (data.corpus_ids[j] for j in row_idx)), reverse=True)[:k]
        ranked[qid] = [doc_id for _, doc_id in order]
    return retrieval_metrics(ranked, data.qrels, k)
