"""Mixture-of-Experts encoders upcycled from a dense model, routed by domain or by a learned router.

Hallee et al., "Contrastive Learning and Mixture of Experts Enables Precise Vector Embeddings"
(arXiv 2401.15713) turn the feed-forward block of a BERT encoder into one expert per domain and send
every text of a domain to its expert ("enforced routing"). Here:

Upcycling (:func:`upcycle`)
    The feed-forward block of the chosen layers becomes N experts, each an exact copy of the dense
    block, so the converted model computes what the dense one did (tested to 1e-6). BERT-class layers
    (``intermediate`` + ``output.dense``: BERT, RoBERTa, XLM-R, MPNet, ELECTRA, MiniLM) and decoder
    layers with an ``mlp`` (Mistral, Llama, Qwen2/3, Gemma) or an ``ffn`` (DistilBERT) are supported.
    In a BERT layer the expert is ``down(act(up(x)))``; the layer's own ``output.dense`` becomes an
    identity, and its dropout, residual and LayerNorm stay shared.

Routing (one decision per text, the same in every converted layer)
    * enforced: the text's domain (a training dataset's name) picks its expert;
    * a router (optional under enforced routing, required under learned routing): a linear layer on the
      mean of the text's input token embeddings (detached, standardised), trained to predict the
      domain with a cross-entropy term; it routes texts whose domain the caller does not give;
    * learned: the router's top-k experts process the text during training too; their outputs are mixed
      with the router's probabilities renormalised over the k (so they sum to 1 and the upcycled model
      still equals the dense one), plus a load-balancing term (Switch Transformer, Fedus et al. 2021):
      ``N · Σ_e f_e · P_e`` with f_e the share of assignments to expert e and P_e its mean probability.

    Each text runs through its own expert(s) only: with top-1 routing a step costs what the dense
    model's does (rows are gathered per expert; a batch of one domain takes the dense path as is).

Domain tokens (optional)
    A token per domain (``[wordnet]``) is added to the vocabulary and inserted after the input's first
    special token (``[CLS] [wordnet] text [SEP]``), or first when the tokenizer adds none. Its embedding
    starts as the mean embedding of the domain name's own tokens. Inputs are truncated one token shorter
    so the inserted token fits the same limit.

Router and load-balancing losses are added to the training loss through the embeddings' backward
(:class:`_AttachLoss`), so the plain step and GradCache need no change. Each forward pass (one role, or
one GradCache chunk) contributes its own mean weighted by its share of the step's texts
(:meth:`MoETextEncoder.training_step`), so a step adds each loss once at its configured weight.

Saving: a sentence-transformers folder whose first module is :class:`MoETransformer` (the MoE settings
go into its ``sentence_bert_config.json``). :func:`load_moe_encoder` (and so
``embedtrain.models.load_text_encoder(path)`` and ``embedtrain.load(path)``) loads it as a
:class:`MoETextEncoder`; sentence-transformers loads it with
``SentenceTransformer(path, trust_remote_code=True)`` (the class is imported from the installed
``embedtrain`` package, never from the folder) and routes with ``encode(texts, domain="wordnet")``.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from sentence_transformers.sentence_transformer.modules import Transformer
from torch import nn

from embedtrain.errors import EmbedtrainError, did_you_mean
from embedtrain.models.checkpointing import checkpoint_activations
from embedtrain.models.encoder import TextEncoder
from embedtrain.models.folders import (
    MOE,
    MOE_MODULE_TYPE,
    find_model_kind,
    read_json_object,
    read_modules,
)

Domain = Union[None, str, Sequence[str], torch.Tensor]

@dataclass
class MoESettings:
    """What was converted and how texts are routed (saved with the model)."""

    domains: list[str]
    layers: list[int]
    routing: str = "enforced"  # or "learned"
    router: bool = True
    top_k: int = 1
    router_loss_weight: float = 0.01
    load_balancing_weight: float = 0.01
    domain_tokens: bool = False
    domain_token_ids: list[int] = field(default_factory=list)
    domain_token_offset: int = 1  # tokens before the domain token ([CLS] or BOS: 1; none: 0)

    def __post_init__(self):
        where = "moe"
        if len(self.domains) < 2:
            raise EmbedtrainError(f"{where}.domains: an MoE needs at least 2 domains (one expert each), got {self.domains}")
        if len(set(self.domains)) != len(self.domains):
            raise EmbedtrainError(f"{where}.domains: {self.domains} names a domain twice")
        if self.routing not in ("enforced", "learned"):
            raise EmbedtrainError(f"{where}.routing: {self.routing!r} is not allowed; choose enforced or learned")
        if self.routing == "learned" and not self.router:
            raise EmbedtrainError(f"{where}.router: learned routing needs the router; set router: true")
        if not 1 <= self.top_k <= len(self.domains):
            raise EmbedtrainError(f"{where}.top_k: must be between 1 and {len(self.domains)} (the experts), got {self.top_k}")
        if self.top_k > 1 and self.routing != "learned":
            raise EmbedtrainError(f"{where}.top_k: {self.top_k} experts per text needs routing: learned")

    @property
    def num_experts(self) -> int:
        return len(self.domains)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "moe") -> "MoESettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EmbedtrainError(f"{where}: unknown MoE settings {', '.join(unknown)}; this model was saved by a newer embedtrain")
        return cls(**data)


# -- experts ---------------------------------------------------------------------------------


class EncoderFeedForward(nn.Module):
    """A BERT-class feed-forward block as one module: ``down(act(up(x)))`` (dropout, residual and
    LayerNorm stay in the layer's ``output``)."""

    def __init__(self, up: nn.Linear, activation, down: nn.Linear):
        super().__init__()
        self.up = up
        self.act = activation
        self.down = down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class Routing:
    """The routing of the current forward pass, shared by a model's routed layers.

    ``index`` (B, k) and ``weight`` (B, k) say which experts process each text and how their outputs
    are mixed. :func:`route` sets them before the backbone runs; gradients of the auxiliary losses are
    collected through :meth:`take_auxiliary_loss`. Statistics count training forwards only.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.index: Optional[torch.Tensor] = None
        self.weight: Optional[torch.Tensor] = None
        self.auxiliary_loss: Optional[torch.Tensor] = None
        self.step_texts: Optional[int] = None
        """Texts one training step embeds (every role, every chunk); each forward's auxiliary loss is
        weighted by its share of them, so a step adds the configured weight once, whatever the forwards."""
        self.loss_scale = 1.0
        """The gradient the auxiliary loss receives: the main loss's scale (fp16), so both agree."""
        self.reset_statistics()

    def reset_statistics(self) -> None:
        self.texts_per_expert = [0] * self.num_experts
        self.router_correct = 0
        self.router_judged = 0
        self.auxiliary_sum = 0.0
        self.auxiliary_count = 0

    def take_auxiliary_loss(self) -> Optional[torch.Tensor]:
        loss, self.auxiliary_loss = self.auxiliary_loss, None
        return loss

    def __deepcopy__(self, memo):  # a copied model gets its own, empty routing state
        return Routing(self.num_experts)

    def kept_for_recomputation(self):
        """``torch.utils.checkpoint``'s ``context_fn`` for a checkpointed layer: the forward pass's context notes
        the routing it runs with, and the recomputation's puts that routing back while the layer runs again (in
        the backward pass, when ``index`` and ``weight`` already hold a later forward pass's: another role, or
        another GradCache chunk). The routing decision itself, its auxiliary losses and statistics are made once,
        in :func:`route`, outside the checkpointed layers."""
        kept: dict = {}

        @contextlib.contextmanager
        def forward():
            kept["routing"] = (self.index, self.weight)
            yield

        @contextlib.contextmanager
        def recompute():
            now = (self.index, self.weight)
            self.index, self.weight = kept["routing"]
            try:
                yield
            finally:
                self.index, self.weight = now

        return forward(), recompute()


class RoutedExperts(nn.Module):
    """N experts in place of one feed-forward block; each text goes through the experts its routing names.

    Rows are gathered per expert so every text is computed by its own expert(s) only; when every text of
    the batch has the same single expert (a batch of one domain) the batch passes through that expert
    as is, exactly the dense computation.
    """

    def __init__(self, experts: Sequence[nn.Module], routing: Routing):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        object.__setattr__(self, "routing", routing)  # shared with the other layers, not a submodule

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        index, weight = self.routing.index, self.routing.weight
        if index is None:
            raise EmbedtrainError(
                "MoE layer called without a routing decision; run the backbone through "
                "embedtrain.models.moe.route() (MoETextEncoder and MoETransformer do)"
            )
        if index.shape[0] != x.shape[0]:
            raise EmbedtrainError(f"MoE routing is for {index.shape[0]} texts but the layer got {x.shape[0]}")
        if index.shape[1] == 1:
            first = index[0, 0]
            if bool((index == first).all()):
                return self.experts[int(first)](x, *args, **kwargs)
        out = None
        for e in torch.unique(index).tolist():
            hit = index == e  # (B, k)
            rows = hit.any(dim=1).nonzero().squeeze(1)
            y = self.experts[e](x[rows], *args, **kwargs)
            if out is None:
                out = y.new_zeros((x.shape[0],) + tuple(y.shape[1:]))
            if index.shape[1] == 1:
                out = out.index_copy(0, rows, y)
            else:
                w = (weight * hit).sum(dim=1)[rows].to(y.dtype)
                out = out.index_add(0, rows, y * w.view(-1, *([1] * (y.dim() - 1))))
        return out


class DomainRouter(nn.Module):
    """Predicts a text's domain from the mean of its input token embeddings: logits (B, N).

    The features are detached (the router learns on its own; it does not change the embeddings) and
    standardised per text (a layer norm without parameters), so its learning speed does not depend
    on the scale of the embedding table. It starts at zero (no preference), which also leaves the
    random number stream alone: an upcycled model trains with the dense model's data order and dropout
    masks, so the two can be compared run against run.
    """

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # its random initialisation is replaced at once
            self.proj = nn.Linear(hidden_size, num_experts)
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.bias.zero_()

    def forward(self, token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
        mean = (token_embeddings.detach() * mask).sum(1) / mask.sum(1).clamp(min=1)
        features = F.layer_norm(mean.float(), mean.shape[-1:])
        return self.proj(features.to(self.proj.weight.dtype)).float()


# -- upcycling -------------------------------------------------------------------------------


def transformer_layers(backbone) -> nn.ModuleList:
    """The list of transformer layers of a BERT-class encoder or a decoder base model."""
    for path in ("encoder.layer", "layers", "transformer.layer", "model.layers"):
        node = backbone
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, nn.ModuleList) and len(node) > 0:
            return node
    raise EmbedtrainError(
        f"model.moe: cannot find the transformer layers of {type(backbone).__name__}; MoE upcycling supports "
        "BERT-class encoders (encoder.layer) and decoder base models (layers)"
    )


def resolve_layers(requested: Sequence[int], count: int) -> list[int]:
    """Layer indices (negative ones count from the end; empty = every layer) as sorted non-negative ints."""
    if not requested:
        return list(range(count))
    resolved = []
    for i in requested:
        j = i + count if i < 0 else i
        if not 0 <= j < count:
            raise EmbedtrainError(f"model.moe.layers: {i} is not a layer of this {count}-layer model; use 0..{count - 1} or -1..-{count}")
        resolved.append(j)
    if len(set(resolved)) != len(resolved):
        raise EmbedtrainError(f"model.moe.layers: {list(requested)} names a layer twice")
    return sorted(resolved)


def _convert_layer(layer: nn.Module, num_experts: int, routing: Routing, where: str) -> None:
    intermediate, output = getattr(layer, "intermediate", None), getattr(layer, "output", None)
    if isinstance(getattr(intermediate, "dense", None), nn.Linear) and isinstance(getattr(output, "dense", None), nn.Linear):
        template = EncoderFeedForward(intermediate.dense, intermediate.intermediate_act_fn, output.dense)
        layer.intermediate = RoutedExperts([copy.deepcopy(template) for _ in range(num_experts)], routing)
        output.dense = nn.Identity()  # the experts end with their own copy of it
        return
    for name in ("mlp", "ffn"):
        block = getattr(layer, name, None)
        if isinstance(block, nn.Module) and not isinstance(block, RoutedExperts):
            setattr(layer, name, RoutedExperts([copy.deepcopy(block) for _ in range(num_experts)], routing))
            return
    raise EmbedtrainError(
        f"model.moe: {where} ({type(layer).__name__}) has no feed-forward block embedtrain knows "
        "(intermediate + output.dense, mlp, or ffn)"
    )


def _domain_token_offset(tokenizer) -> int:
    """1 when the tokenizer puts a special token first ([CLS], <s>), else 0."""
    with_special = tokenizer("x")["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    return 1 if len(with_special) > len(plain) and with_special[0] in special and with_special[0] != plain[0] else 0


def domain_token(domain: str) -> str:
    return f"[{domain}]"


def _add_domain_tokens(backbone, tokenizer, settings: MoESettings) -> None:
    """Add one token per domain to the tokenizer and the embedding table (rows start as the mean
    embedding of the domain name's own tokens)."""
    if tokenizer.padding_side != "right":
        raise EmbedtrainError("model.moe.domain_tokens: needs a tokenizer that pads on the right")
    name_ids = [tokenizer(d.replace("_", " "), add_special_tokens=False)["input_ids"] or [tokenizer.unk_token_id or 0]
                for d in settings.domains]
    tokenizer.add_tokens([domain_token(d) for d in settings.domains], special_tokens=True)
    ids = [tokenizer.convert_tokens_to_ids(domain_token(d)) for d in settings.domains]
    table = backbone.get_input_embeddings()
    if max(ids) >= table.weight.shape[0]:
        with torch.random.fork_rng(devices=[]):  # the new rows are overwritten below; draw nothing
            backbone.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        table = backbone.get_input_embeddings()
    with torch.no_grad():
        for token_id, parts in zip(ids, name_ids):
            table.weight[token_id] = table.weight[parts].mean(0)
    settings.domain_token_ids = ids
    settings.domain_token_offset = _domain_token_offset(tokenizer)


def upcycle(backbone, settings: MoESettings, tokenizer=None):
    """Turn the feed-forward blocks of ``settings.layers`` into ``settings.num_experts`` experts (copies
    of the dense block), add the router and the domain tokens as configured. Changes ``backbone`` in
    place and returns it; ``settings.layers`` must already be resolved (see :func:`resolve_layers`).

    The domain tokens are added to ``tokenizer`` (required with ``settings.domain_tokens`` unless the
    settings carry their ids already, as when a saved model is rebuilt).
    """
    if hasattr(backbone, "moe_settings"):
        raise EmbedtrainError("model.moe: this model is already a mixture of experts; it cannot be upcycled twice")
    layers = transformer_layers(backbone)
    routing = Routing(settings.num_experts)
    for i in settings.layers:
        _convert_layer(layers[i], settings.num_experts, routing, f"layer {i}")
    if settings.router:
        hidden = backbone.get_input_embeddings().weight.shape[1]
        backbone.moe_router = DomainRouter(hidden, settings.num_experts).to(backbone.get_input_embeddings().weight.device)
    if settings.domain_tokens and not settings.domain_token_ids:
        if tokenizer is None:
            raise EmbedtrainError("model.moe.domain_tokens: adding domain tokens needs the tokenizer")
        _add_domain_tokens(backbone, tokenizer, settings)
    backbone.moe_settings = settings
    backbone.moe_routing = routing
    if any(getattr(m, "gradient_checkpointing", False) is True for m in backbone.modules()):
        checkpoint_routed(backbone)  # checkpointed before it had experts: now with their routing kept
    return backbone


def adapted_experts(backbone, target_modules: Sequence[str]) -> None:
    """An upcycled backbone just wrapped with LoRA (peft froze all but the adapters): check that some layer of the
    experts has adapters (else they would stay identical copies) and let the router train in full."""
    if not any(".experts." in name and "lora_" in name for name, _ in backbone.named_parameters()):
        layers = sorted({n.rsplit(".", 1)[-1] for n, m in backbone.named_modules()
                         if ".experts." in n and isinstance(m, nn.Linear)})
        raise EmbedtrainError(f"model.lora.target_modules: no layer of the experts is among {', '.join(target_modules)}, "
                              f"so the experts would stay identical copies; add some of theirs: {', '.join(layers)}")
    router = getattr(backbone, "moe_router", None)
    for p in router.parameters() if router is not None else ():
        p.requires_grad_(True)


def checkpoint_routed(backbone) -> None:
    """Activation checkpointing of an upcycled backbone's layers, each recomputed with the routing of the forward
    pass it recomputes (:meth:`Routing.kept_for_recomputation`)."""
    checkpoint_activations(backbone, context_fn=backbone.moe_routing.kept_for_recomputation)


def is_moe_backbone(backbone) -> bool:
    return isinstance(getattr(backbone, "moe_settings", None), MoESettings)


# -- routing a forward pass ------------------------------------------------------------------


class _AttachLoss(torch.autograd.Function):
    """Identity on the embeddings whose backward also sends gradient ``scale`` to ``loss``: the auxiliary
    routing losses join the training loss of whatever backpropagates through the embeddings (``scale``:
    the training loss's own scale under fp16, else 1)."""

    @staticmethod
    def forward(ctx, embeddings, loss, scale):
        ctx.loss_shape, ctx.loss_dtype, ctx.scale = loss.shape, loss.dtype, scale
        return embeddings.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full(ctx.loss_shape, ctx.scale, dtype=ctx.loss_dtype, device=grad.device), None


def attach_auxiliary_loss(embeddings: torch.Tensor, loss: Optional[torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    if loss is None or not torch.is_grad_enabled() or not loss.requires_grad:
        return embeddings
    return _AttachLoss.apply(embeddings, loss, scale)


def _insert_domain_token(tensors: dict[str, torch.Tensor], attention_mask: torch.Tensor, values: dict[str, torch.Tensor],
                         offset: int) -> dict[str, torch.Tensor]:
    """Insert one column per row after the row's first ``offset`` real tokens (any padding side)."""
    batch, length = attention_mask.shape
    first_real = attention_mask.to(torch.int64).argmax(dim=1)
    position = (first_real + offset).clamp(max=length).unsqueeze(1)  # (B, 1)
    columns = torch.arange(length + 1, device=attention_mask.device).unsqueeze(0)  # (1, L+1)
    source = torch.where(columns < position, columns, columns - 1).clamp(0, length - 1)
    at = columns == position
    out = {}
    for key, tensor in tensors.items():
        moved = tensor.gather(1, source.expand(batch, -1))
        out[key] = torch.where(at, values[key].unsqueeze(1).to(tensor.dtype), moved)
    return out


def route(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor, domain: Optional[torch.Tensor] = None,
          extra: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """Decide the experts of each text and prepare the backbone's inputs; returns the inputs to use
    (``input_ids``, ``attention_mask`` and the ``extra`` (B, L) tensors, with the domain token inserted
    when the model has domain tokens).

    ``domain``: (B,) expert indices, or None to let the router decide. Under learned routing the router
    decides in training mode even when the domain is known (the domain then only supervises it).
    """
    settings: MoESettings = backbone.moe_settings
    routing: Routing = backbone.moe_routing
    router = getattr(backbone, "moe_router", None)
    batch = input_ids.shape[0]
    if domain is not None:
        domain = domain.to(input_ids.device, torch.int64).reshape(-1)
        if domain.numel() == 1 and batch != 1:
            domain = domain.expand(batch)
        if domain.shape[0] != batch:
            raise EmbedtrainError(f"MoE routing: {domain.shape[0]} domains for {batch} texts")
    training = backbone.training
    logits = None
    if router is not None:
        logits = router(backbone.get_input_embeddings()(input_ids), attention_mask)
    if domain is not None and not (settings.routing == "learned" and training):
        index = domain.unsqueeze(1)
        weight = torch.ones(batch, 1, device=input_ids.device)
    else:
        if logits is None:
            raise EmbedtrainError(
                f"this MoE model has no router: give each text a domain ({', '.join(settings.domains)})"
            )
        probs = logits.softmax(dim=-1)
        top, index = probs.topk(settings.top_k, dim=-1)
        weight = top / top.sum(dim=-1, keepdim=True)
    routing.index, routing.weight = index, weight

    routing.auxiliary_loss = None
    if logits is not None and training and torch.is_grad_enabled():
        terms = []
        if domain is not None and settings.router_loss_weight > 0:
            terms.append(settings.router_loss_weight * F.cross_entropy(logits, domain))
        if settings.routing == "learned" and settings.load_balancing_weight > 0:
            n = settings.num_experts
            share = F.one_hot(index, n).float().sum(dim=(0, 1)) / index.numel()  # f_e
            terms.append(settings.load_balancing_weight * n * (share * logits.softmax(dim=-1).mean(0)).sum())
        if terms:
            routing.auxiliary_loss = torch.stack(terms).sum()
            if routing.step_texts:  # this forward's share of the step's texts
                routing.auxiliary_loss = routing.auxiliary_loss * (batch / routing.step_texts)
    if training and torch.is_grad_enabled():
        for e, count in enumerate(torch.bincount(index[:, 0], minlength=settings.num_experts).tolist()):
            routing.texts_per_expert[e] += count
        if logits is not None and domain is not None:
            routing.router_correct += int((logits.argmax(dim=-1) == domain).sum())
            routing.router_judged += batch
        if routing.auxiliary_loss is not None:  # logged per text, as configured (before the share)
            share = batch / routing.step_texts if routing.step_texts else 1.0
            routing.auxiliary_sum += float(routing.auxiliary_loss.detach()) / share
            routing.auxiliary_count += 1

    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **(extra or {})}
    if settings.domain_tokens:
        token_ids = torch.tensor(settings.domain_token_ids, device=input_ids.device)[index[:, 0]]
        values = {"input_ids": token_ids, "attention_mask": torch.ones_like(token_ids)}
        values.update({k: torch.zeros_like(token_ids) for k in inputs if k not in values})
        inputs = _insert_domain_token(inputs, attention_mask, values, settings.domain_token_offset)
    return inputs


def domain_indices(settings: MoESettings, domain: Domain, batch: int) -> Optional[torch.Tensor]:
    """Domain names (one for all texts, or one per text) or indices as a (B,) tensor; None stays None."""
    if domain is None:
        return None
    if isinstance(domain, torch.Tensor):
        return domain
    names = [domain] * batch if isinstance(domain, str) else list(domain)
    if len(names) != batch:
        raise EmbedtrainError(f"domain: {len(names)} domains for {batch} texts; give one domain, or one per text")
    out = []
    for name in names:
        if name not in settings.domains:
            raise EmbedtrainError(
                f"domain: {name!r} is not a domain of this model{did_you_mean(str(name), settings.domains)}; "
                f"choose one of: {', '.join(settings.domains)}"
            )
        out.append(settings.domains.index(name))
    return torch.tensor(out, dtype=torch.int64)


# -- sentence-transformers module ------------------------------------------------------------


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json_object(index)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    raise EmbedtrainError(f"{folder}: no model.safetensors; an MoE model folder holds its weights as safetensors")


class MoETransformer(Transformer):
    """sentence-transformers' ``Transformer`` around an upcycled backbone; ``forward`` routes each batch.

    ``SentenceTransformer.encode(texts, domain="wordnet")`` sends every text to that domain's expert;
    without ``domain`` the router decides (an error when the model has none). The MoE settings are
    saved under ``moe`` in ``sentence_bert_config.json``; loading rebuilds the dense architecture from
    ``config.json``, upcycles it the same way and loads the saved weights (every key must match).
    """

    config_keys = Transformer.config_keys + ["moe"]
    forward_kwargs = {"domain"}

    def __init__(self, model_name_or_path: str, *, moe: Optional[dict] = None, **kwargs):
        object.__setattr__(self, "_settings_to_load", moe)
        super().__init__(model_name_or_path, **kwargs)

    @classmethod
    def from_transformer(cls, transformer: Transformer) -> "MoETransformer":
        """Re-type a ``Transformer`` whose model was just upcycled (its state is kept as it is)."""
        if not is_moe_backbone(transformer.model):
            raise EmbedtrainError("MoETransformer: the transformer's model is not upcycled; call upcycle() first")
        transformer.__class__ = cls
        return transformer

    @property
    def moe(self) -> dict:
        return self.model.moe_settings.to_dict()

    def _load_model(self, model_name_or_path, transformer_task, config, backend, is_peft_model, **model_kwargs):
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        if self._settings_to_load is None:
            raise EmbedtrainError(f"{model_name_or_path}: MoETransformer needs its 'moe' settings in sentence_bert_config.json")
        if backend != "torch" or is_peft_model:
            raise EmbedtrainError(f"{model_name_or_path}: MoE models load with the torch backend, without PEFT adapters")
        folder = Path(model_name_or_path) / model_kwargs.get("subfolder", "")
        if not folder.is_dir():
            raise EmbedtrainError(f"{model_name_or_path}: MoE models load from a local folder; download it first")
        settings = MoESettings.from_dict(dict(self._settings_to_load), where=str(folder / "sentence_bert_config.json"))
        kwargs = {k: model_kwargs[k] for k in ("attn_implementation", "dtype", "torch_dtype") if k in model_kwargs}
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = AutoModel.from_config(config, **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
        upcycle(model, settings)
        state = _load_weights(folder)
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            missing, unexpected = result.missing_keys, result.unexpected_keys
            raise EmbedtrainError(
                f"{folder}: the saved weights do not match the MoE settings ({len(missing)} missing, e.g. "
                f"{(missing or ['-'])[0]}; {len(unexpected)} unexpected, e.g. {(unexpected or ['-'])[0]}); "
                "the folder is damaged or was edited"
            )
        return model.eval()

    def forward(self, features: dict, domain: Domain = None, **kwargs) -> dict:
        ids, mask = features["input_ids"], features["attention_mask"]
        extra = {k: v for k, v in features.items()
                 if k not in ("input_ids", "attention_mask") and isinstance(v, torch.Tensor) and v.shape == ids.shape}
        indices = domain_indices(self.model.moe_settings, domain, ids.shape[0])
        features.update(route(self.model, ids, mask, indices, extra))
        return super().forward(features, **kwargs)


def load_moe_sentence_transformer(path: str, model_kwargs: Optional[dict] = None):
    """A saved MoE folder as a ``SentenceTransformer``, built module by module (the first module is
    embedtrain's own :class:`MoETransformer`; the others must be sentence-transformers' modules)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import import_from_string

    folder = Path(path)
    modules = []
    for entry in read_modules(folder) or []:
        kind = entry["type"]
        if kind == MOE_MODULE_TYPE:
            module = MoETransformer.load(str(folder), subfolder=entry["path"], model_kwargs=dict(model_kwargs or {}),
                                         local_files_only=True)
        elif kind.startswith("sentence_transformers."):
            module = import_from_string(kind).load(str(folder), subfolder=entry["path"], local_files_only=True)
        else:
            raise EmbedtrainError(
                f"{folder / 'modules.json'}: module type {kind!r} is neither embedtrain's MoE module nor a "
                "sentence-transformers module; load it with sentence-transformers instead"
            )
        modules.append(module)
    st = SentenceTransformer(modules=modules, device="cpu")
    saved = folder / "config_sentence_transformers.json"
    if saved.is_file():
        config = read_json_object(saved)
        st.prompts = {k: v for k, v in (config.get("prompts") or {}).items()}
    return st


def is_moe_folder(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a folder holding a saved MoE model (see :func:`embedtrain.models.folders.find_model_kind`)."""
    return find_model_kind(path) == MOE


# -- the encoder -----------------------------------------------------------------------------


class MoETextEncoder(TextEncoder):
    """A :class:`TextEncoder` whose backbone is upcycled: every call routes its texts first.

    The domain of a forward pass is, in order: the ``domain`` argument, the domain set with
    :meth:`routed_to` (the trainer routes each batch to its dataset's domain this way), else the router.
    """

    def __init__(self, sentence_transformer, **kwargs):
        super().__init__(sentence_transformer, **kwargs)
        if not is_moe_backbone(self.backbone):
            raise EmbedtrainError("MoETextEncoder: the backbone is not upcycled; use upcycle_encoder()")
        self._active_domain: Domain = None

    @staticmethod
    def read_sentence_transformer(path: str, attn_implementation: str, trust_remote_code: bool, revision: Optional[str],
                                  dtype: str = "float32"):
        """A saved MoE folder's ``SentenceTransformer``. The first module is built here from the installed
        package, so ``trust_remote_code`` and ``revision`` (accepted for :meth:`TextEncoder.load`'s
        signature) play no part: the folder is local."""
        return load_moe_sentence_transformer(path, {"attn_implementation": attn_implementation,
                                                    "dtype": getattr(torch, dtype)})

    def _recompute_context(self):
        return self.backbone.moe_routing.kept_for_recomputation  # each layer recomputed with its own pass's routing

    def add_lora(self, r: int, alpha: float, dropout: float, target_modules: Sequence[str]) -> None:
        """LoRA adapters on an upcycled backbone: every expert's targeted layers get adapters of their own (so the
        experts, copies of one block, can still part), and the router trains in full beside them. At least one
        expert layer must be a target; else the experts would stay identical."""
        super().add_lora(r, alpha, dropout, target_modules)
        adapted_experts(self.backbone, target_modules)

    @property
    def settings(self) -> MoESettings:
        return self.backbone.moe_settings

    @property
    def domains(self) -> list[str]:
        return list(self.settings.domains)

    @property
    def has_router(self) -> bool:
        return getattr(self.backbone, "moe_router", None) is not None

    @contextlib.contextmanager
    def routed_to(self, domain: Domain):
        """Route every forward pass inside the block to ``domain`` (a name, or None for the router)."""
        if isinstance(domain, str):
            domain_indices(self.settings, domain, 1)  # a clear error for an unknown name, now
        previous, self._active_domain = self._active_domain, domain
        try:
            yield self
        finally:
            self._active_domain = previous

    @contextlib.contextmanager
    def training_step(self, texts: int, loss_scale: float = 1.0):
        """Inside the block, forwards belong to one training step that embeds ``texts`` texts in all (every
        role and chunk): each adds its share of the auxiliary losses, whose gradient is ``loss_scale``."""
        routing = self.backbone.moe_routing
        routing.step_texts, routing.loss_scale = texts, loss_scale
        try:
            yield self
        finally:
            routing.step_texts, routing.loss_scale = None, 1.0

    def forward(self, input_ids=None, attention_mask=None, many=None, domain: Domain = None):
        if many is not None:
            return [self._embed(b["input_ids"], b["attention_mask"], domain) for b in many]
        return self._embed(input_ids, attention_mask, domain)

    def _embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, domain: Domain = None) -> torch.Tensor:
        domain = self._active_domain if domain is None else domain
        inputs = route(self.backbone, input_ids, attention_mask, domain_indices(self.settings, domain, input_ids.shape[0]))
        hidden = self.backbone(**inputs).last_hidden_state
        emb = self._pool(hidden, inputs["attention_mask"])
        emb = F.normalize(emb, dim=-1) if self.normalize else emb
        routing = self.backbone.moe_routing
        return attach_auxiliary_loss(emb, routing.take_auxiliary_loss(), routing.loss_scale)

    def max_length_for(self, role: str) -> int:
        # the inserted domain token takes one of the limit's tokens
        return super().max_length_for(role) - (1 if self.settings.domain_tokens else 0)

    def freeze_unused_parameters(self) -> list[str]:
        """As :meth:`TextEncoder.freeze_unused_parameters`, probing once per expert (a probe routed to one
        domain leaves the other experts without gradient, and they are used all the same)."""
        probe = self.tokenize(["probe text", "another probe"], "document")
        probe = {k: v.to(self.device) for k, v in probe.items()}
        was_training = self.training
        self.train()
        used: set[str] = set()
        settings, routing = self.settings, self.settings.routing
        # one probe forced to each expert, then one routed as configured (under learned routing the
        # router's gradient comes from the routing itself)
        for e, forced in [(e, True) for e in range(settings.num_experts)] + [(0, False)]:
            for p in self.parameters():
                p.grad = None
            domain = torch.full((probe["input_ids"].shape[0],), e, dtype=torch.int64)
            settings.routing = "enforced" if forced else routing
            # the first probe draws the dropout masks the dense model's one probe draws; the others
            # draw nothing, so training continues on the dense model's random number stream
            with contextlib.nullcontext() if e == 0 and forced else torch.random.fork_rng(devices=self._rng_devices()):
                try:
                    self._embed(probe["input_ids"], probe["attention_mask"], domain).sum().backward()
                finally:
                    settings.routing = routing
            used |= {n for n, p in self.named_parameters() if p.grad is not None}
        frozen = []
        for name, p in self.named_parameters():
            if p.requires_grad and name not in used:
                p.requires_grad_(False)
                frozen.append(name)
            p.grad = None
        self.backbone.moe_routing.reset_statistics()
        self.train(was_training)
        return frozen

    def _rng_devices(self) -> list:
        device = self.device
        return [device] if device.type == "cuda" else []

    @torch.no_grad()
    def encode(self, texts: Sequence[str], role: str = "document", prompt: Optional[str] = None, batch_size: int = 128,
               show_progress: bool = False, desc: str = "encoding", domain: Domain = None) -> torch.Tensor:
        """As :meth:`TextEncoder.encode`; ``domain`` is one domain name for every text, one per text, or
        None (the domain set with :meth:`routed_to`, else the router)."""
        domain = self._active_domain if domain is None else domain
        per_text = domain_indices(self.settings, domain, len(texts))
        prefix = self.prompts.get(role, "") if prompt is None else prompt
        device = self.device

        def embed(idx: list[int]) -> torch.Tensor:
            enc = self.tokenize([prefix + texts[i] for i in idx], role)
            batch_domain = None if per_text is None else per_text[idx]
            return self._embed(enc["input_ids"].to(device), enc["attention_mask"].to(device), batch_domain)

        return self._encode_in_batches(texts, embed, batch_size, show_progress, desc)

    @torch.no_grad()
    def predict_domains(self, texts: Sequence[str], role: str = "document", prompt: Optional[str] = None,
                        batch_size: int = 256) -> list[str]:
        """The router's domain for each text (its top-1 expert), without running the backbone."""
        if not self.has_router:
            raise EmbedtrainError("this MoE model has no router; it cannot predict domains")
        prefix = self.prompts.get(role, "") if prompt is None else prompt
        router = self.backbone.moe_router
        table = self.backbone.get_input_embeddings()
        names = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenize([prefix + t for t in texts[start : start + batch_size]], role)
            ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
            names += [self.settings.domains[i] for i in router(table(ids), mask).argmax(dim=-1).tolist()]
        return names

    def routing_statistics(self, reset: bool = True) -> dict[str, float]:
        """Training-time routing figures since the last reset: each expert's share of the texts, the
        router's accuracy against the known domains, the mean auxiliary loss."""
        routing: Routing = self.backbone.moe_routing
        total = sum(routing.texts_per_expert)
        stats: dict[str, float] = {}
        if total:
            stats.update({f"moe/share/{d}": n / total for d, n in zip(self.settings.domains, routing.texts_per_expert)})
        if routing.router_judged:
            stats["moe/router_accuracy"] = routing.router_correct / routing.router_judged
        if routing.auxiliary_count:
            stats["moe/auxiliary_loss"] = routing.auxiliary_sum / routing.auxiliary_count
        if reset:
            routing.reset_statistics()
        return stats


load_moe_encoder = MoETextEncoder.load
"""A saved MoE folder as a :class:`MoETextEncoder`; settings as for :func:`embedtrain.models.load_text_encoder`,
which calls this for MoE folders."""


def upcycle_encoder(
    encoder: TextEncoder,
    domains: Sequence[str],
    layers: Sequence[int] = (),
    routing: str = "enforced",
    router: bool = True,
    top_k: int = 1,
    router_loss_weight: float = 0.01,
    load_balancing_weight: float = 0.01,
    domain_tokens: bool = False,
) -> MoETextEncoder:
    """A dense :class:`TextEncoder` as a :class:`MoETextEncoder` with one expert per domain.

    The dense encoder's backbone is changed in place (do not use ``encoder`` afterwards). ``layers``:
    indices of the layers to convert (negative from the end; empty = all).
    """
    if isinstance(encoder, MoETextEncoder):
        raise EmbedtrainError("model.moe: this model is already a mixture of experts; it cannot be upcycled twice")
    settings = MoESettings(
        domains=list(domains), layers=resolve_layers(layers, len(transformer_layers(encoder.backbone))),
        routing=routing, router=router, top_k=top_k, router_loss_weight=router_loss_weight,
        load_balancing_weight=load_balancing_weight, domain_tokens=domain_tokens,
    )
    upcycle(encoder.backbone, settings, encoder.tokenizer)
    st = encoder._st
    MoETransformer.from_transformer(st[0])
    return MoETextEncoder(
        st, pooling=encoder.pooling, normalize=encoder.normalize, query_max_length=encoder.query_max_length,
        document_max_length=encoder.document_max_length, query_prompt=encoder.prompts.get("query", ""),
        document_prompt=encoder.prompts.get("document", ""),
    )
