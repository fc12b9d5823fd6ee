"""Multimodal training rows: each role (query, positive, negatives) is a text, an image, or both.

:func:`read_multimodal_pairs` reads a local file (or a Hub dataset) with explicit columns per role,
resolves image paths, and checks every row before training: texts must be non-empty strings, image
files must exist (and, with ``verify``, decode). A bad image is reported with its file, row, column
and path; with ``bad_images='skip'`` its row is dropped and counted instead. Webdataset shards (a folder
or glob of ``.tar`` files, see :mod:`embedtrain.data.webdataset`) are read the same way: image columns are
named by the members' extension (``png``), and problems name the shard and the sample's key.

:class:`MultimodalCollator` turns planned rows into model inputs. Images are read here, so with
``num_workers > 0`` they are decoded in the DataLoader workers; the model-specific part (tokenizer,
image transform or processor, and the prompt template) is the ``prepare`` callable the model
provides. An image that fails to decode during training (a file changed after the check) is
replaced by another row of the same dataset under 'skip', and ends the run cleanly under 'stop';
either way the batch carries a :class:`BadImage` record, never an exception from a worker.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from embedtrain.data.probe import Probe, choose_probe
from embedtrain.data.readers import column_list, load_table
from embedtrain.data.sampler import PlannedBatch
from embedtrain.data.webdataset import (
    KEY_COLUMN, SHARD_COLUMN, flatten_fields, image_identity, is_webdataset, member_name, sample_image,
    sample_location,
)
from embedtrain.errors import EmbedtrainError

ImageRef = Union[str, bytes]
"""An image as stored in a dataset: an absolute file path, or the encoded bytes of a datasets Image."""
Prepare = Callable[[Optional[list], Optional[list], str], dict]
"""The model's input builder: (texts or None, PIL images or None, template) -> tensors."""


@dataclass(frozen=True)
class BadImage:
    """An image that could not be used, with everything needed to find it."""

    source: str
    row: int  # 1-based row of the source file
    column: str
    image: str  # path, or a description of in-dataset bytes
    reason: str  # "not found" or "cannot be decoded (...)"
    key: Optional[str] = None  # the sample's key when ``source`` is a webdataset shard

    def message(self) -> str:
        where = f"{self.source} row {self.row}" if self.key is None else sample_location(self.source, self.key)
        return f"{where}: image {self.image} (column '{self.column}') {self.reason}"


@dataclass
class MultimodalPairs:
    """One training dataset whose roles carry texts and/or images."""

    name: str
    source: str
    #: role -> (text column, image column) in the source, for messages; None where the role has none
    columns: dict[str, tuple[Optional[str], Optional[str]]]
    #: role -> list of texts (None when the role has no text)
    texts: dict[str, Optional[list[str]]]
    #: role -> list of images (None when the role has no image)
    images: dict[str, Optional[list[ImageRef]]]
    #: 1-based row of the source for every kept row
    line_numbers: list[int]
    query_template: str = "{image}{text}"
    document_template: str = "{image}{text}"
    weight: float = 1.0
    #: stable 63-bit hashes of each role's content (text and image together), for de-duplication
    row_keys: list[tuple[int, ...]] = field(default_factory=list)
    #: rows dropped before training under bad_images='skip'
    skipped: list[BadImage] = field(default_factory=list)
    #: rows of the source left out by a rule before training, per rule (see embedtrain.data.accounting)
    dropped: dict[str, int] = field(default_factory=dict)
    #: (shard, key) of every kept row when the source is webdataset shards, else None
    samples: Optional[list[tuple[str, str]]] = None
    #: rows set aside for the diagnostics probe (its own and those sharing a text or image with it)
    held_out: int = 0

    def __len__(self) -> int:
        return len(self.line_numbers)

    @property
    def roles(self) -> list[str]:
        return list(self.columns)

    @property
    def num_negatives(self) -> int:
        return len(self.columns) - 2

    def template(self, role: str) -> str:
        return self.query_template if role == "query" else self.document_template

    def describe_image(self, role: str, i: int) -> str:
        ref = self.images[role][i]
        if isinstance(ref, str):
            return ref
        if self.samples is not None:
            return f"{member_name(self.samples[i][1], self.columns[role][1] or '')} ({len(ref)} bytes)"
        return f"<{len(ref)} bytes in the dataset>"

    def bad_image(self, role: str, i: int, reason: str) -> BadImage:
        column = self.columns[role][1] or ""
        if self.samples is not None:
            shard, key = self.samples[i]
            return BadImage(shard, self.line_numbers[i], column, self.describe_image(role, i), reason, key)
        return BadImage(self.source, self.line_numbers[i], column, self.describe_image(role, i), reason)


def content_hash(data: Union[str, bytes]) -> int:
    """A hash that is the same in every process and run (Python's hash() is salted)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") >> 1


def open_image(ref: ImageRef):
    """Read and decode an image (path or encoded bytes) into a PIL image; raises on failure."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref)
    image.load()  # PIL decodes lazily: force it here so that a broken file fails now
    return image


def _decode_problem(ref: ImageRef) -> Optional[str]:
    """None when the image decodes, else the reason."""
    if isinstance(ref, str) and not os.path.isfile(ref):
        return "not found"
    try:
        open_image(ref)
    except Exception as err:  # PIL raises many types for broken files
        first = (str(err).strip().splitlines() or [err.__class__.__name__])[0]
        return f"cannot be decoded ({err.__class__.__name__}: {first[:120]})"
    return None


def _image_ref(value, root: Path, source: str, row: int, column: str) -> ImageRef:
    if isinstance(value, dict):  # a datasets Image column read without decoding: {"bytes", "path"}
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if not isinstance(value, str) or not value.strip():
        kind = "empty" if isinstance(value, str) or value is None else type(value).__name__
        raise EmbedtrainError(f"{source} row {row}: column '{column}' is {kind}, not an image path; fix or remove the row")
    path = Path(os.path.expanduser(value))
    return str(path if path.is_absolute() else root / path)


def _sample_image_ref(value, root: Path, shard: str, key: str, column: str) -> ImageRef:
    """A webdataset sample's image as encoded bytes (or a path, when the column holds one, e.g. a ``.txt``
    member); a sample without the member is one line naming it. (An empty member is kept as no bytes, so that
    the image check reports it like any undecodable image.)"""
    image = sample_image(value)
    if image is not None:
        return image
    if isinstance(value, str) and value.strip():
        path = Path(os.path.expanduser(value))
        return str(path if path.is_absolute() else root / path)
    if value is None:
        raise EmbedtrainError(f"{sample_location(shard, key)}: no '{column}' member (the image column); "
                              "add it to the sample or remove the sample")
    return b""


def read_multimodal_pairs(
    path: str,
    where: str,
    name: str,
    columns: dict[str, tuple[Optional[str], Optional[str]]],
    image_root: Optional[str] = None,
    query_template: str = "{image}{text}",
    document_template: str = "{image}{text}",
    weight: float = 1.0,
    split: str = "train",
    max_rows: Optional[int] = None,
    bad_images: str = "stop",
    verify: bool = True,
) -> MultimodalPairs:
    """Load and check a multimodal dataset.

    ``columns`` maps each role (``query``, ``positive``, ``negative_0``, ...) to its (text column,
    image column). ``where`` is the recipe path of the dataset (e.g. ``data.train[0]``) for messages.
    Relative image paths are read from ``image_root`` (default: the data file's folder; for a folder or glob
    of shards, the first shard's).
    """
    ds, source = load_table(path, where, split)
    root = image_folder(path, image_root)
    wanted = [c for pair in columns.values() for c in pair if c is not None]
    ds = flatten_fields(ds, wanted)
    missing = [c for c in dict.fromkeys(wanted) if c not in ds.column_names]
    if missing:
        raise EmbedtrainError(
            f"{where}: column {', '.join(repr(m) for m in missing)} not in {source} "
            f"(have: {', '.join(ds.column_names)}); set the *_column fields in the recipe"
        )
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    ds = images_kept_encoded(ds, [c for _, c in columns.values() if c is not None])
    # webdataset shards: each row is a sample of a shard; messages name the shard and the key, not a row number
    samples = list(zip(column_list(ds, SHARD_COLUMN), column_list(ds, KEY_COLUMN))) if is_webdataset(ds.column_names) \
        else None

    pairs = pairs_from_columns(
        {c: column_list(ds, c) for c in dict.fromkeys(wanted)}, samples, name, source, columns, root,
        list(range(1, len(ds) + 1)), query_template, document_template, weight, bad_images, verify)
    if len(pairs) == 0:
        raise EmbedtrainError(f"{where}: {source} has no usable rows")
    return pairs


def images_kept_encoded(ds, columns: Sequence[str]):
    """``ds`` (a table or a stream) with its image columns (``datasets.Image`` features) read as encoded bytes,
    which the collator decodes per batch."""
    import datasets

    features = ds.features or {}
    for column in dict.fromkeys(columns):
        if isinstance(features.get(column), datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds


def image_folder(path: str, image_root: Optional[str]) -> Path:
    """Where a dataset's relative image paths are read from: ``image_root``, else the data file's folder (for a
    folder or glob of shards, the first shard's), else (a Hub dataset) the working directory."""
    from embedtrain.config import looks_local, resolve_path
    from embedtrain.config.schema import local_data_files

    if image_root:
        return Path(resolve_path(image_root))
    return Path(local_data_files(path)[1][0]).parent if looks_local(path) else Path.cwd()


def pairs_from_columns(
    values: dict[str, list],
    samples: Optional[list[tuple[str, str]]],
    name: str,
    source: str,
    columns: dict[str, tuple[Optional[str], Optional[str]]],
    root: Path,
    line_numbers: list[int],
    query_template: str = "{image}{text}",
    document_template: str = "{image}{text}",
    weight: float = 1.0,
    bad_images: str = "stop",
    verify: bool = True,
) -> MultimodalPairs:
    """Checked rows from their columns' values (``values[column][i]``): a table read whole, or the rows a stream
    has just read. Texts must be text (empty only beside an image); image paths are resolved from ``root``; bad
    images stop with one line naming the first, or under ``bad_images='skip'`` leave their rows out
    (``skipped``). ``samples``: each row's (shard, key) when the rows are webdataset samples, which messages name
    instead of ``source`` and a row number from ``line_numbers``."""

    def at(i: int) -> str:
        return f"{source} row {line_numbers[i]}" if samples is None else sample_location(*samples[i])

    texts: dict[str, Optional[list[str]]] = {}
    images: dict[str, Optional[list[ImageRef]]] = {}
    for role, (text_col, image_col) in columns.items():
        texts[role] = None
        if text_col is not None:
            column = list(values[text_col])
            for i, value in enumerate(column):
                if value is None and image_col is not None:
                    column[i] = value = ""  # an image with no text
                if value is None and samples is not None:
                    raise EmbedtrainError(f"{at(i)}: no '{text_col}' member (the text column); "
                                          "add it to the sample or remove the sample")
                if not isinstance(value, str):
                    raise EmbedtrainError(f"{at(i)}: column '{text_col}' is {type(value).__name__}, "
                                          "not text; fix or remove the row")
                if not value.strip() and image_col is None:
                    raise EmbedtrainError(f"{at(i)}: column '{text_col}' is empty; fix or remove the row")
            texts[role] = column
        images[role] = None
        if image_col is not None:
            column = values[image_col]
            if samples is None:
                images[role] = [_image_ref(v, root, source, line_numbers[i], image_col) for i, v in enumerate(column)]
            else:
                images[role] = [_sample_image_ref(v, root, *samples[i], image_col) for i, v in enumerate(column)]

    pairs = MultimodalPairs(name=name, source=source, columns=dict(columns), texts=texts, images=images,
                            line_numbers=list(line_numbers), query_template=query_template,
                            document_template=document_template, weight=weight, samples=samples)
    bad = _check_images(pairs, verify)
    if bad:
        if bad_images == "stop":
            first = bad[0].message()
            more = f" (and {len(bad) - 1} more bad images)" if len(bad) > 1 else ""
            raise EmbedtrainError(f"{first}{more}; fix or remove the row, or set data.bad_images: skip to leave such rows out")
        drop = {b.row for b in bad}
        keep = [i for i, line in enumerate(pairs.line_numbers) if line not in drop]
        pairs = _select(pairs, keep)
        pairs.skipped = bad
        pairs.dropped = {"bad_images": len(drop)}
    pairs.row_keys = [_row_key(pairs, i) for i in range(len(pairs))]
    return pairs


def _check_images(pairs: MultimodalPairs, verify: bool) -> list[BadImage]:
    """Every bad image of the dataset, in row order (missing files always; undecodable ones with ``verify``)."""
    work = [(role, i) for role in pairs.roles if pairs.images[role] is not None for i in range(len(pairs))]
    if not work:
        return []
    if verify:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            problems = list(pool.map(lambda ri: _decode_problem(pairs.images[ri[0]][ri[1]]), work))
    else:
        problems = [
            "not found" if isinstance(ref, str) and not os.path.isfile(ref) else None
            for ref in (pairs.images[role][i] for role, i in work)
        ]
    bad = [pairs.bad_image(role, i, p) for (role, i), p in zip(work, problems) if p is not None]
    return sorted(bad, key=lambda b: b.row)


def _select(pairs: MultimodalPairs, keep: list[int]) -> MultimodalPairs:
    pick = lambda values: None if values is None else [values[i] for i in keep]  # noqa: E731
    return MultimodalPairs(
        name=pairs.name, source=pairs.source, columns=pairs.columns,
        texts={r: pick(v) for r, v in pairs.texts.items()}, images={r: pick(v) for r, v in pairs.images.items()},
        line_numbers=[pairs.line_numbers[i] for i in keep], query_template=pairs.query_template,
        document_template=pairs.document_template, weight=pairs.weight,
        samples=None if pairs.samples is None else [pairs.samples[i] for i in keep],
    )


def carve_probe(datasets: list[MultimodalPairs], wanted: int) -> tuple[Probe, list[MultimodalPairs]]:
    """(the diagnostics probe, the datasets without its rows) for image-text rows (see
    :func:`embedtrain.data.probe.choose_probe`): the probe's queries and positives are (text or None, image or None)
    items, and no training row keeps a text or image of the probe. Rows are tried in the order of their query and
    positive texts where a dataset has any (not of the images' identities, a path or a shard member), so that a table
    and its webdataset shards hold out the same rows."""

    def order(d: MultimodalPairs) -> Optional[list[str]]:
        texts = [d.texts[r] for r in ("query", "positive") if d.texts[r] is not None]
        return ["\0".join(t[i] for t in texts) for i in range(len(d))] if texts else None

    chosen, kept_rows = choose_probe([d.row_keys for d in datasets], wanted, [order(d) for d in datasets])
    probe = Probe()
    if not any(chosen):
        return probe, datasets

    def item(d: MultimodalPairs, role: str, i: int) -> tuple:
        return tuple(None if d_[role] is None else d_[role][i] for d_ in (d.texts, d.images))

    kept = []
    for d, rows, keep in zip(datasets, chosen, kept_rows):
        probe.queries.append([item(d, "query", i) for i in rows])
        probe.positives.append([item(d, "positive", i) for i in rows])
        probe.excluded_rows.append(len(d) - len(keep))
        rest = _select(d, keep)
        rest.row_keys, rest.skipped, rest.dropped = [d.row_keys[i] for i in keep], d.skipped, d.dropped
        rest.held_out = len(d) - len(keep)
        kept.append(rest)
    return probe, kept


def _row_key(pairs: MultimodalPairs, i: int) -> tuple[int, ...]:
    """Hashes of each role's text and image; an image is identified by its path, a webdataset sample's by its
    shard and member (as a path), other in-dataset images by their bytes."""
    keys = []
    for role in pairs.roles:
        text = pairs.texts[role][i] if pairs.texts[role] is not None else None
        image = pairs.images[role][i] if pairs.images[role] is not None else None
        if isinstance(image, bytes) and pairs.samples is not None:
            image = image_identity(*pairs.samples[i], pairs.columns[role][1] or "")
        image_id = b"" if image is None else (image.encode("utf-8") if isinstance(image, str) else image)
        keys.append(content_hash((text or "").encode("utf-8") + b"\0" + image_id))
    return tuple(keys)


def split_inputs(inputs: dict[str, torch.Tensor], size: int):
    """Cut one role's collated inputs into chunks of ``size`` rows (for GradCache).

    Per-row tensors are sliced by rows; Qwen2-VL-style flattened patches (``pixel_values`` with
    ``image_grid_thw``) by each image's patch count. Padding columns that no row of a chunk uses
    are dropped on either side (left or right padding), which changes no embedding.
    """
    n = _rows(inputs)
    patches = None
    if "image_grid_thw" in inputs and "pixel_values" in inputs and inputs["pixel_values"].shape[0] != n:
        counts = inputs["image_grid_thw"].prod(dim=-1)
        patches = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).tolist()
    for start in range(0, n, size):
        end = min(start + size, n)
        part = {}
        for key, value in inputs.items():
            if key == "pixel_values" and patches is not None:
                part[key] = value[patches[start] : patches[end]]
            else:
                part[key] = value[start:end]
        mask = part.get("attention_mask")
        if mask is not None:
            used = mask.sum(0).nonzero()
            lo, hi = int(used.min()), int(used.max()) + 1
            if lo > 0 or hi < mask.shape[1]:
                part = {k: (v[:, lo:hi] if _per_token(k, v, mask) else v) for k, v in part.items()}
        yield part


def _per_token(key: str, value: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether a tensor has one entry per token (input_ids, mm_token_type_ids, ...), like the mask."""
    image_keys = key.startswith("pixel_values") or key.endswith("_grid_thw")
    return not image_keys and value.dim() >= 2 and value.shape[:2] == mask.shape


def _rows(inputs: dict[str, torch.Tensor]) -> int:
    for key in ("input_ids", "attention_mask"):
        if key in inputs:
            return inputs[key].shape[0]
    if "image_grid_thw" in inputs:
        return inputs["image_grid_thw"].shape[0]
    return next(iter(inputs.values())).shape[0]


class MultimodalCollator:
    """Planned rows of one dataset → ``{"query", "positive", "negative", "positive_ids",
    "negative_ids", "dataset", "bad_images"}``, the same layout as text batches.

    ``prepare(texts, images, template)`` is the model's input builder. Negatives are interleaved
    per row (row i's negatives are ``i*k … i*k+k-1``).
    """

    def __init__(self, datasets: Sequence[MultimodalPairs], prepare: Prepare, bad_images: str = "stop"):
        self.datasets = datasets
        self.prepare = prepare
        self.bad_images = bad_images

    def _decode_rows(self, ds: MultimodalPairs, rows: list[int]) -> tuple[list[int], dict, list[BadImage], bool]:
        """Decode every image of ``rows``; under 'skip' a row with a bad image is swapped for the next
        usable row of the dataset. Returns (rows, {(role, row): image}, bad images, stop)."""
        decoded: dict[tuple[str, int], object] = {}
        bad: list[BadImage] = []
        in_batch = set(rows)
        keys_in_batch = {k for r in rows for k in ds.row_keys[r]}
        out_rows = []

        def try_row(r: int) -> Optional[BadImage]:
            found = {}
            for role in ds.roles:
                if ds.images[role] is None:
                    continue
                try:
                    found[(role, r)] = open_image(ds.images[role][r])
                except Exception as err:  # a broken or vanished file
                    first = (str(err).strip().splitlines() or [err.__class__.__name__])[0]
                    reason = "not found" if isinstance(err, FileNotFoundError) else \
                        f"cannot be decoded ({err.__class__.__name__}: {first[:120]})"
                    return ds.bad_image(role, r, reason)
            decoded.update(found)
            return None

        for r in rows:
            problem = try_row(r)
            if problem is None:
                out_rows.append(r)
                continue
            bad.append(problem)
            if self.bad_images == "stop":
                return rows, decoded, bad, True
            keys_in_batch -= set(ds.row_keys[r])
            for step in range(1, len(ds)):
                candidate = (r + step) % len(ds)
                if candidate in in_batch or keys_in_batch & set(ds.row_keys[candidate]):
                    continue
                problem = try_row(candidate)
                if problem is None:
                    out_rows.append(candidate)
                    in_batch.add(candidate)
                    keys_in_batch |= set(ds.row_keys[candidate])
                    break
                bad.append(problem)
            else:
                return rows, decoded, bad, True  # no usable row left to stand in
        return out_rows, decoded, bad, False

    def _role_inputs(self, ds: MultimodalPairs, roles: Sequence[str], rows: list[int], decoded: dict) -> dict:
        order = [(r, role) for r in rows for role in roles]
        has_text = ds.texts[roles[0]] is not None
        has_image = ds.images[roles[0]] is not None
        texts = [ds.texts[role][r] for r, role in order] if has_text else None
        images = [decoded[(role, r)] for r, role in order] if has_image else None
        return self.prepare(texts, images, ds.template(roles[0]))

    def __call__(self, planned: PlannedBatch, rows: Sequence[int]) -> dict:
        return self._collate(self.datasets[planned.dataset], list(rows), planned.dataset)

    def collate(self, index: int, data: tuple[MultimodalPairs, list[int]], keys) -> dict:
        """A streamed batch (:class:`~embedtrain.data.streaming.ImageStreamReader`): ``data`` is the reader's pool and
        the batch's rows in it (``keys``, the rows' keys, are the pool's own ``row_keys``)."""
        pool, rows = data
        return self._collate(pool, list(rows), index)

    def _collate(self, ds: MultimodalPairs, rows: list[int], index: int) -> dict:
        rows, decoded, bad, stop = self._decode_rows(ds, rows)
        if stop:
            return {"dataset": index, "bad_images": bad, "stop": True}
        k = ds.num_negatives
        negatives = [f"negative_{j}" for j in range(k)]
        # the recipe gives every negative the same kind (text, image or both), so they collate together
        return {
            "dataset": index,
            "query": self._role_inputs(ds, ["query"], rows, decoded),
            "positive": self._role_inputs(ds, ["positive"], rows, decoded),
            "positive_ids": torch.tensor([ds.row_keys[r][1] for r in rows], dtype=torch.long),
            "negative": self._role_inputs(ds, negatives, rows, decoded) if k else None,
            "negative_ids": (
                torch.tensor([ds.row_keys[r][2 + j] for r in rows for j in range(k)], dtype=torch.long) if k else None
            ),
            "bad_images": bad,
            "stop": False,
        }
