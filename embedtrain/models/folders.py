"""Saved model folders on disk: the files that mark each kind, strict reading of embedtrain's metadata,
and the one place that tells the kinds apart (:func:`detect_model_kind`).

Every saver in this package writes one of these layouts (kind: written by; marked by):

- ``text``: :meth:`TextEncoder.save <embedtrain.models.encoder.TextEncoder.save>`; ``modules.json``.
- ``moe``: the same save of a :class:`~embedtrain.models.moe.MoETextEncoder`; ``modules.json`` whose first
  module is ``embedtrain.models.moe.MoETransformer``.
- ``decoder``: :meth:`DecoderEncoder.save <embedtrain.models.decoder.DecoderEncoder.save>`; ``embedtrain.json``
  with ``"backbone": "bidirectional_decoder"`` (and ``modules.json``).
- ``clip``: :meth:`ClipEncoder.save <embedtrain.models.clip.ClipEncoder.save>`; ``open_clip_config.json``
  (``embedtrain.json`` says ``"kind": "clip"``).
- ``vlm2vec``: :meth:`VlmEncoder.save <embedtrain.models.vlm.VlmEncoder.save>`; ``embedtrain.json`` with
  ``"kind": "vlm2vec"`` (and ``modules.json``).
- ``dml``: :func:`~embedtrain.models.semantic_proxies.save_dml_model`; ``dml_config.json`` with
  ``"format": "embedtrain-dml"``.

A plain sentence-transformers folder has no ``embedtrain.json`` and is a ``text`` folder; an open_clip
folder written by open_clip itself is a ``clip`` folder. A folder whose metadata cannot be read is
damaged and raises :class:`EmbedtrainError` naming the file; it is never read as "no metadata".

The savers and loaders of every kind use these helpers; nothing here imports another module of this package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

from embedtrain.errors import EmbedtrainError

PathLike = Union[str, os.PathLike]

METADATA_FILE = "embedtrain.json"
"""embedtrain's own settings of a saved model (pooling, prompts, ...), beside the library's files."""
INSTRUCTIONS_FILE = "instructions.json"
"""The instruction per evaluation task (``{task name: instruction}``) a model is evaluated with; decoder folders
(NV-Embed) have one."""
MODULES_FILE = "modules.json"
"""sentence-transformers' list of modules."""
MOE_MODULE_TYPE = "embedtrain.models.moe.MoETransformer"
"""The ``type`` of the first module in ``modules.json`` of a saved MoE model."""
DECODER_BACKBONE = "bidirectional_decoder"
"""``embedtrain.json``'s ``backbone`` value in folders of bidirectional decoders (NV-Embed)."""
CLIP_CONFIG_FILE = "open_clip_config.json"
CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"
DML_CONFIG_FILE = "dml_config.json"
DML_FORMAT = "embedtrain-dml"
"""``dml_config.json``'s ``format`` value."""

TEXT, MOE, DECODER, CLIP, VLM2VEC, DML = "text", "moe", "decoder", "clip", "vlm2vec", "dml"
MODEL_KINDS = {
    TEXT: f"a sentence-transformers text encoder ({MODULES_FILE})",
    MOE: f"a Mixture-of-Experts text encoder ({MODULES_FILE} starting with MoETransformer)",
    DECODER: f"a bidirectional decoder text encoder ({METADATA_FILE} backbone '{DECODER_BACKBONE}')",
    CLIP: f"a CLIP model in open_clip's layout ({CLIP_CONFIG_FILE})",
    VLM2VEC: f"a VLM2Vec vision-language encoder ({METADATA_FILE} kind '{VLM2VEC}')",
    DML: f"a metric-learning image encoder ({DML_CONFIG_FILE})",
}
"""Every kind of saved folder, with what marks it."""

# the kinds that embedtrain.json names itself ("kind" key); the others are known by their library files
_METADATA_KINDS = (CLIP, VLM2VEC)
DAMAGED = "the model folder is damaged, re-save or re-train it"


# -- reading and writing ----------------------------------------------------------------------


def read_json(path: PathLike) -> Any:
    """The JSON value in ``path``; a missing, unreadable or malformed file raises :class:`EmbedtrainError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EmbedtrainError(f"{path}: not found; {DAMAGED}") from None
    except UnicodeDecodeError:
        raise EmbedtrainError(f"{path}: not UTF-8 text; {DAMAGED}") from None
    except OSError as err:
        raise EmbedtrainError(f"{path}: cannot be read ({err.strerror or type(err).__name__}); check its permissions") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise EmbedtrainError(f"{path}: not valid JSON (line {err.lineno}); {DAMAGED}") from None


def read_json_object(path: PathLike) -> dict:
    """As :func:`read_json`, and the value must be a JSON object."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise EmbedtrainError(f"{path}: holds a JSON {_json_type(value)}, not an object; {DAMAGED}")
    return value


def write_json(path: PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON (the layout every embedtrain metadata file has)."""
    Path(path).write_text(json.dumps(data, indent=2), encoding="utf-8")


def read_metadata(folder: PathLike) -> dict:
    """The folder's ``embedtrain.json``; ``{}`` when it has none (a plain sentence-transformers or open_clip
    folder). A file that is there but is not a JSON object raises :class:`EmbedtrainError`."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        return {}
    return read_json_object(path)


def write_metadata(folder: PathLike, metadata: dict) -> None:
    """Write ``embedtrain.json`` into ``folder``."""
    write_json(Path(folder) / METADATA_FILE, metadata)


def read_instructions(folder: PathLike) -> Optional[dict[str, str]]:
    """The folder's ``instructions.json`` (task name -> instruction); None when it has none. A file that is not
    an object of strings raises :class:`EmbedtrainError`."""
    path = Path(folder) / INSTRUCTIONS_FILE
    if not path.is_file():
        return None
    table = read_json_object(path)
    bad = [k for k, v in table.items() if not isinstance(v, str)]
    if bad:
        raise EmbedtrainError(f"{path}: the instruction of {bad[0]!r} is not a string; {DAMAGED}")
    return table


def write_instructions(folder: PathLike, instructions: dict[str, str]) -> None:
    """Write ``instructions.json`` (task name -> instruction) into ``folder``."""
    write_json(Path(folder) / INSTRUCTIONS_FILE, dict(instructions))


def read_modules(folder: PathLike) -> Optional[list[dict]]:
    """The entries of the folder's ``modules.json`` (each with ``type`` and ``path``); None when it has none."""
    path = Path(folder) / MODULES_FILE
    if not path.is_file():
        return None
    entries = read_json(path)
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("type"), str) for e in entries):
        raise EmbedtrainError(f"{path}: not a list of sentence-transformers modules (each with a 'type'); {DAMAGED}")
    return entries


def _json_type(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


# -- telling the kinds apart -----------------------------------------------------------------


def find_model_kind(path: PathLike) -> Optional[str]:
    """The kind of saved model in folder ``path`` (a key of :data:`MODEL_KINDS`), or None when ``path`` is
    no folder or carries no mark of one (a Hub id, a plain transformers checkpoint, any other folder).

    A folder whose marks are damaged or contradict each other raises :class:`EmbedtrainError`.
    """
    folder = Path(path)
    if not folder.is_dir():
        return None
    metadata = read_metadata(folder)
    kind = metadata.get("kind")
    if metadata.get("backbone") == DECODER_BACKBONE:
        kind = DECODER
    elif kind is not None and kind not in _METADATA_KINDS:
        raise EmbedtrainError(
            f"{folder / METADATA_FILE}: kind {kind!r} is not one embedtrain knows ({', '.join(_METADATA_KINDS)}); "
            "the folder was saved by a newer embedtrain, or it is damaged"
        )
    modules = read_modules(folder)
    if kind == CLIP:
        _require(folder, CLIP_CONFIG_FILE, kind)
        return CLIP
    if kind in (DECODER, VLM2VEC):
        _require(folder, MODULES_FILE, kind)
        return kind
    if modules is not None:
        return MOE if modules and modules[0]["type"] == MOE_MODULE_TYPE else TEXT
    if (folder / CLIP_CONFIG_FILE).is_file():
        return CLIP
    if (folder / DML_CONFIG_FILE).is_file():
        config_path = folder / DML_CONFIG_FILE
        found = read_json_object(config_path).get("format")
        if found != DML_FORMAT:
            raise EmbedtrainError(f"{config_path}: format {found!r} is not {DML_FORMAT!r}; {DAMAGED}")
        return DML
    return None


def detect_model_kind(path: PathLike) -> str:
    """The kind of saved model in folder ``path`` (a key of :data:`MODEL_KINDS`).

    Raises :class:`EmbedtrainError` (one line naming the folder and what was expected) when ``path`` is not
    a folder, is not a saved model, or is damaged.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise EmbedtrainError(f"{folder}: model folder not found; give the folder a run saved, e.g. <output.dir>/model")
    kind = find_model_kind(folder)
    if kind is None:
        raise EmbedtrainError(
            f"{folder}: not a sentence-transformers model folder (no {MODULES_FILE}), nor an open_clip folder "
            f"(no {CLIP_CONFIG_FILE}) or a metric-learning folder (no {DML_CONFIG_FILE}); give the folder a run "
            "saved, e.g. <output.dir>/model"
        )
    return kind


def _require(folder: Path, name: str, kind: str) -> None:
    if not (folder / name).is_file():
        raise EmbedtrainError(f"{folder}: {METADATA_FILE} says kind '{kind}' but {name} is missing; {DAMAGED}")


def load_failure(name_or_path: str, err: Exception) -> EmbedtrainError:
    """The one-line error for a model that transformers could not load (first line of its message)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
    return EmbedtrainError(
        f"model '{name_or_path}': cannot be loaded ({first[:200]}); give a local model folder, "
        "or a Hub id while the Hub is reachable"
    )
