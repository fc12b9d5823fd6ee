"""Mined negatives (data.mined_negatives): the corpus, the rows' candidates, each batch's choice and its tensors."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from embedtrain.data.collate import BatchCollator, PlannedBatches
from embedtrain.data.mined import MinedNegatives, corpus_of, excluded_candidates
from embedtrain.data.readers import pair_dataset, text_hash
from embedtrain.data.sampler import PlannedBatch
from embedtrain.errors import EmbedtrainError
from embedtrain.train.mining import _fill_randomly, mine_during_training

# rows 0 and 2 share a query (two positives of it); rows 1 and 3 share a positive; "d e" is also a query's text
ROWS = [("q a", "d a"), ("q b", "d b"), ("q a", "d c"), ("q d", "d b"), ("d e", "d d"), ("q f", "d e")]


def dataset(rows=ROWS, negatives=False):
    import datasets

    columns = {"query": [q for q, _ in rows], "positive": [p for _, p in rows]}
    wanted = {"query": "anchor", "positive": "positive"}
    if negatives:
        columns["negative_0"] = [f"own {i}" for i in range(len(rows))]
        wanted["negative_0"] = "negative"
    return pair_dataset(datasets.Dataset.from_dict(columns), "rows.jsonl", "rows", wanted)


def test_the_corpus_is_the_distinct_positives_in_order_of_first_use():
    corpus = corpus_of(dataset().row_keys)
    assert corpus.rows.tolist() == [0, 1, 2, 4, 5]  # d a, d b, d c, d d, d e
    assert corpus.keys.tolist() == [text_hash(t) for t in ("d a", "d b", "d c", "d d", "d e")]
    assert corpus.of_row.tolist() == [0, 1, 2, 1, 3, 4]


def test_a_row_never_gets_a_positive_of_its_query_nor_its_query():
    ds = dataset()
    excluded = excluded_candidates(ds.row_keys, corpus_of(ds.row_keys))
    assert excluded[0] == excluded[2] == {0, 2}  # both positives of "q a"
    assert excluded[1] == {1} and excluded[3] == {1}
    assert excluded[4] == {3, 4}  # its positive, and its query "d e" is a document too


def table(candidates, count=1, rows=ROWS):
    ds = dataset(rows)
    return ds, MinedNegatives(corpus_of(ds.row_keys), np.asarray(candidates), count, step=0)


def test_a_batch_passes_over_candidates_that_repeat_its_texts():
    ds, mined = table([[1, 3, -1], [2, -1, -1], [0, -1, -1], [0, -1, -1], [0, -1, -1], [2, 3, -1]])
    chosen, repeated = mined.choose([0, 1, 5], ds.row_keys)
    # the batch holds q a, d a, q b, d b, q f, d e. Row 0's best (d b) is row 1's positive: it takes d d; row 1
    # takes d c; row 5 ranks d c and d d, both taken: it keeps its best anyway, and that repeat is counted
    assert chosen == {0: [3], 1: [2], 5: [2]} and repeated == 1


def test_the_choice_is_made_in_batch_order():
    ds, mined = table([[3, 2], [0, 2], [1, 3], [0, 2], [0, 1], [1, 3]], count=2)
    chosen, repeated = mined.choose([0, 3], ds.row_keys)
    # row 0 comes first and takes d d and d c; row 3's d a is row 0's positive and d c is taken
    assert chosen == {0: [3, 2], 3: [0, 2]} and repeated == 2
    chosen, repeated = mined.choose([3, 0], ds.row_keys)  # row 3 first: it takes d c (d a is still in the batch)
    assert chosen == {3: [2, 0], 0: [3, 2]} and repeated == 2
    chosen, repeated = mined.choose([1, 2], ds.row_keys)  # each row's positive is the other's candidate
    assert chosen == {1: [0, 2], 2: [3, 1]} and repeated == 2
    chosen, repeated = mined.choose([0], ds.row_keys)  # nothing in the way
    assert chosen == {0: [3, 2]} and repeated == 0


def test_the_collated_batch_has_each_rows_mined_negatives_after_its_own(tiny_bert):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    ds = dataset(negatives=True)
    mined = MinedNegatives(corpus_of(ds.row_keys), np.asarray([[3, 4], [2, 3], [1, 3], [0, 2], [0, 1], [0, 1]]), 2, 0)
    collator = BatchCollator([ds], tokenizer, lambda role: 16)
    collator.mined = [mined]
    planned = PlannedBatch(0, (0, 1, 3, 5))
    whole = collator(planned, planned.rows)
    # a corpus of five texts is crowded: row 0 takes d d, and d e (row 5's positive) is repeated; row 1 takes d c,
    # and d d (taken) is repeated; rows 3 and 5 find every candidate in the batch already (4 repeats)
    expected = [["own 0", "d d", "d e"], ["own 1", "d c", "d d"], ["own 3", "d a", "d c"], ["own 5", "d a", "d b"]]
    texts = [t for row in expected for t in row]
    assert whole["negative_ids"].tolist() == [text_hash(t) for t in texts]
    assert torch.equal(whole["negative"]["input_ids"], tokenizer(texts, padding=True, return_tensors="pt")["input_ids"])
    assert whole["negatives_repeated"] == 6
    # two processes: each collates its half of the global batch with the choice made for the whole of it
    halves = [PlannedBatches([planned], collator, rank, 2)[0] for rank in (0, 1)]
    assert torch.cat([h["negative_ids"] for h in halves]).tolist() == whole["negative_ids"].tolist()
    assert [h["negatives_repeated"] for h in halves] == [6, 6]  # the global batch's, the same on each process


def test_rows_short_of_candidates_get_random_ones_never_excluded():
    settings = SimpleNamespace(top_k=3, num_negatives=2)
    kept = [[4], [], [1, 2, 3]]
    excluded = [{0}, {0, 1, 2}, {0}]
    figures = _fill_randomly(kept, excluded, 5, settings, np.random.default_rng(0), "data.train[0]")
    assert figures == {"rows_short": 2, "random_candidates": 4}
    assert kept[0][0] == 4 and len(set(kept[0])) == 3 and not set(kept[0]) & {0}
    assert sorted(kept[1]) == [3, 4]  # only two texts may be its negatives
    assert kept[2] == [1, 2, 3]
    with pytest.raises(EmbedtrainError, match=r"data.train\[0\] row 1: only 1 of the 5 distinct positives"):
        _fill_randomly([[]], [{0, 1, 2, 3}], 5, settings, np.random.default_rng(0), "data.train[0]")


def test_mining_ranks_the_corpus_by_the_model_and_drops_likely_false_negatives():
    # 2-d embeddings given per text (cosine similarity after normalising), so every ranking is known
    vectors = {"q a": [1, 0], "q b": [0, 1], "q d": [0.6, 0.8], "d e": [-1, 0], "q f": [0.8, -0.6],
               "d a": [0.9, 0.1], "d b": [0.1, 0.9], "d c": [0.8, 0.5], "d d": [0.95, 0.05]}

    def encode(i, texts, role):
        return torch.tensor([vectors[t] for t in texts], dtype=torch.float32)

    accelerator = SimpleNamespace(num_processes=1, process_index=0, is_main_process=True, device=torch.device("cpu"))
    settings = SimpleNamespace(top_k=2, num_negatives=1, factor=0.95)
    tables, report = mine_during_training(encode, [dataset()], settings, step=7, seed=0, accelerator=accelerator)
    mined = tables[0]
    assert (mined.step, mined.count) == (7, 1)
    c = mined.candidates.tolist()  # corpus: 0 d a, 1 d b, 2 d c, 3 d d, 4 d e
    # row 0 (q a; d a at 0.994, limit 0.944): d c is another positive of q a; d d (0.999) is dropped as a likely
    # false negative; d b is kept, and d e, the one text left, is a random candidate after it
    assert c[0] == [1, 4]
    assert c[1] == [2, 0]  # q b: d c (0.53), d a (0.11), both below 0.95 x 0.994
    assert c[2] == [1, 4]  # q a again, positive d c (0.848): d d dropped, d b kept, d e random
    assert c[3][0] == 0 and c[3][1] in (3, 4)  # q d: d c (0.933) dropped, d a kept, one random of the others
    # q "d e" (its own text is a document, never a candidate): its positive scores -0.999, the limit is -0.949,
    # both candidates (d b, d c) score above it and are dropped; only d a is left to it
    assert c[4] == [0, -1]
    assert sorted(c[5]) == [1, 2]  # q f: d d and d a dropped (its positive scores -0.8): d b and d c at random
    assert report["rows"] == {"rows": 6, "corpus": 5, "rows_short": 2, "random_candidates": 6,
                              "dropped_false_negatives": 7}


def test_candidates_round_trip_through_tensors_and_other_data_is_refused():
    from embedtrain.data.mined import from_tensors, to_tensors

    ds, mined = table([[3, 2], [0, 2], [1, 3], [0, 2], [0, 1], [1, -1]], count=2)
    mined.step = 12
    back = from_tensors(to_tensors([mined]), [ds], 2, "--resume: x")[0]
    assert np.array_equal(back.candidates, mined.candidates) and (back.step, back.count) == (12, 2)
    assert np.array_equal(back.corpus.rows, mined.corpus.rows)
    other = dataset(ROWS[:5])  # a row fewer: another corpus
    with pytest.raises(EmbedtrainError, match=r"^--resume: x does not match data.train\[0\] \(rows\): the data changed"):
        from_tensors(to_tensors([mined]), [other], 2, "--resume: x")
    tensors = to_tensors([mined])
    del tensors["0.step"]
    with pytest.raises(EmbedtrainError, match="does not match data.train"):
        from_tensors(tensors, [ds], 2, "--resume: x")
