"""Vision Transformers from three libraries behind one token-level interface.

Visual prompt tuning needs to step inside a ViT: embed the patches, run the blocks one at a time
(inserting or replacing prompt tokens before each), then pool the image tokens. Each adapter below
exposes exactly that for one family:

- ``open_clip``: the visual tower of an open_clip model (``VisionTransformer``), loaded from a folder
  holding ``open_clip_config.json`` and its weights (``open_clip.create_model('local-dir:PATH')``);
- ``timm``: ``timm.models.vision_transformer.VisionTransformer`` (and subclasses that keep its layout);
- ``transformers``: ``ViTModel``, ``CLIPVisionModel`` and ``CLIPVisionModelWithProjection``.

Every adapter holds the original module as ``self.model`` (state-dict keys are the library's own,
under ``model.``), and :meth:`ViTAdapter.spec` describes how to rebuild the architecture without the
original weights file, so a trained model folder is self-contained.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from embedtrain.errors import EmbedtrainError
from embedtrain.models.folders import CLIP_CONFIG_FILE, read_json_object

BACKBONE_KINDS = ("open_clip", "timm", "transformers")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ViTAdapter(nn.Module):
    """A ViT seen as: prefix tokens + patch tokens → blocks → pooled image features.

    Attributes:
        model: the wrapped library module (its parameters are the backbone's).
        width: token width D.
        num_layers: number of transformer blocks.
        num_prefix_tokens: tokens before the patches (the class token, distillation/register tokens);
            prompts are inserted right after them.
        image_size: (height, width) the position table was built for.
        mean, std: per-channel input normalisation the backbone was trained with.
    """

    kind = ""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    # -- the interface --------------------------------------------------------------------
    width: int
    num_layers: int
    num_prefix_tokens: int = 1
    image_size: tuple[int, int]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → tokens (B, prefix + patches, D), ready for the first block."""
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def run_block(self, index: int, tokens: torch.Tensor) -> torch.Tensor:
        return self.blocks()[index](tokens)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block (prompts already removed) → image features (B, D)."""
        raise NotImplementedError

    def projection(self) -> Optional[torch.Tensor]:
        """The backbone's own (D, out) projection after pooling, if it has one (CLIP towers)."""
        return None

    def spec(self) -> dict:
        """JSON-able description that :func:`build_vit_from_spec` turns back into this architecture."""
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """The backbone's own features (no prompts): embed, every block, pool."""
        x = self.embed(pixels)
        for i in range(self.num_layers):
            x = self.run_block(i, x)
        return self.pool(x)


# --------------------------------------------------------------------------------------
# open_clip
# --------------------------------------------------------------------------------------


class OpenClipViT(ViTAdapter):
    """The visual tower of an open_clip model (``open_clip.transformer.VisionTransformer``)."""

    kind = "open_clip"

    def __init__(self, visual: nn.Module, model_cfg: dict, preprocess_cfg: dict):
        super().__init__(visual)
        from open_clip.transformer import VisionTransformer

        if not isinstance(visual, VisionTransformer):
            raise EmbedtrainError(
                f"backbone: the open_clip visual tower is a {type(visual).__name__}; visual prompts need a "
                "ViT tower (open_clip VisionTransformer), not a ResNet or timm tower"
            )
        if visual.attn_pool is not None:
            raise EmbedtrainError("backbone: open_clip towers with attentional pooling are not supported for visual prompts")
        self.model_cfg, self.preprocess_cfg = model_cfg, preprocess_cfg
        self.width = int(visual.conv1.out_channels)
        self.num_layers = len(visual.transformer.resblocks)
        self.image_size = tuple(visual.image_size)
        self.mean = tuple(preprocess_cfg.get("mean", OPENAI_MEAN))
        self.std = tuple(preprocess_cfg.get("std", OPENAI_STD))
        self._batch_first = getattr(visual.transformer, "batch_first", True)

    def embed(self, pixels):
        return self.model._embeds(pixels)

    def blocks(self):
        return list(self.model.transformer.resblocks)

    def run_block(self, index, tokens):
        block = self.model.transformer.resblocks[index]
        if self._batch_first:
            return block(tokens)
        return block(tokens.transpose(0, 1)).transpose(0, 1)

    def pool(self, tokens):
        v = self.model
        if v.final_ln_after_pool:
            pooled = tokens[:, 0] if v.pool_type == "tok" else tokens[:, 1:].mean(dim=1)
            return v.ln_post(pooled)
        tokens = v.ln_post(tokens)
        return tokens[:, 0] if v.pool_type == "tok" else tokens[:, 1:].mean(dim=1)

    def projection(self):
        return self.model.proj

    def spec(self):
        return {"kind": self.kind, "model_cfg": self.model_cfg, "preprocess_cfg": self.preprocess_cfg}


def load_open_clip_folder(path: str) -> OpenClipViT:
    """The visual tower of the open_clip model in ``path`` (open_clip_config.json + weights)."""
    folder = Path(path)
    config_path = folder / CLIP_CONFIG_FILE
    if not folder.is_dir():
        raise EmbedtrainError(f"model.backbone.name_or_path: folder {folder} does not exist; give an open_clip model folder")
    if not config_path.is_file():
        raise EmbedtrainError(
            f"model.backbone.name_or_path: {folder} has no open_clip_config.json; an open_clip folder holds "
            "open_clip_config.json and open_clip_model.safetensors"
        )
    config = read_json_object(config_path)
    if "model_cfg" not in config:
        raise EmbedtrainError(f"{config_path}: no 'model_cfg' section; this is not an open_clip model config")
    weights = [p for p in folder.iterdir() if p.suffix == ".safetensors"]
    if not weights:
        raise EmbedtrainError(f"model.backbone.name_or_path: {folder} has no .safetensors weights (open_clip_model.safetensors)")
    import open_clip

    try:
        model = open_clip.create_model(f"local-dir:{folder}")
    except Exception as err:  # open_clip raises bare RuntimeError/ValueError for bad folders
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise EmbedtrainError(f"model.backbone.name_or_path: open_clip cannot load {folder} ({type(err).__name__}: {first})") from None
    preprocess = dict(getattr(model.visual, "preprocess_cfg", None) or config.get("preprocess_cfg", {}))
    return OpenClipViT(model.visual, config["model_cfg"], _plain(preprocess))


def _open_clip_from_spec(spec: dict) -> OpenClipViT:
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = spec["model_cfg"]
    visual = _build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]), quick_gelu=cfg.get("quick_gelu", False))
    return OpenClipViT(visual, cfg, spec.get("preprocess_cfg", {}))


# --------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------


class TimmViT(ViTAdapter):
    """``timm``'s VisionTransformer (class token, optional register tokens, token or avg pooling)."""

    kind = "timm"

    def __init__(self, model: nn.Module, name: str, kwargs: dict):
        super().__init__(model)
        if not hasattr(model, "blocks") or not hasattr(model, "patch_embed") or not hasattr(model, "_pos_embed"):
            raise EmbedtrainError(f"backbone: timm model {name} is not a plain VisionTransformer; visual prompts need one")
        if getattr(model, "attn_pool", None) is not None:
            raise EmbedtrainError(f"backbone: timm model {name} pools with attention; visual prompts need token or avg pooling")
        self.name, self.kwargs = name, kwargs
        self.width = int(model.embed_dim)
        self.num_layers = len(model.blocks)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.image_size = tuple(model.patch_embed.img_size)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        self.std = tuple(cfg.get("std", IMAGENET_STD))

    def embed(self, pixels):
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(pixels))))

    def blocks(self):
        return list(self.model.blocks)

    def pool(self, tokens):
        return self.model.forward_head(self.model.norm(tokens), pre_logits=True)

    def spec(self):
        return {"kind": self.kind, "name": self.name, "kwargs": self.kwargs}


def load_timm(name: str, pretrained: bool = False, weights: Optional[str] = None, **kwargs) -> TimmViT:
    import timm

    overlay = {"file": weights} if weights else None
    try:
        model = timm.create_model(name, pretrained=pretrained or bool(weights), num_classes=0,
                                  pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise EmbedtrainError(f"model.backbone.name_or_path: timm cannot build {name!r} ({type(err).__name__}: {first})") from None
    return TimmViT(model, name, {**kwargs})


def _timm_from_spec(spec: dict) -> TimmViT:
    import timm

    model = timm.create_model(spec["name"], pretrained=False, num_classes=0, **spec.get("kwargs", {}))
    return TimmViT(model, spec["name"], spec.get("kwargs", {}))


# --------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------


class TransformersViT(ViTAdapter):
    """transformers' ``ViTModel``, ``CLIPVisionModel`` or ``CLIPVisionModelWithProjection``."""

    kind = "transformers"

    def __init__(self, model: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__(model)
        config = model.config
        self.is_clip = config.model_type == "clip_vision_model"
        if config.model_type not in ("vit", "clip_vision_model"):
            raise EmbedtrainError(
                f"backbone: transformers model type {config.model_type!r} is not supported for visual prompts; "
                "use a ViT or a CLIP vision model"
            )
        self.width = int(config.hidden_size)
        self.num_layers = int(config.num_hidden_layers)
        size = config.image_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def _vision(self) -> nn.Module:
        # CLIPVisionModelWithProjection nests the tower under .vision_model
        return getattr(self.model, "vision_model", self.model)

    def embed(self, pixels):
        v = self._vision
        x = v.embeddings(pixels)
        return v.pre_layrnorm(x) if self.is_clip else x

    def blocks(self):
        v = self._vision
        return list(v.encoder.layers) if self.is_clip else list(v.layers)

    def run_block(self, index, tokens):
        out = self.blocks()[index](tokens, None)
        return out[0] if isinstance(out, tuple) else out

    def pool(self, tokens):
        v = self._vision
        if self.is_clip:
            return v.post_layernorm(tokens[:, 0])
        return v.layernorm(tokens)[:, 0]

    def projection(self):
        proj = getattr(self.model, "visual_projection", None)
        return proj.weight.T if proj is not None else None

    def spec(self):
        return {"kind": self.kind, "class": type(self.model).__name__, "config": self.model.config.to_dict(),
                "mean": list(self.mean), "std": list(self.std)}


_TRANSFORMERS_CLASSES = ("ViTModel", "CLIPVisionModel", "CLIPVisionModelWithProjection")


def load_transformers(name_or_path: str, revision: Optional[str] = None) -> TransformersViT:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path, revision=revision)
        if config.model_type == "clip":  # a full CLIP folder: take its vision tower with the projection
            cls = transformers.CLIPVisionModelWithProjection
        elif config.model_type == "clip_vision_model":
            with_projection = "CLIPVisionModelWithProjection" in (config.architectures or [])
            cls = transformers.CLIPVisionModelWithProjection if with_projection else transformers.CLIPVisionModel
        elif config.model_type == "vit":
            cls = transformers.ViTModel
        else:
            raise EmbedtrainError(
                f"model.backbone.name_or_path: {name_or_path} is a {config.model_type!r} model; "
                "visual prompts support ViT and CLIP vision models"
            )
        kwargs = {"add_pooling_layer": False} if cls is transformers.ViTModel else {}
        model = cls.from_pretrained(name_or_path, revision=revision, **kwargs)
    except EmbedtrainError:
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise EmbedtrainError(f"model.backbone.name_or_path: cannot load {name_or_path} ({type(err).__name__}: {first})") from None
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    processor = Path(name_or_path) / "preprocessor_config.json"
    if processor.is_file():
        pp = read_json_object(processor)
        mean, std = tuple(pp.get("image_mean", mean)), tuple(pp.get("image_std", std))
    elif "clip" in config.model_type:
        mean, std = OPENAI_MEAN, OPENAI_STD
    return TransformersViT(model, mean, std)


def _transformers_from_spec(spec: dict) -> TransformersViT:
    import transformers

    if spec["class"] not in _TRANSFORMERS_CLASSES:
        raise EmbedtrainError(f"saved backbone class {spec['class']!r} is not one of {', '.join(_TRANSFORMERS_CLASSES)}")
    cls = getattr(transformers, spec["class"])
    config_cls = cls.config_class
    config = config_cls.from_dict(spec["config"])
    kwargs = {"add_pooling_layer": False} if cls is transformers.ViTModel else {}
    return TransformersViT(cls(config, **kwargs), spec.get("mean", IMAGENET_MEAN), spec.get("std", IMAGENET_STD))


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def load_vit_backbone(kind: str, name_or_path: str, pretrained: bool = True, weights: Optional[str] = None,
                      revision: Optional[str] = None, timm_kwargs: Optional[dict] = None) -> ViTAdapter:
    """Load a ViT backbone of ``kind`` (open_clip folder, timm model name, transformers folder or Hub id)."""
    if kind == "open_clip":
        return load_open_clip_folder(os.path.expanduser(name_or_path))
    if kind == "timm":
        return load_timm(name_or_path, pretrained=pretrained, weights=weights, **(timm_kwargs or {}))
    if kind == "transformers":
        return load_transformers(name_or_path, revision=revision)
    raise EmbedtrainError(f"backbone.kind: {kind!r} is not one of {', '.join(BACKBONE_KINDS)}")


def build_vit_from_spec(spec: dict) -> ViTAdapter:
    """The architecture described by :meth:`ViTAdapter.spec`, with fresh weights (load a state dict next)."""
    kind = spec.get("kind")
    if kind == "open_clip":
        return _open_clip_from_spec(spec)
    if kind == "timm":
        return _timm_from_spec(spec)
    if kind == "transformers":
        return _transformers_from_spec(spec)
    raise EmbedtrainError(f"saved backbone kind {kind!r} is not one of {', '.join(BACKBONE_KINDS)}")


def _plain(value):
    """Tuples → lists, so specs are JSON-able and compare equal after a round trip."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
