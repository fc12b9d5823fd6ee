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


def test_same_label_documents_are_masked_as_false_negatives(tmp_path):
    """Labelled rows carry their labels as the loss's document ids: in a batch, another row's positive of the
    query's label is left out of its negatives, while texts of other labels stay."""
    import torch

    from embedtrain.data import BatchCollator, PlannedBatch
    from embedtrain.losses.in_batch import candidate_documents
    from transformers import BertTokenizerFast

    from conftest import write_vocab

    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps({"text": f"small {g} tree {i}", "label": g}) + "\n"
                            for g in ("red", "blue") for i in range(3)))
    ds = read_labeled(str(path), "data.train[0]", "colours", num_negatives=1, seed=0)
    tokenizer = BertTokenizerFast(vocab_file=str(write_vocab(tmp_path / "vocab.txt")))
    batch = BatchCollator([ds], tokenizer, lambda role: 16)(PlannedBatch(0, tuple(range(6))), list(range(6)))
    labels = [row.split()[1] for row in ds.rows["query"]]
    ids = batch["positive_ids"].tolist()
    assert all((ids[i] == ids[j]) == (labels[i] == labels[j]) for i in range(6) for j in range(6))
    emb = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    _, targets, keep = candidate_documents(emb, emb, emb, batch["positive_ids"], batch["negative_ids"],
                                           in_batch_negatives=True, mask_false_negatives=True, across_processes=False)
    for i in range(6):
        for j in range(6):  # the in-batch positives
            assert keep[i, j] == (j == i or labels[j] != labels[i]), (i, j)
        assert keep[i, 6 + i]  # its own negative, of the other label
