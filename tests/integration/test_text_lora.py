"""LoRA on sentence-transformers text encoders (`model.lora` without `model.bidirectional`): a BERT-class encoder
and a decoder with causal attention and last-token pooling (the Qwen3-Embedding / e5-mistral way). Only the
adapters train; the saved folder holds the merged weights, which plain sentence-transformers loads, and the
adapter alone, which peft puts back on the original weights to the same embeddings."""

import json

import pytest
import torch
from safetensors.torch import load_file

from embedtrain.config import recipe_from_dict
from embedtrain.models import load_text_encoder
from embedtrain.train.loop import train

from conftest import tiny_recipe

TEXTS = ["the river runs fast through the city", "a computer program reads data", "green light on the hill"]


def lora_run(model_dir, pairs_file, out, lora, **model):
    recipe = tiny_recipe(model_dir, pairs_file, out, train={"max_steps": 8, "lr": 5e-3, "log_every": 1})
    recipe["model"].update(model, lora=lora)
    return train(recipe_from_dict(recipe), log=lambda *_: None)


def check_folder(result, base_dir, adapted: tuple[str, ...]):
    """The saved weights are the base's, changed exactly in the adapted layers; plain sentence-transformers and
    peft (base + adapter) give embedtrain's embeddings."""
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer

    folder = result.model_dir
    base, saved = load_file(str(base_dir / "model.safetensors")), load_file(str(folder / "model.safetensors"))
    assert set(saved) == set(base)  # merged: no lora_A / lora_B / base_layer keys
    changed = {k for k in base if not torch.equal(base[k], saved[k])}
    assert changed and all(k.endswith(tuple(f"{name}.weight" for name in adapted)) for k in changed), changed
    assert json.loads((folder / "embedtrain.json").read_text())["lora_adapter"] == "adapter"
    assert (folder / "adapter" / "adapter_config.json").is_file()
    targets = ", ".join(f"`{name.rsplit('.', 1)[-1]}`" for name in sorted(n.rsplit(".", 1)[-1] for n in adapted))
    assert f"| LoRA | r 4, alpha 8 on {targets}: merged into the weights; the adapter alone is in `adapter/` (peft) |" \
        in (folder / "README.md").read_text()

    ours = load_text_encoder(str(folder)).encode(TEXTS)
    st = SentenceTransformer(str(folder), device="cpu")  # no trust_remote_code: sentence-transformers' own modules
    torch.testing.assert_close(st.encode(TEXTS, convert_to_tensor=True), ours, rtol=0, atol=1e-6)

    rebuilt = load_text_encoder(str(folder))
    original = load_text_encoder(str(base_dir)).backbone  # the untrained weights, and the adapter on top
    rebuilt.backbone = PeftModel.from_pretrained(original, str(folder / "adapter"))
    # W x + s B (A x) against (W + s B A) x in float32 on unit-scale activations: a few ulps of the hidden
    # width's sums, far below 1e-5
    torch.testing.assert_close(rebuilt.encode(TEXTS), ours, rtol=0, atol=1e-5)


def test_lora_on_a_bert_encoder(tiny_bert, pairs_file, tmp_path):
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]}
    result = lora_run(tiny_bert, pairs_file, tmp_path / "run", lora)
    losses = [l["loss"] for l in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if l.get("loss") is not None]
    assert len(losses) == 8 and min(losses[-3:]) < losses[0]
    check_folder(result, tiny_bert, ("attention.self.query", "attention.self.value"))


def test_lora_on_a_causal_decoder(pairs_file, tmp_path):
    from nvembed_support import save_tiny_decoder

    base = save_tiny_decoder(tmp_path / "qwen2", "qwen2")
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    result = lora_run(base, pairs_file, tmp_path / "run", lora, pooling="last_token")
    check_folder(result, base, ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))


def test_only_the_adapters_train(tiny_bert):
    encoder = load_text_encoder(str(tiny_bert), lora={"r": 2, "alpha": 4, "dropout": 0.0,
                                                      "target_modules": ["query"]})
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    with pytest.raises(Exception, match="model.lora.target_modules: nope not found"):
        load_text_encoder(str(tiny_bert), lora={"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["nope"]})


def test_lora_on_bfloat16_weights(tiny_bert, pairs_file, tmp_path):
    """`model.dtype: bfloat16` under LoRA: the frozen weights load in bfloat16, the adapters train in float32 and the
    embeddings are float32; the folder holds bfloat16 weights, merged in float32 first."""
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]}
    encoder = load_text_encoder(str(tiny_bert), lora=lora, dtype="bfloat16")
    dtypes = {n: p.dtype for n, p in encoder.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if ".lora_" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if ".lora_" not in n)
    assert encoder.encode(TEXTS).dtype == torch.float32

    result = lora_run(tiny_bert, pairs_file, tmp_path / "run", lora, dtype="bfloat16")
    base, saved = load_file(str(tiny_bert / "model.safetensors")), load_file(str(result.model_dir / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    changed = {k for k in base if not torch.equal(base[k].to(torch.bfloat16), saved[k])}
    assert changed and all(k.endswith(("attention.self.query.weight", "attention.self.value.weight")) for k in changed)
