"""Where every training row goes: read, left out by a rule, or trained on in an epoch.

A row can leave training in four places, and each is counted per dataset:

- ``label_without_second_text`` (example-based data): a text whose label has no other text gets no positive;
- ``bad_images`` (``data.bad_images: skip``): a row whose image is missing or does not decode;
- ``duplicates``: rows the epoch plan could not place in any full batch without repeating a text it must
  not repeat (see :mod:`embedtrain.data.sampler`): they are lost to every epoch alike;
- ``incomplete_batch``: fewer rows than one global batch left at the end of an epoch. They are not lost:
  the next epoch draws a new order, so this is reported but never counts as a drop.

:func:`check_accounts` turns a dataset that yields no batch, or that loses more than ``max_dropped_share``
of its rows to the first three rules, into one error per dataset (all of them together), before the
first step of ``embedtrain train`` and in ``embedtrain plan``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

from embedtrain.data.sampler import PlannedBatch, rows_drawn
from embedtrain.errors import EmbedtrainError


@dataclass
class DatasetAccount:
    index: int
    name: str
    rows_read: int
    """Rows of the source (after ``max_rows``)."""
    rows: int
    """Rows left after the rules applied while reading."""
    weight: float
    rows_drawn: int
    """Rows an epoch draws (rows x weight)."""
    rows_per_epoch: int
    """Rows in the epoch's full batches."""
    batches_per_epoch: int
    incomplete_batch: int
    """Rows drawn that do not fill a last global batch (back in the next epoch's order)."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Rows left out, per rule (read-time rules, and ``duplicates`` per epoch)."""
    held_out: int = 0
    """Rows set aside on purpose (the diagnostics probe): reported, never counted as lost."""

    @property
    def lost(self) -> int:
        return sum(self.dropped.values())

    @property
    def lost_share(self) -> float:
        """Share of the source's rows that never train: 1 - (kept when read) x (placed or waiting per epoch)."""
        if self.rows_read <= self.held_out or not self.rows_drawn:
            return 1.0 if self.rows_read > self.held_out else 0.0
        kept = (self.rows / (self.rows_read - self.held_out)) * \
            ((self.rows_per_epoch + self.incomplete_batch) / self.rows_drawn)
        return max(0.0, 1.0 - kept)

    def to_dict(self) -> dict:
        return {**asdict(self), "lost": self.lost, "lost_share": round(self.lost_share, 6)}

    def line(self) -> str:
        drops = ", ".join(f"{n} by {rule}" for rule, n in self.dropped.items() if n)
        return (f"{self.name}: {self.rows_read} rows read, {self.rows_per_epoch} trained per epoch in "
                f"{self.batches_per_epoch} batches" + (f"; left out: {drops}" if drops else "")
                + (f"; {self.held_out} held out for the diagnostics probe" if self.held_out else "")
                + (f"; {self.incomplete_batch} wait for the next epoch (incomplete batch)" if self.incomplete_batch else ""))


def account(datasets: Sequence, plan: Sequence[PlannedBatch], global_batch: int) -> list[DatasetAccount]:
    """One :class:`DatasetAccount` per dataset from its read-time drops (``dataset.dropped``) and an epoch's plan."""
    planned = [0] * len(datasets)
    batches = [0] * len(datasets)
    for b in plan:
        planned[b.dataset] += len(b.rows)
        batches[b.dataset] += 1
    out = []
    for i, ds in enumerate(datasets):
        read_drops = dict(getattr(ds, "dropped", {}) or {})
        held_out = int(getattr(ds, "held_out", 0) or 0)
        drawn = rows_drawn(len(ds), ds.weight)
        fillable = (drawn // global_batch) * global_batch  # what a plan without the duplicate rule would place
        dropped = {**read_drops, "duplicates": max(0, fillable - planned[i])}
        out.append(DatasetAccount(
            index=i, name=ds.name, rows_read=len(ds) + sum(read_drops.values()) + held_out, rows=len(ds), weight=ds.weight,
            rows_drawn=drawn, rows_per_epoch=planned[i], batches_per_epoch=batches[i],
            incomplete_batch=drawn - fillable, dropped={k: v for k, v in dropped.items() if v}, held_out=held_out))
    return out


def problems(accounts: Sequence[DatasetAccount], max_dropped_share: float, global_batch: int) -> list[str]:
    """One line per dataset that yields no batch or loses more than ``max_dropped_share`` of its rows."""
    lines = []
    for a in accounts:
        where = f"data.train[{a.index}] ({a.name})"
        if a.batches_per_epoch == 0:
            why = (f"{a.dropped['duplicates']} of its {a.rows_drawn} rows repeat a text another row of the batch has"
                   if a.dropped.get("duplicates") else f"it has {a.rows_drawn} rows per epoch")
            lines.append(f"{where}: yields no full batch of {global_batch} rows ({why}); lower data.batch_size, "
                         "add rows, or remove the dataset")
        elif a.lost_share > max_dropped_share + 1e-9:  # exactly the allowed share is allowed (float rounding)
            drops = ", ".join(f"{n} by {rule}" for rule, n in a.dropped.items())
            lines.append(f"{where}: {100 * a.lost_share:.1f}% of its rows would never train ({drops}), more than "
                         f"data.max_dropped_share ({max_dropped_share:g}); fix the data, or raise "
                         "data.max_dropped_share to accept the loss")
    return lines


def check_accounts(accounts: Sequence[DatasetAccount], max_dropped_share: float, global_batch: int) -> None:
    """Raise one :class:`EmbedtrainError` listing every dataset :func:`problems` finds."""
    found = problems(accounts, max_dropped_share, global_batch)
    if found:
        raise EmbedtrainError("; ".join(found) if len(found) == 1 else
                              f"{len(found)} training datasets would be dropped or cut: " + " | ".join(found))
