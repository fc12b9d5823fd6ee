"""Label-string datasets train in full (repeated documents masked, not dropped), and every row is accounted for."""

import json

import pytest
import torch

from embedtrain.data.accounting import account, check_accounts, problems
from embedtrain.data.readers import read_pairs, text_hash
from embedtrain.data.sampler import plan_epoch
from embedtrain.errors import EmbedtrainError
from embedtrain.losses.in_batch import candidate_documents

LABELS = ["joy", "anger", "fear"]


def write_labelled_pairs(path, rows=64, duplicate_queries=0):
    """Classification rows as pairs: query = a unique sentence, positive = its label string (3 labels)."""
    lines = [{"anchor": f"message number {i} about something", "positive": LABELS[i % 3]} for i in range(rows)]
    for j in range(duplicate_queries):  # the same message again, with the same label
        lines.append(dict(lines[j % 3]))
    path.write_text("".join(json.dumps(row) + "\n" for row in lines))
    return path


def test_label_strings_at_a_batch_larger_than_the_labels_train_every_row(tmp_path):
    ds = read_pairs(str(write_labelled_pairs(tmp_path / "labels.jsonl")), "data.train[0]", "emotion")
    # the old rule (no text twice in a batch): at most 3 rows per batch, so no batch of 16 at all
    strict = plan_epoch([len(ds)], [ds.row_keys], 16, seed=0, epoch=0)
    assert strict == []
    (acc,) = account([ds], strict, 16)
    assert acc.batches_per_epoch == 0 and acc.dropped == {"duplicates": 64}
    assert "yields no full batch of 16 rows" in problems([acc], 0.05, 16)[0]

    plan = plan_epoch([len(ds)], [ds.row_keys], 16, seed=0, epoch=0, repeat_documents=True)
    assert sorted(r for b in plan for r in b.rows) == list(range(64))  # every row, once
    (acc,) = account([ds], plan, 16)
    assert (acc.rows_per_epoch, acc.batches_per_epoch, acc.dropped, acc.lost_share) == (64, 4, {}, 0.0)
    check_accounts([acc], 0.0, 16)

    # ... and in each batch the loss masks the other rows of a query's label, never its own positive
    for b in plan:
        ids = torch.tensor([ds.row_keys[r][1] for r in b.rows])
        dim = 4
        q, p = torch.randn(16, dim), torch.randn(16, dim)
        keep = candidate_documents(q, p, None, ids, None, True, True, False).keep
        same = ids.unsqueeze(0) == ids.unsqueeze(1)
        assert torch.equal(keep, ~same | torch.eye(16, dtype=torch.bool))
        assert same.sum() > 16  # labels do repeat inside the batch


def test_repeated_documents_never_repeat_a_query_or_cross_roles(tmp_path):
    rows = [(text_hash(f"q{i % 50}"), text_hash(LABELS[i % 3])) for i in range(100)]  # queries repeat twice
    rows.append((text_hash("joy"), text_hash("q1")))  # a query that is another row's document, and vice versa
    plan = plan_epoch([len(rows)], [rows], 10, seed=1, epoch=0, repeat_documents=True)
    assert plan
    for b in plan:
        queries = [rows[r][0] for r in b.rows]
        docs = {rows[r][1] for r in b.rows}
        assert len(queries) == len(set(queries))
        assert not set(queries) & docs


def test_a_dataset_losing_more_than_the_allowed_share_is_an_error(tmp_path):
    # 64 distinct messages + 16 repeats of three of them: the repeats cannot share a batch of 16 with their twin
    # often enough, and the account says how many rows the duplicate rule leaves out
    ds = read_pairs(str(write_labelled_pairs(tmp_path / "dup.jsonl", rows=64, duplicate_queries=16)),
                    "data.train[0]", "emotion")
    plan = plan_epoch([len(ds)], [ds.row_keys], 16, seed=0, epoch=0, repeat_documents=True)
    (acc,) = account([ds], plan, 16)
    assert acc.rows_read == 80 and acc.rows_per_epoch + acc.dropped.get("duplicates", 0) + acc.incomplete_batch == 80
    lost = acc.dropped.get("duplicates", 0)
    assert lost > 0
    assert acc.lost_share == pytest.approx(lost / 80)
    with pytest.raises(EmbedtrainError, match=r"data.train\[0\] \(emotion\): .*data.max_dropped_share"):
        check_accounts([acc], 0.05 * lost / 80, 16)
    check_accounts([acc], lost / 80, 16)  # allowed explicitly


def test_rows_held_out_on_purpose_are_reported_not_lost(tmp_path):
    ds = read_pairs(str(write_labelled_pairs(tmp_path / "labels.jsonl")), "data.train[0]", "emotion")
    ds.held_out = 16  # e.g. the diagnostics probe
    plan = plan_epoch([len(ds)], [ds.row_keys], 16, seed=0, epoch=0, repeat_documents=True)
    (acc,) = account([ds], plan, 16)
    assert (acc.rows_read, acc.held_out, acc.lost_share) == (80, 16, 0.0)
    assert "16 held out for the diagnostics probe" in acc.line()
