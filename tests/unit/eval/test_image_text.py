"""Image-text retrieval through the same entry point as text retrieval: BEIR folders with image rows."""

import json

import pytest
import torch

from embedtrain.errors import EmbedtrainError
from embedtrain.eval.retrieval import evaluate_retrieval, load_beir

from multimodal_support import write_image_text_task


class ByIdEncoder:
    """Embeds item i (a text 'name i' or the i-th image) as a fixed vector, so every ranking is known."""

    def __init__(self, vectors: dict[str, torch.Tensor]):
        self.vectors = vectors
        self.calls = []

    def encode_items(self, texts=None, images=None, role="document", template=None, **_):
        self.calls.append((role, template, texts is not None, images is not None))
        keys = texts if texts is not None else [p.rsplit("/", 1)[-1] for p in images]
        return torch.stack([self.vectors[k] for k in keys])


def test_image_rows_load_and_score_both_directions(tmp_path):
    folder = write_image_text_task(tmp_path / "task", n=4)
    data = load_beir(folder)
    assert data.has_images and data.query_images is None and all(data.corpus_images)
    names = data.query_texts
    files = [p.rsplit("/", 1)[-1] for p in data.corpus_images]
    e = torch.eye(4)
    # query 0 finds image 0 first; query 1 finds image 1 second; query 2 finds image 2 third; query 3 last
    vectors = {names[0]: e[0], names[1]: e[1] + 1.2 * e[2], names[2]: e[2] + 1.2 * e[3] + 1.1 * e[0],
               names[3]: e[0] + e[1] + e[2] - e[3]}
    vectors.update({f: e[i] for i, f in enumerate(files)})
    encoder = ByIdEncoder(vectors)
    scores = evaluate_retrieval(encoder, data, "q: {text}", "{text}")
    assert scores["t2i/recall@1"] == pytest.approx(1 / 4)
    assert scores["t2i/recall@5"] == pytest.approx(1.0) and scores["t2i/recall@10"] == pytest.approx(1.0)
    assert scores["t2i/mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert "i2t/recall@1" in scores and "i2t/ndcg@10" in scores
    assert encoder.calls == [("query", "q: {text}", True, False), ("document", "{text}", False, True)]


def test_missing_image_in_task_is_one_line(tmp_path):
    folder = write_image_text_task(tmp_path / "task", n=3)
    lines = (folder / "corpus.jsonl").read_text().splitlines()
    lines[1] = json.dumps({"_id": "d1", "image": "nowhere/x.png"})
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(EmbedtrainError, match=r"corpus.jsonl: row 2 \(d1\): image nowhere/x.png not found"):
        load_beir(folder)
