"""The diagnostics probe: a few hundred training pairs held out from training, chosen by their content.

The choice depends only on the rows' texts and the number asked for (not on the seed, the order of the
rows or the number of processes), so a resumed run carves the same probe and trains on the same rows.
Rows are taken in order of a stable hash of their texts; a training row that shares any text with the
probe (as query, positive or negative) is dropped from training too, so that the probe is truly unseen.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from embedtrain.data.readers import PairDataset, column_list, text_hash

MAX_FRACTION = 0.05
"""At most this share of the training rows goes to the probe (small datasets keep their rows)."""
MIN_ROWS = 16
"""Fewer probe pairs than this say little about a space of hundreds of dimensions: then there is no probe."""


@dataclass
class Probe:
    """Held-out (query, positive) pairs, grouped by the training dataset they come from."""

    queries: list[list] = field(default_factory=list)
    positives: list[list] = field(default_factory=list)
    """Per training dataset (in recipe order), its probe's queries and positives (row i pairs with row i): texts, or
    for image-text data (text or None, image or None) items."""
    excluded_rows: list[int] = field(default_factory=list)
    """Per training dataset, the rows removed from training: the probe's own and those sharing a text (or an image)
    with it."""

    @property
    def rows(self) -> int:
        return sum(len(q) for q in self.queries)

    def summary(self, names: list[str]) -> dict:
        """What results.json records."""
        return {"rows": self.rows, "excluded_training_rows": sum(self.excluded_rows),
                "per_dataset": {n: {"probe_rows": len(q), "excluded_training_rows": e}
                                for n, q, e in zip(names, self.queries, self.excluded_rows)}}


def probe_size(total_rows: int, wanted: int) -> int:
    """The probe's number of pairs: ``wanted``, at most :data:`MAX_FRACTION` of the rows; 0 below :data:`MIN_ROWS`."""
    size = min(wanted, int(total_rows * MAX_FRACTION))
    return size if size >= MIN_ROWS else 0


def choose_probe(row_keys: list[Sequence[tuple[int, ...]]], wanted: int,
                 order: Optional[list[Optional[Sequence[str]]]] = None) -> tuple[list[list[int]], list[list[int]]]:
    """Per dataset (its rows' keys: one hash per role, query first, positive second), the probe's rows and the rows
    left for training: no row left shares a text (or image) with the probe, in any dataset. Each dataset gives a
    share of the probe proportional to its size; no probe (every row kept) below :data:`MIN_ROWS` pairs. Rows are
    tried in the order of a hash of their query and positive keys, or of ``order[d]``'s string per row where given.

    A row is passed over when holding it out would take more than :data:`MAX_FRACTION` of any dataset's rows out
    of training, counting every row that shares its query or positive. That keeps label strings out of the probe (a
    class name over thousands of rows; texts reused as negatives across rows): a dataset of them may give fewer
    pairs than its share, or none, and fewer than :data:`MIN_ROWS` pairs in all make no probe."""
    total = sum(len(k) for k in row_keys)
    size = probe_size(total, wanted)
    if size == 0:
        return [[] for _ in row_keys], [list(range(len(k))) for k in row_keys]
    holders = _KeyIndex(row_keys)
    budget = [int(len(k) * MAX_FRACTION) for k in row_keys]
    removed: list[set[int]] = [set() for _ in row_keys]
    held: set[int] = set()  # the hash of every probe text
    chosen: list[list[int]] = []
    for d, (keys, share) in enumerate(zip(row_keys, _shares([len(k) for k in row_keys], size))):
        rows = []
        names = order[d] if order is not None and order[d] is not None else [f"{k[0]}:{k[1]}" for k in keys]
        for i in _probe_order(names).tolist():
            if len(rows) == share:
                break
            query, positive = keys[i][0], keys[i][1]
            if query in held or positive in held or query == positive:
                continue  # distinct texts: a repeated one would count twice in the rank and the pair figures
            hit = {(e, j) for key in (query, positive) for e, j in holders.rows(key) if j not in removed[e]}
            cost = Counter(e for e, _ in hit)
            if any(len(removed[e]) + n > budget[e] for e, n in cost.items()):
                continue
            rows.append(i)
            held.update((query, positive))
            for e, j in hit:
                removed[e].add(j)
        chosen.append(rows)
    if sum(len(rows) for rows in chosen) < MIN_ROWS:  # too few pairs passed: no probe, every row trains
        return [[] for _ in row_keys], [list(range(len(k))) for k in row_keys]
    return chosen, [[i for i in range(len(keys)) if i not in removed[d]] for d, keys in enumerate(row_keys)]


class _KeyIndex:
    """Which (dataset, row) pairs hold a key: every row's keys in one sorted array, looked up by binary search (a few
    arrays of int64 however many rows, built in one vectorised sort)."""

    def __init__(self, row_keys: list[Sequence[tuple[int, ...]]]):
        keys, datasets, rows = [], [], []
        for d, table in enumerate(row_keys):
            table = np.asarray(table, dtype=np.int64).reshape(len(table), len(table[0]) if len(table) else 0)
            keys.append(table.ravel())
            datasets.append(np.full(table.size, d, dtype=np.int64))
            rows.append(np.repeat(np.arange(len(table), dtype=np.int64), table.shape[1]))
        keys_all = np.concatenate(keys)
        order = np.argsort(keys_all, kind="stable")
        self.keys, self.datasets, self.rows_of = keys_all[order], np.concatenate(datasets)[order], np.concatenate(rows)[order]

    def rows(self, key: int) -> list[tuple[int, int]]:
        lo, hi = np.searchsorted(self.keys, key, "left"), np.searchsorted(self.keys, key, "right")
        return list(zip(self.datasets[lo:hi].tolist(), self.rows_of[lo:hi].tolist()))


def carve_probe(datasets: list[PairDataset], wanted: int) -> tuple[Probe, list[PairDataset]]:
    """(the probe, the datasets without its rows) for text pairs (see :func:`choose_probe`)."""
    chosen, kept_rows = choose_probe([d.row_keys for d in datasets], wanted)
    probe = Probe()
    if not any(chosen):
        return probe, datasets
    kept = []
    for d, rows, keep in zip(datasets, chosen, kept_rows):
        picked = d.rows.select(rows)
        probe.queries.append(column_list(picked, "query"))
        probe.positives.append(column_list(picked, "positive"))
        probe.excluded_rows.append(len(d) - len(keep))
        kept.append(dataclasses.replace(
            d, rows=d.rows.select(keep), row_keys=[d.row_keys[i] for i in keep],
            match_keys=None if d.match_keys is None else [d.match_keys[i] for i in keep], held_out=len(d) - len(keep)))
    return probe, kept


def _probe_order(names: Sequence[str]) -> np.ndarray:
    """Rows in a stable order that is unrelated to the file's order: by the hash of each row's name (its query and
    positive), ties by row number."""
    hashes = np.fromiter((text_hash(n) for n in names), dtype=np.int64, count=len(names))
    return np.argsort(hashes, kind="stable")


def _shares(lengths: list[int], size: int) -> list[int]:
    """``size`` split in proportion to ``lengths`` (largest remainders; the first dataset wins ties)."""
    total = sum(lengths)
    exact = [size * n / total for n in lengths]
    shares = [int(x) for x in exact]
    for i in sorted(range(len(lengths)), key=lambda i: (-(exact[i] - shares[i]), i))[: size - sum(shares)]:
        shares[i] += 1
    return shares


def same_class_pairs(labels: Sequence[int], wanted: int) -> list[tuple[int, int]]:
    """The diagnostics probe of a metric-learning run: up to ``wanted`` pairs of images (indices into ``labels``)
    of the same class, each image in one pair at most, taken from the classes in turn (class by class in label
    order, each class's images in their order: its first and second image, then the next class's, and so on
    round after round) so that as many classes as possible give one. Called on the unseen (test) classes it costs
    no training image. Fewer than :data:`MIN_ROWS` pairs make no probe (an empty list)."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    members = [by_class[c] for c in sorted(by_class)]
    pairs: list[tuple[int, int]] = []
    for round_ in range(max((len(m) // 2 for m in members), default=0)):
        for images in members:
            if 2 * round_ + 1 < len(images) and len(pairs) < wanted:
                pairs.append((images[2 * round_], images[2 * round_ + 1]))
    return pairs if len(pairs) >= MIN_ROWS else []
