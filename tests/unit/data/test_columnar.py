"""Data preparation by whole columns (Arrow, numpy) gives what the row-by-row Python version gave: the same
row keys, probe, lengths, and the same first bad row in the same words."""

import dataclasses
import json
import sys

import datasets
import numpy as np
import pyarrow as pa
import pytest

from embedtrain.data.collate import token_lengths
from embedtrain.data.probe import carve_probe, probe_size
from embedtrain.data.readers import PYTHON_WHITESPACE, pair_dataset, read_pairs, text_hash, text_keys
from embedtrain.errors import EmbedtrainError

ROLES = {"query": "anchor", "positive": "positive", "negative_0": "negative"}


# -- the row-by-row versions these functions replaced, kept here as the reference -----------------------
def reference_check_and_keys(ds, source: str, wanted: dict[str, str]):
    columns = {role: list(ds[role]) for role in wanted}
    for role, values in columns.items():
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise EmbedtrainError(f"{source} row {i + 1}: column '{wanted[role]}' is {type(value).__name__}, "
                                      "not text; fix or remove the row")
            if not value.strip():
                raise EmbedtrainError(f"{source} row {i + 1}: column '{wanted[role]}' is empty; fix or remove the row")
    return [tuple(text_hash(columns[r][i]) for r in wanted) for i in range(len(ds))]


def reference_carve(datasets_, wanted: int):
    size = probe_size(sum(len(d) for d in datasets_), wanted)
    total = sum(len(d) for d in datasets_)
    exact = [size * len(d) / total for d in datasets_]
    shares = [int(x) for x in exact]
    for i in sorted(range(len(datasets_)), key=lambda i: (-(exact[i] - shares[i]), i))[: size - sum(shares)]:
        shares[i] += 1
    held, chosen = set(), []
    for d, share in zip(datasets_, shares):
        rows = []
        for i in sorted(range(len(d)), key=lambda i: (text_hash(f"{d.row_keys[i][0]}:{d.row_keys[i][1]}"), i)):
            if len(rows) == share:
                break
            query, positive = d.row_keys[i][0], d.row_keys[i][1]
            if query in held or positive in held or query == positive:
                continue
            rows.append(i)
            held.update((query, positive))
        chosen.append(rows)
    out = []
    for d, rows in zip(datasets_, chosen):
        picked = d.rows.select(rows)
        keep = [i for i in range(len(d)) if not held.intersection(d.row_keys[i])]
        out.append((list(picked["query"]), list(picked["positive"]), len(d) - len(keep),
                    [d.row_keys[i] for i in keep], list(d.rows.select(keep)["query"])))
    return out


# -- helpers -------------------------------------------------------------------------------------------
def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def good_rows(n: int):
    # repeated documents on purpose: a positive of one row is the negative of another, labels repeat
    return [{"anchor": f"query {i}", "positive": f"doc {i % 7}", "negative": f"doc {(i + 3) % 7}"} for i in range(n)]


def outcome(fn):
    try:
        return ("ok", fn())
    except EmbedtrainError as err:
        return ("error", str(err))


def table(rows):
    return datasets.Dataset.from_dict({role: [r[col] for r in rows] for role, col in ROLES.items()})


# -- tests -----------------------------------------------------------------------------------------------
def test_the_whitespace_list_is_exactly_what_str_strip_removes():
    python = {chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()}
    assert set(PYTHON_WHITESPACE) == python and len(PYTHON_WHITESPACE) == len(python)


@pytest.mark.parametrize("bad", [
    None,                        # only a text column with a missing value
    {2: {"positive": ""}},       # empty
    {5: {"negative": " \t\n"}},  # blank, ASCII
    {3: {"anchor": "\u3000\x1c\u2029\x85"}},  # blank by Python's definition (ideographic space, separators)
    {1: {"positive": "\u200b"}},  # a zero-width space is not whitespace for Python: a valid text
    {4: {"anchor": " fine "}},
    {7: {"positive": None}},     # null inside a text column
    {6: {"negative": ""}, 8: {"positive": "  "}},  # the first role with a bad row is reported, not the first row
    {9: {"anchor": 5}},          # an int: the column is no longer text
    {0: {"negative": ["two", "texts"]}},
    {3: {"anchor": "line\n"}, 4: {"anchor": "\n\n"}},
])
def test_checks_and_keys_match_the_row_by_row_version(bad, tmp_path):
    rows = good_rows(12)
    for i, change in (bad or {}).items():
        rows[i] = {**rows[i], **change}
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    raw = datasets.load_dataset("json", data_files=path, split="train")
    renamed = raw.select_columns(list(ROLES.values())).rename_columns(
        {c: r for r, c in ROLES.items() if c != r})
    expected = outcome(lambda: reference_check_and_keys(renamed, path, ROLES))
    got = outcome(lambda: read_pairs(path, "data.train[0]", "t", negative_columns=["negative"]).row_keys)
    assert got == expected


def test_keys_of_a_selected_reordered_view_and_of_large_strings():
    rows = good_rows(30)
    ds = table(rows)
    view = ds.select([7, 3, 3, 29, 0])
    assert text_keys(view, list(ROLES)) == reference_check_and_keys(view, "v", ROLES)
    large = ds.cast(datasets.Features({r: datasets.Value("large_string") for r in ROLES}))
    assert text_keys(large, list(ROLES)) == reference_check_and_keys(ds, "v", ROLES)
    assert text_keys(ds.select([]), list(ROLES)) == []


def test_keys_of_a_table_in_several_arrow_chunks():
    parts = [table(good_rows(10)), table([{"anchor": f"other {i}", "positive": "doc 1", "negative": f"n {i}"}
                                          for i in range(5)])]
    ds = datasets.concatenate_datasets(parts)
    assert isinstance(ds.with_format("arrow")["query"], pa.ChunkedArray)
    assert len(ds.with_format("arrow")["query"].chunks) == 2
    assert text_keys(ds, list(ROLES)) == reference_check_and_keys(ds, "v", ROLES)


def test_the_probe_matches_the_row_by_row_version():
    def rows(n, prefix, shared_every):
        return [{"anchor": f"{prefix}query {i}", "positive": f"{prefix}doc {i}",
                 # some negatives are other rows' positives, so probe texts reach into other rows
                 "negative": f"{prefix}doc {(i + 1) % n}" if i % shared_every == 0 else f"{prefix}neg {i}"}
                for i in range(n)]

    def pairs(name, data):
        return pair_dataset(table(data), f"{name}.jsonl", name, ROLES)

    sets = [pairs("a", rows(1500, "a ", 3)), pairs("b", rows(700, "b ", 2))]
    expected = reference_carve(sets, 60)
    probe, kept = carve_probe(sets, 60)
    got = [(q, p, e, k.row_keys, list(k.rows["query"]))
           for q, p, e, k in zip(probe.queries, probe.positives, probe.excluded_rows, kept)]
    assert got == expected
    assert sum(probe.excluded_rows) > probe.rows  # the shared negatives took rows with them


def test_token_lengths_are_the_sum_over_roles():
    ds = pair_dataset(table(good_rows(20)), "t.jsonl", "t", ROLES)
    expected = [sum(len(ds.rows[i][r]) for r in ROLES) for i in range(len(ds))]
    assert token_lengths(ds) == expected
    with_ids = dataclasses.replace(ds, rows=ds.rows.map(
        lambda b: {f"{r}_ids": [list(range(len(t) % 5 + 1)) for t in b[r]] for r in ROLES}, batched=True))
    assert token_lengths(with_ids) == [sum(len(t) % 5 + 1 for t in (ds.rows[i][r] for r in ROLES))
                                       for i in range(len(ds))]
    assert isinstance(token_lengths(ds)[0], int) and np.asarray(token_lengths(ds)).dtype == np.int64
