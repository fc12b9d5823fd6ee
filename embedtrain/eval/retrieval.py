"""Local retrieval evaluation on BEIR-layout folders.

A folder holds ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``)
and ``qrels.tsv`` (``query-id``, ``corpus-id``, ``score`` with a header; ``qrels/test.tsv`` also
works). Metrics follow trec_eval's definitions (linear gain nDCG, as mteb reports them).

Image-text tasks use the same layout: a query or corpus row may carry an ``image`` path (relative
to the folder) besides or instead of ``text``. :func:`evaluate_retrieval` then embeds through the
encoder's ``encode_items`` and reports each direction under a name such as ``t2i`` (text queries,
image corpus) or ``i2t`` (the reverse direction, with ``both_directions``), with Recall@1/5/10.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from embedtrain.errors import EmbedtrainError
from embedtrain.jsonl import json_lines


@dataclass
class RetrievalData:
    """A loaded retrieval task: ids and texts in file order, and graded relevance."""

    name: str
    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    corpus_images: Optional[list[Optional[str]]] = None
    """Image path per corpus row (None where a row has none), or None for a text-only corpus."""
    query_images: Optional[list[Optional[str]]] = None
    """Image path per query (None where a query has none), or None for text-only queries."""

    @property
    def has_images(self) -> bool:
        return self.corpus_images is not None or self.query_images is not None


def _read_jsonl(path: Path, required: tuple[str, ...], optional_with: tuple[str, ...] = ()) -> list[dict]:
    """Rows of a JSON-lines file; a row that has a field of ``optional_with`` (e.g. an image) may
    leave out the required fields other than ``_id``."""
    rows = []
    for line_no, row in json_lines(path.read_text(encoding="utf-8"), path):
        missing = [k for k in required if k not in row and not (k != "_id" and any(row.get(o) for o in optional_with))]
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
    corpus = _read_jsonl(folder / "corpus.jsonl", ("_id", "text"), optional_with=("image",))
    queries = _read_jsonl(folder / "queries.jsonl", ("_id", "text"), optional_with=("image",))
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
    corpus_texts = [(f"{r.get('title') or ''} {r.get('text') or ''}".strip()) for r in corpus]
    return RetrievalData(
        name=name or folder.name,
        corpus_ids=[str(r["_id"]) for r in corpus],
        corpus_texts=corpus_texts,
        query_ids=[str(r["_id"]) for r in queries],
        query_texts=[r.get("text") or "" for r in queries],
        qrels=qrels,
        corpus_images=_image_paths(folder, corpus, "corpus.jsonl"),
        query_images=_image_paths(folder, queries, "queries.jsonl"),
    )


def _image_paths(folder: Path, rows: list[dict], file: str) -> Optional[list[Optional[str]]]:
    """Absolute image paths of rows with an ``image`` field (None for the others), or None if no row has one."""
    if not any(r.get("image") for r in rows):
        return None
    paths: list[Optional[str]] = []
    for line_no, r in enumerate(rows, 1):
        image = r.get("image")
        if not image:
            paths.append(None)
            continue
        path = Path(image) if Path(image).is_absolute() else folder / image
        if not path.is_file():
            raise EmbedtrainError(f"{folder / file}: row {line_no} ({r['_id']}): image {image} not found; fix the path")
        paths.append(str(path))
    return paths


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
    both_directions: bool = True,
) -> dict[str, float]:
    """Embed queries and corpus with ``encoder.encode`` and score the ranking (metrics on 0-1).

    A task with images (see :class:`RetrievalData`) goes to :func:`evaluate_image_text`, with the
    prompts taken as the templates of queries and corpus (``both_directions`` applies to it only).
    """
    if data.has_images:
        return evaluate_image_text(encoder, data, query_prompt, document_prompt, batch_size=batch_size,
                                   both_directions=both_directions, show_progress=show_progress)
    q = encoder.encode(data.query_texts, role="query", prompt=query_prompt, batch_size=batch_size,
                       show_progress=show_progress, desc=f"{data.name} queries")
    c = encoder.encode(data.corpus_texts, role="document", prompt=document_prompt, batch_size=batch_size,
                       show_progress=show_progress, desc=f"{data.name} corpus")
    return retrieval_metrics(_ranked_ids(q, c, data.query_ids, data.corpus_ids, k), data.qrels, k)


def _ranked_ids(query_emb: torch.Tensor, corpus_emb: torch.Tensor, query_ids: list[str], corpus_ids: list[str],
                k: int) -> dict[str, list[str]]:
    """Top-k corpus ids per query, ties ordered as trec_eval (and so mteb) orders them: by id, descending."""
    # a margin past k so that every document tied with the k-th is seen
    scores, idx = rank(query_emb, corpus_emb, k + 32)
    ranked = {}
    for qid, row_scores, row_idx in zip(query_ids, scores.tolist(), idx.tolist()):
        order = sorted(zip(row_scores, (corpus_ids[j] for j in row_idx)), reverse=True)[:k]
        ranked[qid] = [doc_id for _, doc_id in order]
    return ranked


def _modality(texts: Sequence[str], images: Optional[Sequence[Optional[str]]]) -> str:
    """'t' (text), 'i' (image) or 'it' (image + text) for one side of a task."""
    has_image = images is not None and any(images)
    has_text = any(t for t in texts)
    return ("i" if has_image else "") + ("t" if has_text or not has_image else "")


def _encode_side(encoder, texts: list[str], images: Optional[list[Optional[str]]], role: str,
                 template: Optional[str], batch_size: int, show_progress: bool, desc: str) -> torch.Tensor:
    has_text = any(t for t in texts)
    return encoder.encode_items(
        texts=texts if has_text else None, images=images if images is not None and any(images) else None,
        role=role, template=template, batch_size=batch_size, show_progress=show_progress, desc=desc,
    )


def evaluate_image_text(
    encoder,
    data: RetrievalData,
    query_template: str | None = None,
    document_template: str | None = None,
    batch_size: int = 128,
    ks: Sequence[int] = (1, 5, 10),
    both_directions: bool = True,
    show_progress: bool = False,
) -> dict[str, float]:
    """Retrieval between texts and images (or image + text items) with ``encoder.encode_items``.

    Returns ``<direction>/recall@k`` for every k in ``ks`` plus ``ndcg@10`` and ``mrr@10``, where the
    direction names the query and corpus modalities (``t2i``: text queries, image corpus). With
    ``both_directions`` the corpus items also retrieve the queries (``i2t``) with the same
    embeddings (each side keeps its template) and the qrels reversed.
    """
    k_max = max(max(ks), 10)
    q_name = _modality(data.query_texts, data.query_images)
    c_name = _modality(data.corpus_texts, data.corpus_images)

    def metrics(q, c, q_ids, c_ids, qrels) -> dict[str, float]:
        ranked = _ranked_ids(q, c, q_ids, c_ids, k_max)
        out = retrieval_metrics(ranked, qrels, 10)
        for k in ks:
            out[f"recall@{k}"] = retrieval_metrics(ranked, qrels, k)[f"recall@{k}"]
        return out

    q = _encode_side(encoder, data.query_texts, data.query_images, "query", query_template, batch_size,
                     show_progress, f"{data.name} queries")
    c = _encode_side(encoder, data.corpus_texts, data.corpus_images, "document", document_template, batch_size,
                     show_progress, f"{data.name} corpus")
    scores = {f"{q_name}2{c_name}/{m}": v for m, v in metrics(q, c, data.query_ids, data.corpus_ids, data.qrels).items()}
    if both_directions:
        # the same embeddings, the other way round: each corpus item retrieves among the queries
        reverse: dict[str, dict[str, int]] = {}
        for qid, rels in data.qrels.items():
            for did, rel in rels.items():
                reverse.setdefault(did, {})[qid] = rel
        back = metrics(c, q, data.corpus_ids, data.query_ids, reverse)
        scores.update({f"{c_name}2{q_name}/{m}": v for m, v in back.items()})
    return scores
