"""Fixtures for the mteb evaluation tests: tiny BERT sentence-transformers models and BEIR folders.

Everything is built locally (nothing is downloaded). The test modules import the fixtures they use
by name. This is not a ``conftest.py``: a second conftest module would replace ``tests/conftest.py``
as ``conftest`` in ``sys.modules`` and break the tests that import helpers from it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = (
    "apple banana cherry grape lemon mango orange peach pear plum "
    "river lake ocean mountain valley forest desert island cloud storm "
    "red green blue yellow black white purple silver golden bright "
    "run walk jump swim climb read write sing dance sleep "
    "king queen city village school garden market bridge tower castle "
    "this is a an the of and test sentence another positive title query passage"
).split()
"""The vocabulary of the tiny model and of the test data (mteb's mock tasks use the last line)."""

QUERY_PROMPT = "query: "
DOCUMENT_PROMPT = "passage: "


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Save a 2-layer, 32-wide BERT as a sentence-transformers folder (with prompts) in ``folder``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from embedtrain.models import load_text_encoder

    raw = folder / "hf"
    raw.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ":", ".", ",", "'"] + list(dict.fromkeys(WORDS))
    (raw / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # from_pretrained reads vocab.txt in every transformers version (transformers 5 ignores a
    # vocab_file argument given to the constructor).
    tokenizer = BertTokenizerFast.from_pretrained(str(raw), do_lower_case=True)
    assert tokenizer.unk_token_id not in tokenizer("apple river")["input_ids"]
    tokenizer.save_pretrained(raw)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(raw)
    model_dir = folder / "model"
    encoder = load_text_encoder(str(raw), query_prompt=QUERY_PROMPT, document_prompt=DOCUMENT_PROMPT, max_length=64)
    encoder.save(model_dir)
    return model_dir


def write_beir(folder: Path, seed: int = 0) -> Path:
    """20 documents, 8 queries, graded qrels (the last query has only a 0-graded judgment)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    content = list(WORDS[:50])
    docs = []
    seen: set[str] = set()
    while len(docs) < 20:
        text = " ".join(rng.sample(content, 5))
        if text not in seen:
            seen.add(text)
            docs.append({"_id": f"d{len(docs)}", "title": "", "text": text})
    queries, qrels = [], []
    for i in range(8):
        targets = rng.sample(range(20), 3)
        words = docs[targets[0]]["text"].split()[:2] + docs[targets[1]]["text"].split()[:1]
        queries.append({"_id": f"q{i}", "text": " ".join(words)})
        grades = (0, 0, 0) if i == 7 else (2, 1, 0)
        qrels += [(f"q{i}", f"d{t}", g) for t, g in zip(targets, grades)]
    with (folder / "corpus.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    with (folder / "queries.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(q) + "\n" for q in queries)
    with (folder / "qrels.tsv").open("w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t{g}\n" for q, d, g in qrels)
    return folder


@pytest.fixture(scope="session")
def prompts() -> dict[str, str]:
    """The prompts saved with the tiny models."""
    return {"query": QUERY_PROMPT, "document": DOCUMENT_PROMPT}


@pytest.fixture
def make_beir(tmp_path: Path):
    """``make_beir(relative_folder, seed=0)`` writes a BEIR folder under ``tmp_path``."""
    return lambda relative, seed=0: write_beir(tmp_path / relative, seed)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny sentence-transformers model folder with prompts 'query: ' / 'passage: '."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_a"), seed=0)


@pytest.fixture(scope="session")
def other_tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture and vocabulary as ``tiny_model_dir``, other weights."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_b"), seed=1)


@pytest.fixture(scope="session")
def graded_beir_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BEIR folder named ``toy/eval`` (task name ``toy``)."""
    return write_beir(tmp_path_factory.mktemp("beir") / "toy" / "eval")
