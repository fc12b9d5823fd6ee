"""Retrieval at every prefix and precision an embedding is served at, on faiss indexes.

The embeddings are computed once at full size; for a prefix of d dimensions each side keeps its first d
values and is L2-normalised again (as ``SentenceTransformer(path, truncate_dim=d).encode(...,
normalize_embeddings=True)`` gives them). Each precision then goes through sentence-transformers' own
``quantize_embeddings`` and is searched on a faiss index:

- ``float32``: ``IndexFlatIP`` (cosine), 4·d bytes per document;
- ``int8``: codes with per-dimension ranges calibrated on the corpus, dequantized on both sides and searched
  on ``IndexFlatIP``; d bytes per document (the codes; the flat index itself holds the dequantized floats);
- ``binary``: packed sign bits (``ubinary``) on ``IndexBinaryFlat`` (Hamming distance), d/8 bytes;
- ``binary+rescore``: Hamming search keeps ``rescore_top_k`` documents, which the float32 query re-ranks
  against their ±1 codes (sentence-transformers' rescoring; nothing but the bits is stored), d/8 bytes;
- ``binary+float_rescore``: the same candidates re-ranked against the documents' float32 prefixes (kept on
  disk and read for the candidates only), d/8 bytes in memory plus 4·d on disk.

A model trained with ``loss.compact.binary_rotation: random`` gives a rotation R per prefix: its binary codes are those
of the prefix times R, and ``binary+rescore`` scores the query times R against them (the rows say ``rotated``).

Queries/s is the whole query set searched in one call on one thread, rescoring included (best of three). Ranks follow
:func:`~embedtrain.eval.retrieval.retrieval_metrics` (ties ordered by document id, descending, as trec_eval).
"""

from __future__ import annotations

import time
from typing import Mapping, Optional, Sequence

import numpy as np

from embedtrain.errors import EmbedtrainError
from embedtrain.eval.retrieval import RetrievalData, retrieval_metrics

PRECISIONS = ("float32", "int8", "binary")
ROWS = ("float32", "int8", "binary", "binary+rescore", "binary+float_rescore")
K = 10
REPEATS = 3
MARGIN = 32  # candidates past k so that documents tied with the k-th are seen (as retrieval._ranked_ids does)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise EmbedtrainError("faiss is not installed; run `pip install faiss-cpu` (a dependency of embedtrain)") from None
    return faiss


def prefix(emb: np.ndarray, dim: int) -> np.ndarray:
    """The first ``dim`` values of each row, L2-normalised (float32)."""
    x = np.ascontiguousarray(emb[:, :dim], dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def quantize(emb: np.ndarray, precision: str, calibration: Optional[np.ndarray] = None) -> np.ndarray:
    """sentence-transformers' codes of ``emb``: float32, int8 (ranges from ``calibration``) or packed bits."""
    from sentence_transformers.util.quantization import quantize_embeddings

    if precision == "binary":
        return quantize_embeddings(emb, "ubinary")
    return quantize_embeddings(emb, precision, calibration_embeddings=calibration)


def int8_ranges(calibration: np.ndarray) -> np.ndarray:
    """(2, d) per-dimension (min, max), the ranges quantize_embeddings derives from calibration embeddings."""
    return np.stack([calibration.min(axis=0), calibration.max(axis=0)]).astype(np.float32)


def dequantize_int8(codes: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """The value at the bottom of each code's bucket: (code + 128)·step + min, step = (max - min)/255."""
    steps = (ranges[1] - ranges[0]) / 255
    steps = np.where(steps == 0, 1, steps)
    return ((codes.astype(np.float32) + 128) * steps + ranges[0]).astype(np.float32)


def _ranked(scores: np.ndarray, indices: np.ndarray, data: RetrievalData) -> dict[str, list[str]]:
    ranked = {}
    for qid, row_scores, row_idx in zip(data.query_ids, scores.tolist(), indices.tolist()):
        order = sorted(((s, data.corpus_ids[j]) for s, j in zip(row_scores, row_idx) if j >= 0), reverse=True)[:K]
        ranked[qid] = [doc_id for _, doc_id in order]
    return ranked


def search(queries: np.ndarray, corpus: np.ndarray, precision: str, rescore_top_k: int = 40,
           rotation: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, float, int]:
    """(scores, indices, seconds, bytes per document) of every query on the corpus at one precision (a row of
    :data:`ROWS`); ``queries`` and ``corpus`` are normalised float32 prefixes. Higher scores rank first. Binary
    rows with a ``rotation`` (d, d) take the codes of ``corpus @ rotation`` and ``queries @ rotation``."""
    faiss = _faiss()
    n, dim = corpus.shape
    k = min(K + MARGIN, n)
    if precision == "float32":
        index = faiss.IndexFlatIP(dim)
        index.add(corpus)
        t0 = time.perf_counter()
        scores, idx = index.search(queries, k)
        return scores, idx, time.perf_counter() - t0, 4 * dim
    if precision == "int8":
        ranges = int8_ranges(corpus)
        docs = dequantize_int8(quantize(corpus, "int8", corpus), ranges)
        index = faiss.IndexFlatIP(dim)
        index.add(docs)
        t0 = time.perf_counter()
        q = dequantize_int8(quantize(queries, "int8", corpus), ranges)
        scores, idx = index.search(q, k)
        return scores, idx, time.perf_counter() - t0, dim
    if not precision.startswith("binary"):
        raise EmbedtrainError(f"precision {precision!r}: choose one of {', '.join(ROWS)}")
    if dim % 8:
        raise EmbedtrainError(f"binary search needs a prefix that is a multiple of 8 dimensions, got {dim}")
    documents = corpus  # the float32 prefixes binary+float_rescore reads
    if rotation is not None:
        corpus = corpus @ rotation
    codes = quantize(corpus, "binary")
    index = faiss.IndexBinaryFlat(dim)
    index.add(codes)
    t0 = time.perf_counter()
    rotated = queries if rotation is None else queries @ rotation  # the query in the codes' basis
    q_codes = quantize(rotated, "binary")
    if precision == "binary":
        dist, idx = index.search(q_codes, k)
        return -dist.astype(np.float32), idx, time.perf_counter() - t0, dim // 8
    top = min(max(rescore_top_k, K), n)
    _, idx = index.search(q_codes, top)
    if precision == "binary+rescore":
        # float query against the candidates' ±1 codes, unpacked from the stored bits
        queries, bits = rotated, np.unpackbits(codes[idx], axis=-1)[..., :dim].astype(np.float32) * 2 - 1
    elif precision == "binary+float_rescore":
        bits = documents[idx]  # the candidates' float32 prefixes, read from disk in a real deployment
    else:
        raise EmbedtrainError(f"precision {precision!r}: choose one of {', '.join(ROWS)}")
    scores = np.einsum("qd,qkd->qk", queries, bits)
    return scores, idx, time.perf_counter() - t0, dim // 8


def compact_table(query_emb, corpus_emb, data: RetrievalData, dims: Sequence[int],
                  precisions: Sequence[str] = PRECISIONS, rescore_top_k: int = 40,
                  binary_rotations: Optional[Mapping[int, np.ndarray]] = None) -> list[dict]:
    """One row per (prefix, precision): nDCG@10, Recall@10, MRR@10, bytes per document, queries/s.

    Binary precisions add the rescoring rows. ``query_emb``/``corpus_emb`` are the full-size embeddings
    (tensors or arrays) of ``data``'s queries and corpus, in file order. ``binary_rotations``: {prefix: (d, d)}
    of a model trained with ``binary_rotation: random``; a prefix without one is searched by its own signs.
    """
    faiss = _faiss()
    q_full = np.asarray(query_emb, dtype=np.float32)
    c_full = np.asarray(corpus_emb, dtype=np.float32)
    full = c_full.shape[1]
    bad = [d for d in dims if not 1 <= d <= full]
    if bad:
        raise EmbedtrainError(f"dims {bad}: a prefix must be between 1 and the embedding's {full} dimensions")
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise EmbedtrainError(f"precisions {unknown}: choose from {', '.join(PRECISIONS)}")
    rows_of = {"float32": ["float32"], "int8": ["int8"],
               "binary": ["binary", "binary+rescore", "binary+float_rescore"]}
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # queries/s of one thread: comparable between rows on a shared machine
    try:
        table = []
        for dim in dims:
            q, c = prefix(q_full, dim), prefix(c_full, dim)
            for precision in precisions:
                for row in rows_of[precision]:
                    # best of REPEATS: the least disturbed timing on a shared machine (the results are identical)
                    rotation = (binary_rotations or {}).get(dim) if row.startswith("binary") else None
                    rotation = None if rotation is None else np.asarray(rotation, dtype=np.float32)
                    runs = [search(q, c, row, rescore_top_k, rotation) for _ in range(REPEATS)]
                    scores, idx, _, nbytes = runs[0]
                    seconds = min(r[2] for r in runs)
                    metrics = retrieval_metrics(_ranked(scores, idx, data), data.qrels, K)
                    table.append({"dims": dim, "precision": row, "bytes_per_document": nbytes,
                                  **({"rescore_top_k": rescore_top_k} if "rescore" in row else {}),
                                  **({"rotated": True} if rotation is not None else {}),
                                  **metrics, "queries_per_second": round(len(q) / max(seconds, 1e-9), 1)})
    finally:
        faiss.omp_set_num_threads(threads)
    return table


def add_retention(table: list[dict], metric: str = "ndcg@10") -> list[dict]:
    """Each row's ``metric`` as a share of the full-size float32 row's (``retained``)."""
    full = max(r["dims"] for r in table)
    ref = next(r[metric] for r in table if r["dims"] == full and r["precision"] == "float32")
    return [{**r, "retained": r[metric] / ref if ref else float("nan")} for r in table]


def table_markdown(table: list[dict]) -> str:
    lines = ["| dims | precision | bytes/doc | nDCG@10 | Recall@10 | retained | queries/s |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in table:
        retained = f"{100 * r['retained']:.1f}%" if "retained" in r else ""
        lines.append(f"| {r['dims']} | {r['precision']} | {r['bytes_per_document']} | {100 * r['ndcg@10']:.2f} | "
                     f"{100 * r['recall@10']:.2f} | {retained} | {r['queries_per_second']:,.0f} |")
    return "\n".join(lines)


def evaluate_compact(encoder, data: RetrievalData, dims: Sequence[int], precisions: Sequence[str] = PRECISIONS,
                     rescore_top_k: int = 40, query_prompt: Optional[str] = None,
                     document_prompt: Optional[str] = None, batch_size: int = 128,
                     binary_rotations: Optional[Mapping[int, np.ndarray]] = None) -> list[dict]:
    """Embed ``data`` with ``encoder.encode`` once and return :func:`compact_table` with retention."""
    q = encoder.encode(data.query_texts, role="query", prompt=query_prompt, batch_size=batch_size,
                       desc=f"{data.name} queries")
    c = encoder.encode(data.corpus_texts, role="document", prompt=document_prompt, batch_size=batch_size,
                       desc=f"{data.name} corpus")
    return add_retention(compact_table(q.numpy(), c.numpy(), data, dims, precisions, rescore_top_k,
                                       binary_rotations))


def run_compact(args) -> int:
    """``embedtrain eval --compact``: the table of every model (``--model``, ``--compare``) on every
    ``--local-task``, printed as Markdown and written to ``<output>/compact.json`` and ``compact.md``."""
    import json
    from pathlib import Path

    from embedtrain.eval.retrieval import load_beir
    from embedtrain.models import TextEncoder
    from embedtrain.models.compact_record import read_binary_rotations, read_record

    if not args.local_task:
        raise EmbedtrainError("--compact: give the BEIR folders to search with --local-task")
    if args.tasks or args.benchmark or args.task_types:
        raise EmbedtrainError("--compact: evaluates --local-task folders only; remove --tasks/--benchmark/--task-types")
    if args.rescore_top_k is not None and args.rescore_top_k < 1:
        raise EmbedtrainError(f"--rescore-top-k: {args.rescore_top_k} must be at least 1")
    tasks = [load_beir(folder) for folder in args.local_task]
    report, text = [], []
    for spec in [args.model] + ([args.compare] if args.compare else []):
        encoder = TextEncoder.load(spec)
        record = read_record(_local_folder(spec)) or {}
        rotations = read_binary_rotations(_local_folder(spec)) if record else None
        dims = args.dims or record.get("dims") or [encoder.embedding_dim]
        precisions = args.precisions or (["float32"] + [p for p in record["precisions"] if p != "float32"]
                                         if record else list(PRECISIONS))
        top_k = args.rescore_top_k or record.get("rescore_top_k", 40)
        for data in tasks:
            table = evaluate_compact(encoder, data, dims, precisions, top_k, batch_size=args.batch_size,
                                     binary_rotations=rotations)
            report.append({"model": spec, "task": data.name, "trained_for": record or None, "table": table})
            text.append(f"## {spec} on {data.name}\n\n{table_markdown(table)}\n")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "compact.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (output / "compact.md").write_text("\n".join(text), encoding="utf-8")
    print("\n".join(text))
    return 0


def _local_folder(spec: str) -> str:
    from embedtrain.config import looks_local, resolve_path

    return resolve_path(spec) if looks_local(spec) else spec
