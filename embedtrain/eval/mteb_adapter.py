"""An embedtrain :class:`~embedtrain.models.TextEncoder` as an mteb 2.x encoder.

This module and its siblings ``local_tasks`` and ``mteb_run`` are the only places that import mteb.
:class:`MtebEncoder` implements mteb's ``EncoderProtocol``: ``encode`` receives a dataloader of text
batches plus the task's metadata and ``prompt_type``, and embeds the texts the way the model was
trained (query or document role, with that role's prompt and token limit).

Prompts, most specific first:

1. ``task_prompts[task_name][role]`` (a per-task mapping given by the caller);
2. ``instruction_for(task_metadata, prompt_type)`` when it returns a string (the hook for
   instruction-style prompts such as ``"Instruct: {task}\\nQuery: "``);
3. the prompt saved with the model for that role.

Tasks without a query/document distinction (classification, clustering, STS, ...) call ``encode``
with ``prompt_type=None``; they are embedded in ``symmetric_role`` ("query" by default, as
instruction-tuned models put the instruction on both sides of a symmetric task).

mteb caches results by model name and revision and reuses them without looking at the weights, so
the revision defaults to a content hash of the weights and of the settings that change the vectors
(:func:`content_revision`); every checkpoint gets its own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

import numpy as np

from embedtrain.errors import EmbedtrainError

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.models.model_meta import ModelMeta
    from mteb.types import Array, BatchedInput, PromptType
    from torch.utils.data import DataLoader

    from embedtrain.models.encoder import TextEncoder

Role = Literal["query", "document"]
InstructionFn = Callable[["TaskMetadata", Optional["PromptType"]], Optional[str]]
"""``(task_metadata, prompt_type) -> prefix or None``; None falls back to the model's saved prompt."""

REVISION_LENGTH = 12
"""Hex digits of sha256 kept in a revision."""

_CHUNK = 1 << 24  # bytes read at a time while hashing weight files


def _weight_files(folder: Path) -> list[Path]:
    """Weight files of a model folder: the root and each sentence-transformers module folder.

    safetensors files are preferred; ``.bin`` files count only where a folder has no safetensors.
    """
    folders = [folder]
    modules = folder / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text(encoding="utf-8"))
        except ValueError:
            entries = []
        folders += [folder / e["path"] for e in entries if isinstance(e, dict) and e.get("path")]
    files: list[Path] = []
    for sub in folders:
        found = sorted(sub.glob("*.safetensors")) or sorted(sub.glob("*.bin"))
        files += [f for f in found if f not in files]
    return files


def _hash_files(files: list[Path], folder: Path, digest: Any) -> None:
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode())
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)


def _hash_tensors(encoder: TextEncoder, digest: Any) -> None:
    import torch

    for name, tensor in sorted(encoder.backbone.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())


def encoder_settings(encoder: TextEncoder) -> dict[str, Any]:
    """The settings besides the weights that decide what ``encoder.encode`` returns."""
    return {
        "pooling": encoder.pooling,
        "normalize": encoder.normalize,
        "query_max_length": encoder.query_max_length,
        "document_max_length": encoder.document_max_length,
        "prompts": dict(encoder.prompts),
    }


def content_revision(encoder: TextEncoder, folder: str | Path | None = None) -> str:
    """A stable revision for ``encoder``: the first 12 hex digits of a sha256.

    The hash covers the weight files of ``folder`` when it is a local model folder that has them
    (else the backbone's tensors in memory) and :func:`encoder_settings`, so a new checkpoint or an
    edited prompt gives a new revision while reloading the same folder gives the same one.
    """
    digest = hashlib.sha256()
    local = Path(folder) if folder is not None else None
    files = _weight_files(local) if local is not None and local.is_dir() else []
    if files:
        _hash_files(files, local, digest)
    else:
        _hash_tensors(encoder, digest)
    digest.update(json.dumps(encoder_settings(encoder), sort_keys=True).encode())
    return digest.hexdigest()[:REVISION_LENGTH]


def default_model_name(name_or_path: str) -> str:
    """The mteb model name ('organization/model') for a model folder or Hub id.

    A Hub id stays as it is (``hub/<id>`` when it has no organization); a local folder becomes
    ``local/<parent>--<folder>``.
    """
    from embedtrain.config import looks_local, resolve_path

    if not looks_local(name_or_path):
        return name_or_path if "/" in name_or_path else f"hub/{name_or_path}"
    path = Path(resolve_path(name_or_path)).resolve()
    parts = [p for p in (path.parent.name, path.name) if p]
    return "local/" + "--".join(parts or ["model"])


class MtebEncoder:
    """mteb ``EncoderProtocol`` around an embedtrain ``TextEncoder``.

    Args:
        encoder: the model.
        name: model name in mteb's 'organization/model' form (results are cached under it).
        revision: results are cached per revision; defaults to :func:`content_revision`.
        source: where the model was loaded from (a local folder is hashed for the revision).
        task_prompts: ``{task_name: {"query": ..., "document": ...}}`` overriding the saved prompts
            for those tasks; a missing role keeps the saved prompt.
        instruction_for: optional hook returning the prefix for a task and prompt type, or None.
        symmetric_role: role for tasks that do not tell queries from documents.
        experiment: a name for a non-default prompt set (task_prompts / instruction_for); results
            are then cached in their own experiment folder. Derived from the settings when omitted.
    """

    def __init__(
        self,
        encoder: TextEncoder,
        *,
        name: str = "local/model",
        revision: str | None = None,
        source: str | Path | None = None,
        task_prompts: Mapping[str, Mapping[str, str]] | None = None,
        instruction_for: InstructionFn | None = None,
        symmetric_role: Role = "query",
        experiment: str | None = None,
    ) -> None:
        if symmetric_role not in ("query", "document"):
            raise EmbedtrainError(f"symmetric_role: {symmetric_role!r} is not 'query' or 'document'")
        for task, prompts in (task_prompts or {}).items():
            unknown = set(prompts) - {"query", "document"}
            if unknown:
                raise EmbedtrainError(
                    f"task_prompts[{task!r}]: unknown key(s) {', '.join(sorted(unknown))}; use 'query' and 'document'"
                )
        self.encoder = encoder
        self.task_prompts = {t: dict(p) for t, p in (task_prompts or {}).items()}
        self.instruction_for = instruction_for
        self.symmetric_role: Role = symmetric_role
        self.mteb_model_meta = self._model_meta(
            name, revision or content_revision(encoder, source), experiment or self._experiment_name()
        )

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, name: str | None = None, **kwargs: Any) -> MtebEncoder:
        """Load a model folder, ``pkg://`` path or Hub id with ``load_text_encoder`` and wrap it."""
        from embedtrain.config import resolve_path
        from embedtrain.models import load_text_encoder

        encoder = load_text_encoder(name_or_path)
        return cls(
            encoder,
            name=name or default_model_name(name_or_path),
            source=resolve_path(name_or_path),
            **kwargs,
        )

    # -- metadata ---------------------------------------------------------------------------
    def _experiment_name(self) -> str | None:
        """A short stable name for non-default prompts (None when the saved prompts apply)."""
        if not self.task_prompts and self.instruction_for is None and self.symmetric_role == "query":
            return None
        hook = self.instruction_for
        spec = {
            "task_prompts": self.task_prompts,
            "instruction_for": None if hook is None else f"{hook.__module__}.{getattr(hook, '__qualname__', hook)}",
            "symmetric_role": self.symmetric_role,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:REVISION_LENGTH]

    def _model_meta(self, name: str, revision: str, experiment: str | None) -> ModelMeta:
        from mteb.models.model_meta import ModelMeta

        encoder = self.encoder
        params = list(encoder.backbone.parameters())
        n_parameters = sum(p.numel() for p in params)
        embeddings = encoder.backbone.get_input_embeddings()
        uses_prompts = bool(
            any(encoder.prompts.values()) or self.task_prompts or self.instruction_for is not None
        )
        try:
            return ModelMeta(
                loader=None,
                name=name,
                revision=revision,
                release_date=None,
                languages=None,
                n_parameters=n_parameters,
                n_embedding_parameters=embeddings.weight.numel() if embeddings is not None else None,
                memory_usage_mb=round(sum(p.numel() * p.element_size() for p in params) / 2**20, 1),
                max_tokens=max(encoder.query_max_length, encoder.document_max_length),
                embed_dim=encoder.embedding_dim,
                license=None,
                open_weights=None,
                public_training_code=None,
                public_training_data=None,
                framework=["Sentence Transformers", "PyTorch"],
                similarity_fn_name="cosine",
                use_instructions=uses_prompts,
                training_datasets=None,
                modalities=["text"],
                model_type=["dense"],
                experiment_kwargs={"prompts": experiment} if experiment else None,
            )
        except ValueError as err:
            raise EmbedtrainError(f"model name {name!r}: {str(err).splitlines()[-1].strip()}") from None

    # -- prompts ----------------------------------------------------------------------------
    def role_for(self, prompt_type: PromptType | None) -> Role:
        """'query' or 'document' for mteb's prompt type (None: ``symmetric_role``)."""
        if prompt_type is None:
            return self.symmetric_role
        return "query" if getattr(prompt_type, "value", prompt_type) == "query" else "document"

    def prompt_for(self, task_metadata: TaskMetadata, prompt_type: PromptType | None) -> str:
        """The text prepended to every input of this task and prompt type."""
        role = self.role_for(prompt_type)
        task_specific = self.task_prompts.get(task_metadata.name, {})
        if role in task_specific:
            return task_specific[role]
        if self.instruction_for is not None:
            instruction = self.instruction_for(task_metadata, prompt_type)
            if instruction is not None:
                return instruction
        return self.encoder.prompts.get(role, "")

    # -- EncoderProtocol --------------------------------------------------------------------
    def encode(
        self,
        inputs: DataLoader[BatchedInput],
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> Array:
        """Embed every text of ``inputs`` (float32, shape (n, dim), in input order).

        All texts are gathered first so that ``TextEncoder.encode`` batches them by length.
        ``batch_size`` and ``show_progress_bar`` come from mteb's encode kwargs.
        """
        texts: list[str] = []
        for batch in inputs:
            if "text" not in batch:
                raise EmbedtrainError(
                    f"task {task_metadata.name}: inputs have no text ({', '.join(batch)}); embedtrain encoders read text only"
                )
            texts.extend(batch["text"])
        role = self.role_for(prompt_type)
        embeddings = self.encoder.encode(
            texts,
            role=role,
            prompt=self.prompt_for(task_metadata, prompt_type),
            batch_size=int(kwargs.get("batch_size") or 128),
            show_progress=bool(kwargs.get("show_progress_bar", False)),
            desc=f"{task_metadata.name} {hf_split}/{hf_subset} {'queries' if role == 'query' else 'documents'}",
        )
        return embeddings.numpy().astype(np.float32, copy=False)

    def similarity(self, embeddings1: Array, embeddings2: Array) -> Array:
        """Cosine similarity of every pair (matrix), as the model was trained."""
        from mteb.similarity_functions import cos_sim

        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1: Array, embeddings2: Array) -> Array:
        """Cosine similarity of row i with row i."""
        from mteb.similarity_functions import pairwise_cos_sim

        return pairwise_cos_sim(embeddings1, embeddings2)
