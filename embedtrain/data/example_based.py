"""Example-based pairs from labelled texts (classification and clustering data), as NV-Embed-v2 builds them.

NV-Embed (arXiv 2405.17428, stage 2) adds non-retrieval data to contrastive training. For a
classification or clustering set of (text, label) rows, a label name is a poor "document"; instead
each text is paired with *another example* of its label, and its negatives are examples of other
labels:

    query    = text_i
    positive = a different text with label(text_i)
    negative_j = a text with label l_j, for k distinct labels l_j != label(text_i)

The choice is random but fixed by ``seed``. Texts whose label has no second distinct text get no row.
Other rows of a batch often share a label: the dataset's ``match_keys`` are the rows' labels, so the
loss masks every in-batch document of the query's own label as a false negative (in-batch negatives can
stay on).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import numpy as np

from embedtrain.data.readers import PairDataset, column_list, load_columns, pair_dataset, text_hash
from embedtrain.errors import EmbedtrainError


def example_based_rows(
    texts: list[str], labels: list, num_negatives: int = 1, seed: int = 0, with_labels: bool = False
):
    """Rows ``{"query", "positive", "negative_0", ...}`` built as in the module docstring; with
    ``with_labels`` also the label of each role of each row (query, positive, negatives)."""
    by_label: dict = defaultdict(list)
    for text, label in zip(texts, labels):
        if text not in by_label[label]:
            by_label[label].append(text)
    names = list(by_label)
    if len(names) - 1 < num_negatives:
        raise ValueError(f"{len(names)} labels cannot give {num_negatives} negatives from other labels each")
    rng = np.random.default_rng(seed)
    index = {label: i for i, label in enumerate(names)}
    rows, labels_of = [], []
    for text, label in zip(texts, labels):
        same = by_label[label]
        if len(same) < 2:
            continue
        positive = text
        while positive == text:
            positive = same[int(rng.integers(len(same)))]
        others = [j for j in range(len(names)) if j != index[label]]
        chosen = rng.choice(len(others), size=num_negatives, replace=False)
        row = {"query": text, "positive": positive}
        row_labels = [label, label]
        for j, c in enumerate(chosen):
            pool = by_label[names[others[int(c)]]]
            row[f"negative_{j}"] = pool[int(rng.integers(len(pool)))]
            row_labels.append(names[others[int(c)]])
        rows.append(row)
        labels_of.append(tuple(row_labels))
    return (rows, labels_of) if with_labels else rows


def read_labeled(
    path: str,
    where: str,
    name: str,
    text_column: str = "text",
    label_column: str = "label",
    num_negatives: int = 1,
    query_prompt: str = "",
    document_prompt: str = "",
    weight: float = 1.0,
    split: str = "train",
    max_rows: Optional[int] = None,
    subset: Optional[str] = None,
    seed: int = 0,
) -> PairDataset:
    """Load (text, label) rows and turn them into example-based training pairs (see the module docstring).

    ``max_rows`` limits the labelled rows read; ``where`` names the dataset in error messages.
    """
    import datasets

    fields = {"text_column": [text_column], "label_column": [label_column]}
    table, source = load_columns(path, where, fields, split, max_rows, subset)
    texts, labels = column_list(table, text_column), column_list(table, label_column)
    for i, (text, label) in enumerate(zip(texts, labels)):
        if not isinstance(text, str) or not text.strip():
            raise EmbedtrainError(f"{source} row {i + 1}: column '{text_column}' is empty or not text; fix or remove the row")
        if label is None or isinstance(label, (list, dict)):
            raise EmbedtrainError(f"{source} row {i + 1}: column '{label_column}' holds {label!r}, not one label; fix or remove the row")
    try:
        rows, row_labels = example_based_rows(texts, labels, num_negatives, seed, with_labels=True)
    except ValueError as err:
        raise EmbedtrainError(f"{where}.example_negatives: {err} in {source}; lower example_negatives") from None
    if not rows:
        raise EmbedtrainError(f"{where}: no label of {source} has two different texts, so no pair can be built")
    roles = ["query", "positive"] + [f"negative_{j}" for j in range(num_negatives)]
    ds = datasets.Dataset.from_dict({r: [row[r] for row in rows] for r in roles})
    wanted = {"query": text_column, "positive": text_column, **{r: text_column for r in roles[2:]}}
    dataset = pair_dataset(ds, source, name, wanted, query_prompt, document_prompt, weight)
    # the loss masks documents of the query's own label: another text of it is no negative
    dataset.match_keys = [tuple(text_hash(f"label\x00{label!r}") for label in labels_of) for labels_of in row_labels]
    if len(rows) < len(texts):  # texts whose label has no other text: no positive can be built for them
        dataset.dropped = {"label_without_second_text": len(texts) - len(rows)}
    return dataset
