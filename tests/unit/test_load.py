"""embedtrain.load: one call loads a saved folder of any kind, and the model reproduces the saved one's embeddings."""

from __future__ import annotations

import pytest
import torch

import embedtrain
from embedtrain.errors import EmbedtrainError
from embedtrain.models import detect_model_kind, load_text_encoder
from multimodal_support import EMOJI, emoji_rows, tiny_vlm  # noqa: F401  (fixture)
from tests.unit.saved_models import (
    TEXTS,
    pixels,
    save_clip_folder,
    save_decoder_folder,
    save_dml_folder,
    save_moe_folder,
    save_text_folder,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_text_folder(tiny_bert, tmp_path):
    from embedtrain.models.encoder import TextEncoder

    encoder = save_text_folder(tmp_path / "model", tiny_bert)
    loaded = embedtrain.load(tmp_path / "model")
    assert detect_model_kind(tmp_path / "model") == "text"
    assert type(loaded) is TextEncoder
    assert (loaded.pooling, loaded.prompts["query"], loaded.query_max_length) == ("cls", "query: ", 24)
    assert torch.allclose(loaded.encode(TEXTS, role="query"), encoder.encode(TEXTS, role="query"), atol=1e-6)
    # options go to the kind's loader
    assert embedtrain.load(tmp_path / "model", pooling="mean").pooling == "mean"


def test_moe_folder(tiny_bert_no_dropout, tmp_path):
    from embedtrain.models.moe import MoETextEncoder

    moe = save_moe_folder(tmp_path / "model", tiny_bert_no_dropout)
    loaded = embedtrain.load(str(tmp_path / "model"))
    assert detect_model_kind(tmp_path / "model") == "moe"
    assert isinstance(loaded, MoETextEncoder) and loaded.settings == moe.settings
    for domain in ("a", "b"):
        assert torch.allclose(loaded.encode(TEXTS, domain=domain), moe.encode(TEXTS, domain=domain), atol=1e-6)
    assert not torch.allclose(loaded.encode(TEXTS, domain="a"), loaded.encode(TEXTS, domain="b"))


def test_decoder_folder(tmp_path):
    from embedtrain.models.decoder import DecoderEncoder
    from nvembed_support import save_tiny_decoder

    encoder = save_decoder_folder(tmp_path / "model", save_tiny_decoder(tmp_path / "decoder", "qwen2"))
    loaded = embedtrain.load(tmp_path / "model")
    assert detect_model_kind(tmp_path / "model") == "decoder"
    assert isinstance(loaded, DecoderEncoder) and loaded.pooling == "latent_attention"
    assert torch.allclose(loaded.encode(TEXTS), encoder.encode(TEXTS), atol=1e-5)


def test_clip_folder(tmp_path):
    from embedtrain.models.clip import ClipEncoder

    encoder = save_clip_folder(tmp_path / "model")
    loaded = embedtrain.load(tmp_path / "model")
    assert detect_model_kind(tmp_path / "model") == "clip"
    assert isinstance(loaded, ClipEncoder) and loaded.templates == encoder.templates
    rows = emoji_rows(3)
    images = [str(EMOJI / r["image"]) for r in rows]
    names = [r["name"] for r in rows]
    assert torch.allclose(loaded.encode_items(images=images), encoder.encode_items(images=images), atol=1e-6)
    assert torch.allclose(loaded.encode_items(texts=names, role="query"),
                          encoder.encode_items(texts=names, role="query"), atol=1e-6)


def test_dml_folder(tmp_path):
    from embedtrain.models.visual_prompts import PromptedViT

    from vpt_support import build_tiny_open_clip

    model = save_dml_folder(tmp_path / "model", build_tiny_open_clip(tmp_path / "tower")).eval()
    loaded = embedtrain.load(tmp_path / "model")
    assert detect_model_kind(tmp_path / "model") == "dml"
    assert isinstance(loaded, PromptedViT) and not loaded.training
    x = pixels()
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.encoder(x), atol=1e-6)


def test_vlm2vec_folder(tiny_vlm, tmp_path):
    from embedtrain.models.vlm import VlmEncoder, load_vlm_encoder

    torch.manual_seed(0)
    encoder = load_vlm_encoder(str(tiny_vlm), finetune="full", templates={"query": "Query: {text}", "document": "{text}"})
    encoder.save(tmp_path / "model")
    loaded = embedtrain.load(tmp_path / "model")
    assert detect_model_kind(tmp_path / "model") == "vlm2vec"
    assert isinstance(loaded, VlmEncoder) and loaded.templates == encoder.templates
    torch.testing.assert_close(loaded.encode_items(texts=TEXTS, role="query"),
                               encoder.encode_items(texts=TEXTS, role="query"), atol=1e-5, rtol=1e-4)


def test_unknown_option_names_the_allowed_ones(tmp_path):
    save_clip_folder(tmp_path / "model")
    with pytest.raises(EmbedtrainError, match=r"'pooling' is not an option for a CLIP model.*allowed: pretrained, "):
        embedtrain.load(tmp_path / "model", pooling="mean")


def test_not_a_model_folder_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(EmbedtrainError) as info:
        embedtrain.load(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path}: not a sentence-transformers model folder (no modules.json)")
    assert "open_clip_config.json" in message and "dml_config.json" in message and "\n" not in message
    with pytest.raises(EmbedtrainError, match="model folder not found"):
        embedtrain.load(tmp_path / "missing")


def test_load_text_encoder_refuses_other_kinds(tmp_path):
    save_clip_folder(tmp_path / "model")
    with pytest.raises(EmbedtrainError, match=r"holds a CLIP model in open_clip's layout .*, not a text encoder; "
                                               r"load it with embedtrain.load\(path\)"):
        load_text_encoder(str(tmp_path / "model"))
