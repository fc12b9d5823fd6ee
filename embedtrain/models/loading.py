"""Loading a saved model of any kind: :func:`load_model` asks :func:`detect_model_kind` what a folder holds
and calls that kind's loader.

- ``text``: :func:`~embedtrain.models.encoder.load_sentence_transformers_encoder` (``TextEncoder.load``) → ``TextEncoder``
- ``moe``: :func:`~embedtrain.models.moe.load_moe_encoder` (``MoETextEncoder.load``) → ``MoETextEncoder``
- ``decoder``: :func:`~embedtrain.models.decoder.load_decoder_encoder` → ``DecoderEncoder``
- ``clip``: :func:`~embedtrain.models.clip.load_clip_encoder` → ``ClipEncoder``
- ``vlm2vec``: :func:`~embedtrain.models.vlm.load_vlm_encoder` → ``VlmEncoder``
- ``dml``: :func:`~embedtrain.models.semantic_proxies.load_dml_encoder` → ``PromptedViT`` (images only)

:func:`load_text_encoder` does the same for the three text kinds and also takes what is not a saved folder
(a Hub id, a plain transformers checkpoint), as the trainer's ``model.name_or_path`` does.

This module is the top of the package: it imports each loader when it is called, and nothing in
``embedtrain.models`` imports it.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Union

from embedtrain.errors import EmbedtrainError
from embedtrain.models.folders import (
    CLIP,
    DECODER,
    DML,
    MODEL_KINDS,
    MOE,
    TEXT,
    VLM2VEC,
    detect_model_kind,
    find_model_kind,
)

__all__ = ["MODEL_KINDS", "detect_model_kind", "find_model_kind", "load_model", "load_text_encoder"]


def load_model(path: Union[str, os.PathLike], **options: Any):
    """The model saved in folder ``path`` (or ``pkg://module/dir``), whatever its kind, ready to encode.

    ``options`` go to the kind's loader (listed in this module's docstring), e.g. ``pooling`` or
    ``max_length`` for text encoders; an option the loader does not take is an error. A VLM2Vec folder
    loads without LoRA adapters (``finetune='full'``) unless ``finetune`` is given.
    """
    from embedtrain.config import resolve_path

    folder = resolve_path(os.fspath(path))
    kind = detect_model_kind(folder)
    loader = _loader(kind)
    allowed = list(inspect.signature(loader).parameters)[1:]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise EmbedtrainError(
            f"{folder}: {', '.join(map(repr, unknown))} is not an option for {MODEL_KINDS[kind]}; "
            f"allowed: {', '.join(allowed) or 'none'}"
        )
    if kind == VLM2VEC:
        options = {"finetune": "full", **options}
    return loader(folder, **options)


def _loader(kind: str) -> Callable:
    """The function that loads folders of ``kind``; the model modules are imported only now (each pulls in
    its own libraries: torch, sentence-transformers, open_clip, transformers' vision models)."""
    from embedtrain.models import clip, decoder, encoder, moe, semantic_proxies, vlm

    loaders = {TEXT: encoder.load_sentence_transformers_encoder, MOE: moe.load_moe_encoder,
               DECODER: decoder.load_decoder_encoder, CLIP: clip.load_clip_encoder, VLM2VEC: vlm.load_vlm_encoder,
               DML: semantic_proxies.load_dml_encoder}
    return loaders[kind]


def load_text_encoder(name_or_path: str, **settings: Any):
    """A text encoder from a saved folder (text, MoE or decoder kind), a transformers folder or a Hub id.

    Returns a :class:`~embedtrain.models.encoder.TextEncoder` (a ``MoETextEncoder`` or ``DecoderEncoder``
    for those folders). ``settings`` (``pooling``, ``max_length``, ``query_prompt``, ...) are those of
    :meth:`~embedtrain.models.encoder.TextEncoder.load`; those left as None come from the folder (its
    ``embedtrain.json`` or sentence-transformers config), then from defaults (mean pooling, normalised, 256
    tokens). A folder of another kind (CLIP, VLM2Vec, metric learning) is an error: load it with
    :func:`load_model`.
    """
    from embedtrain.config import resolve_path

    path = resolve_path(name_or_path)
    kind = find_model_kind(path) or TEXT  # not a saved folder: a Hub id or a plain checkpoint
    if kind in (TEXT, MOE, DECODER):
        return _loader(kind)(name_or_path, **settings)
    raise EmbedtrainError(
        f"model '{name_or_path}': {path} holds {MODEL_KINDS[kind]}, not a text encoder; "
        "load it with embedtrain.load(path)"
    )
