"""Hard negatives mined by the model being trained (``data.mined_negatives``): the corpus they come from, the
ranked candidates of every row, and the choice made for each batch.

A dataset's corpus is its distinct positives (the documents it already has), each stood for by the first row
holding it, so a mined negative is read like a positive: the same tokens, the same document prompt. Mining
(:mod:`embedtrain.train.mining`) ranks, for every row, up to ``top_k`` corpus texts that pass the positive-aware
rule; this module keeps those candidates and picks each batch's negatives from them.

The choice is made for the whole global batch, in row order, so every process and DataLoader worker makes the
same one: a row takes its best candidates whose text is not already in the batch (a query, a positive, a hard
negative of any row, or a negative another row has just taken). The epoch plan's promise that no text repeats
in a batch therefore holds for mined negatives too. When every candidate of a row repeats a text of its batch
(never seen on real data: it takes ``top_k`` collisions), the row keeps its best candidates anyway; the batch
counts them (``negatives_repeated``) and the trainer reports the total.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from embedtrain.errors import EmbedtrainError


@dataclass
class Corpus:
    """The distinct positives of one dataset: ``rows[c]`` is the first row whose positive is corpus text ``c``,
    ``keys[c]`` that text's hash, and ``of_row[r]`` the corpus index of row ``r``'s positive."""

    rows: np.ndarray
    keys: np.ndarray
    of_row: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


def corpus_of(row_keys: Sequence[tuple[int, ...]]) -> Corpus:
    """The corpus of a dataset whose rows have the text hashes ``row_keys`` (query, positive, negatives...)."""
    positives = np.fromiter((k[1] for k in row_keys), dtype=np.int64, count=len(row_keys))
    keys, first, of_row = np.unique(positives, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # corpus in the order the texts first appear
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return Corpus(rows=first[order], keys=keys[order], of_row=rank[of_row.reshape(-1)])


def excluded_candidates(row_keys: Sequence[tuple[int, ...]], corpus: Corpus) -> list[set[int]]:
    """Per row, the corpus texts that may never be its negative: every positive of its query (a query may have
    several rows) and the query's own text when it is also a document."""
    index = {int(k): c for c, k in enumerate(corpus.keys)}
    positives_of: dict[int, set[int]] = {}
    for r, keys in enumerate(row_keys):
        positives_of.setdefault(keys[0], set()).add(int(corpus.of_row[r]))
    return [positives_of[k[0]] | ({index[k[0]]} if k[0] in index else set()) for k in row_keys]


@dataclass
class MinedNegatives:
    """One dataset's mined candidates: ``candidates[r]`` holds corpus indices for row ``r``, best first (-1
    after the last), mined with the weights of ``step``; every batch takes ``count`` negatives per row."""

    corpus: Corpus
    candidates: np.ndarray
    count: int
    step: int

    def choose(self, batch_rows: Sequence[int], row_keys: Sequence[tuple[int, ...]]) -> tuple[dict[int, list[int]], int]:
        """The corpus indices each row of the global batch ``batch_rows`` takes, and how many of them repeat a text
        of the batch (only when a row runs out of candidates that do not)."""
        seen = {k for r in batch_rows for k in row_keys[r]}
        chosen: dict[int, list[int]] = {}
        repeated = 0
        for r in batch_rows:
            ranked = [int(c) for c in self.candidates[r] if c >= 0]
            picks = []
            for c in ranked:
                key = int(self.corpus.keys[c])
                if key not in seen:
                    picks.append(c)
                    seen.add(key)
                    if len(picks) == self.count:
                        break
            if len(picks) < self.count:  # every candidate is in the batch already: keep the best of them anyway
                extra = [c for c in ranked if c not in picks][: self.count - len(picks)]
                repeated += len(extra)
                picks += extra
            chosen[r] = picks
        return chosen, repeated


def to_tensors(tables: Sequence[MinedNegatives]) -> dict:
    """Every dataset's candidates, corpus rows and mining step as tensors named ``<dataset index>.<what>`` (for a
    checkpoint's safetensors file)."""
    import torch

    tensors = {}
    for i, table in enumerate(tables):
        tensors[f"{i}.candidates"] = torch.as_tensor(table.candidates, dtype=torch.int32)
        tensors[f"{i}.corpus_rows"] = torch.as_tensor(table.corpus.rows, dtype=torch.int64)
        tensors[f"{i}.step"] = torch.tensor([table.step], dtype=torch.int64)
    return tensors


def from_tensors(tensors: dict, datasets, count: int, where: str) -> list[MinedNegatives]:
    """The tables :func:`to_tensors` wrote, for ``datasets`` as they are read now (``count`` negatives per row); an
    error naming ``where`` when they were mined from other data."""
    tables = []
    for i, ds in enumerate(datasets):
        corpus = corpus_of(ds.row_keys)
        names = [f"{i}.candidates", f"{i}.corpus_rows", f"{i}.step"]
        ok = all(n in tensors for n in names)
        if ok:
            candidates, rows = tensors[names[0]].numpy().astype(np.int64), tensors[names[1]].numpy()
            ok = (np.array_equal(rows, corpus.rows) and candidates.ndim == 2 and candidates.shape[0] == len(ds)
                  and candidates.max(initial=-1) < len(corpus))
        if not ok:
            raise EmbedtrainError(f"{where} does not match data.train[{i}] ({ds.name}): the data changed since the "
                                  "checkpoint; resume with the same data, or start again with --overwrite")
        tables.append(MinedNegatives(corpus, candidates, count, int(tensors[names[2]][0])))
    return tables
