"""Hard-negative mining with a teacher model, positive-aware (NV-Embed-v2, arXiv 2405.17428).

For each (query, positive) row the teacher embeds the query and a corpus (the dataset's own positives and
negatives, plus any extra corpus files), takes the ``top_k`` corpus texts closest to the query, and
keeps as hard negatives only the candidates that are clearly less similar than the positive:

    keep d  if  s(q, d) < factor * s(q, p)          (factor = 0.95 in the paper: "TopK-PercPos")

A candidate scoring almost as high as the positive (or higher) is most likely an unlabelled positive;
training on it as a negative teaches the model to push apart texts that belong together. Texts equal to
any positive of the same query, and the query itself, are never candidates. The ``num_negatives``
hardest kept candidates become the row's negatives; a row with fewer is left out (and counted).

The corpus is the dataset's positives plus any corpus files. The output is a ``.jsonl`` file with columns ``anchor``, ``positive``, ``negative_1`` … ``negative_k``,
which a recipe reads with ``negative_columns: [negative_1, ..., negative_k]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from embedtrain.data.readers import column_list
from embedtrain.jsonl import json_lines
from embedtrain.errors import EmbedtrainError


@dataclass
class MiningReport:
    """What mining did: rows written, rows left out, and candidates dropped as likely false negatives."""

    rows_in: int = 0
    rows_out: int = 0
    rows_short: int = 0
    dropped_false_negatives: int = 0
    corpus_size: int = 0
    examples_dropped: list[tuple[str, str, float, float]] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.rows_out} of {self.rows_in} rows written ({self.rows_short} had too few negatives left); "
                f"corpus {self.corpus_size} texts; {self.dropped_false_negatives} candidates dropped as likely "
                "false negatives")


SCORE_BLOCK = 1 << 26
"""Scores held at once by :func:`nearest`: query rows x corpus rows (256 MB of float32)."""


@torch.no_grad()
def nearest(
    query_emb: torch.Tensor,
    corpus: Iterable[tuple[int, torch.Tensor]],
    k: int,
    paired: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The ``k`` best-scoring corpus rows of every query by dot product: scores (Q, k') best first and their
    corpus indices, k' = min(k, corpus size).

    ``corpus`` yields (offset, embeddings) chunks in order, read one at a time: the memory held grows with a chunk
    and the queries, not with the corpus. Each chunk's top k merge with the best so far (an exact search; only
    the order of equal scores may differ from one search over the whole corpus). Runs on ``query_emb``'s device.
    ``paired`` (Q,): a corpus index per query whose score is also returned (the query's positive), computed as the
    chunks pass.
    """
    device = query_emb.device
    best_scores = torch.empty(query_emb.shape[0], 0, device=device)
    best_index = torch.empty(query_emb.shape[0], 0, dtype=torch.long, device=device)
    paired_scores = None if paired is None else torch.full((query_emb.shape[0],), float("nan"), device=device)
    paired = None if paired is None else paired.to(device)
    seen = 0
    for offset, chunk in corpus:
        seen += chunk.shape[0]
        if not query_emb.shape[0]:  # no queries (a process's empty share): (0, k') all the same
            best_scores, best_index = best_scores.new_empty(0, min(k, seen)), best_index.new_empty(0, min(k, seen))
            continue
        chunk = chunk.to(device, query_emb.dtype)
        if paired is not None:
            rows = ((paired >= offset) & (paired < offset + chunk.shape[0])).nonzero().flatten()
            paired_scores[rows] = (query_emb[rows] * chunk[paired[rows] - offset]).sum(-1)
        block = max(1, SCORE_BLOCK // max(chunk.shape[0], 1))
        merged_scores, merged_index = [], []
        for start in range(0, query_emb.shape[0], block):
            scores, index = (query_emb[start:start + block] @ chunk.T).topk(min(k, chunk.shape[0]), dim=1)
            index = index + offset
            if best_scores.shape[1]:  # the first chunk's top k are the best so far as they are
                scores = torch.cat([best_scores[start:start + block], scores], dim=1)
                index = torch.cat([best_index[start:start + block], index], dim=1)
                scores, at = scores.topk(min(k, scores.shape[1]), dim=1)
                index = index.gather(1, at)
            merged_scores.append(scores)
            merged_index.append(index)
        best_scores, best_index = torch.cat(merged_scores), torch.cat(merged_index)
    return best_scores, best_index, paired_scores


def keep_candidates(
    scores: torch.Tensor,
    indices: torch.Tensor,
    positive_scores: torch.Tensor,
    excluded: Sequence[set[int]],
    top_k: int = 30,
    num_negatives: int = 4,
    factor: float = 0.95,
) -> tuple[list[list[int]], list[list[int]]]:
    """From each query's nearest corpus rows (:func:`nearest`, best first): the kept negatives (hardest first) and
    the dropped candidates. The candidates are the ``top_k`` best rows not in ``excluded[i]``; one scoring at or
    above ``factor`` x the positive's score is dropped."""
    kept: list[list[int]] = []
    dropped: list[list[int]] = []
    for i, (s_row, i_row) in enumerate(zip(scores.tolist(), indices.tolist())):
        limit = factor * float(positive_scores[i])
        candidates = [(s, j) for s, j in zip(s_row, i_row) if j not in excluded[i]][:top_k]
        kept.append([j for s, j in candidates if s < limit][:num_negatives])
        dropped.append([j for s, j in candidates if s >= limit])
    return kept, dropped


def search_depth(top_k: int, excluded: Sequence[set[int]]) -> int:
    """Rows to search per query so that ``top_k`` remain after the excluded ones are left out."""
    return top_k + max((len(e) for e in excluded), default=0)


def _read_corpus(path: str) -> list[str]:
    """Texts of a BEIR corpus.jsonl (``text`` and optional ``title``) or of a .txt file (one per line)."""
    from embedtrain.config import resolve_path

    file = Path(resolve_path(path))
    if not file.is_file():
        raise EmbedtrainError(f"--corpus: {file} does not exist; give a .jsonl (BEIR corpus) or .txt file")
    if file.suffix == ".txt":
        return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = []
    for n, row in json_lines(file.read_text(encoding="utf-8"), file, "each line must be one object with a 'text'"):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise EmbedtrainError(f"{file}:{n}: no 'text' field; corpus rows look like {{\"text\": ...}}")
        texts.append(f"{row.get('title') or ''} {row['text']}".strip())
    return texts


def mine_hard_negatives(
    teacher: str,
    data: str,
    output: str,
    query_column: str = "anchor",
    positive_column: str = "positive",
    corpus: Sequence[str] = (),
    top_k: int = 30,
    num_negatives: int = 4,
    factor: float = 0.95,
    query_prompt: str = "",
    document_prompt: str = "",
    max_length: Optional[int] = None,
    batch_size: int = 128,
    max_rows: Optional[int] = None,
    split: str = "train",
    subset: Optional[str] = None,
    device: Optional[str] = None,
    cache: Optional[str] = None,
    chunk_rows: int = 16384,
    keep_cache: bool = False,
    log=print,
) -> Optional[MiningReport]:
    """Mine hard negatives for the (query, positive) rows of ``data`` with ``teacher``; write ``output``.

    ``data``: a local file or Hub dataset id (as in recipes). The corpus searched is the dataset's
    positives plus the texts of the ``corpus`` files. ``teacher``: any model ``embedtrain`` loads (a
    sentence-transformers folder, ``pkg://`` path or Hub id).

    The embeddings go through :func:`embedtrain.train.chunked_embeddings.embed_in_chunks`: chunks of
    ``chunk_rows`` texts cached in ``cache`` (default: ``OUTPUT.cache`` beside the output), shared among the
    processes of a ``torchrun`` / ``accelerate launch`` and read back when the same command runs again after a
    stop. Each process then searches the whole corpus for an equal share of the queries (:func:`nearest`, where it
    embedded); the main process gathers the shares, keeps the candidates and writes. The cache is removed once the
    output is written, unless ``keep_cache``. Returns the report on the main process, None on the others.
    """
    from embedtrain.config import resolve_path
    from embedtrain.data import read_pairs
    from embedtrain.models import load_text_encoder
    from embedtrain.train.accelerator import process_state
    from embedtrain.train.chunked_embeddings import (TextSet, embed_in_chunks, folder_fingerprint, gather_on_main,
                                                     share_of)

    if top_k < 1 or num_negatives < 1:
        raise EmbedtrainError("--top-k and --num-negatives must be at least 1")
    if num_negatives > top_k:
        raise EmbedtrainError(f"--num-negatives {num_negatives} is more than --top-k {top_k} candidates; raise --top-k")
    if not 0 < factor <= 1:
        raise EmbedtrainError(f"--factor must be in (0, 1], got {factor}; 0.95 keeps candidates below 95% of the positive's score")
    out = Path(output)
    if out.suffix != ".jsonl":
        raise EmbedtrainError(f"--output: {out} must end in .jsonl")
    if chunk_rows < 1:
        raise EmbedtrainError(f"--chunk-rows must be at least 1, got {chunk_rows}")
    if device and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise EmbedtrainError(f"--device {device}: no GPU is visible to this process; leave --device out to run on CPU")
    state = process_state()
    with state.main_process_first():  # a Hub dataset is downloaded and cached once
        pairs = read_pairs(data, "--data", Path(data).stem, query_column, positive_column, [], split=split,
                           max_rows=max_rows, subset=subset)
    queries, positives = column_list(pairs.rows, "query"), column_list(pairs.rows, "positive")

    texts: list[str] = []
    index: dict[str, int] = {}
    for text in list(positives) + [t for path in corpus for t in _read_corpus(path)]:
        if text not in index:
            index[text] = len(texts)
            texts.append(text)
    positives_of: dict[str, set[int]] = {}
    for q, p in zip(queries, positives):
        positives_of.setdefault(q, set()).add(index[p])
    excluded = [positives_of[q] | ({index[q]} if q in index else set()) for q in queries]

    encoder = load_text_encoder(teacher, max_length=max_length)
    if device:  # several processes on GPUs: each its own
        several_gpus = state.num_processes > 1 and torch.device(device).type == "cuda"
        encoder.to(state.device if several_gpus else device)
    cache_dir = Path(cache) if cache else out.with_name(out.name + ".cache")
    identity = {"teacher": teacher, "teacher_files": folder_fingerprint(resolve_path(teacher)),
                "query_max_length": encoder.max_length_for("query"),
                "document_max_length": encoder.max_length_for("document")}
    sets = [TextSet("queries", queries, "query", query_prompt), TextSet("corpus", texts, "document", document_prompt)]
    embedded = embed_in_chunks(encoder, sets, cache_dir, identity, state, chunk_rows, batch_size, log)
    # each process searches for its share of the queries where its teacher ran, reading the corpus's embeddings one
    # cached chunk at a time
    first, end = share_of(len(queries), state)
    where = f"process {state.process_index} of {state.num_processes}: " if state.num_processes > 1 else ""
    log(f"searching on {encoder.device}: {where}queries {first} to {end} of {len(queries)} against {len(texts)} "
        "corpus texts")
    normalize = torch.nn.functional.normalize
    q_emb = normalize(embedded[0].load(first, end), dim=-1).to(encoder.device)
    corpus_chunks = ((offset, normalize(chunk, dim=-1)) for offset, chunk in embedded[1].chunks())
    positive_of = torch.as_tensor([index[p] for p in positives[first:end]], dtype=torch.long)
    scores, found, positive_scores = nearest(q_emb, corpus_chunks, search_depth(top_k, excluded), positive_of)
    found_all = gather_on_main(cache_dir, "search", {"scores": scores, "found": found, "positive": positive_scores},
                               state)
    if found_all is None:  # not the main process: it keeps the candidates and writes alone
        return None
    scores, found, positive_scores = found_all["scores"], found_all["found"], found_all["positive"]
    kept, dropped = keep_candidates(scores, found, positive_scores, excluded, top_k, num_negatives, factor)

    report = MiningReport(rows_in=len(queries), corpus_size=len(texts))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i, (q, p) in enumerate(zip(queries, positives)):
            report.dropped_false_negatives += len(dropped[i])
            if dropped[i] and len(report.examples_dropped) < 5:
                j = dropped[i][0]
                score = float(scores[i][found[i] == j][0])
                report.examples_dropped.append((q, texts[j], score, float(positive_scores[i])))
            if len(kept[i]) < num_negatives:
                report.rows_short += 1
                continue
            row = {"anchor": q, "positive": p, **{f"negative_{n + 1}": texts[j] for n, j in enumerate(kept[i])}}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            report.rows_out += 1
    tmp.replace(out)
    log(report.summary())
    if keep_cache:
        log(f"embeddings kept in {cache_dir} (--keep-cache)")
    else:
        import shutil

        shutil.rmtree(cache_dir, ignore_errors=True)
        log(f"embedding cache {cache_dir} removed (the output is written; --keep-cache keeps it)")
    return report


# -- mined by the model being trained (data.mined_negatives) -------------------------------------------------


def encode_shared(encode, texts: Sequence[str], accelerator) -> torch.Tensor:
    """``encode(texts)`` split across the run's processes and gathered: every process embeds an equal share (the
    last one padded with copies of the first text, so that a sharded model runs the same forward calls on each) and
    gets every embedding, in input order."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if world == 1:
        return encode(list(texts))
    per = -(-len(texts) // world)
    share = list(texts[rank * per:(rank + 1) * per])
    share += [texts[0]] * (per - len(share))
    return accelerator.gather(encode(share).to(accelerator.device)).cpu()[: len(texts)]


@torch.no_grad()
def mine_during_training(encode, datasets, settings, step: int, seed: int, accelerator):
    """Every dataset's :class:`~embedtrain.data.mined.MinedNegatives` for ``step``, mined with the current weights,
    and what mining did (per dataset: rows, corpus, rows short of candidates, random candidates, dropped likely
    false negatives).

    ``encode(i, texts, role)``: dataset ``i``'s ``texts`` embedded as ``role`` ('query' or 'document', with the
    dataset's prompts). Every process takes part: each embeds a share of the texts; the main process ranks the
    candidates (:func:`nearest` and :func:`keep_candidates` on normalised embeddings, ``settings.top_k`` and
    ``settings.factor``) and
    sends them, and its figures, to the others. A row with fewer than ``top_k`` candidates passing the rule gets
    random corpus texts (never its own positives, its query, nor a candidate the rule dropped) after them, so it can
    still avoid the texts of its batch.
    """
    from accelerate.utils import broadcast, broadcast_object_list

    from embedtrain.data.mined import MinedNegatives, corpus_of, excluded_candidates

    tables, report = [], {}
    for i, ds in enumerate(datasets):
        corpus = corpus_of(ds.row_keys)
        queries = column_list(ds.rows, "query")
        first_of_query: dict[int, int] = {}
        query_of_row = [first_of_query.setdefault(k[0], len(first_of_query)) for k in ds.row_keys]
        distinct = [None] * len(first_of_query)
        for r, q in enumerate(query_of_row):
            distinct[q] = distinct[q] or queries[r]
        documents = column_list(ds.rows.select(corpus.rows.tolist()), "positive")
        q_emb = encode_shared(lambda t: encode(i, t, "query"), distinct, accelerator)
        c_emb = encode_shared(lambda t: encode(i, t, "document"), documents, accelerator)
        candidates = torch.full((len(ds), settings.top_k), -1, dtype=torch.long)
        figures, problem = {"rows": len(ds), "corpus": len(corpus)}, None
        if accelerator.is_main_process:
            device = accelerator.device
            q_row = torch.nn.functional.normalize(q_emb, dim=-1)[torch.as_tensor(query_of_row)].to(device)
            c_emb = torch.nn.functional.normalize(c_emb, dim=-1).to(device)
            positive_scores = (q_row * c_emb[torch.as_tensor(corpus.of_row).to(device)]).sum(-1)
            excluded = excluded_candidates(ds.row_keys, corpus)
            scores, found, _ = nearest(q_row, [(0, c_emb)], search_depth(settings.top_k, excluded))
            kept, dropped = keep_candidates(scores, found, positive_scores, excluded, settings.top_k, settings.top_k,
                                            settings.factor)
            never = [e | set(d) for e, d in zip(excluded, dropped)]  # nor a likely false negative, by chance
            try:
                figures.update(_fill_randomly(kept, never, len(corpus), settings,
                                              np.random.default_rng([seed, step, i]), f"data.train[{i}] ({ds.name})"))
            except EmbedtrainError as err:  # every process raises it (below), none waits for the others
                problem = str(err)
            figures["dropped_false_negatives"] = sum(len(d) for d in dropped)
            for r, row in enumerate(kept):
                candidates[r, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        if accelerator.num_processes > 1:
            figures, problem = broadcast_object_list([figures, problem], from_process=0)
            candidates = broadcast(candidates.to(accelerator.device), from_process=0).cpu()
        if problem:
            raise EmbedtrainError(problem)
        tables.append(MinedNegatives(corpus, candidates.numpy(), settings.num_negatives, step))
        report[ds.name] = figures
    return tables, report


def _fill_randomly(kept: list[list[int]], excluded: Sequence[set[int]], corpus: int, settings, rng, where: str) -> dict:
    """Give every row of ``kept`` up to ``top_k`` candidates (at least ``num_negatives``): random corpus texts that are
    not ``excluded[row]`` after the mined ones; raises when the corpus holds too few texts a row may take."""
    short = random = 0
    for r, row in enumerate(kept):
        want = min(settings.top_k, corpus - len(excluded[r]))
        if want < settings.num_negatives:
            raise EmbedtrainError(
                f"{where} row {r + 1}: only {max(want, 0)} of the {corpus} distinct positives may be its negative, "
                f"fewer than data.mined_negatives.num_negatives ({settings.num_negatives}); lower it or add rows")
        short += len(row) < settings.num_negatives
        taken = set(row) | excluded[r]
        while len(row) < want:
            c = int(rng.integers(corpus))
            if c not in taken:
                row.append(c)
                taken.add(c)
                random += 1
    return {"rows_short": short, "random_candidates": random}
