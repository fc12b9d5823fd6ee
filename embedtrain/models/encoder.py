"""A Hugging Face text encoder + pooling + optional L2 normalisation.

The model is held inside a ``SentenceTransformer`` so that saving writes a folder that
``SentenceTransformer(path)`` loads and that reproduces :meth:`TextEncoder.encode` exactly. Training
calls the transformers backbone directly on pre-tokenized tensors (no sentence-transformers code on
the hot path).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from embedtrain.errors import EmbedtrainError
from embedtrain.models.checkpointing import checkpoint_activations
from embedtrain.models.folders import MODULES_FILE, load_failure, read_metadata, read_modules, write_metadata
from embedtrain.models.lora import ADAPTER_DIR, apply_lora, is_peft_model, saved_merged
from embedtrain.models.pooling import POOLERS, SENTENCE_TRANSFORMERS_MODE

__all__ = ["TextEncoder", "load_failure", "load_sentence_transformers_encoder", "set_modules", "token_limits"]


class TextEncoder(nn.Module):
    """Texts → embeddings of shape (batch, dim).

    Args:
        sentence_transformer: the container holding tokenizer and backbone (module 0 must be
            sentence-transformers' ``Transformer``).
        pooling: a name in :data:`embedtrain.models.pooling.POOLERS`.
        normalize: L2-normalise the pooled vectors.
        query_max_length / document_max_length: token limits per role.
        query_prompt / document_prompt: text prepended before tokenization by :meth:`encode`
            with ``role=...`` (saved into the folder as sentence-transformers prompts).
    """

    def __init__(
        self,
        sentence_transformer,
        pooling: str = "mean",
        normalize: bool = True,
        query_max_length: int = 256,
        document_max_length: int = 256,
        query_prompt: str = "",
        document_prompt: str = "",
    ):
        super().__init__()
        # Not registered as a submodule: the backbone below is the only owner of the weights, so
        # state dicts have one copy of each tensor.
        object.__setattr__(self, "_st", sentence_transformer)
        self.backbone = sentence_transformer[0].model
        self.tokenizer = sentence_transformer[0].tokenizer
        self.pooling = pooling
        self._pool = POOLERS.get(pooling)
        self.normalize = normalize
        self.query_max_length = query_max_length
        self.document_max_length = document_max_length
        self.prompts = {"query": query_prompt, "document": document_prompt}
        self.register_buffer("center", None)  # see set_center
        self.register_buffer("basis", None)

    # -- forward ---------------------------------------------------------------------------
    @property
    def embedding_dim(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        many: Optional[Sequence[dict[str, torch.Tensor]]] = None,
    ):
        """Embeddings (batch, dim) of one tokenized batch, or a list of them for ``many`` batches.

        ``many`` embeds several differently padded batches (queries, positives, negatives) in one
        call, so that under DistributedDataParallel one forward is followed by one backward.
        """
        if many is not None:
            return [self._embed(b["input_ids"], b["attention_mask"]) for b in many]
        return self._embed(input_ids, attention_mask)

    def _embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        emb = self._pool(hidden, attention_mask).float()  # a no-op for float32 weights; bfloat16 ones under LoRA
        emb = F.normalize(emb, dim=-1) if self.normalize else emb
        if self.center is not None:
            emb = emb - self.center.to(emb.dtype)
            if self.basis is not None:
                emb = emb @ self.basis.to(emb.dtype)
            emb = F.normalize(emb, dim=-1) if self.normalize else emb
        return emb

    def set_center(self, center: Optional[torch.Tensor], basis: Optional[torch.Tensor] = None) -> None:
        """From now on every embedding is ``e - center``, or ``(e - center) @ basis`` with a ``basis`` of shape (d, d)
        whose columns are orthonormal (a rotation: the full-size cosine is unchanged, the prefixes are not), then
        normalised again when the encoder normalises, in training and evaluation alike; None removes both.
        Buffers: checkpoints keep them, and :meth:`save` writes them as a sentence-transformers ``Dense`` layer
        (weight ``basis.T`` or the identity, bias ``-basis.T @ center``) and a ``Normalize``."""
        if center is None:
            if basis is not None:
                raise EmbedtrainError("a basis is applied to the centred embedding: give a centre with it")
            self.center = self.basis = None
            return
        d = self.embedding_dim
        center = torch.as_tensor(center, dtype=torch.float32).detach().reshape(-1)
        if center.numel() != d:
            raise EmbedtrainError(f"a centre of {center.numel()} values for a {d}-dimensional embedding")
        if basis is not None:
            basis = torch.as_tensor(basis, dtype=torch.float32).detach()
            if tuple(basis.shape) != (d, d):
                raise EmbedtrainError(f"a basis of shape {tuple(basis.shape)} for a {d}-dimensional embedding; "
                                      f"it must be ({d}, {d})")
            basis = basis.to(self.device).clone()
        self.center, self.basis = center.to(self.device).clone(), basis

    def freeze_unused_parameters(self) -> list[str]:
        """Stop training parameters that never influence the embedding (e.g. BERT's pooler head).

        Found with one probe forward/backward. Besides saving work, this is what lets
        DistributedDataParallel run without ``find_unused_parameters``: a parameter that never gets a
        gradient would otherwise hold back the gradient all-reduce of its whole bucket.
        """
        probe = self.tokenize(["probe text", "another probe"], "document")
        probe = {k: v.to(self.device) for k, v in probe.items()}
        was_training = self.training
        self.train()
        for p in self.parameters():
            p.grad = None
        self(**probe).sum().backward()
        frozen = []
        for name, p in self.named_parameters():
            if p.requires_grad and p.grad is None:
                p.requires_grad_(False)
                frozen.append(name)
            p.grad = None
        self.train(was_training)
        return frozen

    def max_length_for(self, role: str) -> int:
        return self.query_max_length if role == "query" else self.document_max_length

    def tokenize(self, texts: Sequence[str], role: str = "document") -> dict[str, torch.Tensor]:
        """Tokenize and pad to the longest text (never to max_length)."""
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length_for(role), return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str],
        role: str = "document",
        prompt: Optional[str] = None,
        batch_size: int = 128,
        show_progress: bool = False,
        desc: str = "encoding",
    ) -> torch.Tensor:
        """Embed ``texts`` (float32, on CPU, in input order).

        ``prompt`` defaults to the saved prompt of ``role`` ('query' or 'document'). Texts are
        batched in order of length so that little compute goes to padding.
        """
        prefix = self.prompts.get(role, "") if prompt is None else prompt

        def embed(idx: list[int]) -> torch.Tensor:
            return self._embed_texts([texts[i] for i in idx], role, prefix)

        return self._encode_in_batches(texts, embed, batch_size, show_progress, desc)

    def _embed_texts(self, texts: list[str], role: str, prompt: str) -> torch.Tensor:
        """Embeddings of one batch of ``texts``, each after ``prompt``."""
        enc = self.tokenize([prompt + t for t in texts], role)
        device = self.device
        return self(enc["input_ids"].to(device), enc["attention_mask"].to(device))

    def _encode_in_batches(
        self,
        texts: Sequence[str],
        embed: Callable[[list[int]], torch.Tensor],
        batch_size: int,
        show_progress: bool,
        desc: str,
    ) -> torch.Tensor:
        """``embed(indices)`` for batches of ``texts`` taken longest first (little compute goes to padding),
        in eval mode; the embeddings as float32 on CPU, in input order."""
        from tqdm.auto import tqdm

        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        was_training = self.training
        self.eval()
        out = torch.empty(len(texts), self.embedding_dim, dtype=torch.float32)
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc=desc, disable=None if show_progress else True, leave=False):
            idx = order[start : start + batch_size]
            out[idx] = embed(idx).float().cpu()
        self.train(was_training)
        return out

    # -- saving ----------------------------------------------------------------------------
    def sentence_transformer(self):
        """The sentence-transformers model configured to compute exactly what this encoder does."""
        from sentence_transformers.sentence_transformer.modules import Normalize

        st = self._st
        transformer = st[0]
        # max_length_for, not the settings: a subclass may keep tokens back (the MoE encoder's domain token)
        transformer.max_seq_length = max(self.max_length_for("query"), self.max_length_for("document"))
        transformer.query_length = self.max_length_for("query")
        transformer.document_length = self.max_length_for("document")
        modules = [transformer, self._pooling_module()] + ([Normalize()] if self.normalize else [])
        if self.center is not None:
            modules += [center_module(self.center, self.basis)] + ([Normalize()] if self.normalize else [])
        return set_modules(st, modules, self.prompts)

    def _pooling_module(self) -> nn.Module:
        """The sentence-transformers module that pools as this encoder does."""
        from sentence_transformers.sentence_transformer.modules import Pooling

        return Pooling(self.embedding_dim, pooling_mode=SENTENCE_TRANSFORMERS_MODE[self.pooling])

    def _metadata(self) -> dict:
        """embedtrain's own view of the model (``embedtrain.json``), for tools that want it without
        sentence-transformers."""
        return {
            "pooling": self.pooling,
            "normalize": self.normalize,
            "query_max_length": self.query_max_length,
            "document_max_length": self.document_max_length,
            "prompts": self.prompts,
            **({"center": True} if self.center is not None else {}),
            **({"basis": True} if self.basis is not None else {}),
            "lora_adapter": ADAPTER_DIR if is_peft_model(self.backbone) else None,
        }

    def save(self, path: str | os.PathLike, state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Write a sentence-transformers folder (safetensors weights) to ``path``.

        ``state_dict`` (this module's keys, ``backbone.*``) replaces the weights written: under FSDP or
        DeepSpeed ZeRO-3 each process holds only a shard, so the trainer gathers the full state dict
        (``Accelerator.get_state_dict``) and passes it here. The centre written is this module's own buffer
        (the trainer loads the gathered one into the module first, ``module_with_state``).
        """
        if state_dict is not None and is_peft_model(self.backbone):
            # the merged weights are computed from the module, so it takes the gathered copy first (under FSDP or
            # ZeRO-3 the trainer hands in an unsharded rebuild holding them already: Task.export)
            self.load_state_dict(state_dict)
            state_dict = None
        st = self.sentence_transformer()
        with saved_merged(st[0]):  # LoRA: merged weights (plain sentence-transformers folder) + adapter/
            st.save(str(path), safe_serialization=True)
        if state_dict is not None:
            backbone_sd = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
            missing = set(self.backbone.state_dict()) - set(backbone_sd)
            if missing:
                raise EmbedtrainError(
                    f"saving {path}: the gathered state dict lacks {len(missing)} backbone weights "
                    f"(e.g. {sorted(missing)[0]}); save from every process with the full state dict"
                )
            # the transformer module's folder, as sentence-transformers wrote it (the root for module 0)
            module_dir = Path(path) / read_modules(path)[0]["path"]
            self.backbone.save_pretrained(str(module_dir), state_dict=backbone_sd, safe_serialization=True)
        write_metadata(path, self._metadata())


    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        name_or_path: str,
        pooling: Optional[str] = None,
        normalize: Optional[bool] = None,
        max_length: Optional[int] = None,
        query_max_length: Optional[int] = None,
        document_max_length: Optional[int] = None,
        query_prompt: Optional[str] = None,
        document_prompt: Optional[str] = None,
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
        revision: Optional[str] = None,
        gradient_checkpointing: bool = False,
        lora: Optional[dict] = None,
        dtype: str = "float32",
    ):
        """A saved folder (or, for :class:`TextEncoder`, a transformers folder or a Hub id) as an encoder of this class.

        Each setting left as None comes from the folder's ``embedtrain.json``, then from the model's own
        sentence-transformers modules and prompts, then from the defaults (mean pooling, normalised, 256 tokens).
        ``lora``: ``r``, ``alpha``, ``dropout``, ``target_modules`` to add fresh adapters (:meth:`add_lora`).
        ``dtype``: the precision the weights load in (``bfloat16`` suits weights LoRA freezes; embeddings are float32).
        """
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

        from embedtrain.config import resolve_path

        path = resolve_path(name_or_path)
        saved = read_metadata(path)
        try:
            st = cls.read_sentence_transformer(path, attn_implementation, trust_remote_code, revision, dtype)
        except (OSError, ValueError) as err:
            raise load_failure(name_or_path, err) from None
        if not isinstance(st[0], Transformer) or st[0].tokenizer is None:
            raise EmbedtrainError(f"model '{name_or_path}': the first module is not a text transformer; embedtrain trains text encoders here")

        center, basis = read_center(st, name_or_path)
        st_pooling = next((m for m in st if isinstance(m, Pooling)), None)
        if pooling is None:
            pooling = saved.get("pooling")
        if pooling is None and st_pooling is not None:
            reverse = {v: k for k, v in SENTENCE_TRANSFORMERS_MODE.items()}
            mode = st_pooling.pooling_mode if isinstance(st_pooling.pooling_mode, str) else st_pooling.pooling_mode[0]
            pooling = reverse.get(mode, "mean")
        if normalize is None:
            normalize = saved.get("normalize", any(isinstance(m, Normalize) for m in st) if st_pooling else True)
        qlen, dlen = token_limits(saved, max_length, query_max_length, document_max_length, st[0].max_seq_length or 256)
        prompts = saved.get("prompts") or {k: (v or "") for k, v in (st.prompts or {}).items()}
        encoder = cls(
            st,
            pooling=pooling or "mean",
            normalize=bool(normalize),
            query_max_length=qlen,
            document_max_length=dlen,
            query_prompt=prompts.get("query", "") if query_prompt is None else query_prompt,
            document_prompt=prompts.get("document", "") if document_prompt is None else document_prompt,
        )
        if center is not None:
            encoder.set_center(center, basis)
        if gradient_checkpointing:
            encoder.enable_gradient_checkpointing()
        if lora is not None:
            encoder.add_lora(lora["r"], lora["alpha"], lora["dropout"], lora["target_modules"])
        return encoder

    def add_lora(self, r: int, alpha: float, dropout: float, target_modules: Sequence[str]) -> None:
        """Wrap the backbone with fresh LoRA adapters: only they train from now on (the pooling has no weights).
        A saved folder holds the merged weights, which sentence-transformers loads without peft, and the adapter
        alone in ``adapter/``; adding LoRA to such a folder trains new adapters on its merged weights."""
        if is_peft_model(self.backbone):
            raise EmbedtrainError("model.lora: the backbone has LoRA adapters already")
        self.backbone = apply_lora(self.backbone, r, alpha, dropout, target_modules)
        self._st[0].model = self.backbone

    @staticmethod
    def read_sentence_transformer(path: str, attn_implementation: str, trust_remote_code: bool, revision: Optional[str],
                                  dtype: str = "float32"):
        """The ``SentenceTransformer`` of a sentence-transformers folder, or one holding just the ``Transformer``
        module of a transformers folder or Hub id (on CPU)."""
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Transformer

        model_kwargs = {"attn_implementation": attn_implementation, "dtype": getattr(torch, dtype)}
        if (Path(path) / MODULES_FILE).is_file():
            return SentenceTransformer(
                path, device="cpu", trust_remote_code=trust_remote_code, model_kwargs=model_kwargs, revision=revision
            )
        transformer = Transformer(
            path,
            model_kwargs={**model_kwargs, "trust_remote_code": trust_remote_code, "revision": revision},
            processor_kwargs={"trust_remote_code": trust_remote_code, "revision": revision},
            config_kwargs={"trust_remote_code": trust_remote_code, "revision": revision},
        )
        return SentenceTransformer(modules=[transformer], device="cpu")

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the backbone's activations in the backward pass instead of keeping them."""
        if not getattr(self.backbone, "supports_gradient_checkpointing", False):
            raise EmbedtrainError(
                f"model.gradient_checkpointing: {type(self.backbone).__name__} does not support it; set it to false"
            )
        checkpoint_activations(self.backbone, self._recompute_context())

    def _recompute_context(self):
        """torch's ``context_fn`` for each checkpointed layer (None: none needed; an MoE keeps its routing)."""
        return None


def center_module(center: torch.Tensor, basis: Optional[torch.Tensor] = None) -> nn.Module:
    """sentence-transformers' ``Dense`` computing ``(e - center) @ basis`` (``e - center`` without a basis): weight
    ``basis.T`` (the identity), bias ``-basis.T @ center`` (``-center``), no activation."""
    from sentence_transformers.sentence_transformer.modules import Dense

    dim = center.numel()
    center = center.detach().float().cpu()
    weight = torch.eye(dim) if basis is None else basis.detach().float().cpu().T.contiguous()
    return Dense(dim, dim, bias=True, activation_function=nn.Identity(), init_weight=weight,
                 init_bias=-(weight @ center))


def read_center(st, name: str) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(centre, basis) of a folder saved with them (:func:`center_module` after the pooling; basis None for an
    identity weight), else (None, None). Any other ``Dense`` layer (an activation, a weight that is not a rotation)
    is not something this encoder computes: an error, not a silently different embedding."""
    from sentence_transformers.sentence_transformer.modules import Dense

    dense = [m for m in st if isinstance(m, Dense)]
    if not dense:
        return None, None
    layer = dense[0].linear
    dim = layer.in_features
    weight = layer.weight.detach().float().cpu()
    # 1e-4: a float32 rotation of a few hundred dimensions is orthonormal to about 1e-6 per entry
    rotation = (layer.out_features == dim
                and torch.allclose(weight @ weight.T, torch.eye(dim), atol=1e-4))
    if (len(dense) > 1 or layer.bias is None or not rotation
            or not isinstance(dense[0].activation_function, nn.Identity)):
        raise EmbedtrainError(f"model '{name}': its Dense layer is not a centre (a rotation or the identity, plus a "
                              "bias); embedtrain's text encoder cannot compute it")
    center = -(weight.T @ layer.bias.detach().float().cpu())  # bias = -weight @ centre, weight orthonormal
    if torch.equal(weight, torch.eye(dim)):
        return center, None
    return center, weight.T.contiguous()


def set_modules(st, modules: Sequence[nn.Module], prompts: dict[str, str]):
    """Replace the modules of sentence-transformers model ``st`` in place (the trained transformer is passed
    back in as module 0, so its weights are kept), set its prompts and cosine similarity; returns ``st``."""
    for name in list(st._modules):
        del st._modules[name]
    for i, module in enumerate(modules):
        st.add_module(str(i), module)
    st.prompts = dict(prompts)
    st.similarity_fn_name = "cosine"
    return st


def token_limits(
    saved: dict, max_length: Optional[int], query_max_length: Optional[int], document_max_length: Optional[int],
    default: int,
) -> tuple[int, int]:
    """The query and document token limits of a loaded encoder: each as given, else as saved in the folder
    (``saved``, its ``embedtrain.json``) unless ``max_length`` is given, else ``max_length`` or ``default``."""
    default_len = max_length or default
    qlen = query_max_length or (saved.get("query_max_length") if max_length is None else None) or default_len
    dlen = document_max_length or (saved.get("document_max_length") if max_length is None else None) or default_len
    return int(qlen), int(dlen)


load_sentence_transformers_encoder = TextEncoder.load
"""A sentence-transformers folder, a transformers folder or a Hub id as a :class:`TextEncoder`.

This is :func:`embedtrain.models.load_text_encoder` for folders of kind ``text`` (and names that are no saved
folder); that function also loads MoE and decoder folders."""
