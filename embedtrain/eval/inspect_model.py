"""``embedtrain inspect MODEL --texts FILE``: the label-free diagnostics of any saved model that embeds text.

FILE is plain text (one text per line: RankMe, uniformity and the random-pair cosine) or JSON lines
with query and positive columns (pairs: alignment and the similarity gap as well, queries embedded as
queries and positives as documents, with the model's saved prompts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from embedtrain.errors import EmbedtrainError


def read_texts(path: str, query_column: str = "query", positive_column: str = "positive",
               max_rows: Optional[int] = None) -> tuple[list[str], Optional[list[str]]]:
    """(texts, None) from a plain-text file, or (queries, positives) from JSON lines."""
    file = Path(path)
    if not file.is_file():
        raise EmbedtrainError(f"--texts: {path} not found; give a text file (one per line) or a .jsonl of pairs")
    lines = [(i, line) for i, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if max_rows is not None:
        lines = lines[:max_rows]
    if file.suffix != ".jsonl":
        texts = [line.strip() for _, line in lines]
        if len(texts) < 2:
            raise EmbedtrainError(f"--texts: {path} has {len(texts)} non-empty lines; give at least 2 texts")
        return texts, None
    queries, positives = [], []
    for line_no, line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            raise EmbedtrainError(f"{path}:{line_no}: not valid JSON; each line must be one object") from None
        for column in (query_column, positive_column):
            if not isinstance(row, dict) or not isinstance(row.get(column), str) or not row[column].strip():
                raise EmbedtrainError(f"{path}:{line_no}: no text in column '{column}'; fix the row or pass "
                                      "--query-column / --positive-column")
        queries.append(row[query_column])
        positives.append(row[positive_column])
    if len(queries) < 2:
        raise EmbedtrainError(f"--texts: {path} has {len(queries)} pairs; give at least 2")
    return queries, positives


def encode_texts(model, texts: list[str], role: str, batch_size: int):
    """Embeddings of ``texts`` from any loaded model that takes text (text, MoE, decoder, CLIP, VLM2Vec)."""
    if hasattr(model, "encode"):
        return model.encode(texts, role=role, batch_size=batch_size)
    if hasattr(model, "encode_items"):
        return model.encode_items(texts=texts, role=role, batch_size=batch_size)
    raise EmbedtrainError(f"{type(model).__name__}: this model embeds images only; inspect needs a model that embeds text")


def inspect_model(model_path: str, texts_path: str, query_column: str = "query", positive_column: str = "positive",
                  batch_size: int = 64, max_rows: Optional[int] = None) -> dict:
    """Diagnostics of the model in ``model_path`` on the texts (or pairs) of ``texts_path``."""
    import torch

    from embedtrain.eval.diagnostics import diagnose
    from embedtrain.models.loading import load_model

    texts, positives = read_texts(texts_path, query_column, positive_column, max_rows)
    model = load_model(model_path)
    if positives is None:
        values = diagnose(encode_texts(model, texts, "document", batch_size))
    else:
        q = encode_texts(model, texts, "query", batch_size)
        p = encode_texts(model, positives, "document", batch_size)
        values = diagnose(torch.cat([q, p]), q, p)
    return {"model": str(model_path), "texts": str(texts_path), "pairs" if positives else "rows": len(texts), **values}
