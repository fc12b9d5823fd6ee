"""compact_embeddings.json in a saved model: the prefixes and precisions it was trained for (loss.compact).

``SentenceTransformer(path, truncate_dim=d)`` serves a prefix; sentence-transformers' ``quantize_embeddings``
a precision ('binary' is its 'ubinary': packed bits, 1 where the value is positive).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from embedtrain.errors import EmbedtrainError

RECORD_FILE = "compact_embeddings.json"


def write_record(model_dir: str | Path, dims: Sequence[int], precisions: Sequence[str], normalize: bool,
                 rescore_top_k: int, center: bool = False) -> None:
    record = {
        "dims": list(dims),
        "precisions": list(precisions),
        "normalize": normalize,
        "rescore_top_k": rescore_top_k,
        "center": center,
        "sentence_transformers_precision": {p: ("ubinary" if p == "binary" else p) for p in precisions},
    }
    (Path(model_dir) / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def read_record(model_dir: str | Path) -> Optional[dict]:
    """The record of a saved model, or None when it was trained without loss.compact."""
    path = Path(model_dir) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise EmbedtrainError(f"{path}: not valid JSON; re-save the model or delete the file") from None
    if not isinstance(record, dict) or not isinstance(record.get("dims"), list) or not isinstance(record.get("precisions"), list):
        raise EmbedtrainError(f"{path}: needs 'dims' and 'precisions' lists; re-save the model or delete the file")
    return record
