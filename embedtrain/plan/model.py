"""A recipe's model as the plan sees it: built from its configuration on the meta device, no weights read.

The same pieces training uses build it (transformers' ``from_config``, the latent-attention head, peft LoRA, MoE
upcycling, open_clip's CLIP and the towers' trainable choice, the prompted ViT with its proxies), each on
``torch.device("meta")``: every parameter has its real shape, dtype and ``requires_grad``, and no memory.
Besides the counts, each transformer stack is described as a :class:`Tower` for the activation and FLOP
estimates (:mod:`embedtrain.plan.estimate`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from embedtrain.errors import EmbedtrainError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Tower:
    """One transformer stack of the model and how a training step uses it."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int
    """Width of the keys (= of the values): heads x head size, fewer with grouped-query attention."""
    gated: bool
    """A gated MLP (SwiGLU: three matrices) rather than two."""
    params: int
    """Parameters of the stack without its token/patch embedding tables (what the matmuls use)."""
    trainable: int
    backward: bool
    """Whether a step backpropagates through it (something in or below it is trained)."""
    fused_attention: bool
    """Attention through a fused kernel (sdpa, flash): no score matrix is kept for the backward."""
    dropout: bool = False
    """Dropout masks are kept (hidden or attention dropout above 0 while training)."""
    family: str = "vit"
    """Block layout, for what autograd keeps per token: 'bert' (post-norm, GELU MLP), 'decoder' (RMSNorm,
    rotary, grouped-query attention, gated MLP) or 'vit' (pre-norm, fused qkv, GELU MLP: open_clip, timm, VLM
    vision towers)."""
    lora_inputs: int = 0
    """Input features of one block's LoRA-adapted linears, summed (each keeps a dropped-out copy of its input)."""
    lora_dropout: bool = False
    tokens: Optional[int] = None
    """Tokens of every input when the model fixes them (an image's prefix and patch tokens, a CLIP text tower's
    padded context); None when they come from the data."""
    block_bytes: int = 0
    """Bytes of all the stack's repeated blocks (what FSDP wraps one by one); the rest of the model is the root."""
    block_trainable_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelShape:
    source: str
    """Where the configuration came from."""
    base_total: int
    """Parameters of the pretrained model itself, as built (no LoRA, head, proxies or prompts; no language-model head)."""
    total: int
    trainable: int
    weight_bytes: int
    trainable_bytes: int
    largest_layer_bytes: int
    """The biggest transformer block's weights (what FSDP gathers at once)."""
    towers: list[Tower] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "towers"}, "towers": [t.to_dict() for t in self.towers]}


def count(module: nn.Module) -> tuple[int, int, int, int]:
    """(parameters, trainable, their bytes, trainable bytes); shared tensors count once."""
    seen, total, trainable, total_b, trainable_b = set(), 0, 0, 0, 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        total_b += p.numel() * p.element_size()
        if p.requires_grad:
            trainable += p.numel()
            trainable_b += p.numel() * p.element_size()
    return total, trainable, total_b, trainable_b


def read_config(path: str, where: str) -> dict:
    """A model's ``config.json`` (a file, or a folder holding one) as a dict; one clear line when it cannot be read."""
    file = Path(path)
    if file.is_dir():
        for candidate in (file / "config.json", file / "0_Transformer" / "config.json", file / "open_clip_config.json"):
            if candidate.is_file():
                file = candidate
                break
    if not file.is_file():
        raise EmbedtrainError(f"{where}: no config.json at {path}; give a local model folder, or --model-config "
                              "FILE (a copy of the model's config.json: nothing is downloaded)")
    try:
        data = json.loads(file.read_text())
    except ValueError:
        raise EmbedtrainError(f"{where}: {file} is not valid JSON; give the model's config.json") from None
    if not isinstance(data, dict):
        raise EmbedtrainError(f"{where}: {file} holds no JSON object; give the model's config.json")
    return data


def transformers_config(data: dict, where: str):
    from transformers import CONFIG_MAPPING

    kind = data.get("model_type")
    if kind not in CONFIG_MAPPING:
        raise EmbedtrainError(f"{where}: config.json has model_type {kind!r}, which this transformers does not know")
    return CONFIG_MAPPING[kind].from_dict(data)


def _blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer stack (the largest ModuleList)."""
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    return max(lists, key=len) if lists else []


def _block_bytes(module: nn.Module) -> int:
    blocks = _blocks(module)
    return max((sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks), default=0)


def _with_blocks(tower: Tower, blocks: list[nn.Module]) -> Tower:
    """``tower`` with the bytes (all and trainable) of its ``blocks`` filled in."""
    _, _, tower.block_bytes, tower.block_trainable_bytes = count(nn.ModuleList(blocks))
    return tower


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model under peft's LoRA wrapper (the model itself when it has none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _embedding_params(module: nn.Module) -> int:
    return sum(p.numel() for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False))


def _lora_inputs(module: nn.Module) -> int:
    """In-features of the LoRA-wrapped linears of the first block of ``module`` (0 without LoRA)."""
    blocks = _blocks(module)
    if not blocks:
        return 0
    return sum(int(m.in_features) for m in blocks[0].modules() if hasattr(m, "lora_A") and hasattr(m, "in_features"))


def _stack(name: str, module: nn.Module, config, backward: bool, fused_attention: bool, gated: bool, dropout: bool = False,
           family: str = "decoder", lora_dropout: bool = False) -> Tower:
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    total, trainable, _, _ = count(module)
    return _with_blocks(Tower(name, int(config.num_hidden_layers), hidden, int(config.intermediate_size), heads,
                              kv_heads * head_dim, gated, total - _embedding_params(module), trainable, backward,
                              fused_attention, dropout, family, _lora_inputs(module),
                              lora_dropout and _lora_inputs(module) > 0), _blocks(module))


def model_shape(recipe, model_config: Optional[str] = None, num_classes: Optional[int] = None) -> ModelShape:
    """The model a recipe trains, on the meta device (see the module docstring). ``num_classes``: the
    training classes of a metric-learning recipe (one proxy each)."""
    kind = recipe.kind
    if kind == "dml" and recipe.model.backbone.kind == "open_clip":
        return _dml(recipe, num_classes or 100)  # a local open_clip folder loads its (local) weights with its shape
    with torch.device("meta"):
        if kind == "text":
            return _text(recipe, model_config)
        if kind == "vlm2vec":
            return _vlm(recipe, model_config)
        if kind == "clip":
            return _clip(recipe, model_config)
        if kind == "dml":
            return _dml(recipe, num_classes or 100)
    raise EmbedtrainError(f"kind: {kind!r} cannot be planned")


def _config_source(recipe, model_config: Optional[str]) -> str:
    """The file or folder the configuration is read from: --model-config, else the recipe's model (for a
    chained stage, the first stage's model: a stage changes weights, not shapes)."""
    if model_config:
        return model_config
    from embedtrain.config import load_recipe, resolve_path

    r = recipe
    while getattr(r.model, "previous_stage", None):
        r = load_recipe(resolve_path(r.model.previous_stage))
    return resolve_path(r.model.name_or_path)


def _text(recipe, model_config: Optional[str]) -> ModelShape:
    from transformers import AutoModel

    m = recipe.model
    source = _config_source(recipe, model_config)
    config = transformers_config(read_config(source, "model.name_or_path"), "model.name_or_path")
    dtype = DTYPES[m.dtype]  # float32 for encoders unless LoRA freezes their weights (the recipe check)
    config._attn_implementation = m.attn_implementation or "sdpa"
    backbone = AutoModel.from_config(config, dtype=dtype)
    base_total = count(backbone)[0]
    notes, head = [], None
    if m.bidirectional:
        if m.pooling == "latent_attention":
            from embedtrain.models.latent_attention import LatentAttentionPooling

            head = LatentAttentionPooling(int(config.hidden_size), **asdict(m.latent_attention))
    else:
        pooler = getattr(backbone, "pooler", None)
        for p in (pooler.parameters() if pooler is not None else ()):  # unused by mean/cls pooling of hidden states
            p.requires_grad_(False)
        if m.moe is not None:
            from embedtrain.config import moe_domains
            from embedtrain.models.moe import MoESettings, resolve_layers, transformer_layers, upcycle

            mo = m.moe
            settings = MoESettings(domains=moe_domains(recipe), layers=resolve_layers(mo.layers, len(transformer_layers(backbone))),
                                   routing=mo.routing, router=mo.router, top_k=mo.top_k, domain_tokens=False)
            upcycle(backbone, settings)
            if mo.domain_tokens:
                notes.append(f"model.moe.domain_tokens: {len(settings.domains)} token embeddings not counted")
    if m.lora is not None:
        from embedtrain.models.lora import apply_lora

        backbone = apply_lora(backbone, m.lora.r, m.lora.alpha, m.lora.dropout, m.lora.target_modules)
        if m.moe is not None:  # as the trainer: adapters on the experts, the router in full
            from embedtrain.models.moe import adapted_experts

            adapted_experts(backbone, m.lora.target_modules)
    parts = nn.ModuleList([backbone] + ([head] if head is not None else []))
    total, trainable, total_b, trainable_b = count(parts)
    # the block layout, whether or not its attention is made bidirectional: a decoder base model (Mistral, Llama,
    # Qwen2/3, Gemma: RMSNorms, rotary, gated MLP) keeps its blocks in `layers`, a BERT-class encoder in `encoder.layer`
    decoder = isinstance(getattr(_unwrapped(backbone), "layers", None), nn.ModuleList)
    dropout = not decoder and float(getattr(config, "hidden_dropout_prob", 0.0) or 0.0) > 0
    fused = (m.attn_implementation or "sdpa") != "eager" and not dropout
    tower = _stack("decoder" if decoder else "text", backbone, config, backward=True, fused_attention=fused,
                   gated=decoder, dropout=dropout, family="decoder" if decoder else "bert",
                   lora_dropout=bool(m.lora is not None and m.lora.dropout > 0))
    if head is not None:
        tower.params += count(head)[0]
    return ModelShape(str(source), base_total, total, trainable, total_b, trainable_b, _block_bytes(backbone), [tower],
                      notes)


def _vlm(recipe, model_config: Optional[str]) -> ModelShape:
    from transformers import AutoModelForImageTextToText

    m = recipe.model
    source = _config_source(recipe, model_config)
    config = transformers_config(read_config(source, "model.name_or_path"), "model.name_or_path")
    config._attn_implementation = m.attn_implementation or "sdpa"
    full = AutoModelForImageTextToText.from_config(config, dtype=DTYPES[m.dtype])
    backbone = getattr(full, "model", full)  # the language-model head is not used for embeddings
    base_total = count(backbone)[0]
    if m.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        from embedtrain.models.vlm import lora_target

        backbone = get_peft_model(backbone, LoraConfig(r=m.lora.r, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                                                       target_modules=lora_target(m.lora.target_modules)))
    else:
        for name, p in backbone.named_parameters():
            p.requires_grad_(m.train_vision or "language_model" in name)
    total, trainable, total_b, trainable_b = count(backbone)
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    text_cfg = getattr(config, "text_config", config)
    vision_cfg = config.vision_config
    language = getattr(base, "language_model", None) or base
    visual = getattr(base, "visual", None)
    towers = [_stack("language", language, text_cfg, backward=True, fused_attention=True, gated=True,
                     lora_dropout=m.finetune == "lora" and m.lora.dropout > 0)]
    if visual is not None:
        v_total, v_trainable, _, _ = count(visual)
        width = int(getattr(vision_cfg, "embed_dim", None) or vision_cfg.hidden_size)
        mlp = int(getattr(vision_cfg, "intermediate_size", None) or width * getattr(vision_cfg, "mlp_ratio", 4))
        heads = int(vision_cfg.num_heads)
        towers.append(_with_blocks(Tower("vision", int(vision_cfg.depth), width, mlp, heads, width, False, v_total,
                                         v_trainable, backward=v_trainable > 0, fused_attention=True, family="vit"),
                                   _blocks(visual)))
    return ModelShape(str(source), base_total, total, trainable, total_b, trainable_b, _block_bytes(language), towers)


def _clip(recipe, model_config: Optional[str]) -> ModelShape:
    import open_clip

    from embedtrain.models.clip import ClipEncoder, architecture_config

    m = recipe.model
    if model_config or m.name_or_path:
        source = model_config or _config_source(recipe, None)
        data = read_config(source, "model.name_or_path") if Path(source).exists() else \
            {"model_cfg": open_clip.get_model_config(source)}
        if not data.get("model_cfg"):
            raise EmbedtrainError(f"model.name_or_path: {source} gives no open_clip model_cfg; give --model-config "
                                  "open_clip_config.json")
        model_cfg = data["model_cfg"]
    else:
        source, model_cfg = "model.architecture", architecture_config(**asdict(m.architecture))
    clip = open_clip.model.CLIP(**model_cfg)
    base_total = count(clip)[0]
    encoder = ClipEncoder(clip, model_cfg, tokenizer=None)
    encoder.set_towers(m.image_tower, m.text_tower, m.lora.r, m.lora.alpha, m.lora.dropout, m.lora.target_modules)
    total, trainable, total_b, trainable_b = count(encoder)
    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    base = encoder._base()
    visual, text = base.visual, base.transformer
    towers = []
    size = v.get("image_size", 224)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    tokens = {"image": (size // int(v.get("patch_size", 16))) ** 2 + 1, "text": int(t.get("context_length", 77))}
    for name, module, cfg, mode in (("image", visual, v, m.image_tower), ("text", text, t, m.text_tower)):
        width = int(cfg.get("width", 768 if name == "image" else 512))
        heads = int(cfg.get("heads", 8)) if name == "text" else max(1, width // int(cfg.get("head_width", 64)))
        mlp = int(width * float(cfg.get("mlp_ratio", 4.0)))
        tower_total, tower_trainable, _, _ = count(module if name == "text" else visual)
        towers.append(_with_blocks(Tower(name, int(cfg.get("layers", 12)), width, mlp, heads, width, False, tower_total,
                                         tower_trainable, backward=mode != "frozen", fused_attention=True, family="vit",
                                         lora_inputs=_lora_inputs(module),
                                         lora_dropout=mode == "lora" and m.lora.dropout > 0, tokens=tokens[name]),
                                   _blocks(module)))
    return ModelShape(str(source), base_total, total, trainable, total_b, trainable_b, _block_bytes(visual), towers)


def _dml(recipe, classes: int) -> ModelShape:
    import dataclasses

    from embedtrain.train.tasks.dml import build_dml_model

    b = recipe.model.backbone
    planned = dataclasses.replace(recipe, model=dataclasses.replace(
        recipe.model, backbone=dataclasses.replace(b, pretrained=False, weights=None)))
    model = build_dml_model(planned, classes)
    total, trainable, total_b, trainable_b = count(model)
    backbone = model.encoder.backbone
    base_total = count(backbone.model if hasattr(backbone, "model") else backbone)[0]
    blocks = backbone.blocks()
    width = int(backbone.width)
    block_total = sum(p.numel() for blk in blocks for p in blk.parameters())
    # prefix and patch tokens of one image (its shape alone: works on the meta device), then the first block's prompts
    pixels = torch.zeros(1, 3, *backbone.image_size, device=next(backbone.parameters()).device)
    tokens = int(backbone.embed(pixels).shape[1]) + recipe.model.tuning.num_prompts
    tower = _with_blocks(Tower("image", len(blocks), width, 4 * width, max(1, width // 64), width, False, block_total,
                               sum(p.numel() for blk in blocks for p in blk.parameters() if p.requires_grad),
                               backward=True, fused_attention=True, family="vit", tokens=tokens), list(blocks))
    notes = [f"proxies counted for {classes} training classes"]
    return ModelShape(f"{b.kind}:{b.name_or_path}", base_total, total, trainable, total_b, trainable_b,
                      max((sum(p.numel() * p.element_size() for p in blk.parameters()) for blk in blocks), default=0),
                      [tower], notes)
