"""Webdataset shards (``.tar`` files of samples ``<key>.<ext>``) as image-text training data.

``datasets`` reads the shards (its ``webdataset`` builder): the members of one sample become one row, one
column per extension (``png``, ``jpg``, ``txt``, ``json``, ...) plus ``__key__`` (the sample's key) and
``__url__`` (its shard). Image members become ``datasets.Image`` values, ``.txt`` members text, ``.json``
members nested fields, which :func:`flatten_fields` turns into columns named ``json.<field>``
(``query_text_column: json.name``). Rows come in shard order (the files sorted by name), then in member
order within a shard; nothing is re-sorted.

The helpers here work on one example dict (``{"png": {"bytes": ...}, "__key__": ..., "__url__": ...}``) or
on one column's values, so that a reader of whole tables and one that streams examples use the same rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

KEY_COLUMN = "__key__"
"""The sample's key: its members' names without the extension (``000123`` for ``000123.png``)."""
SHARD_COLUMN = "__url__"
"""The shard file the sample was read from."""


def is_webdataset(column_names) -> bool:
    """Whether a table (its column names) was read from webdataset shards."""
    return KEY_COLUMN in column_names and SHARD_COLUMN in column_names


def sample_location(shard: str, key: str) -> str:
    """How messages name a sample: ``data/emoji_wds/train-00002.tar sample 000612``."""
    return f"{shard} sample {key}"


def member_name(key: str, column: str) -> str:
    """The tar member a column of a sample came from (``000612.png``)."""
    return f"{key}.{column}"


def sample_image(value) -> Optional[bytes]:
    """A sample's image field as the encoded bytes the collator decodes, or None when the sample has no such
    member or an empty one (the caller reports it). ``value`` is what ``datasets`` gives for an Image column
    read without decoding (``{"bytes": ..., "path": ...}``) or the member's raw bytes (an example read before
    features are applied). The bytes are never decoded here: checking them is the reader's job."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) > 0:
        return bytes(value)
    return None


def image_identity(shard: str, key: str, column: str) -> str:
    """What identifies a sample's image for de-duplication: its shard's name and member, as a file's path
    identifies an image read from a folder (two samples are two images, whatever their bytes)."""
    return f"{Path(shard).name}/{member_name(key, column)}"


def flatten_fields(ds, wanted):
    """``ds`` with its nested (struct) columns flattened to ``<column>.<field>`` when a wanted column names such
    a field (``json.name`` for the ``name`` of a sample's ``.json`` member); otherwise ``ds`` itself. Works on
    a ``datasets.Dataset`` and an ``IterableDataset`` alike (both flatten lazily)."""
    names = set(ds.column_names or [])
    if all(c in names for c in wanted):
        return ds
    if not any(c.split(".", 1)[0] in names and "." in c for c in wanted):
        return ds
    return ds.flatten()
