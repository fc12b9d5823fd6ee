"""Training pairs read as streams: datasets too large to load whole, or on the Hub.

A ``data.train`` entry with ``streaming: true`` is read through ``datasets``' iterable datasets (local Parquet,
JSON-lines or CSV shards: one file, a folder or a glob; or a Hub id), one pool of rows at a time, inside the
DataLoader's worker processes, and tokenized there. Nothing is read before training but the shards' metadata.
Image-text rows (CLIP, VLM2Vec: webdataset shards too) are read the same way by :class:`ImageStreamReader`, which
checks each pool's images as they are read and leaves tokenizing and decoding to the collator.

- **Split across processes and workers.** With P processes of W workers there are G = P x W readers; reader g
  takes shards g, g+G, g+2G, ... when the dataset has at least G shards, else it reads every shard and keeps
  every G-th row. No row is read by two readers and none is skipped.
- **Pools.** A reader takes ``length_grouping_window x batch_size`` new rows at a time plus the rows its previous
  pool could not place, and cuts them into batches by the in-memory sampler's rules
  (:func:`embedtrain.data.sampler._fill_batches`): no duplicate text in a batch (a repeated document stays when the
  loss masks it), rows of similar length together (with length grouping), batch order shuffled inside the pool.
  Rows that fit no batch wait for the next pool; at most one pool's worth waits, the rest is counted as dropped.
  Duplicates are kept apart within each process's batch; across processes the loss masks them by text.
- **Passes.** A reader that reaches the end of its part starts the next pass, the shard order shuffled anew
  (a Hub dataset keeps its order).
- **Task-homogeneous batches.** Step k's dataset is drawn from the mixing weights by a generator seeded with
  (seed, k): the same in every process and worker. The DataLoader hands out its workers' batches in turn, so
  worker w of a loader started at step s makes the batches of steps s+w, s+w+W, ...; the reader it uses is the
  one of step residue (s+w) mod W, so a resumed run pairs steps and readers as the uninterrupted run did.
- **Exact resume.** Every batch carries its reader's position after it: per dataset the pass, the source's own
  position (``IterableDataset.state_dict``) at the start of the current pool, the rows carried into that pool and
  the batches already given out of it. A checkpoint keeps every process's positions; a resumed run reads the
  current pool again from its start and continues with the same rows. Positions belong to a number of processes
  and workers: resuming with other numbers is an error (start again, or resume on the same numbers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from embedtrain.data.collate import role_settings, tokenize_roles
from embedtrain.data.readers import text_hash
from embedtrain.data.sampler import _fill_batches
from embedtrain.data.webdataset import KEY_COLUMN, SHARD_COLUMN, flatten_fields, is_webdataset
from embedtrain.errors import EmbedtrainError


@dataclass
class ImageRows:
    """What a stream of multimodal rows adds to its :class:`StreamSource` (plain values)."""

    roles: dict[str, tuple[Optional[str], Optional[str]]]  # role -> (text column, image column)
    image_root: str  # relative image paths are read from here
    query_template: str = "{image}{text}"
    document_template: str = "{image}{text}"
    webdataset: bool = False  # rows are webdataset samples: messages name their shard and key
    bad_images: str = "stop"
    verify: bool = True


@dataclass
class StreamSource:
    """One streaming dataset: where its rows come from and what the collator needs (plain values, so DataLoader
    workers can take it)."""

    name: str
    where: str  # recipe path of the entry, for messages (data.train[0])
    path: str  # as the recipe gives it
    builder: Optional[str]  # the datasets builder of local shards; None for a Hub id
    files: list[str]
    columns: dict[str, str]  # role (query, positive, negative_0..) -> column of the source
    query_prompt: str = ""
    document_prompt: str = ""
    weight: float = 1.0
    split: str = "train"
    subset: Optional[str] = None
    rows: Optional[int] = None  # rows in all shards: from Parquet footers, or estimated (rows_estimated)
    num_shards: int = 1
    rows_estimated: bool = False  # rows is the shards' bytes over the first shard's bytes per row
    images: Optional[ImageRows] = None  # multimodal rows: columns then holds each role's text and image columns

    @property
    def num_negatives(self) -> int:
        return len(self.images.roles if self.images is not None else self.columns) - 2

    @property
    def role_columns(self) -> list[str]:
        return list(self.columns)

    @property
    def read_columns(self) -> list[str]:
        """The source's columns a row is read from, in order (a column two roles share, once)."""
        columns = list(dict.fromkeys(self.columns.values()))
        if self.images is not None and self.images.webdataset:
            columns += [KEY_COLUMN, SHARD_COLUMN]
        return columns

    def open(self, order: Optional[Sequence[int]] = None):
        """The source as a ``datasets.IterableDataset`` with role columns (local shards in ``order``)."""
        import datasets

        datasets.disable_progress_bars()
        try:
            if self.builder is not None:
                files = [self.files[i] for i in order] if order is not None else self.files
                ds = datasets.load_dataset(self.builder, data_files=files, split="train", streaming=True)
            else:
                ds = datasets.load_dataset(self.path, self.subset, split=self.split, streaming=True)
        except FileNotFoundError:
            raise EmbedtrainError(f"{self.where}.path: {self.path} not found; check the path or the Hub id") from None
        except Exception as err:  # datasets wraps resolution errors in many types
            first = (str(err).strip().splitlines() or [err.__class__.__name__])[0]
            raise EmbedtrainError(f"{self.where}.path: cannot stream {self.path} ({first[:160]}); check the "
                                  "path, the Hub id or the shards' format") from None
        if self.images is None:
            return ds.select_columns(list(self.columns.values()))
        from embedtrain.data.multimodal import images_kept_encoded

        return images_kept_encoded(flatten_fields(ds, list(self.columns.values())).select_columns(self.read_columns),
                                   [c for _, c in self.images.roles.values() if c is not None])

    def line(self) -> str:
        rows = "rows unknown until read" if self.rows is None else f"{'about ' * self.rows_estimated}{self.rows:,} rows"
        return f"stream {self.name}: {self.path}, {self.num_shards} shard{'s' * (self.num_shards != 1)}, {rows}"

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "format": self.builder or "hub", "shards": self.num_shards,
                "rows": self.rows, "rows_estimated": self.rows_estimated, "weight": self.weight}


def open_stream(where: str, name: str, path: str, columns: dict[str, str], query_prompt: str = "",
                document_prompt: str = "", weight: float = 1.0, split: str = "train",
                subset: Optional[str] = None, images: Optional[ImageRows] = None) -> StreamSource:
    """A checked :class:`StreamSource`: its shards found, its columns present (read from the shards' schema, or
    from the first row when the format has none), its row count when the shards record it. ``images``: the rows
    are multimodal (``columns`` then maps ``<role>.text`` / ``<role>.image`` to columns)."""
    from embedtrain.config.schema import local_data_files, looks_local

    if images is None and len(set(columns.values())) != len(columns):
        raise EmbedtrainError(f"{where}: the same column is used for two roles ({', '.join(columns.values())}); "
                              "give each role its own column")
    builder, files = None, []
    if looks_local(path):
        try:
            builder, files = local_data_files(path)
        except EmbedtrainError as err:
            raise EmbedtrainError(f"{where}.path: {err}") from None
    source = StreamSource(name, where, path, builder, files, dict(columns), query_prompt, document_prompt, weight,
                          split, subset, images=images)
    import datasets

    try:
        ds = (datasets.load_dataset(builder, data_files=files, split="train", streaming=True) if builder
              else datasets.load_dataset(path, subset, split=split, streaming=True))
        if images is not None:
            ds = flatten_fields(ds, list(columns.values()))  # json.<field> columns of webdataset samples
        names = ds.column_names or list(next(iter(ds.take(1)), {}))
        if images is not None:
            images.webdataset = is_webdataset(names)
    except Exception as err:
        first = (str(err).strip().splitlines() or [err.__class__.__name__])[0]
        raise EmbedtrainError(f"{where}.path: cannot stream {path} ({first[:160]}); check the path, the Hub id or "
                              "the shards' format") from None
    missing = [c for c in columns.values() if c not in names]
    if missing:
        raise EmbedtrainError(f"{where}: missing {', '.join(repr(m) for m in missing)} in {path} "
                              f"(have: {', '.join(names)}); set the column names in the recipe")
    source.num_shards = ds.num_shards
    if builder == "parquet":
        import pyarrow.parquet as pq

        source.rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    elif builder in ("json", "csv"):
        source.rows, source.rows_estimated = _estimate_rows(files, header=builder == "csv"), True
    elif builder == "webdataset":
        source.rows, source.rows_estimated = _estimate_samples(files), len(files) > 1
    return source


def _estimate_samples(files: Sequence[str]) -> Optional[int]:
    """Samples of webdataset shards: the first shard's (its members' distinct keys, read from the tar headers
    alone) times the shards' bytes over the first shard's; exact for one shard."""
    import os
    import tarfile

    try:
        with tarfile.open(files[0]) as tar:
            keys = {m.name.rpartition("/")[0] + "/" + m.name.rpartition("/")[2].split(".", 1)[0] for m in tar if m.isfile()}
    except (OSError, tarfile.TarError) as err:
        raise EmbedtrainError(f"{files[0]}: cannot read it as a tar shard ({err}); check the file") from None
    if not keys:
        return None
    first = os.path.getsize(files[0])
    return max(1, round(len(keys) * sum(os.path.getsize(f) for f in files) / first))


def _estimate_rows(files: Sequence[str], header: bool, sample: int = 1 << 20) -> Optional[int]:
    """Rows of line-per-row shards: their bytes over the bytes per line of the first shard's first megabyte."""
    import os

    with open(files[0], "rb") as f:
        head = f.read(sample)
    lines = head.count(b"\n") - header
    if lines <= 0:
        return None
    total = sum(os.path.getsize(f) for f in files)
    return max(1, round(total / (len(head) / (lines + header))) - header * len(files))


def step_dataset(seed: int, step: int, probabilities: Sequence[float], mixing: str) -> int:
    """The dataset of global step ``step`` (0-based): the same in every process and worker."""
    if len(probabilities) == 1:
        return 0
    if mixing == "round_robin":
        return step % len(probabilities)
    return int(np.random.default_rng([seed, step, 7]).choice(len(probabilities), p=probabilities))


def mixing_probabilities(sources: Sequence[StreamSource], mixing: str) -> tuple[list[float], str]:
    """Each stream's share of the steps, and how it was set (a line for the log)."""
    if mixing == "round_robin":
        return [1 / len(sources)] * len(sources), "one batch of each dataset in turn"
    if all(s.rows is not None for s in sources):
        mass = [s.weight * s.rows for s in sources]
        how = "rows x weight (rows from the shards' metadata)"
    else:
        mass = [s.weight for s in sources]
        how = "weights only (some shards do not record their rows)"
    total = sum(mass)
    return [m / total for m in mass], how


class TokenizeRoles:
    """Token ids of a stream's role columns (prompts put before them, each role's limit): what a worker runs."""

    def __init__(self, tokenizer, query_max_length: int, document_max_length: int):
        self.tokenizer, self.limits = tokenizer, {"query": query_max_length, "document": document_max_length}

    def max_length_for(self, role: str) -> int:
        return self.limits[role]

    def __call__(self, source: StreamSource, data: dict) -> dict:
        prompts, limits = role_settings(source, self.max_length_for)
        return tokenize_roles(self.tokenizer, data, source.role_columns, prompts, limits)


@dataclass
class _Pool:
    rows: list[list]  # the pool's rows: their values, in the order of the reader's columns
    tokens: Any  # what batches are taken from: <column>_ids of those rows (text), their checked pairs (images)
    batches: list[list[int]]  # row indices of its batches, in the order they are given out


class StreamReader:
    """One reader's rows of one stream, in batches (see the module docstring). ``tokenize(source, data)`` gives
    the ``<column>_ids`` token columns of a dict of role columns."""

    def __init__(self, source: StreamSource, index: int, reader: int, readers: int, seed: int, batch_size: int,
                 pool_rows: int, tokenize: Callable[[StreamSource, dict], dict], group_by_length: bool,
                 no_duplicates: bool, repeat_documents: bool, position: Optional[dict] = None):
        self.source, self.index, self.reader, self.readers, self.seed = source, index, reader, readers, seed
        self.batch_size, self.pool_rows, self.tokenize = batch_size, pool_rows, tokenize
        self.group_by_length, self.no_duplicates, self.repeat_documents = group_by_length, no_duplicates, repeat_documents
        p = position or {}
        self.pass_ = p.get("pass", 0)
        self.pool_no = p.get("pool", 0)
        self.carry: list[list] = _from_json(p.get("carry", []))
        self.read_before, self.dropped_before = p.get("read", 0), p.get("dropped", 0)
        self.given_before, self.done = p.get("given", 0), p.get("done", 0)
        self.rows_this_pass = p.get("rows_this_pass", 0)
        self._open_pass(p.get("source"))
        self.pool: Optional[_Pool] = None
        if position is not None:
            self._read_pool()  # the pool the position is in, again, with its first `done` batches given out

    def _open_pass(self, source_state: Optional[dict]) -> None:
        if getattr(self, "rows", None) is not None:
            self.rows.close()
        order = None
        if self.source.builder is not None:  # each pass takes the shards in its own order
            order = np.random.default_rng([self.seed, self.index, self.pass_, 11]).permutation(len(self.source.files))
        ds = self.source.open(order)
        if ds.num_shards >= self.readers:
            ds = ds.shard(num_shards=self.readers, index=self.reader, contiguous=False)
        elif self.readers > 1:
            from datasets.distributed import split_dataset_by_node

            ds = split_dataset_by_node(ds, rank=self.reader, world_size=self.readers)
        if source_state is not None:
            ds.load_state_dict(source_state)
        self.ds, self.source_state = ds, source_state
        self.rows = ds.iter(batch_size=self.pool_rows)

    def _read_pool(self) -> None:
        """Read the next pool's new rows (the next pass's when this one is over) and cut the pool into batches."""
        while True:
            new = next(self.rows, None)
            if new is not None:
                break
            if not self.rows_this_pass:
                raise EmbedtrainError(
                    f"{self.source.where}: {self.source.path} gives reader {self.reader} of {self.readers} no rows "
                    f"({self.source.num_shards} shards); give the dataset more rows or run fewer processes or workers")
            self.pass_, self.rows_this_pass = self.pass_ + 1, 0
            self._open_pass(None)
        columns = self._columns()
        fresh = [[new[c][i] for c in columns] for i in range(len(next(iter(new.values()))))]
        read = len(fresh)
        fresh = self._check(fresh)
        rows = self.carry + fresh
        tokens, keys, lengths = self._prepare(rows)
        rng = np.random.default_rng([self.seed, self.index, self.reader, self.pass_, self.pool_no])
        order = rng.permutation(len(rows))
        if self.group_by_length and lengths is not None:
            lengths = np.asarray(lengths)
            order = order[np.argsort(lengths[order], kind="stable")]
        leftover: list[int] = []
        batches = _fill_batches(order.tolist(), keys, self.batch_size, self.no_duplicates, leftover,
                                self.repeat_documents)
        rng.shuffle(batches)
        self.pool = _Pool(rows, tokens, batches)
        self.fresh, self.keys = read, keys
        self.next_carry = [rows[i] for i in leftover[: self.pool_rows]]
        self.dropped_here = max(0, len(leftover) - self.pool_rows)

    def _columns(self) -> list[str]:
        """The source's columns of a row, in order."""
        return [self.source.columns[c] for c in self.source.role_columns]

    def _prepare(self, rows: list[list]) -> tuple[Any, list[tuple[int, ...]], Optional[list[int]]]:
        """(what batches are taken from, each row's keys for de-duplication, each row's tokens or None)."""
        columns = self.source.role_columns
        data = {c: [r[j] for r in rows] for j, c in enumerate(columns)}
        tokens = self.tokenize(self.source, data)
        keys = [tuple(text_hash(t) for t in r) for r in rows]
        lengths = [sum(len(tokens[f"{c}_ids"][i]) for c in columns) for i in range(len(rows))]
        return tokens, keys, lengths

    def _take(self, picked: list[int]):
        """A batch's data: its rows' token columns."""
        return {name: [values[i] for i in picked] for name, values in self.pool.tokens.items()}

    def notes(self) -> dict[str, Any]:
        """What a batch reports besides its data (nothing for text)."""
        return {}

    def _check(self, rows: list[list]) -> list[list]:
        """The rows read, checked (a bad one is an error naming it); returns the rows kept."""
        for n, row in enumerate(rows):
            for column, value in zip(self.source.role_columns, row):
                problem = (f"is {type(value).__name__}, not text" if not isinstance(value, str)
                           else "is empty" if not value.strip() else None)
                if problem:
                    raise EmbedtrainError(
                        f"{self.source.where}: {self.source.path}: column '{self.source.columns[column]}' {problem} in "
                        f"row {self.rows_this_pass + n + 1} that reader {self.reader} of {self.readers} reads in pass "
                        f"{self.pass_ + 1}; fix or remove the row")
        self.rows_this_pass += len(rows)
        return rows

    def next_batch(self) -> tuple[dict, list[tuple[int, ...]]]:
        """The next batch: its ``<column>_ids`` token columns and the rows' text hashes (query, documents...)."""
        while self.pool is None or self.done == len(self.pool.batches):
            if self.pool is not None:  # on to the next pool: what this one leaves waits for it
                self.read_before += self.fresh
                self.dropped_before += self.dropped_here
                self.given_before += self.done
                self.carry, self.done, self.pool_no = self.next_carry, 0, self.pool_no + 1
                self.source_state = self.ds.state_dict()
            self._read_pool()
        picked = self.pool.batches[self.done]
        self.done += 1
        return self._take(picked), [self.keys[i] for i in picked]

    def position(self) -> dict[str, Any]:
        """Where this reader is after the batches it gave out (JSON-ready)."""
        return {"pass": self.pass_, "pool": self.pool_no, "source": self.source_state, "carry": _to_json(self.carry),
                "done": self.done, "read": self.read_before, "dropped": self.dropped_before,
                "given": self.given_before, "rows_this_pass": self.rows_this_pass - (self.fresh if self.pool else 0)}

    def figures(self) -> dict[str, int]:
        """Rows read, trained and dropped so far, and the pass."""
        fresh = self.fresh if self.pool is not None else 0
        return {"rows_read": self.read_before + fresh, "rows_trained": (self.given_before + self.done) * self.batch_size,
                "rows_dropped": self.dropped_before + (self.dropped_here if self.pool is not None else 0),
                "passes": self.pass_ + 1}


class ImageStreamReader(StreamReader):
    """A :class:`StreamReader` of multimodal rows (:class:`ImageRows`). The rows each pool reads are checked as a
    dataset read whole is (:func:`~embedtrain.data.multimodal.pairs_from_columns`): texts, image paths, and with
    ``verify`` every image decoded once. A bad image stops the run with a line naming it (its shard and sample, or
    the row of this reader's pass), or under ``bad_images: skip`` leaves its row out, counted and reported with the
    next batch. A pool is a :class:`~embedtrain.data.multimodal.MultimodalPairs`; a batch is the pool and its
    rows, which the collator reads and decodes (a row whose image fails then is replaced by another of the pool
    under 'skip', as in a dataset read whole)."""

    def __init__(self, *args, position: Optional[dict] = None, **kwargs):
        self.bad_before = (position or {}).get("bad", 0)  # bad rows of the pools before the current one
        self.bad_messages: list[str] = []
        self.bad_here = 0
        super().__init__(*args, position=position, **kwargs)

    def _columns(self) -> list[str]:
        return self.source.read_columns

    def _pairs(self, rows: list[list], lines: list[int], verify: bool, bad_images: str, where: str):
        from pathlib import Path

        from embedtrain.data.multimodal import pairs_from_columns

        im = self.source.images
        values = {c: [r[j] for r in rows] for j, c in enumerate(self._columns())}
        samples = list(zip(values[SHARD_COLUMN], values[KEY_COLUMN])) if im.webdataset else None
        return pairs_from_columns(values, samples, self.source.name, f"{self.source.path} ({where})", im.roles,
                                  Path(im.image_root), lines, im.query_template, im.document_template,
                                  self.source.weight, bad_images, verify)

    def _check(self, rows: list[list]) -> list[list]:
        first = self.rows_this_pass
        self.rows_this_pass += len(rows)
        self.bad_before, self.bad_here = self.bad_before + self.bad_here, 0  # a new pool: the last one's are counted
        if not rows:
            return rows
        im = self.source.images
        where = f"reader {self.reader + 1} of {self.readers}, pass {self.pass_ + 1}"
        pairs = self._pairs(rows, list(range(first + 1, first + len(rows) + 1)), im.verify, im.bad_images, where)
        if pairs.skipped:
            self.bad_here = len(rows) - len(pairs)
            self.bad_messages += [b.message() for b in pairs.skipped]
        kept = {line - first - 1 for line in pairs.line_numbers}
        return [r for i, r in enumerate(rows) if i in kept]

    def _prepare(self, rows: list[list]):
        # the rows were checked when read (and carried rows in an earlier pool): here only their paths are looked up
        where = f"reader {self.reader + 1} of {self.readers}, pass {self.pass_ + 1}, pool {self.pool_no + 1}"
        pairs = self._pairs(rows, list(range(1, len(rows) + 1)), False, "stop", where)
        return pairs, pairs.row_keys, None

    def _take(self, picked: list[int]):
        return self.pool.tokens, picked

    def notes(self) -> dict[str, Any]:
        """The bad images left out since the last batch (their messages), for the run's log."""
        out, self.bad_messages = {"bad_images_read": self.bad_messages}, []
        return out

    def position(self) -> dict[str, Any]:
        return {**super().position(), "bad": self.bad_before}  # before the current pool, which a resume reads again

    def figures(self) -> dict[str, int]:
        return {**super().figures(), "rows_bad_images": self.bad_before + (self.bad_here if self.pool is not None else 0)}


def _to_json(rows: list[list]) -> list[list]:
    """Carried rows as JSON values: bytes (an image read from the shards) as ``{"base64": ...}``."""
    import base64

    def value(v):
        if isinstance(v, (bytes, bytearray, memoryview)):
            return {"base64": base64.b64encode(bytes(v)).decode("ascii")}
        if isinstance(v, dict):
            return {k: value(x) for k, x in v.items()}
        return v

    return [[value(v) for v in row] for row in rows]


def _from_json(rows: list[list]) -> list[list]:
    """The inverse of :func:`_to_json`."""
    import base64

    def value(v):
        if isinstance(v, dict):
            if set(v) == {"base64"}:
                return base64.b64decode(v["base64"])
            return {k: value(x) for k, x in v.items()}
        return v

    return [[value(v) for v in row] for row in rows]


@dataclass
class StreamSettings:
    """What every reader of a run shares (plain values)."""

    seed: int
    batch_size: int
    pool_rows: int
    group_by_length: bool
    no_duplicates: bool
    repeat_documents: bool
    mixing: str
    probabilities: list[float] = field(default_factory=list)


class PairStream(torch.utils.data.IterableDataset):
    """This process's batches from step ``start`` on, made by the readers of its DataLoader workers; each batch
    carries ``stream_position`` (the reader position after it) for the checkpoint."""

    def __init__(self, sources: Sequence[StreamSource], settings: StreamSettings, collate: Callable[[int, dict, list], dict],
                 tokenize: Callable[[StreamSource, dict], dict], start: int, rank: int, world_size: int, workers: int,
                 positions: Optional[dict[int, dict]] = None):
        self.sources, self.settings, self.collate, self.tokenize = list(sources), settings, collate, tokenize
        self.start, self.rank, self.world_size, self.workers = start, rank, world_size, max(1, workers)
        self.positions = positions or {}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        W = self.workers
        lane = (self.start + worker) % W  # the reader set of this worker's steps (see the module docstring)
        reader, readers = self.rank * W + lane, self.world_size * W
        saved = dict(self.positions.get(lane, {}))
        open_readers: dict[int, StreamReader] = {}
        step = self.start + worker
        try:
            yield from self._batches(step, lane, reader, readers, saved, open_readers)
        finally:  # close the sources while the interpreter is whole (a generator collected at exit complains)
            for r in open_readers.values():
                r.rows.close()

    def _batches(self, step: int, lane: int, reader: int, readers: int, saved: dict, open_readers: dict):
        W, s = self.workers, self.settings
        while True:
            d = step_dataset(s.seed, step, s.probabilities, s.mixing)
            try:
                if d not in open_readers:
                    kind = ImageStreamReader if self.sources[d].images is not None else StreamReader
                    open_readers[d] = kind(
                        self.sources[d], d, reader, readers, s.seed, s.batch_size, s.pool_rows, self.tokenize,
                        s.group_by_length, s.no_duplicates, s.repeat_documents, position=saved.get(d))
                data, keys = open_readers[d].next_batch()
            except EmbedtrainError as err:  # one clear line in the main process, not a worker's traceback
                yield {"error": str(err)}
                return
            batch = {**self.collate(d, data, keys), **open_readers[d].notes()}
            saved.update({i: r.position() for i, r in open_readers.items()})
            batch["stream_position"] = {"lane": lane, "streams": dict(saved),
                                        "figures": {i: r.figures() for i, r in open_readers.items()}}
            yield batch
            step += W


class StreamState:
    """The main process's record of where each stream is: taken from each batch, gathered from every process
    before a checkpoint, handed back on resume."""

    def __init__(self, world_size: int, workers: int):
        self.world_size, self.workers = world_size, max(1, workers)
        self.lanes: dict[int, dict] = {}  # lane -> {dataset: position}
        self.figures: dict[int, dict] = {}  # lane -> {dataset: figures}

    def take(self, batch: dict) -> Optional[str]:
        """Record the position a batch carries (removed from the batch); its error line, if it is one."""
        if "error" in batch:
            return batch["error"]
        where = batch.pop("stream_position", None)
        if where is not None:
            self.lanes[where["lane"]] = where["streams"]
            self.figures[where["lane"]] = where["figures"]
        return None

    def to_dict(self, accelerator) -> dict:
        """Every process's positions (all processes call it), JSON-ready."""
        mine = {"lanes": {str(k): {str(d): p for d, p in v.items()} for k, v in self.lanes.items()},
                "figures": {str(k): {str(d): f for d, f in v.items()} for k, v in self.figures.items()}}
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            every = gather_object([mine])
        else:
            every = [mine]
        return {"processes": self.world_size, "workers": self.workers, "per_process": every}

    def positions_for(self, saved: Optional[dict], rank: int) -> dict[int, dict]:
        """This process's positions from a checkpoint's record (empty at the start); other numbers of processes or
        workers are an error."""
        if not saved:
            return {}
        if (saved["processes"], saved["workers"]) != (self.world_size, self.workers):
            raise EmbedtrainError(
                f"resume: the checkpoint's stream positions belong to {saved['processes']} process(es) x "
                f"{saved['workers']} worker(s), this run has {self.world_size} x {self.workers}; resume with "
                "the same numbers (data.num_workers, processes), or start again with --overwrite")
        mine = saved["per_process"][rank]
        self.lanes = {int(k): {int(d): p for d, p in v.items()} for k, v in mine["lanes"].items()}
        self.figures = {int(k): {int(d): f for d, f in v.items()} for k, v in mine["figures"].items()}
        return self.lanes


def stream_figures(saved: dict, sources: Sequence[StreamSource]) -> list[dict]:
    """Per stream, summed over processes and workers: rows read, trained and dropped, and the most passes."""
    out = []
    for d, source in enumerate(sources):
        total = {"rows_read": 0, "rows_trained": 0, "rows_dropped": 0, "passes": 0}
        if source.images is not None:
            total["rows_bad_images"] = 0  # left out under data.bad_images: skip (rows_read counts them)
        for proc in saved.get("per_process", []):
            for lane in proc["figures"].values():
                f = lane.get(str(d))
                if f:
                    for k in total:
                        if k != "passes":
                            total[k] += f.get(k, 0)
                    total["passes"] = max(total["passes"], f["passes"])
        out.append({"index": d, "name": source.name, "path": source.path, "streaming": True,
                    "shards": source.num_shards, "rows_in_shards": source.rows,
                    "rows_in_shards_estimated": source.rows_estimated, **total})
    return out
