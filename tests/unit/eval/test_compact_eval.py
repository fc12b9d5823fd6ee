"""Every prefix and precision on faiss, against rankings written out with numpy and the project's evaluation."""

import numpy as np
import pytest

from embedtrain.eval.compact import add_retention, compact_table, evaluate_compact, prefix, table_markdown
from embedtrain.eval.retrieval import RetrievalData, evaluate_retrieval, load_beir, retrieval_metrics


def ranked_by(scores: np.ndarray, data: RetrievalData) -> dict:
    """Top 10 by score, ties by document id descending (as trec_eval orders them), from a full score matrix."""
    return {qid: [d for _, d in sorted(zip(row.tolist(), data.corpus_ids), reverse=True)[:10]]
            for qid, row in zip(data.query_ids, scores)}


def exact_scores(queries: np.ndarray, documents: np.ndarray) -> np.ndarray:
    """queries @ documents.T with every dot product summed exactly (math.fsum) and rounded once to float32.

    Documents with the same binary code tie exactly here, as they do in the search: a BLAS product may sum
    identical columns in different orders and split such ties by an ulp, and the ranking then depends on the
    library build (seen with numpy 2.4.6: nDCG@10 0.527 against the search's 0.553 on the same codes)."""
    import math

    return np.array([[math.fsum((qv.astype(np.float64) * dv.astype(np.float64)).tolist()) for dv in documents]
                     for qv in queries], dtype=np.float32)


@pytest.fixture(scope="module")
def embedded(tiny_bert_no_dropout, beir_dir):
    from embedtrain.models import load_text_encoder

    encoder = load_text_encoder(str(tiny_bert_no_dropout), max_length=32)
    data = load_beir(beir_dir, "tiny")
    q = encoder.encode(data.query_texts, role="query").numpy()
    c = encoder.encode(data.corpus_texts, role="document").numpy()
    return encoder, data, q, c


def test_float_rows_are_the_projects_own_evaluation(embedded):
    encoder, data, q, c = embedded
    table = evaluate_compact(encoder, data, dims=[32, 16])
    full = next(r for r in table if r["dims"] == 32 and r["precision"] == "float32")
    expected = evaluate_retrieval(encoder, data)
    for metric in ("ndcg@10", "recall@10", "mrr@10"):  # 1e-6: the same ranking; float32 sums only
        assert full[metric] == pytest.approx(expected[metric], abs=1e-6)
    assert full["bytes_per_document"] == 128 and full["retained"] == pytest.approx(1.0)
    half = next(r for r in table if r["dims"] == 16 and r["precision"] == "float32")
    qp, cp = prefix(q, 16), prefix(c, 16)
    assert half["ndcg@10"] == pytest.approx(retrieval_metrics(ranked_by(qp @ cp.T, data), data.qrels)["ndcg@10"], abs=1e-6)
    assert "| 16 | float32 | 64 |" in table_markdown(table)


def test_binary_rows_are_hamming_and_rescoring_written_out(embedded):
    from sentence_transformers.util.quantization import quantize_embeddings

    _, data, q, c = embedded
    dim = 16
    # every document is a rescoring candidate (40 of 40), so rescoring is a full ranking to compare with
    table = {r["precision"]: r for r in compact_table(q, c, data, [dim], ["binary"], rescore_top_k=len(c))}
    qp, cp = prefix(q, dim), prefix(c, dim)
    qb, cb = qp > 0, cp > 0
    hamming = (qb[:, None, :] != cb[None, :, :]).sum(-1)
    assert table["binary"]["ndcg@10"] == pytest.approx(
        retrieval_metrics(ranked_by(-hamming.astype(np.float32), data), data.qrels)["ndcg@10"], abs=1e-9)
    signs = np.where(cb, 1.0, -1.0).astype(np.float32)
    assert table["binary+rescore"]["ndcg@10"] == pytest.approx(
        retrieval_metrics(ranked_by(exact_scores(qp, signs), data), data.qrels)["ndcg@10"], abs=1e-6)
    assert table["binary+float_rescore"]["ndcg@10"] == pytest.approx(
        retrieval_metrics(ranked_by(qp @ cp.T, data), data.qrels)["ndcg@10"], abs=1e-6)
    assert {r["bytes_per_document"] for r in table.values()} == {dim // 8}
    # the stored codes are sentence-transformers' packed bits
    np.testing.assert_array_equal(np.packbits(cb, axis=-1), quantize_embeddings(cp, "ubinary"))


def test_int8_row_ranks_sentence_transformers_codes(embedded):
    from sentence_transformers.util.quantization import quantize_embeddings

    _, data, q, c = embedded
    row = compact_table(q, c, data, [32], ["int8"])[0]
    qp, cp = prefix(q, 32), prefix(c, 32)
    lo, hi = cp.min(0), cp.max(0)
    step = (hi - lo) / 255

    def values(x):
        return (quantize_embeddings(x, "int8", calibration_embeddings=cp).astype(np.float32) + 128) * step + lo

    expected = retrieval_metrics(ranked_by(values(qp) @ values(cp).T, data), data.qrels)["ndcg@10"]
    assert row["ndcg@10"] == pytest.approx(expected, abs=1e-6) and row["bytes_per_document"] == 32


def test_bad_dims_and_precisions_are_one_clear_error(embedded):
    from embedtrain.errors import EmbedtrainError

    _, data, q, c = embedded
    with pytest.raises(EmbedtrainError, match="between 1 and the embedding's 32"):
        compact_table(q, c, data, [64])
    with pytest.raises(EmbedtrainError, match="choose from"):
        compact_table(q, c, data, [32], ["int4"])
    with pytest.raises(EmbedtrainError, match="multiple of 8"):
        compact_table(q, c, data, [12], ["binary"])
    assert add_retention([{"dims": 8, "precision": "float32", "ndcg@10": 0.5}])[0]["retained"] == 1.0


def test_a_binary_rotation_searches_the_codes_of_the_rotated_prefix(embedded):
    from embedtrain.losses.compact import random_rotation

    _, data, q, c = embedded
    dim = 16
    r = random_rotation(dim).numpy()
    table = {row["precision"]: row for row in compact_table(q, c, data, [dim], ["binary"], rescore_top_k=len(c),
                                                            binary_rotations={dim: r})}
    assert all(row["rotated"] for row in table.values())
    qr, cr = prefix(q, dim) @ r, prefix(c, dim) @ r
    hamming = ((qr > 0)[:, None, :] != (cr > 0)[None, :, :]).sum(-1)
    assert table["binary"]["ndcg@10"] == pytest.approx(
        retrieval_metrics(ranked_by(-hamming.astype(np.float32), data), data.qrels)["ndcg@10"], abs=1e-9)
    signs = np.where(cr > 0, 1.0, -1.0).astype(np.float32)
    assert table["binary+rescore"]["ndcg@10"] == pytest.approx(
        retrieval_metrics(ranked_by(exact_scores(qr, signs), data), data.qrels)["ndcg@10"], abs=1e-6)
    # float rescoring reads the unrotated float prefixes (every document a candidate: the float ranking)
    qp, cp = prefix(q, dim), prefix(c, dim)
    assert table["binary+float_rescore"]["ndcg@10"] == pytest.approx(
        retrieval_metrics(ranked_by(qp @ cp.T, data), data.qrels)["ndcg@10"], abs=1e-6)
    # a prefix without a rotation is searched by its own signs
    assert "rotated" not in compact_table(q, c, data, [8], ["binary"], binary_rotations={dim: r})[0]
