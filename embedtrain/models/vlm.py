"""VLM2Vec: a transformers image-text-to-text model used as an embedding model.

Any model that ``AutoModelForImageTextToText`` and ``AutoProcessor`` load (Qwen2-VL / Qwen2.5-VL,
LLaVA-style models, ...) becomes an encoder: an input (text, image, or both) is written out with a
per-dataset template whose ``{image}`` stands for the processor's image token(s) (e.g.
``"{image}Instruct: Find a caption for the image\\nQuery: {text}"``), run through the model's
decoder, and the state of its last real token (correct under left and right padding) is
L2-normalised. LoRA comes from peft (``get_peft_model`` on the backbone); the language-model head
is not kept (only hidden states are used).

Reference: Jiang et al., "VLM2Vec: Training Vision-Language Models for Massive Multimodal
Embedding Tasks", arXiv:2410.05160.

Saving writes a sentence-transformers folder (the backbone with LoRA merged, its processor, last-
token pooling and normalisation) whose chat template renders the same text as the templates, per
task: ``SentenceTransformer(path).encode_query([{"image": img, "text": "..."}])`` reproduces
:meth:`VlmEncoder.encode_items` with role 'query' (and ``encode_document`` the document role).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from embedtrain.errors import EmbedtrainError
from embedtrain.models.checkpointing import checkpoint_activations
from embedtrain.models.folders import VLM2VEC, load_failure, read_metadata, write_metadata
from embedtrain.models.images import load_images
from embedtrain.models.pooling import POOLERS, SENTENCE_TRANSFORMERS_MODE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the language model's attention and MLP projections (Llama/Qwen/Mistral naming); never the vision tower's
LORA_DEFAULT = r".*language_model.*\.(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def lora_target(lora_targets: Sequence[str] = ()) -> str:
    """peft's target pattern: the named projections (or the default ones) of the language model only."""
    return LORA_DEFAULT if not lora_targets else rf".*language_model.*\.(?:{'|'.join(lora_targets)})"


def image_placeholder(processor) -> str:
    """The text that stands for one image in this processor's prompts (Qwen2-VL wraps its image pad
    token in vision start/end tokens)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    token = getattr(processor, "image_token", None) or getattr(tokenizer, "image_token", None)
    if not token:
        raise EmbedtrainError(f"{type(processor).__name__} has no image token; the model must be a vision-language model")
    vocab = tokenizer.get_vocab()
    start = getattr(tokenizer, "vision_start_token", None) or ("<|vision_start|>" if "<|vision_start|>" in vocab else None)
    end = getattr(tokenizer, "vision_end_token", None) or ("<|vision_end|>" if "<|vision_end|>" in vocab else None)
    return f"{start}{token}{end}" if start and end else token


def render(template: str, text: Optional[str], has_image: bool, placeholder: str) -> str:
    """A template with ``{image}`` and ``{text}`` filled in (plain replacement: other braces stay).

    An image given to a template without ``{image}`` goes first.
    """
    if has_image and "{image}" not in template:
        template = "{image}" + template
    return template.replace("{image}", placeholder if has_image else "").replace("{text}", text or "")


def _jinja_literal(text: str) -> str:
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def _jinja_branch(template: str, placeholder: str) -> str:
    """Jinja that renders ``template`` from ``ns.text`` and ``ns.image`` exactly as :func:`render` does."""
    if "{image}" not in template:
        template = "{image}" + template
    out, rest = [], template
    while rest:
        cut = min((i for i in (rest.find("{image}"), rest.find("{text}")) if i >= 0), default=-1)
        if cut < 0:
            out.append(_jinja_literal(rest))
            break
        out.append(_jinja_literal(rest[:cut]))
        if rest.startswith("{image}", cut):
            out.append("{% if ns.image %}" + _jinja_literal(placeholder) + "{% endif %}")
            rest = rest[cut + len("{image}"):]
        else:
            out.append("{{ ns.text }}")
            rest = rest[cut + len("{text}"):]
    return "".join(out)


def chat_template(templates: dict[str, str], placeholder: str) -> str:
    """A chat template for sentence-transformers: every text of the messages joined, any image marked,
    then the query template (``task == 'query'``) or the document template (otherwise) rendered."""
    collect = (
        "{%- set ns = namespace(text='', image=false) -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{%- set ns.text = ns.text + message['content'] -%}"
        "{%- else -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}{%- set ns.image = true -%}"
        "{%- elif item['type'] == 'text' -%}{%- set ns.text = ns.text + item['text'] -%}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- endfor -%}"
    )
    return (collect + "{%- if task is defined and task == 'query' -%}" + _jinja_branch(templates["query"], placeholder)
            + "{%- else -%}" + _jinja_branch(templates["document"], placeholder) + "{%- endif -%}")


class VlmInputs:
    """The model-side input builder for the data collator: templates → the processor's tensors.

    Holds only the processor (no weights), so DataLoader workers can run it. Texts longer than
    ``max_length`` tokens are cut before the template is applied, so image tokens are never cut.
    """

    def __init__(self, processor, max_length: int, image_max_pixels: Optional[int] = None):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.placeholder = image_placeholder(processor)
        self.max_length = max_length
        self.images_kwargs = {}
        if image_max_pixels is not None:
            self.images_kwargs["size"] = {**dict(getattr(processor.image_processor, "size", {}) or {}),
                                          "longest_edge": image_max_pixels}

    def _cut(self, text: Optional[str]) -> Optional[str]:
        if not text:
            return text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= self.max_length else self.tokenizer.decode(ids[: self.max_length])

    def __call__(self, texts: Optional[list], images: Optional[list], template: str = "{image}{text}") -> dict:
        n = len(texts) if texts is not None else len(images)
        rendered = [render(template, self._cut(texts[i]) if texts is not None else None, images is not None,
                           self.placeholder) for i in range(n)]
        kwargs = {"images_kwargs": self.images_kwargs} if self.images_kwargs and images is not None else {}
        out = self.processor(text=rendered, images=images, padding=True, return_tensors="pt", **kwargs)
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


class VlmEncoder(nn.Module):
    """Texts, images or both → embeddings (batch, hidden) from a vision-language model.

    ``forward`` takes one role's processor outputs (``input_ids``, ``attention_mask``,
    ``pixel_values``, ...); ``many`` embeds several roles in one call.
    """

    kind = "vlm2vec"

    def __init__(self, backbone: nn.Module, processor, pooling: str = "last_token", normalize: bool = True,
                 max_length: int = 256, templates: Optional[dict] = None, image_max_pixels: Optional[int] = None,
                 source: str = ""):
        super().__init__()
        self.backbone = backbone
        self.processor = processor
        self.pooling = pooling
        self._pool = POOLERS.get(pooling)
        self.normalize = normalize
        self.max_length = max_length
        self.templates = dict(templates or {"query": "{image}{text}", "document": "{image}{text}"})
        self.inputs = VlmInputs(processor, max_length, image_max_pixels)
        self.source = source
        self._accepted = set(inspect.signature(self._base().forward).parameters)

    def _base(self) -> nn.Module:
        return self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone

    @property
    def embedding_dim(self) -> int:
        config = self._base().config
        return int(getattr(config, "hidden_size", None) or config.get_text_config().hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def forward(self, many: Optional[Sequence[dict]] = None, **inputs):
        if many is not None:
            return [self._embed(b) for b in many]
        return self._embed(inputs)

    def _embed(self, inputs: dict) -> torch.Tensor:
        kwargs = {k: v for k, v in inputs.items() if k in self._accepted}
        hidden = self.backbone(**kwargs, use_cache=False).last_hidden_state
        emb = self._pool(hidden, inputs["attention_mask"])
        return F.normalize(emb, dim=-1) if self.normalize else emb

    def trainable_summary(self) -> str:
        total = sum(p.numel() for p in self.parameters())
        trained = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return f"{trained:,} of {total:,} parameters trained ({100 * trained / max(total, 1):.2f}%)"

    # -- encoding --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_items(self, texts: Optional[Sequence[Optional[str]]] = None, images: Optional[Sequence] = None,
                     role: str = "document", template: Optional[str] = None, batch_size: int = 32,
                     show_progress: bool = False, desc: str = "encoding") -> torch.Tensor:
        """Embed items (texts, images as paths or PIL images, or both, aligned); float32 on CPU, in order.

        ``template`` defaults to the role's saved template ('query' or 'document').
        """
        from tqdm.auto import tqdm

        if texts is None and images is None:
            raise EmbedtrainError("nothing to encode; give texts, images or both")
        n = len(texts) if texts is not None else len(images)
        if texts is not None and images is not None and len(images) != n:
            raise EmbedtrainError(f"{len(texts)} texts but {len(images)} images; give one image per text")
        template = self.templates.get(role, "{image}{text}") if template is None else template
        was_training = self.training
        self.eval()
        out = torch.empty(n, self.embedding_dim, dtype=torch.float32)
        for start in tqdm(range(0, n, batch_size), desc=desc, disable=None if show_progress else True, leave=False):
            end = min(start + batch_size, n)
            part_images = None
            if images is not None:
                part = list(images[start:end])
                if any(p is None for p in part):
                    raise EmbedtrainError("every item of a batch needs an image, or none does; split the task")
                part_images = load_images(part)
            inputs = self.inputs(list(texts[start:end]) if texts is not None else None, part_images, template)
            out[start:end] = self(**{k: v.to(self.device) for k, v in inputs.items()}).float().cpu()
        self.train(was_training)
        return out

    def encode(self, texts: Sequence[str], role: str = "document", prompt: Optional[str] = None, batch_size: int = 32,
               show_progress: bool = False, desc: str = "encoding") -> torch.Tensor:
        """Text-only encoding with the text encoder's signature (``prompt`` is a template here)."""
        return self.encode_items(texts=texts, role=role, template=prompt, batch_size=batch_size,
                                 show_progress=show_progress, desc=desc)

    # -- saving ----------------------------------------------------------------------------
    def merged_backbone(self) -> nn.Module:
        """A CPU copy of the backbone with LoRA merged in."""
        model = copy.deepcopy(self.backbone).cpu()
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        return model

    def save(self, path: str | os.PathLike, loss_state: Optional[dict] = None, extra: Optional[dict] = None) -> None:
        """Write a sentence-transformers folder: Transformer (backbone + processor with a chat template
        rendering the query/document templates) → last-token Pooling → Normalize."""
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.base.modules import Transformer
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.merged_backbone().save_pretrained(folder, safe_serialization=True)
        processor = copy.deepcopy(self.processor)
        processor.chat_template = chat_template(self.templates, self.inputs.placeholder)
        if self.inputs.images_kwargs:
            processor.image_processor.size = self.inputs.images_kwargs["size"]
        processor.save_pretrained(folder)
        transformer = Transformer(str(folder), model_kwargs={"dtype": self._base().dtype})
        modules = [transformer, Pooling(self.embedding_dim, pooling_mode=SENTENCE_TRANSFORMERS_MODE[self.pooling])]
        st = SentenceTransformer(modules=modules + ([Normalize()] if self.normalize else []), device="cpu")
        st.similarity_fn_name = "cosine"
        st.save(str(folder), safe_serialization=True)
        meta = {"kind": VLM2VEC, "pooling": self.pooling, "normalize": self.normalize, "max_length": self.max_length,
                "templates": self.templates, "image_placeholder": self.inputs.placeholder, **(extra or {})}
        write_metadata(folder, meta)


def load_vlm_encoder(
    name_or_path: str,
    pooling: str = "last_token",
    normalize: bool = True,
    max_length: int = 256,
    finetune: str = "lora",
    lora_r: int = 16,
    lora_alpha: float = 32.0,
    lora_dropout: float = 0.05,
    lora_targets: Sequence[str] = (),
    train_vision: bool = False,
    dtype: str = "float32",
    image_max_pixels: Optional[int] = None,
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    revision: Optional[str] = None,
    templates: Optional[dict] = None,
) -> VlmEncoder:
    """Load an image-text-to-text model and its processor as a :class:`VlmEncoder`.

    ``finetune='lora'`` trains LoRA adapters on the language model only; ``'full'`` trains the
    language model (and the vision tower with ``train_vision``). A folder saved by
    :meth:`VlmEncoder.save` loads too (its templates are used unless ``templates`` is given).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from embedtrain.config import resolve_path

    path = resolve_path(name_or_path)
    common = {"trust_remote_code": trust_remote_code, "revision": revision}
    try:
        processor = AutoProcessor.from_pretrained(path, **common)
        full = AutoModelForImageTextToText.from_pretrained(path, dtype=DTYPES[dtype],
                                                           attn_implementation=attn_implementation, **common)
    except (OSError, ValueError, KeyError) as err:
        raise load_failure(name_or_path, err) from None
    if getattr(processor, "image_processor", None) is None:
        raise EmbedtrainError(f"model '{name_or_path}': its processor has no image processor; "
                              "give a vision-language model (image-text-to-text)")
    # the decoder and vision tower without the language-model head: embeddings use hidden states only
    backbone = getattr(full, "model", full)
    saved = read_metadata(path)
    templates = templates or saved.get("templates")
    if gradient_checkpointing:
        checkpoint_activations(backbone)
        if finetune == "lora":
            backbone.enable_input_require_grads()  # checkpointed blocks need a graph into their inputs

    if finetune == "lora":
        from peft import LoraConfig, get_peft_model

        target = lora_target(lora_targets)
        config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target)
        try:
            with warnings.catch_warnings():  # peft still asks transformers for a renamed attribute
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                backbone = get_peft_model(backbone, config)
        except ValueError as err:
            first = (str(err).strip().splitlines() or ["no module matched"])[0]
            raise EmbedtrainError(f"model.lora.target_modules: {first[:200]}; name projection layers of the "
                                  "language model, e.g. q_proj, v_proj") from None
    else:
        for name, p in backbone.named_parameters():
            p.requires_grad_(train_vision or "language_model" in name)
    return VlmEncoder(backbone, processor, pooling=pooling, normalize=normalize, max_length=max_length,
                      templates=templates, image_max_pixels=image_max_pixels, source=name_or_path)
