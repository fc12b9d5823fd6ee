"""Tokenization (once, cached by datasets) and collation of planned batches into tensors.

A collated batch is a dict:
- ``query``, ``positive``: ``{"input_ids", "attention_mask"}`` of shape (B, L_role), padded to
  the longest text of that role in the batch (never to max_length);
- ``negative``: the same for the B x k hard negatives, row-major (row i's negatives are
  ``i*k … i*k+k-1``), or None when the dataset has none;
- ``positive_ids`` (B,) and ``negative_ids`` (B*k,): int64 hashes of what makes two documents the same
  answer (their text; their label for labelled rows) so the loss can mask false negatives across processes;
- ``dataset``: the dataset index;
- ``negatives_repeated`` (with mined negatives only): how many mined negatives of the global batch repeat one of
  its texts (see :mod:`embedtrain.data.mined`).

With ``prompt_lengths`` given (instruction masking, NV-Embed), every role's dict also has a
``pooling_mask`` (B, L_role): the attention mask without each text's prompt tokens.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from embedtrain.data.readers import PairDataset, column_lengths
from embedtrain.errors import EmbedtrainError
from embedtrain.data.sampler import PlannedBatch

ROLE_OF = {"query": "query", "positive": "document"}


def role_of(column: str) -> str:
    return ROLE_OF.get(column, "document")


def pretokenize(
    dataset: PairDataset, tokenizer, max_length_for: Callable[[str], int], num_proc: Optional[int] = None
) -> None:
    """Add ``<role>_ids`` token columns (prompt included, truncated) using ``datasets.map``.

    datasets caches the result on disk keyed by the data, the tokenizer and the settings, so a
    second run with the same recipe does not tokenize again.
    """

    # The closure holds plain values only: datasets hashes it into the cache key.
    columns = list(dataset.role_columns)
    prompts, limits = role_settings(dataset, max_length_for)

    def tokenize(batch):
        return tokenize_roles(tokenizer, batch, columns, prompts, limits)

    dataset.rows = dataset.rows.map(tokenize, batched=True, batch_size=2000, num_proc=num_proc,
                                    desc=f"tokenizing {dataset.name}")


def role_settings(dataset, max_length_for: Callable[[str], int]) -> tuple[dict[str, str], dict[str, int]]:
    """Per role column of ``dataset``: the prompt put before its texts and its token limit."""
    columns = dataset.role_columns
    prompts = {c: dataset.query_prompt if role_of(c) == "query" else dataset.document_prompt for c in columns}
    return prompts, {c: max_length_for(role_of(c)) for c in columns}


def tokenize_roles(tokenizer, batch: dict, columns: Sequence[str], prompts: dict[str, str],
                   limits: dict[str, int]) -> dict[str, list]:
    """``<column>_ids``: the token ids of each role column's texts of ``batch`` (prompt included, truncated)."""
    out = {}
    for column in columns:
        texts = [prompts[column] + t for t in batch[column]]
        out[f"{column}_ids"] = tokenizer(texts, truncation=True, max_length=limits[column])["input_ids"]
    return out


def token_lengths(dataset: PairDataset) -> list[int]:
    """Total tokens per row over all roles (or characters when not pre-tokenized)."""
    import numpy as np

    columns = dataset.rows.column_names
    if all(f"{c}_ids" in columns for c in dataset.role_columns):
        per_role = [column_lengths(dataset.rows, f"{c}_ids") for c in dataset.role_columns]
    else:
        per_role = [column_lengths(dataset.rows, c) for c in dataset.role_columns]
    return np.sum(np.asarray(per_role, dtype=np.int64).reshape(len(per_role), len(dataset)), axis=0).tolist()


def pad(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token id lists to the longest one."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


class BatchCollator:
    """Turns planned rows of one dataset into tensors (from cached token ids, or by tokenizing)."""

    def __init__(self, datasets: Sequence[PairDataset], tokenizer, max_length_for: Callable[[str], int],
                 prompt_lengths: Optional[dict[str, int]] = None):
        self.datasets = datasets
        self.tokenizer = tokenizer
        self.max_length_for = max_length_for
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # prompt -> tokens it takes at the start of a text (leading special tokens included), to leave
        # out of pooling; None: pool every token. A plain dict, so that DataLoader workers can take it.
        self.prompt_lengths = prompt_lengths
        self.mined: Optional[list] = None
        """Per dataset, its :class:`~embedtrain.data.mined.MinedNegatives` (or None), when data.mined_negatives is on."""

    def _with_pooling_mask(self, dataset: PairDataset, tensors: dict[str, torch.Tensor], role: str) -> dict:
        prompt = dataset.query_prompt if role == "query" else dataset.document_prompt
        n = self.prompt_lengths[prompt] if prompt else 0
        mask = tensors["attention_mask"]
        # count from each row's first real token, so left padding works as well as right padding
        first = mask.argmax(dim=1, keepdim=True)
        keep = torch.arange(mask.shape[1]).unsqueeze(0) >= first + n
        pooled = mask * keep.to(mask.dtype)
        if n and not bool((pooled.sum(1) > 0).all()):
            raise EmbedtrainError(
                f"{dataset.name}: the {role} prompt {prompt[:40]!r}... takes {n} of the "
                f"{self.max_length_for(role)} tokens allowed, leaving a text with no token to pool; raise the "
                f"model's {role}_max_length or shorten the prompt"
            )
        return {**tensors, "pooling_mask": pooled}

    def _tensors(self, dataset: PairDataset, data: dict, columns: Sequence[str], n: int) -> dict[str, torch.Tensor]:
        """Pad the texts of ``columns`` interleaved per row (row i, column j → i*len(columns)+j)."""
        if all(f"{c}_ids" in data for c in columns):
            return pad([data[f"{c}_ids"][i] for i in range(n) for c in columns], self.pad_id)
        role = role_of(columns[0])
        prompt = dataset.query_prompt if role == "query" else dataset.document_prompt
        texts = [prompt + data[c][i] for i in range(n) for c in columns]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length_for(role),
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def __call__(self, planned: PlannedBatch, rows: Sequence[int]) -> dict:
        dataset = self.datasets[planned.dataset]
        data, ids = dataset.rows[list(rows)], [dataset.ids(r) for r in rows]
        mined = self.mined[planned.dataset] if self.mined else None
        if mined is None:
            return self.collate(planned.dataset, data, ids)
        return self._with_mined(planned, rows, dataset, mined, data, ids)

    def _with_mined(self, planned: PlannedBatch, rows: Sequence[int], dataset: PairDataset, mined, data: dict,
                    ids: list) -> dict:
        """The batch with each row's mined negatives after its own (chosen for the whole global batch, see
        :mod:`embedtrain.data.mined`); ``negatives_repeated``: how many of the global batch's repeat one of its texts."""
        chosen, repeated = mined.choose(planned.rows, dataset.row_keys)
        picks = [chosen[r] for r in rows]
        documents = dataset.rows[[int(mined.corpus.rows[c]) for p in picks for c in p]]
        column = "positive_ids" if "positive_ids" in documents else "positive"
        first, m = dataset.num_negatives, mined.count
        for j in range(m):
            name = f"negative_{first + j}" + column[len("positive"):]
            data[name] = [documents[column][i * m + j] for i in range(len(rows))]
        ids = [tuple(row) + tuple(int(mined.corpus.keys[c]) for c in p) for row, p in zip(ids, picks)]
        return {**self.collate(planned.dataset, data, ids, first + m), "negatives_repeated": repeated}

    def collate(self, index: int, data: dict, ids: Sequence[tuple[int, ...]], negatives: Optional[int] = None) -> dict:
        """The batch of dataset ``index`` whose rows are ``data`` (role columns, or ``<role>_ids`` token columns:
        a dict of lists) with the loss's document ids ``ids`` (one tuple per row: query, positive, negatives);
        ``negatives``: the negative columns per row (default: the dataset's own)."""
        dataset = self.datasets[index]
        n, k = len(ids), dataset.num_negatives if negatives is None else negatives
        negatives = [f"negative_{j}" for j in range(k)]
        tensors = {role: self._tensors(dataset, data, columns, n) if columns else None
                   for role, columns in (("query", ["query"]), ("positive", ["positive"]), ("negative", negatives))}
        if self.prompt_lengths is not None:
            tensors = {role: t if t is None else self._with_pooling_mask(dataset, t, "query" if role == "query" else "document")
                       for role, t in tensors.items()}
        return {
            "dataset": index,
            "query": tensors["query"],
            "positive": tensors["positive"],
            "positive_ids": torch.tensor([row[1] for row in ids], dtype=torch.long),
            "negative": tensors["negative"],
            "negative_ids": torch.tensor([row[2 + j] for row in ids for j in range(k)], dtype=torch.long) if k else None,
        }


class PlannedBatches(torch.utils.data.Dataset):
    """The batches of an epoch plan as a map-style dataset (so DataLoader workers can collate).

    ``rank``/``world_size`` pick this process's slice of each global batch.
    """

    def __init__(self, plan: Sequence[PlannedBatch], collator: BatchCollator, rank: int = 0, world_size: int = 1):
        self.plan = plan
        self.collator = collator
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict:
        planned = self.plan[i]
        per_process = len(planned.rows) // self.world_size
        rows = planned.rows[self.rank * per_process : (self.rank + 1) * per_process]
        return self.collator(planned, rows)
