"""Epoch plans: which rows form each global batch.

A plan is a deterministic function of (seed, epoch) so that every process computes the same plan
without communicating, and a resumed run can skip exactly the batches already trained on.

Guarantees:
- task-homogeneous: every global batch comes from one dataset (so in-batch negatives are of the
  same kind as the positive);
- no duplicates: no query appears twice in a global batch, and no query's text is another row's document
  (either would be a false negative the loss cannot see). With ``repeat_documents`` (the loss masks
  false negatives) a document may repeat across rows: a label string shared by thousands of rows
  (classification data) trains every row, and the loss masks the copies; without it no text repeats;
- length grouping (optional): rows are sorted by length inside random pools of ``window`` batches,
  so batches have little padding, then the batch order is shuffled across the whole epoch. The rows a
  pool cannot place in a full batch (its longest, and duplicates) move on to the next pool instead of
  being dropped, so long rows are not under-sampled; only the last pool's remainder waits for the next
  epoch;
- balanced processes: the rows of every length-grouped global batch are shuffled before the batch is
  split across processes, so no process always gets the shortest slice of a length-sorted batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class PlannedBatch:
    dataset: int
    rows: tuple[int, ...]


def _fill_batches(
    order: Sequence[int], row_keys: Sequence[tuple[int, ...]], batch_size: int, no_duplicates: bool,
    leftover: list[int] | None = None, repeat_documents: bool = False,
) -> list[list[int]]:
    """Cut ``order`` into full batches; a row that would repeat a text of the batch waits for the next
    (see the module docstring for which repeats count). Rows that end in no full batch are appended to
    ``leftover`` when given (else dropped)."""
    batches: list[list[int]] = []
    current: list[int] = []
    seen: set[int] = set()  # every text of the batch (without repeat_documents), else its queries
    seen_docs: set[int] = set()  # the batch's documents (with repeat_documents)
    waiting: list[int] = []

    def try_add(idx: int) -> bool:
        keys = row_keys[idx]
        if not no_duplicates:
            current.append(idx)
            return True
        if repeat_documents:
            query, docs = keys[0], set(keys[1:])
            if query in seen or query in seen_docs or not docs.isdisjoint(seen):
                return False
            seen.add(query)
            seen_docs.update(docs)
        else:
            if not seen.isdisjoint(keys):
                return False
            seen.update(keys)
        current.append(idx)
        return True

    for idx in order:
        if not try_add(idx):
            waiting.append(idx)
            continue
        while len(current) == batch_size:
            batches.append(current)
            current, seen, seen_docs = [], set(), set()
            retry, waiting = waiting, []
            for w in retry:
                if len(current) == batch_size or not try_add(w):
                    waiting.append(w)
    if leftover is not None:
        leftover += current + waiting
    return batches


def _dataset_batches(
    size: int,
    row_keys: Sequence[tuple[int, ...]],
    lengths: Sequence[int] | None,
    global_batch: int,
    rng: np.random.Generator,
    no_duplicates: bool,
    window: int,
    repeats: float,
    repeat_documents: bool = False,
) -> list[list[int]]:
    # weight > 1 draws the dataset more than once per epoch, weight < 1 a fraction of it
    whole, frac = int(repeats), repeats - int(repeats)
    order = np.concatenate(
        [rng.permutation(size) for _ in range(whole)] + [rng.permutation(size)[: int(round(frac * size))]]
    ).astype(np.int64)
    if lengths is None:
        return _fill_batches(order.tolist(), row_keys, global_batch, no_duplicates, repeat_documents=repeat_documents)
    pool = max(1, window) * global_batch
    lengths = np.asarray(lengths)
    batches: list[list[int]] = []
    carried: list[int] = []  # rows the previous pool could not place in a full batch
    for start in range(0, len(order), pool):
        chunk = np.concatenate([np.asarray(carried, dtype=np.int64), order[start : start + pool]])
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        carried = []
        batches += _fill_batches(chunk.tolist(), row_keys, global_batch, no_duplicates, carried, repeat_documents)
    return batches


def plan_epoch(
    sizes: Sequence[int],
    row_keys: Sequence[Sequence[tuple[int, ...]]],
    global_batch: int,
    seed: int,
    epoch: int,
    lengths: Sequence[Sequence[int] | None] | None = None,
    weights: Sequence[float] | None = None,
    mixing: str = "proportional",
    no_duplicates: bool = True,
    window: int = 64,
    repeat_documents: bool = False,
) -> list[PlannedBatch]:
    """The ordered global batches of one epoch.

    ``mixing='proportional'`` shuffles all datasets' batches together (each dataset contributes in
    proportion to size x weight); ``'round_robin'`` takes one batch from each dataset in turn.
    ``repeat_documents``: documents may repeat inside a batch (the loss masks the copies; see above).
    """
    rng = np.random.default_rng([seed, epoch])
    lengths = lengths or [None] * len(sizes)
    weights = weights or [1.0] * len(sizes)
    per_dataset = [
        _dataset_batches(n, keys, lens, global_batch, rng, no_duplicates, window, w, repeat_documents)
        for n, keys, lens, w in zip(sizes, row_keys, lengths, weights)
    ]
    for batches, lens in zip(per_dataset, lengths):  # length-sorted pools would otherwise come in length order
        rng.shuffle(batches)
        if lens is not None:  # and each process would always get the same end of a length-sorted batch
            for rows in batches:
                rng.shuffle(rows)
    if mixing == "round_robin":
        plan = []
        for k in range(max((len(b) for b in per_dataset), default=0)):
            plan += [PlannedBatch(d, tuple(b[k])) for d, b in enumerate(per_dataset) if k < len(b)]
        return plan
    plan = [PlannedBatch(d, tuple(rows)) for d, b in enumerate(per_dataset) for rows in b]
    order = rng.permutation(len(plan))
    return [plan[i] for i in order]


def rows_drawn(size: int, weight: float) -> int:
    """Rows a dataset of ``size`` rows and sampling ``weight`` contributes to an epoch (before batching)."""
    whole, frac = int(weight), weight - int(weight)
    return whole * size + int(round(frac * size))
