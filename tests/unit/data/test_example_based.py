import json

import pytest

from embedtrain.data.example_based import example_based_rows, read_labeled
from embedtrain.errors import EmbedtrainError


def test_positive_shares_the_label_and_negatives_come_from_distinct_other_labels():
    texts = [f"{label} text {i}" for label in "abcd" for i in range(4)] + ["lonely e"]
    labels = [label for label in "abcd" for _ in range(4)] + ["e"]
    rows = example_based_rows(texts, labels, num_negatives=3, seed=1)
    label_of = dict(zip(texts, labels))
    assert len(rows) == 16  # 'e' has no second example, so no row
    for row in rows:
        assert row["positive"] != row["query"] and label_of[row["positive"]] == label_of[row["query"]]
        negative_labels = [label_of[row[f"negative_{j}"]] for j in range(3)]
        assert len(set(negative_labels)) == 3 and label_of[row["query"]] not in negative_labels
    assert rows == example_based_rows(texts, labels, num_negatives=3, seed=1)  # fixed by the seed
    assert rows != example_based_rows(texts, labels, num_negatives=3, seed=2)
    with pytest.raises(ValueError, match="5 labels cannot give 5 negatives"):
        example_based_rows(texts, labels, num_negatives=5)


def test_read_labeled_builds_a_pair_dataset_with_clear_errors(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps({"name": f"{g} {i}", "group": g}) + "\n" for g in "xyz" for i in range(3)))
    ds = read_labeled(str(path), "data.train[0]", "groups", "name", "group", 2, query_prompt="Instruct: t\nQuery: ")
    assert len(ds) == 9 and ds.num_negatives == 2 and ds.query_prompt.startswith("Instruct")
    assert ds.rows.column_names == ["query", "positive", "negative_0", "negative_1"]
    with pytest.raises(EmbedtrainError, match=r"data.train\[0\].label_column: missing 'label'"):
        read_labeled(str(path), "data.train[0]", "groups", "name", "label")
    with pytest.raises(EmbedtrainError, match="lower example_negatives"):
        read_labeled(str(path), "data.train[0]", "groups", "name", "group", 3)
