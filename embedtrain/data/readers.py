"""Read training pairs into Hugging Face datasets with explicit column roles, and check them.

After :func:`read_pairs` a dataset has the columns ``query``, ``positive`` and ``negative_0`` …
``negative_{k-1}`` (plain strings, never empty), whatever the source file called them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from embedtrain.errors import EmbedtrainError


@dataclass
class PairDataset:
    """One training dataset: rows with fixed roles plus what batching and the loss need."""

    name: str
    rows: "object"  # datasets.Dataset with columns query, positive, negative_0..k-1
    num_negatives: int
    query_prompt: str = ""
    document_prompt: str = ""
    weight: float = 1.0
    #: stable 63-bit hashes of every text in a row (query, positive, negatives), for de-duplication
    row_keys: list[tuple[int, ...]] = field(default_factory=list)
    #: what makes two documents the same answer for the loss's false-negative masking, per row and role
    #: (None: their texts, ``row_keys``; labelled rows: their labels, so a same-label text is never a negative)
    match_keys: Optional[list[tuple[int, ...]]] = None
    #: rows of the source left out by a rule before training, per rule (see embedtrain.data.accounting)
    dropped: dict[str, int] = field(default_factory=dict)
    #: rows set aside on purpose (the diagnostics probe and the rows sharing a text with it): not a loss
    held_out: int = 0

    @property
    def dedup_keys(self) -> list[tuple[int, ...]]:
        """What the epoch plan keeps apart in a batch: every text of a row, or for labelled rows (whose
        same-label documents the loss masks by label, wherever they stand) their queries only."""
        return self.row_keys if self.match_keys is None else [k[:1] for k in self.row_keys]

    def ids(self, row: int) -> tuple[int, ...]:
        """The loss's document ids of ``row``'s roles (see ``match_keys``)."""
        return (self.match_keys or self.row_keys)[row]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def role_columns(self) -> list[str]:
        return ["query", "positive"] + [f"negative_{j}" for j in range(self.num_negatives)]


def text_hash(text: str) -> int:
    """A hash that is the same in every process and run (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def _is_text(ds, role: str) -> bool:
    """Whether a column holds plain Arrow strings (else its values are checked one by one in Python)."""
    import datasets

    feature = ds.features[role]
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _plain_arrow(ds, name: str) -> bool:
    """Whether a column's Arrow values are its Python values (plain text or lists of numbers); columns that
    ``datasets`` decodes on access (JSON of mixed types, images, ...) are not."""
    import datasets

    feature = ds.features[name]
    if isinstance(feature, datasets.Value):
        return _is_text(ds, name)
    inner = getattr(feature, "feature", None)  # a list column: List(Value) / Sequence(Value)
    return isinstance(inner, datasets.Value) and inner.dtype not in ("string", "large_string", "binary")


def column_list(ds, name: str) -> list:
    """A whole column of a ``datasets.Dataset`` as a Python list, read through Arrow in one call when its values
    need no decoding (indexing the lazy column element by element costs a table look-up per element: minutes for
    millions of rows); other columns are decoded by ``datasets`` as usual."""
    if _plain_arrow(ds, name):
        return ds.with_format("arrow")[name].to_pylist()
    return list(ds[name])


def column_lengths(ds, name: str) -> list[int]:
    """The length of every value of a text or list column (computed by Arrow when the values need no decoding)."""
    if not _plain_arrow(ds, name):
        return [len(v) for v in column_list(ds, name)]
    import pyarrow as pa
    import pyarrow.compute as pc

    column = ds.with_format("arrow")[name]
    text = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
    lengths = pc.utf8_length(column) if text else pc.list_value_length(column)
    return lengths.to_pylist()


def load_table(path: str, where: str, split: str = "train", subset: Optional[str] = None):
    """A local .jsonl/.json/.csv/.parquet/.tar file, a folder or glob of such shards, or a Hub dataset
    (``subset``: its configuration) as a ``datasets.Dataset``, and the name to use for it in messages."""
    import datasets

    from embedtrain.config.schema import local_data_files, looks_local

    datasets.disable_progress_bars()
    try:
        if looks_local(path):
            try:
                builder, files = local_data_files(path)
            except EmbedtrainError as err:
                raise EmbedtrainError(f"{where}.path: {err}") from None
            source = files[0] if len(files) == 1 else f"{path} ({len(files)} shards)"
            return datasets.load_dataset(builder, data_files=files, split="train"), source
        return datasets.load_dataset(path, subset, split=split), path
    except EmbedtrainError:
        raise
    except FileNotFoundError:
        raise EmbedtrainError(f"{where}.path: {path} not found; check the path or the Hub id") from None
    except Exception as err:  # datasets wraps parser errors in many types
        first = (str(err).strip().splitlines() or [err.__class__.__name__])[0]
        raise EmbedtrainError(f"{where}.path: cannot read {path} ({first[:160]}); check the file's format") from None
    finally:
        datasets.enable_progress_bars()


def load_columns(
    path: str,
    where: str,
    fields: dict[str, list[str]],
    split: str = "train",
    max_rows: Optional[int] = None,
    subset: Optional[str] = None,
):
    """:func:`load_table`, checked to have the columns each recipe field names (``fields``, e.g.
    ``{"text_column": ["text"], "label_column": ["label"]}``) and cut to its first ``max_rows`` rows."""
    ds, source = load_table(path, where, split, subset)
    missing = [c for columns in fields.values() for c in columns if c not in ds.column_names]
    if missing:
        field_name = next(f for f, columns in fields.items() if any(c in missing for c in columns))
        raise EmbedtrainError(
            f"{where}.{field_name}: missing {', '.join(repr(m) for m in missing)} in {source} "
            f"(have: {', '.join(ds.column_names)}); set the column names in the recipe"
        )
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    return ds, source


def read_pairs(
    path: str,
    where: str,
    name: str,
    query_column: str = "anchor",
    positive_column: str = "positive",
    negative_columns: Optional[list[str]] = None,
    query_prompt: str = "",
    document_prompt: str = "",
    weight: float = 1.0,
    split: str = "train",
    max_rows: Optional[int] = None,
    subset: Optional[str] = None,
) -> PairDataset:
    """Load a local file (or a Hub dataset id) and validate every row.

    ``where`` is the recipe path of this dataset (e.g. ``data.train[0]``) used in error messages.
    """
    negative_columns = list(negative_columns or [])
    fields = {"query_column": [query_column], "positive_column": [positive_column], "negative_columns": negative_columns}
    ds, source = load_columns(path, where, fields, split, max_rows, subset)

    wanted = {"query": query_column, "positive": positive_column}
    wanted.update({f"negative_{j}": c for j, c in enumerate(negative_columns)})
    ds = ds.select_columns(list(wanted.values()))
    if len(set(wanted.values())) != len(wanted):
        raise EmbedtrainError(f"{where}: the same column is used for two roles ({', '.join(wanted.values())}); give each role its own column")
    ds = ds.rename_columns({src: role for role, src in wanted.items() if src != role})
    return pair_dataset(ds, source, name, wanted, query_prompt, document_prompt, weight)


def pair_dataset(
    ds, source: str, name: str, wanted: dict[str, str], query_prompt: str = "", document_prompt: str = "",
    weight: float = 1.0,
) -> PairDataset:
    """Check the texts of a table with role columns (query, positive, negative_0..) and wrap it.

    ``wanted`` maps each role to the column name the user gave (for messages). The first bad row of the
    first role that has one is reported (a value that is not text, or one that is empty or blank).
    """
    for role in wanted:
        _check_texts(ds, role, source, wanted[role])
    return PairDataset(
        name=name,
        rows=ds,
        num_negatives=len(wanted) - 2,
        query_prompt=query_prompt,
        document_prompt=document_prompt,
        weight=weight,
        row_keys=text_keys(ds, list(wanted)),
    )


# What str.strip() removes: every character whose str.isspace() is true (a test checks the list against
# Python's own definition), for Arrow's regular expressions (RE2, which knows no Python whitespace class).
PYTHON_WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                     "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


def _check_texts(ds, role: str, source: str, column: str) -> None:
    """Raise for the first row whose ``role`` value is not text or is blank. Text columns are checked by Arrow
    (a null is the only non-text value they can hold); other columns, which fail anyway, value by value."""
    if not _is_text(ds, role):
        for i, value in enumerate(column_list(ds, role)):
            _check_text(value, i, source, column)
        return
    import pyarrow.compute as pc

    values = ds.with_format("arrow")[role]
    blank = "^[" + "".join(f"\\x{{{ord(c):x}}}" for c in PYTHON_WHITESPACE) + "]*$"
    bad = pc.or_kleene(pc.is_null(values), pc.match_substring_regex(values, blank))
    first = pc.index(pc.fill_null(bad, True), True).as_py()
    if first >= 0:
        _check_text(values[first].as_py(), first, source, column)


def _check_text(value, i: int, source: str, column: str) -> None:
    if not isinstance(value, str):
        raise EmbedtrainError(
            f"{source} row {i + 1}: column '{column}' is {type(value).__name__}, not text; fix or remove the row"
        )
    if not value.strip():
        raise EmbedtrainError(f"{source} row {i + 1}: column '{column}' is empty; fix or remove the row")


def text_keys(ds, roles: list[str]) -> list[tuple[int, ...]]:
    """Per row, the :func:`text_hash` of its text in each of ``roles`` (checked text columns). Arrow numbers the
    distinct texts of all roles together (one dictionary encoding); each is hashed once (labels and shared
    documents repeat a lot)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    table = ds.with_format("arrow")
    chunks = []
    for role in roles:
        column = table[role]
        column = column.cast(pa.large_string()) if not pa.types.is_large_string(column.type) else column
        chunks += column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    encoded = pc.dictionary_encode(pa.chunked_array(chunks, type=pa.large_string()).combine_chunks())
    distinct = encoded.dictionary.to_pylist()
    hashes = np.fromiter((text_hash(t) for t in distinct), dtype=np.int64, count=len(distinct))
    per_role = hashes[encoded.indices.to_numpy()].reshape(len(roles), len(ds))
    return list(zip(*(keys.tolist() for keys in per_role)))
