"""Decoder LLMs as embedding models (NV-Embed, arXiv 2405.17428): the trainer's encoder for them.

:class:`DecoderEncoder` puts together the pieces of this package:

- a decoder (Mistral, Llama, Qwen2/3, Gemma) with bidirectional attention, checked by the probe when it
  is built (:mod:`embedtrain.models.bidirectional`);
- optional LoRA adapters on it (:mod:`embedtrain.models.lora`); the pooling head is trained in full;
- pooling: latent attention (:mod:`embedtrain.models.latent_attention`), mean, last token, or the state of
  an EOS token that the tokenizer appends;
- instruction masking: a text's prompt (the query's ``Instruct: {task}\\nQuery: ``) is left out of the
  mean, counted with the tokenizer's offsets (:mod:`embedtrain.models.instructions`). Training batches
  carry a ``pooling_mask`` built by the collator; :meth:`DecoderEncoder.encode` builds the same one.

It offers what the training loop and the evaluation use of :class:`~embedtrain.models.encoder.TextEncoder`
(``forward`` on token tensors or ``many`` batches, ``encode``, ``tokenize``, ``max_length_for``,
``freeze_unused_parameters``, ``save``). A saved model is a sentence-transformers folder::

    modules.json      BidirectionalTransformer -> LatentAttentionPoolingModule | Pooling -> Normalize
    config.json, model.safetensors, tokenizer files    the decoder (LoRA merged), "is_causal": false
    1_LatentAttentionPoolingModule/                     the head's sizes and weights
    adapter/                                            the LoRA adapter alone (peft format), if trained with LoRA
    embedtrain.json                                     embedtrain's settings ("backbone": "bidirectional_decoder")
    instructions.json                                   the instruction per MTEB task it is evaluated with
                                                        (NV-Embed's table unless the folder it came from had its own)

``SentenceTransformer(path, trust_remote_code=True)`` loads it (the module classes are imported from the
installed embedtrain package, never from the folder) and gives the same embeddings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from embedtrain.errors import EmbedtrainError
from embedtrain.models.bidirectional import BidirectionalTransformer, assert_bidirectional
from embedtrain.models.checkpointing import checkpoint_activations
from embedtrain.models.encoder import TextEncoder, token_limits
from embedtrain.models.folders import (
    DECODER,
    DECODER_BACKBONE,
    MODEL_KINDS,
    find_model_kind,
    load_failure,
    read_instructions,
    read_metadata,
    write_instructions,
    write_metadata,
)
from embedtrain.models.instructions import nv_embed_mteb_instructions, pooling_mask, prefix_token_lengths
from embedtrain.models.latent_attention import (
    DEFAULT_NUM_HEADS,
    LatentAttentionPooling,
    LatentAttentionPoolingModule,
)
from embedtrain.models.lora import ADAPTER_DIR, apply_lora
from embedtrain.models.pooling import last_token_pooling, mean_pooling

BACKBONE_KIND = DECODER_BACKBONE
"""``embedtrain.json``'s ``backbone`` value for folders this module writes."""
DECODER_POOLING = ("latent_attention", "mean", "last_token", "eos")
LATENT_DIR = "1_LatentAttentionPoolingModule"


def append_eos_token(tokenizer) -> None:
    """Make a fast tokenizer end every text with its EOS token (for ``eos`` pooling).

    The rule goes into the tokenizer's post-processor, so it is saved in ``tokenizer.json`` and every
    later use (pre-tokenized training data, evaluation, a sentence-transformers reload) appends the token
    too; truncation keeps room for it. Tokenizers that already end texts with EOS are left as they are.
    """
    from tokenizers import processors

    if not getattr(tokenizer, "is_fast", False) or tokenizer.eos_token_id is None:
        raise EmbedtrainError(
            "model.pooling: eos needs a fast tokenizer with an EOS token; use last_token or latent_attention pooling"
        )
    if tokenizer("x")["input_ids"][-1] == tokenizer.eos_token_id:
        return
    eos = (tokenizer.eos_token, tokenizer.eos_token_id)
    template = processors.TemplateProcessing(single=f"$A {eos[0]}", pair=f"$A {eos[0]} $B:1 {eos[0]}:1", special_tokens=[eos])
    backend = tokenizer.backend_tokenizer
    old = backend.post_processor
    backend.post_processor = template if old is None else processors.Sequence([old, template])
    if tokenizer("x")["input_ids"][-1] != tokenizer.eos_token_id:  # a tokenizer class that rebuilt its own rule
        raise EmbedtrainError(
            f"model.pooling: eos: could not make {type(tokenizer).__name__} append its EOS token; use last_token pooling"
        )


class DecoderEncoder(TextEncoder):
    """Texts → embeddings (batch, dim) with a bidirectional decoder and NV-Embed's pooling.

    Args:
        sentence_transformer: a ``SentenceTransformer`` whose module 0 is the :class:`BidirectionalTransformer`
            holding the decoder (maybe LoRA-wrapped) and its tokenizer.
        pooling: ``latent_attention``, ``mean``, ``last_token`` or ``eos``.
        head: the :class:`LatentAttentionPooling` module (``latent_attention`` pooling only).
        instruction_masking: pool only the text's tokens, not its prompt's (mean and latent attention).
        Other arguments as for :class:`TextEncoder`.
    """

    def __init__(
        self,
        sentence_transformer,
        pooling: str = "latent_attention",
        head: Optional[LatentAttentionPooling] = None,
        normalize: bool = True,
        query_max_length: int = 512,
        document_max_length: int = 512,
        query_prompt: str = "",
        document_prompt: str = "",
        instruction_masking: bool = False,
    ):
        nn.Module.__init__(self)
        self.register_buffer("center", None)  # TextEncoder's; loss.compact.center is refused for decoders
        self.register_buffer("basis", None)
        if pooling not in DECODER_POOLING:
            raise EmbedtrainError(f"model.pooling: '{pooling}' is not available for decoders; use one of {', '.join(DECODER_POOLING)}")
        if (pooling == "latent_attention") != (head is not None):
            raise ValueError("a latent-attention head is needed exactly for pooling 'latent_attention'")
        object.__setattr__(self, "_st", sentence_transformer)  # not a submodule: no second copy of the weights
        self.backbone = sentence_transformer[0].model
        self.tokenizer = sentence_transformer[0].tokenizer
        self.head = head
        self.pooling = pooling
        self.normalize = normalize
        self.query_max_length = query_max_length
        self.document_max_length = document_max_length
        self.prompts = {"query": query_prompt, "document": document_prompt}
        self.instruction_masking = instruction_masking and pooling in ("mean", "latent_attention")
        self._prefix_lengths: dict[str, int] = {}
        self.eval_instructions: Optional[dict[str, str]] = None
        """Instruction per evaluation task saved as instructions.json; None: NV-Embed's MTEB table."""

    # -- forward ---------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        pooling_mask: Optional[torch.Tensor] = None,
        many: Optional[Sequence[dict[str, torch.Tensor]]] = None,
    ):
        """Embeddings of one tokenized batch, or a list of them for ``many`` batches (see TextEncoder).

        ``pooling_mask`` (batch, seq): the tokens to pool (text without its prompt); defaults to
        ``attention_mask``. It is ignored unless instruction masking is on.
        """
        if many is not None:
            return [self._embed(b["input_ids"], b["attention_mask"], b.get("pooling_mask")) for b in many]
        return self._embed(input_ids, attention_mask, pooling_mask)

    def _embed(self, input_ids, attention_mask, pooling_mask_=None) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        mask = pooling_mask_ if (self.instruction_masking and pooling_mask_ is not None) else attention_mask
        if self.pooling == "latent_attention":
            emb = self.head(hidden, mask)
        elif self.pooling == "mean":
            emb = mean_pooling(hidden, mask)
        else:  # last_token, eos (the tokenizer appended the EOS token, so it is the last real one)
            emb = last_token_pooling(hidden, attention_mask)
        emb = emb.float()
        return F.normalize(emb, dim=-1) if self.normalize else emb

    # -- tokenization ----------------------------------------------------------------------
    def prompt_token_count(self, prompt: str) -> int:
        """Tokens of ``prompt`` (leading special tokens included) to leave out of pooling; 0 when masking is off."""
        if not self.instruction_masking or not prompt:
            return 0
        if prompt not in self._prefix_lengths:
            self._prefix_lengths[prompt] = prefix_token_lengths(self.tokenizer, [prompt])[0]
        return self._prefix_lengths[prompt]

    def tokenize(self, texts: Sequence[str], role: str = "document", prompt: str = "") -> dict[str, torch.Tensor]:
        """Tokenize ``prompt + text`` (padded to the longest) with the pooling mask that leaves the prompt out."""
        enc = self.tokenizer([prompt + t for t in texts], padding=True, truncation=True,
                             max_length=self.max_length_for(role), return_tensors="pt")
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if self.instruction_masking:
            out["pooling_mask"] = pooling_mask(enc["input_ids"], enc["attention_mask"], self.prompt_token_count(prompt))
        return out

    def _embed_texts(self, texts: list[str], role: str, prompt: str) -> torch.Tensor:
        device = self.device
        batch = {k: v.to(device) for k, v in self.tokenize(texts, role, prompt).items()}
        if self.instruction_masking and prompt:
            empty = (batch["pooling_mask"].sum(1) == 0).nonzero().flatten().tolist()
            if empty:
                raise EmbedtrainError(
                    f"prompt {prompt[:40]!r}... fills all {self.max_length_for(role)} tokens of a {role}, leaving "
                    "no text token to pool; raise the max length or shorten the prompt"
                )
        return self(**batch)

    # -- saving ----------------------------------------------------------------------------
    def _pooling_module(self) -> nn.Module:
        from sentence_transformers.sentence_transformer.modules import Pooling

        if self.pooling == "latent_attention":
            pooling = LatentAttentionPoolingModule(
                self.embedding_dim, include_prompt=not self.instruction_masking, **self.head.sizes()
            )
            pooling.latent_attention = self.head  # the trained head itself, not a copy
            return pooling
        mode = {"mean": "mean", "last_token": "lasttoken", "eos": "lasttoken"}[self.pooling]
        return Pooling(self.embedding_dim, pooling_mode=mode, include_prompt=not self.instruction_masking)

    def _metadata(self) -> dict:
        meta = {
            "backbone": BACKBONE_KIND,
            **super()._metadata(),
            "instruction_masking": self.instruction_masking,
        }
        if self.head is not None:
            meta["latent_attention"] = self.head.sizes()
        return meta

    def save(self, path: str | os.PathLike, state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Write the sentence-transformers folder described in the module docstring.

        ``state_dict`` is the trainer's gathered copy of this module's weights (``Accelerator.get_state_dict``).
        It is loaded before writing; a copy whose tensors do not match this module's shapes (a sharded
        FSDP / ZeRO-3 module) is refused with an error rather than written wrong.
        """
        if state_dict is not None:
            own = self.state_dict()
            mismatched = [k for k, v in own.items() if k not in state_dict or tuple(state_dict[k].shape) != tuple(v.shape)]
            if mismatched:
                raise EmbedtrainError(
                    f"saving {path}: the gathered weights do not match the decoder encoder ({len(mismatched)} "
                    f"tensors, e.g. {mismatched[0]}); decoder encoders are saved from DDP or ZeRO-2 runs, "
                    "not from sharded FSDP / ZeRO-3 modules"
                )
            self.load_state_dict(state_dict)
        st = self.sentence_transformer()
        st.save(str(path), safe_serialization=True)
        write_metadata(path, self._metadata())
        write_instructions(path, self.eval_instructions if self.eval_instructions is not None
                           else nv_embed_mteb_instructions())

    @classmethod
    def load(cls, name_or_path: str, **settings) -> "DecoderEncoder":
        """As :func:`load_decoder_encoder`."""
        return load_decoder_encoder(name_or_path, **settings)


def is_decoder_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder saved by :meth:`DecoderEncoder.save`."""
    return find_model_kind(path) == DECODER


def load_decoder_encoder(
    name_or_path: str,
    pooling: Optional[str] = None,
    normalize: Optional[bool] = None,
    max_length: Optional[int] = None,
    query_max_length: Optional[int] = None,
    document_max_length: Optional[int] = None,
    query_prompt: Optional[str] = None,
    document_prompt: Optional[str] = None,
    instruction_masking: Optional[bool] = None,
    latent_attention: Optional[dict] = None,
    lora: Optional[dict] = None,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    revision: Optional[str] = None,
    device: str | torch.device = "cpu",
) -> DecoderEncoder:
    """Load a decoder (Hub id, transformers folder, or a folder saved by :meth:`DecoderEncoder.save`).

    The decoder is made bidirectional and checked by the probe; a saved folder's latent-attention head,
    prompts and settings are reused (settings given here win). ``latent_attention``: ``num_latents``,
    ``num_heads``, ``intermediate_size`` for a new head. ``lora``: ``r``, ``alpha``, ``dropout``,
    ``target_modules`` to add fresh adapters (on a saved folder: on top of its merged weights).
    ``device``: where the model is loaded (the probe runs there).
    """
    from sentence_transformers import SentenceTransformer

    from embedtrain.config import resolve_path

    path = resolve_path(name_or_path)
    local = Path(path)
    kind = find_model_kind(local)
    saved = read_metadata(local) if local.is_dir() else {}
    if kind not in (None, DECODER):
        raise EmbedtrainError(
            f"model '{name_or_path}': {MODEL_KINDS[kind]}, not a bidirectional decoder saved by embedtrain; "
            "give the decoder's own folder or Hub id, or set model.bidirectional: false"
        )
    model_kwargs = {"attn_implementation": attn_implementation, "trust_remote_code": trust_remote_code,
                    "dtype": getattr(torch, dtype)}
    if torch.device(device).type != "cpu":  # load straight onto the accelerator (a 7B model, and the probe, run there)
        model_kwargs["device_map"] = {"": str(torch.device(device))}
    if revision is not None:
        model_kwargs["revision"] = revision
    hub = {"trust_remote_code": trust_remote_code, "revision": revision}
    try:
        transformer = BidirectionalTransformer(path, model_kwargs=model_kwargs, processor_kwargs=hub, config_kwargs=hub)
    except (OSError, ValueError) as err:
        raise load_failure(name_or_path, err) from None
    if transformer.tokenizer is None:
        raise EmbedtrainError(f"model '{name_or_path}': no tokenizer found; a decoder folder needs its tokenizer files")

    pooling = pooling or saved.get("pooling") or "latent_attention"
    if pooling not in DECODER_POOLING:
        raise EmbedtrainError(f"model.pooling: '{pooling}' is not available for decoders; use one of {', '.join(DECODER_POOLING)}")
    if pooling == "eos":
        append_eos_token(transformer.tokenizer)
    hidden = int(transformer.model.config.hidden_size)
    head = None
    if pooling == "latent_attention":
        head = _latent_head(local, saved, hidden, latent_attention or {})
        head.to(device)
    if gradient_checkpointing:
        checkpoint_activations(transformer.model)
    if lora is not None:
        transformer.model = apply_lora(transformer.model, lora["r"], lora["alpha"], lora["dropout"], lora["target_modules"])
        assert_bidirectional(transformer.model, transformer.tokenizer)
    st = SentenceTransformer(modules=[transformer], device=str(torch.device(device)))
    prompts = saved.get("prompts") or {}
    qlen, dlen = token_limits(saved, max_length, query_max_length, document_max_length, 512)
    encoder = DecoderEncoder(
        st,
        pooling=pooling,
        head=head,
        normalize=bool(saved.get("normalize", True) if normalize is None else normalize),
        query_max_length=qlen,
        document_max_length=dlen,
        query_prompt=prompts.get("query", "") if query_prompt is None else query_prompt,
        document_prompt=prompts.get("document", "") if document_prompt is None else document_prompt,
        instruction_masking=bool(saved.get("instruction_masking", False) if instruction_masking is None
                                 else instruction_masking),
    )
    if local.is_dir():
        encoder.eval_instructions = read_instructions(local)
    return encoder


def _latent_head(folder: Path, saved: dict, hidden: int, sizes: dict) -> LatentAttentionPooling:
    """The saved head of an embedtrain folder (its sizes must match ``sizes`` where given), else a new one."""
    if (folder / LATENT_DIR / "model.safetensors").is_file():
        module = LatentAttentionPoolingModule.load(str(folder / LATENT_DIR))
        head = module.latent_attention
        have = head.sizes()
        differ = [f"{k} {sizes[k]} (saved: {have[k]})" for k in have if sizes.get(k) is not None and sizes[k] != have[k]]
        if differ:
            raise EmbedtrainError(
                f"model.latent_attention: {', '.join(differ)} differ from the head saved in {folder}; "
                "use the saved sizes to continue training it"
            )
        return head.float()
    given = {k: sizes[k] for k in ("num_latents", "num_heads", "intermediate_size") if sizes.get(k)}  # else the defaults
    num_heads = given.get("num_heads", DEFAULT_NUM_HEADS)
    if hidden % num_heads:
        raise EmbedtrainError(
            f"model.latent_attention.num_heads: {num_heads} does not divide the decoder's hidden size {hidden}"
        )
    return LatentAttentionPooling(hidden, **given)


def load_adapter_encoder(model_dir: str | os.PathLike, base: Optional[str] = None, device: str = "cpu") -> DecoderEncoder:
    """A saved LoRA-trained model rebuilt from the base decoder + its ``adapter/`` (not the merged weights).

    ``base`` defaults to the base model recorded in the adapter's config. For checking that the merged
    folder and the adapter agree, or to keep training the adapter.
    """
    from peft import PeftConfig, PeftModel

    model_dir = Path(model_dir)
    adapter = model_dir / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        raise EmbedtrainError(f"{model_dir}: has no {ADAPTER_DIR}/adapter_config.json; it was not trained with LoRA")
    base = base or PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    encoder = load_decoder_encoder(str(model_dir), device=device)  # head, tokenizer and settings of the folder
    saved = read_metadata(model_dir)
    base_encoder = load_decoder_encoder(base, pooling="mean", device=device)
    wrapped = PeftModel.from_pretrained(base_encoder.backbone, str(adapter))
    assert_bidirectional(wrapped, encoder.tokenizer)
    encoder._st[0].model = wrapped
    encoder.backbone = wrapped
    encoder.instruction_masking = bool(saved.get("instruction_masking", False))
    return encoder
