"""Class-balanced batches for metric learning: every batch holds m images of each of its classes.

Proxy losses learn from the positives and negatives inside a batch; drawing ``batch_size / m``
distinct classes with exactly ``m`` images each makes every batch carry positives for every class in
it. Batches are a deterministic function of (seed, epoch), so a resumed run can skip the batches it
already trained on.

Per epoch: each class's images are shuffled and cut into groups of m; a last short group (and a
class with fewer than m images) is filled up with images of the same class drawn again. The groups
are shuffled and packed into batches of distinct classes; groups left over at the end of the epoch
are dropped.
"""

from __future__ import annotations

import random
from typing import Sequence

from embedtrain.errors import EmbedtrainError


def class_balanced_batches(labels: Sequence[int], batch_size: int, samples_per_class: int, seed: int,
                           epoch: int = 0) -> list[list[int]]:
    """Batches of dataset indices for one epoch; each has ``batch_size / samples_per_class`` distinct
    classes with ``samples_per_class`` images each."""
    m = samples_per_class
    if m < 1:
        raise EmbedtrainError(f"data.samples_per_class: must be at least 1, got {m}")
    if batch_size % m:
        raise EmbedtrainError(f"data.batch_size: {batch_size} is not a multiple of data.samples_per_class ({m})")
    per_batch = batch_size // m
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    if len(by_class) < per_batch:
        raise EmbedtrainError(
            f"data.batch_size: {per_batch} classes per batch ({batch_size} / {m}) but only {len(by_class)} "
            "training classes; lower data.batch_size or raise data.samples_per_class"
        )
    rng = random.Random(f"{seed}-{epoch}")
    groups: list[tuple[int, list[int]]] = []
    for label in sorted(by_class):
        indices = by_class[label][:]
        rng.shuffle(indices)
        for start in range(0, len(indices), m):
            group = indices[start:start + m]
            if len(group) < m:
                group += [rng.choice(by_class[label]) for _ in range(m - len(group))]
            groups.append((label, group))
    rng.shuffle(groups)

    batches: list[list[int]] = []
    current: list[tuple[int, list[int]]] = []
    waiting: list[tuple[int, list[int]]] = []
    for group in groups:
        # a class already in the batch waits for the next one (each class once per batch)
        if any(group[0] == g[0] for g in current):
            waiting.append(group)
            continue
        current.append(group)
        if len(current) == per_batch:
            batches.append([i for _, g in current for i in g])
            current = []
            retry, waiting = waiting, []
            for w in retry:
                if len(current) < per_batch and all(w[0] != g[0] for g in current):
                    current.append(w)
                    if len(current) == per_batch:
                        batches.append([i for _, g in current for i in g])
                        current = []
                else:
                    waiting.append(w)
    return batches
