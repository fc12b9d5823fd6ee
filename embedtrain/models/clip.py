"""CLIP dual encoders through open_clip: an image tower and a text tower into one embedding space.

:class:`ClipEncoder` wraps an open_clip ``CLIP`` model with its BPE tokenizer and evaluation
image transform. Either tower can be trained, frozen, or adapted with LoRA (peft). Saving writes
open_clip's own folder layout, ``open_clip_config.json`` (model and preprocessing config) and
``open_clip_model.safetensors`` (LoRA merged in), so that::

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:runs/emoji_clip/model")
    tokenizer = open_clip.get_tokenizer("local-dir:runs/emoji_clip/model")

gives the same (normalised) embeddings as :meth:`ClipEncoder.encode_items`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from embedtrain.errors import EmbedtrainError
from embedtrain.models.folders import (
    CLIP,
    CLIP_CONFIG_FILE,
    CLIP_WEIGHTS_FILE,
    read_json_object,
    read_metadata,
    write_json,
    write_metadata,
)
from embedtrain.models.images import load_images

CONFIG_FILE = CLIP_CONFIG_FILE
WEIGHTS_FILE = CLIP_WEIGHTS_FILE
TOWERS = ("image", "text")
# attention and MLP layers of open_clip's transformer blocks, per tower (CLIP and CustomTextCLIP layouts)
LORA_DEFAULT = {
    "image": r"visual\.transformer\.resblocks\.\d+\.(?:attn|mlp\.c_fc|mlp\.c_proj)",
    "text": r"(?:text\.)?transformer\.resblocks\.\d+\.(?:attn|mlp\.c_fc|mlp\.c_proj)",
}
LORA_PREFIX = {"image": r"visual\.", "text": r"(?!visual\.)"}


def architecture_config(
    embed_dim: int,
    image_size: int,
    patch_size: int,
    vision_width: int,
    vision_layers: int,
    vision_head_width: int,
    text_width: int,
    text_layers: int,
    text_heads: int,
    context_length: int,
) -> dict:
    """An open_clip ``model_cfg`` for a ViT image tower and a transformer text tower (BPE vocabulary)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "patch_size": patch_size, "width": vision_width,
                       "layers": vision_layers, "head_width": vision_head_width},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": text_width,
                     "heads": text_heads, "layers": text_layers},
    }


def tower_of(name: str) -> str:
    """'image', 'text' or 'scale' for a parameter name of an open_clip CLIP model."""
    if name.startswith("visual."):
        return "image"
    if name.split(".")[0] in ("logit_scale", "logit_bias"):
        return "scale"
    return "text"


class ClipInputs:
    """The model-side input builder for the data collator: texts → token ids, images → pixels.

    Picklable and small (no weights), so DataLoader workers can run it.
    """

    def __init__(self, tokenizer, transform):
        self.tokenizer = tokenizer
        self.transform = transform

    def __call__(self, texts: Optional[list], images: Optional[list], template: str = "{text}") -> dict:
        if images is not None:
            return {"pixel_values": torch.stack([self.transform(image) for image in images])}
        # the image of a CLIP input goes to the image tower: {image} stands for nothing in a text
        rendered = [template.replace("{image}", "").replace("{text}", t or "") for t in texts]
        return {"input_ids": self.tokenizer(rendered)}


class ClipEncoder(nn.Module):
    """Texts or images → L2-normalised embeddings of shape (batch, embed_dim).

    ``forward`` embeds one collated role: ``input_ids`` (text tower) or ``pixel_values`` (image
    tower); ``many`` embeds several roles in one call (one forward per backward under DDP).
    """

    kind = "clip"

    def __init__(self, clip_model: nn.Module, model_cfg: dict, tokenizer, templates: Optional[dict] = None):
        super().__init__()
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        self.clip = clip_model
        self.model_cfg = copy.deepcopy(model_cfg)
        self.tokenizer = tokenizer
        preprocess_cfg = open_clip.get_model_preprocess_cfg(self._base())
        self.preprocess_cfg = dict(preprocess_cfg)
        self.transform = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
        self.inputs = ClipInputs(tokenizer, self.transform)
        self.templates = dict(templates or {"query": "{text}", "document": "{text}"})
        self.lora_towers: list[str] = []

    def _base(self) -> nn.Module:
        """The open_clip model itself (under a peft wrapper when LoRA is on)."""
        return self.clip.get_base_model() if hasattr(self.clip, "get_base_model") else self.clip

    @property
    def embedding_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    def forward(self, input_ids: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None,
                many: Optional[Sequence[dict]] = None):
        if many is not None:
            return [self._embed(**b) for b in many]
        return self._embed(input_ids, pixel_values)

    def _embed(self, input_ids: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None):
        base = self._base()
        features = base.encode_image(pixel_values) if pixel_values is not None else base.encode_text(input_ids)
        return F.normalize(features, dim=-1)

    # -- towers ----------------------------------------------------------------------------
    def set_towers(self, image: str, text: str, lora_r: int = 16, lora_alpha: float = 32.0,
                   lora_dropout: float = 0.05, lora_targets: Sequence[str] = ()) -> None:
        """Train ('train'), freeze ('frozen') or LoRA-adapt ('lora') each tower.

        open_clip's own logit scale/bias stay frozen: the loss holds the trained temperature, and
        :meth:`save` writes it back into the model.
        """
        modes = {"image": image, "text": text}
        lora = [t for t in TOWERS if modes[t] == "lora"]
        if lora:
            from peft import LoraConfig, get_peft_model

            if lora_targets:
                names = "|".join(lora_targets)
                pattern = "|".join(rf"{LORA_PREFIX[t]}(?:.*\.)?(?:{names})" for t in lora)
            else:
                pattern = "|".join(LORA_DEFAULT[t] for t in lora)
            config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=pattern)
            try:
                self.clip = get_peft_model(self.clip, config)
            except ValueError as err:
                first = (str(err).strip().splitlines() or ["no module matched"])[0]
                raise EmbedtrainError(f"model.lora.target_modules: {first[:200]}; name layers of the "
                                      f"{' and '.join(lora)} tower, e.g. c_fc, c_proj, attn") from None
            self.lora_towers = lora
        for name, p in self._base().named_parameters():
            tower = tower_of(name)
            if "lora_" in name:
                p.requires_grad_(modes[tower] == "lora")
            else:
                p.requires_grad_(tower != "scale" and modes.get(tower) == "train")
        base = self._base()
        for name in ("logit_scale", "logit_bias"):
            p = getattr(base, name, None)
            if isinstance(p, nn.Parameter):
                # a buffer, not a frozen parameter: nothing trains it (same key in the state dict), and FSDP
                # cannot shard a 0-d parameter
                delattr(base, name)
                base.register_buffer(name, p.detach().clone())

    def trainable_summary(self) -> str:
        counts = {"image": [0, 0], "text": [0, 0]}
        for name, p in self._base().named_parameters():
            tower = tower_of(name)
            if tower in counts:
                counts[tower][1] += p.numel()
                counts[tower][0] += p.numel() if p.requires_grad else 0
        return ", ".join(f"{t} tower {c[0]:,} of {c[1]:,} parameters trained" for t, c in counts.items())

    # -- encoding --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_items(self, texts: Optional[Sequence[Optional[str]]] = None, images: Optional[Sequence] = None,
                     role: str = "document", template: Optional[str] = None, batch_size: int = 128,
                     show_progress: bool = False, desc: str = "encoding") -> torch.Tensor:
        """Embed texts or images (paths or PIL images); float32 on CPU, in input order."""
        from tqdm.auto import tqdm

        if (texts is None) == (images is None):
            raise EmbedtrainError("a CLIP input is a text or an image; give texts or images")
        template = self.templates.get(role, "{text}") if template is None else template
        items = list(texts if texts is not None else images)
        was_training = self.training
        self.eval()
        out = torch.empty(len(items), self.embedding_dim, dtype=torch.float32)
        for start in tqdm(range(0, len(items), batch_size), desc=desc, disable=None if show_progress else True,
                          leave=False):
            part = items[start : start + batch_size]
            if texts is not None:
                inputs = self.inputs(part, None, template)
            else:
                inputs = self.inputs(None, load_images(part), template)
            out[start : start + len(part)] = self(**{k: v.to(self.device) for k, v in inputs.items()}).float().cpu()
        self.train(was_training)
        return out

    # -- saving ----------------------------------------------------------------------------
    def merged_model(self, loss_state: Optional[dict] = None) -> nn.Module:
        """A plain open_clip model (CPU copy) with LoRA merged and the loss's temperature (and bias) set."""
        model = copy.deepcopy(self.clip).cpu()
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        with torch.no_grad():
            if loss_state and "log_scale" in loss_state:
                model.logit_scale.copy_(loss_state["log_scale"].reshape(model.logit_scale.shape))
            if loss_state and "bias" in loss_state and model.logit_bias is not None:
                model.logit_bias.copy_(loss_state["bias"].reshape(model.logit_bias.shape))
        return model

    def save(self, path: str | os.PathLike, loss_state: Optional[dict] = None, extra: Optional[dict] = None) -> None:
        """Write open_clip's folder layout (config + safetensors weights) and embedtrain.json."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        model = self.merged_model(loss_state)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE))
        model_cfg = copy.deepcopy(self.model_cfg)
        if model.logit_bias is not None:
            model_cfg["init_logit_bias"] = float(model.logit_bias.detach().reshape(-1)[0])
        preprocess = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.preprocess_cfg.items()}
        write_json(folder / CONFIG_FILE, {"model_cfg": model_cfg, "preprocess_cfg": preprocess})
        write_metadata(folder, {"kind": CLIP, "normalize": True, "templates": self.templates, **(extra or {})})


def load_clip_encoder(
    name_or_path: str = "",
    pretrained: Optional[str] = None,
    architecture: Optional[dict] = None,
    init_logit_bias: Optional[float] = None,
    templates: Optional[dict] = None,
    gradient_checkpointing: bool = False,
) -> ClipEncoder:
    """Build a :class:`ClipEncoder`.

    ``name_or_path``: an open_clip folder (``open_clip_config.json`` + weights, e.g. a run's
    ``model/``), a built-in open_clip name (with ``pretrained`` tag, downloaded), or empty to build
    ``architecture`` (a ``model_cfg`` dict, see :func:`architecture_config`) with random weights.
    ``init_logit_bias`` gives the model a logit bias (SigLIP).
    """
    import open_clip

    from embedtrain.config import looks_local, resolve_path

    try:
        if not name_or_path:
            if architecture is None:
                raise EmbedtrainError("model: give model.name_or_path or a model.architecture to build")
            model_cfg = copy.deepcopy(architecture)
            if init_logit_bias is not None:
                model_cfg["init_logit_bias"] = init_logit_bias
            model = open_clip.model.CLIP(**model_cfg)
            open_clip.model.set_model_preprocess_cfg(model, _default_preprocess(model))
        elif looks_local(name_or_path):
            folder = Path(resolve_path(name_or_path))
            saved = read_json_object(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
            if "model_cfg" not in saved:
                raise EmbedtrainError(f"model.name_or_path: {folder} has no readable {CONFIG_FILE} with a model_cfg; "
                                      "give a folder written by embedtrain or open_clip")
            model_cfg = saved["model_cfg"]
            model = open_clip.create_model(f"local-dir:{folder}")
            if templates is None:
                templates = read_metadata(folder).get("templates")
        else:
            model_cfg = open_clip.get_model_config(name_or_path)
            if model_cfg is None:
                raise EmbedtrainError(f"model.name_or_path: '{name_or_path}' is neither a folder nor an open_clip "
                                      f"architecture; see open_clip.list_models()")
            model = open_clip.create_model(name_or_path, pretrained=pretrained)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{resolve_path(name_or_path)}" if name_or_path and
                                            looks_local(name_or_path) else (name_or_path or ""),
                                            context_length=model_cfg["text_cfg"].get("context_length"))
    except EmbedtrainError:
        raise
    except (OSError, ValueError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [err.__class__.__name__])[0]
        raise EmbedtrainError(f"model '{name_or_path}': cannot be loaded ({first[:200]}); give an open_clip folder, "
                              "or a built-in name with a pretrained tag while the Hub is reachable") from None
    if gradient_checkpointing:
        model.set_grad_checkpointing(True)
    return ClipEncoder(model, model_cfg, tokenizer, templates)


def _default_preprocess(model) -> dict:
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg

    cfg = asdict(PreprocessCfg())
    cfg["size"] = model.visual.image_size
    return cfg
