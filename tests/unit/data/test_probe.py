"""The diagnostics probe: held out of training by content, the same on every start."""

import datasets

from embedtrain.data.probe import MAX_FRACTION, MIN_ROWS, carve_probe, probe_size
from embedtrain.data.readers import pair_dataset


def dataset(rows: list[tuple[str, str, str]], name: str = "d"):
    table = datasets.Dataset.from_dict({"query": [r[0] for r in rows], "positive": [r[1] for r in rows],
                                        "negative_0": [r[2] for r in rows]})
    return pair_dataset(table, f"{name}.jsonl", name, {"query": "q", "positive": "p", "negative_0": "n"})


def rows(n: int, prefix: str = "") -> list[tuple[str, str, str]]:
    return [(f"{prefix}query {i}", f"{prefix}positive {i}", f"{prefix}negative {i}") for i in range(n)]


def test_the_probe_is_chosen_by_content_not_by_row_order():
    data = rows(1000)
    probe, kept = carve_probe([dataset(data)], 40)
    again, _ = carve_probe([dataset(list(reversed(data)))], 40)
    assert probe.rows == 40 and sorted(probe.queries[0]) == sorted(again.queries[0])
    pairs = dict(zip(probe.queries[0], probe.positives[0]))
    assert all(pairs[f"query {q.split()[-1]}"] == f"positive {q.split()[-1]}" for q in probe.queries[0])
    # the probe's rows are gone from training, the rest kept in order
    assert len(kept[0]) == 960 and not set(probe.queries[0]) & set(kept[0].rows["query"])
    assert kept[0].rows["query"] == [q for q, _, _ in data if q not in pairs]
    assert len(kept[0].row_keys) == 960


def test_rows_sharing_a_text_with_the_probe_leave_training_too():
    data = rows(1000)
    probe, _ = carve_probe([dataset(data)], 20)
    held_positive = probe.positives[0][0]
    # another row whose negative is a probe positive, and one repeating a probe query
    extra = [("unrelated query", "unrelated positive", held_positive), (probe.queries[0][1], "other", "other neg")]
    probe2, kept = carve_probe([dataset(data + extra)], 20)
    assert probe2.queries == probe.queries  # the extra rows hash elsewhere; the choice is the same
    assert probe2.excluded_rows == [22] and "unrelated query" not in kept[0].rows["query"]


def test_the_probe_is_shared_among_datasets_by_size_and_capped_for_small_data():
    probe, kept = carve_probe([dataset(rows(3000, "a "), "a"), dataset(rows(1000, "b "), "b")], 100)
    assert [len(q) for q in probe.queries] == [75, 25]
    assert probe.summary(["a", "b"])["per_dataset"]["b"] == {"probe_rows": 25, "excluded_training_rows": 25}
    assert probe_size(1000, 256) == int(1000 * MAX_FRACTION)  # at most a small share of the rows
    assert probe_size(MIN_ROWS * 10, 256) == 0  # too few for a meaningful probe: none
    small = [dataset(rows(100))]
    none, same = carve_probe(small, 256)
    assert none.rows == 0 and same is small


def test_label_strings_do_not_take_their_class_out_of_training():
    """Classification rows (a text, its class name as the positive, another class as the negative): holding one row
    out would take every row of its class (and every row using it as a negative) with it. Such rows are passed
    over; no dataset loses more than MAX_FRACTION of its rows to the probe, in any dataset holding the same texts."""
    labels = [f"class {c}" for c in range(4)]
    labelled = [(f"text {i}", labels[i % 4], labels[(i + 1) % 4]) for i in range(800)]
    # texts reused as negatives across rows (example-based data): each query is another row's negative
    reused = [(f"sentence {i}", f"paraphrase {i}", f"sentence {(i + 1) % 600}") for i in range(600)]
    pairs = rows(2000)
    data = [dataset(labelled, "labels"), dataset(reused, "reused"), dataset(pairs, "pairs")]
    probe, kept = carve_probe(data, 256)
    assert probe.queries[0] == []  # every labelled row shares its class name with 199 others
    for before, after in zip(data, kept):
        assert len(before) - len(after) <= int(len(before) * MAX_FRACTION), before.name
    # its share by size is 45 pairs, but a pair costs two rows (its own, and the one using its query as a negative):
    # the budget of 30 rows (5% of 600) binds first
    assert 0 < len(probe.queries[1]) <= 30 // 2 + 1 and len(data[1]) - len(kept[1]) <= 30
    # plain pairs: their share of a probe of 170 pairs (5% of the 3,400 rows), split by size: 2,000 / 3,400 of it
    assert len(probe.queries[2]) == 100


def test_labels_only_make_no_probe():
    labels = [f"class {c}" for c in range(4)]
    data = [dataset([(f"text {i}", labels[i % 4], labels[(i + 1) % 4]) for i in range(4000)], "labels")]
    probe, kept = carve_probe(data, 256)  # 200 pairs would fit 5% of the rows, but each takes a class with it
    assert probe.rows == 0 and kept is data


def test_same_class_pairs_take_each_class_in_turn():
    """Metric learning's probe: pairs of images of one class, no image twice, every class giving a pair before
    any gives a second; at most the number asked for; none below MIN_ROWS pairs."""
    from embedtrain.data.probe import MIN_ROWS, same_class_pairs

    labels = [c for c in range(10) for _ in range(2 + c)]  # class c has 2 + c images, in order
    pairs = same_class_pairs(labels, 256)
    assert len(pairs) == sum((2 + c) // 2 for c in range(10))  # every pair a class's images can make
    assert all(labels[a] == labels[b] for a, b in pairs)
    images = [i for pair in pairs for i in pair]
    assert len(images) == len(set(images))
    assert [labels[a] for a, _ in pairs[:10]] == list(range(10))  # round one: one pair per class
    few = same_class_pairs(labels, 20)
    assert few == pairs[:20] and {labels[a] for a, _ in few} == set(range(10))
    assert same_class_pairs(labels, MIN_ROWS - 1) == []
    assert same_class_pairs([0, 1] * 20, 256) == [(0, 2), (1, 3), (4, 6), (5, 7), (8, 10), (9, 11), (12, 14), (13, 15),
                                                   (16, 18), (17, 19), (20, 22), (21, 23), (24, 26), (25, 27),
                                                   (28, 30), (29, 31), (32, 34), (33, 35), (36, 38), (37, 39)]
