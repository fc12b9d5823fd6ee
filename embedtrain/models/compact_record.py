"""compact_embeddings.json in a saved model: the prefixes and precisions it was trained for (loss.compact).

``SentenceTransformer(path, truncate_dim=d)`` serves a prefix; sentence-transformers' ``quantize_embeddings``
a precision ('binary' is its 'ubinary': packed bits, 1 where the value is positive). A model trained with
``binary_rotation: random`` also holds binary_rotations.safetensors: the binary code of a prefix e (unit length) is
then ``quantize_embeddings(e @ R, "ubinary")`` with R its rotation (key: the prefix length).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

from embedtrain.errors import EmbedtrainError

if TYPE_CHECKING:
    import numpy as np
    import torch

RECORD_FILE = "compact_embeddings.json"
ROTATIONS_FILE = "binary_rotations.safetensors"


def write_record(model_dir: str | Path, dims: Sequence[int], precisions: Sequence[str], normalize: bool,
                 rescore_top_k: int, center: bool = False, basis: str = "identity",
                 binary_rotations: Optional[Mapping[int, "torch.Tensor"]] = None) -> None:
    if binary_rotations:
        from safetensors.torch import save_file

        save_file({str(d): r.detach().float().cpu().contiguous() for d, r in binary_rotations.items()},
                  str(Path(model_dir) / ROTATIONS_FILE))
    record = {
        "dims": list(dims),
        "precisions": list(precisions),
        "normalize": normalize,
        "rescore_top_k": rescore_top_k,
        "center": center,
        "basis": basis,
        "binary_rotation": "random" if binary_rotations else "none",
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


def read_binary_rotations(model_dir: str | Path) -> Optional[dict[int, "np.ndarray"]]:
    """{prefix length: rotation (d, d), float32} of a model whose record names a ``binary_rotation``, else None.
    A record that names rotations the folder lacks, or a rotation of the wrong shape, is an error."""
    record = read_record(model_dir)
    if record is None or record.get("binary_rotation", "none") == "none":
        return None
    path = Path(model_dir) / ROTATIONS_FILE
    if not path.is_file():
        raise EmbedtrainError(f"{Path(model_dir) / RECORD_FILE}: binary_rotation is {record['binary_rotation']!r} but "
                              f"{ROTATIONS_FILE} is missing; copy the whole model folder")
    from safetensors.numpy import load_file

    try:
        rotations = {int(k): v for k, v in load_file(str(path)).items()}
    except Exception as err:  # a damaged file or a key that is not a prefix length
        raise EmbedtrainError(f"{path}: cannot be read ({err.__class__.__name__}); copy the model folder again") from None
    for d, r in rotations.items():
        if r.shape != (d, d):
            raise EmbedtrainError(f"{path}: the rotation of prefix {d} has shape {r.shape}, not ({d}, {d})")
    missing = [d for d in record["dims"] if d not in rotations]
    if missing:
        raise EmbedtrainError(f"{path}: no rotation for the prefixes {missing} the record lists; copy the model "
                              "folder again")
    return rotations
