import pytest
import torch

from embedtrain.errors import EmbedtrainError
from embedtrain.models.bidirectional import (
    assert_bidirectional,
    load_bidirectional_decoder,
    make_bidirectional,
    probe_bidirectional,
)
from embedtrain.models.instructions import instruction_prefix, tokenize_with_instructions
from embedtrain.models.latent_attention import LatentAttentionPooling
from nvembed_support import FAMILY_TOKENIZER, TASKS, build_tiny_decoder, build_tokenizer, save_tiny_decoder

MAIN = [(family, impl) for family in ("mistral", "qwen2") for impl in ("eager", "sdpa")]


@pytest.fixture(scope="module")
def tokenizers():
    return {style: build_tokenizer(style) for style in ("sentencepiece", "byte_level")}


@pytest.mark.parametrize("family,impl", MAIN)
def test_probe_fails_on_causal_decoder_and_passes_after_make_bidirectional(tokenizers, family, impl):
    tokenizer = tokenizers[FAMILY_TOKENIZER[family]]
    model = build_tiny_decoder(family, len(tokenizer), impl)
    assert not probe_bidirectional(model, tokenizer)
    with pytest.raises(EmbedtrainError, match="still attends causally with no and right and left padding"):
        assert_bidirectional(model, tokenizer)
    assert make_bidirectional(model) is model
    assert probe_bidirectional(model, tokenizer)
    assert_bidirectional(model, tokenizer)  # also checks that padding stays masked
    assert make_bidirectional(model) is model and probe_bidirectional(model, len(tokenizer))


@pytest.mark.parametrize(
    "family,impl",
    [("llama", "sdpa"), ("qwen3", "sdpa"), ("gemma", "sdpa"), ("gemma2", "eager"), ("gemma3_text", "sdpa")],
)
def test_other_families(family, impl):
    model = build_tiny_decoder(family, 300, impl)
    assert not probe_bidirectional(model)
    assert probe_bidirectional(make_bidirectional(model))


def test_flipping_only_the_attention_modules_is_caught():
    # the half-way fix: attention modules non-causal, mask builder untouched → causal whenever a
    # padding mask is materialised, bidirectional otherwise
    model = build_tiny_decoder("mistral", 300, "sdpa")
    for module in model.modules():
        if isinstance(getattr(module, "is_causal", None), bool):
            module.is_causal = False
    with pytest.raises(EmbedtrainError, match="still attends causally with right and left padding"):
        assert_bidirectional(model)


def test_unsupported_model_is_refused(tiny_bert):
    from transformers import AutoModel

    with pytest.raises(EmbedtrainError, match="model_type 'bert' is not supported; supported: mistral"):
        make_bidirectional(AutoModel.from_pretrained(str(tiny_bert)))


def _embed(model, pooler, tokenizer, texts, prefixes, side):
    tokenizer.padding_side = side
    batch = tokenize_with_instructions(tokenizer, texts, prefixes, max_length=64)
    tokenizer.padding_side = "right"
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return pooler(hidden, batch["pooling_mask"])


@pytest.mark.parametrize("family,impl", MAIN)
def test_left_and_right_padding_give_the_unpadded_embedding(tokenizers, family, impl):
    tokenizer = tokenizers[FAMILY_TOKENIZER[family]]
    model = make_bidirectional(build_tiny_decoder(family, len(tokenizer), impl))
    torch.manual_seed(0)
    pooler = LatentAttentionPooling(32, num_latents=16, num_heads=4).eval()
    prefix = instruction_prefix(TASKS[0])
    texts = ["a", "the river runs fast through the small city", "what is the capital of france"]
    prefixes = [prefix, "", prefix]
    alone = torch.cat([_embed(model, pooler, tokenizer, [t], [p], "right") for t, p in zip(texts, prefixes)])
    for side in ("right", "left"):
        padded = _embed(model, pooler, tokenizer, texts, prefixes, side)
        # RoPE sees only relative positions, so left padding's shifted positions change nothing but rounding
        assert torch.allclose(padded, alone, atol=1e-5), (side, (padded - alone).abs().max())


def test_load_bidirectional_decoder_from_a_causal_checkpoint(tmp_path):
    folder = save_tiny_decoder(tmp_path / "mistral")  # as on the Hub: no is_causal in config.json
    model = load_bidirectional_decoder(str(folder), attn_implementation="sdpa", dtype="float32", device="cpu")
    assert model.config.is_causal is False and probe_bidirectional(model)
    # the setting is saved, and this transformers honours it on a plain reload
    from transformers import AutoModel

    model.save_pretrained(tmp_path / "saved")
    assert probe_bidirectional(AutoModel.from_pretrained(str(tmp_path / "saved"), attn_implementation="sdpa"))
    with pytest.raises(EmbedtrainError, match="cannot be loaded"):
        load_bidirectional_decoder(str(tmp_path / "missing"))
    with pytest.raises(EmbedtrainError, match="not a torch dtype"):
        load_bidirectional_decoder(str(folder), dtype="bfloat17")


def test_lora_wrapped_decoder_stays_bidirectional():
    from peft import LoraConfig, get_peft_model

    model = make_bidirectional(build_tiny_decoder("mistral", 300, "sdpa"))
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    wrapped = get_peft_model(model, lora)
    assert probe_bidirectional(wrapped)
    # and make_bidirectional also works on an already wrapped causal model
    causal = get_peft_model(build_tiny_decoder("qwen2", 300, "sdpa"), lora)
    assert not probe_bidirectional(causal)
    assert probe_bidirectional(make_bidirectional(causal))
