"""What a saved model folder says about itself, for its model card: the card of a folder pushed without one,
and the folder facts that a run's card (:mod:`embedtrain.hub.run_card`) adds to the recipe's.

Only the text kinds (``text``, ``moe``, ``decoder``) get a generated card: the card template shows how to
use a sentence-transformers text encoder. A generated card has no evaluation results and no training
details, because a folder does not record them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from embedtrain.hub.model_card import ModelCardData
from embedtrain.models.folders import (
    DECODER,
    MOE,
    TEXT,
    find_model_kind,
    read_instructions,
    read_json_object,
    read_metadata,
    read_modules,
)

CARD_KINDS = (TEXT, MOE, DECODER)
"""Kinds of saved folders whose model card :func:`card_for_folder` can write."""


def card_for_folder(model_dir: str | Path, repo_id: str) -> ModelCardData:
    """Card data for a saved text-encoder folder from its own files (no results, no recipe)."""
    meta = read_metadata(model_dir)
    lengths = [n for n in (meta.get("query_max_length"), meta.get("document_max_length")) if n]
    return ModelCardData(
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        summary=moe_summary(model_dir),
        embedding_dim=embedding_dim(model_dir),
        max_length=max(lengths) if lengths else None,
        pooling=meta.get("pooling"),
        normalize=meta.get("normalize"),
        prompts={k: v for k, v in (meta.get("prompts") or {}).items() if v},
        custom_modules=has_custom_modules(model_dir),
        instructions=read_instructions(model_dir) or {},
        lora=lora_record(model_dir),
    )


def lora_record(model_dir: str | Path) -> Optional[dict]:
    """The LoRA adapter a folder was trained with (``r``, ``alpha``, ``target_modules``, its subfolder), or None."""
    sub = read_metadata(model_dir).get("lora_adapter")
    config = Path(model_dir) / str(sub) / "adapter_config.json" if sub else None
    if config is None or not config.is_file():
        return None
    cfg = read_json_object(config)
    return {"r": cfg.get("r"), "alpha": cfg.get("lora_alpha"), "target_modules": sorted(cfg.get("target_modules") or []),
            "folder": sub}


def has_custom_modules(model_dir: str | Path) -> bool:
    """Whether modules.json names a module class outside sentence-transformers."""
    modules = read_modules(model_dir) or []
    return any(not m["type"].startswith("sentence_transformers.") for m in modules)


def embedding_dim(model_dir: str | Path) -> Optional[int]:
    """The output size recorded by sentence-transformers' Pooling module, if the folder has one."""
    pooling = Path(model_dir) / "1_Pooling" / "config.json"
    if pooling.is_file():
        cfg = read_json_object(pooling)
        return cfg.get("embedding_dimension") or cfg.get("word_embedding_dimension")
    return None


def moe_summary(model_dir: str | Path) -> Optional[str]:
    """For a Mixture-of-Experts model: how to load and route it (None otherwise: the default summary)."""
    if find_model_kind(model_dir) != MOE:
        return None
    config = read_json_object(Path(model_dir) / "sentence_bert_config.json")
    moe = config.get("moe", {})
    domains = moe.get("domains", [])
    return (
        "A Mixture-of-Experts text embedding model trained with embedtrain: the feed-forward blocks of layers "
        f"{', '.join(map(str, moe.get('layers', [])))} have one expert per domain ({', '.join(domains)}). "
        "Its first module is embedtrain's `MoETransformer`, so it loads with "
        "`SentenceTransformer(path, trust_remote_code=True)` with `embedtrain` installed (the class comes from the "
        f"installed package, not from this folder). Pass `domain=\"{(domains or ['...'])[0]}\"` to `encode` to choose "
        "the expert" + ("; without it the model's router picks one." if moe.get("router") else ".")
    )
