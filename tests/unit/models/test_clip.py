"""CLIP through open_clip: towers trained/frozen/LoRA, and the saved folder reproduces embeddings in open_clip."""

import pytest
import torch

from embedtrain.models.clip import architecture_config, load_clip_encoder

from multimodal_support import EMOJI, emoji_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ARCH = architecture_config(embed_dim=16, image_size=32, patch_size=8, vision_width=16, vision_layers=1,
                           vision_head_width=8, text_width=16, text_layers=1, text_heads=2, context_length=16)


def _nonzero_lora(encoder):
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # LoRA starts as a no-op; make it matter


@pytest.mark.parametrize("image,text", [("train", "train"), ("frozen", "lora"), ("lora", "frozen"), ("lora", "lora")])
def test_towers_choose_trainable_parameters(image, text):
    torch.manual_seed(0)
    encoder = load_clip_encoder("", architecture=ARCH)
    encoder.set_towers(image, text, lora_r=2)
    trained = {n for n, p in encoder._base().named_parameters() if p.requires_grad}
    for tower, mode, prefix in (("image", image, "visual."), ("text", text, "transformer.")):
        names = {n for n in trained if n.startswith(prefix)}
        if mode == "frozen":
            assert not names
        elif mode == "lora":
            assert names and all("lora_" in n for n in names)
        else:
            assert any("lora_" not in n for n in names)
    assert "logit_scale" not in trained  # the loss holds the temperature


def test_saved_folder_reproduces_embeddings_in_open_clip(tmp_path):
    import open_clip
    from PIL import Image

    torch.manual_seed(0)
    encoder = load_clip_encoder("", architecture=ARCH, init_logit_bias=-10.0,
                                templates={"query": "an emoji of {text}", "document": "{text}"})
    encoder.set_towers("lora", "lora", lora_r=2)
    _nonzero_lora(encoder)
    rows = emoji_rows(4)
    images = [str(EMOJI / r["image"]) for r in rows]
    names = [r["name"] for r in rows]
    ours_images = encoder.encode_items(images=images)
    ours_texts = encoder.encode_items(texts=names, role="query")
    encoder.save(tmp_path / "model", loss_state={"log_scale": torch.tensor(2.5), "bias": torch.tensor(-7.0)})
    assert {p.name for p in (tmp_path / "model").iterdir()} >= {"open_clip_config.json", "open_clip_model.safetensors"}

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'model'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'model'}")
    model.eval()
    with torch.no_grad():
        theirs_images = model.encode_image(torch.stack([preprocess(Image.open(p)) for p in images]), normalize=True)
        theirs_texts = model.encode_text(tokenizer([f"an emoji of {n}" for n in names]), normalize=True)
    torch.testing.assert_close(theirs_images, ours_images, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(theirs_texts, ours_texts, atol=1e-5, rtol=1e-4)
    assert model.logit_scale.item() == pytest.approx(2.5) and model.logit_bias.item() == pytest.approx(-7.0)

    # and embedtrain reloads its own folder (templates included) to the same embeddings
    again = load_clip_encoder(str(tmp_path / "model"))
    torch.testing.assert_close(again.encode_items(texts=names, role="query"), ours_texts, atol=1e-6, rtol=1e-5)


def test_unknown_open_clip_name_is_one_line():
    from embedtrain.errors import EmbedtrainError

    with pytest.raises(EmbedtrainError, match="neither a folder nor an open_clip architecture"):
        load_clip_encoder("ViT-Nope-99")
