"""Tiny saved model folders of every kind, each with the encoder that wrote it (built offline from configs)."""

from __future__ import annotations

from pathlib import Path

TEXTS = ["how do plants make food", "the river runs fast", "a small red house", "music and sound"]
CLIP_ARCH = dict(embed_dim=16, image_size=32, patch_size=8, vision_width=16, vision_layers=1, vision_head_width=8,
                 text_width=16, text_layers=1, text_heads=2, context_length=16)


def save_text_folder(folder: Path, tiny_bert: Path):
    from embedtrain.models import load_text_encoder

    encoder = load_text_encoder(str(tiny_bert), pooling="cls", max_length=24, query_prompt="query: ")
    encoder.save(folder)
    return encoder


def save_moe_folder(folder: Path, tiny_bert: Path):
    import torch

    from embedtrain.models import load_text_encoder
    from embedtrain.models.moe import transformer_layers, upcycle_encoder

    moe = upcycle_encoder(load_text_encoder(str(tiny_bert), max_length=24), ["a", "b"], layers=[1])
    torch.manual_seed(0)
    with torch.no_grad():  # as if trained: the experts differ
        layer = transformer_layers(moe.backbone)[1]
        for p in layer.intermediate.experts[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    moe.save(folder)
    return moe


def save_decoder_folder(folder: Path, decoder_dir: Path):
    import torch

    from embedtrain.models.decoder import load_decoder_encoder

    torch.manual_seed(0)
    encoder = load_decoder_encoder(str(decoder_dir), pooling="latent_attention", max_length=32,
                                   latent_attention={"num_latents": 4, "num_heads": 2})
    encoder.save(folder)
    return encoder


def save_clip_folder(folder: Path):
    import torch

    from embedtrain.models.clip import architecture_config, load_clip_encoder

    torch.manual_seed(0)
    encoder = load_clip_encoder("", architecture=architecture_config(**CLIP_ARCH),
                                templates={"query": "an emoji of {text}", "document": "{text}"})
    encoder.save(folder)
    return encoder


def save_dml_folder(folder: Path, open_clip_dir: Path):
    """A metric-learning model (prompted ViT from a tiny open_clip tower, 4 classes) and its folder."""
    import torch

    from embedtrain.models.semantic_proxies import DMLModel, ProxyBank, save_dml_model
    from embedtrain.models.visual_prompts import PromptedViT, prompt_layout
    from embedtrain.models.vit_backbones import load_vit_backbone

    torch.manual_seed(0)
    backbone = load_vit_backbone("open_clip", str(open_clip_dir))
    encoder = PromptedViT(backbone, prompt_layout(backbone.num_layers, 2, 3))
    model = DMLModel(encoder, ProxyBank(4, encoder.embed_dim))
    save_dml_model(model, folder, extra={"test_classes": ["c4", "c5"]})
    return model


def pixels(n: int = 3, size: int = 32, seed: int = 0):
    import torch

    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
