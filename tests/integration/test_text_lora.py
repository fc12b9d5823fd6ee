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
from lora_support import TEXTS, check_folder


def lora_run(model_dir, pairs_file, out, lora, **model):
    recipe = tiny_recipe(model_dir, pairs_file, out, train={"max_steps": 8, "lr": 5e-3, "log_every": 1})
    recipe["model"].update(model, lora=lora)
    return train(recipe_from_dict(recipe), log=lambda *_: None)


def test_lora_on_a_bert_encoder(tiny_bert, pairs_file, tmp_path):
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]}
    result = lora_run(tiny_bert, pairs_file, tmp_path / "run", lora)
    losses = [l["loss"] for l in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if l.get("loss") is not None]
    assert len(losses) == 8 and min(losses[-3:]) < losses[0]
    check_folder(result.model_dir, tiny_bert, ("attention.self.query", "attention.self.value"))


def test_lora_on_a_causal_decoder(pairs_file, tmp_path):
    from nvembed_support import save_tiny_decoder

    base = save_tiny_decoder(tmp_path / "qwen2", "qwen2")
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    result = lora_run(base, pairs_file, tmp_path / "run", lora, pooling="last_token")
    check_folder(result.model_dir, base, ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))


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
