"""Layer-wise learning-rate decay: each parameter's rate from its depth."""

import pytest
import torch

from embedtrain.models import load_text_encoder
from embedtrain.train.optim import build_optimizer, build_scheduler, layer_depth, layerwise_lr_decay, parameter_groups


def test_depth_of_parameter_names():
    assert layer_depth("backbone.embeddings.word_embeddings.weight", 6) == 0
    assert layer_depth("backbone.encoder.layer.0.attention.self.query.weight", 6) == 1
    assert layer_depth("backbone.encoder.layer.5.output.dense.bias", 6) == 6
    assert layer_depth("model.layers.11.mlp.up_proj.weight", 12) == 12
    assert layer_depth("visual.transformer.resblocks.3.attn.in_proj_weight", 12) == 4
    assert layer_depth("backbone.pooler.dense.weight", 6) == 7
    assert layer_depth("latent_attention.latents", 6) == 7


def test_each_parameter_gets_lr_times_decay_to_the_layers_above_it(tiny_bert):
    model = load_text_encoder(str(tiny_bert), max_length=32)  # 2 blocks: depths 0 (embeddings), 1, 2, 3 (pooler)
    lr, decay = 1e-3, 0.5
    groups = layerwise_lr_decay(parameter_groups(model.named_parameters(), 0.01), model.named_parameters(), lr, decay)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    expected = {0: lr * 0.5 ** 3, 1: lr * 0.5 ** 2, 2: lr * 0.5, 3: lr}
    seen = set()
    for name, p in model.named_parameters():
        depth = layer_depth(name, 2)
        seen.add(depth)
        assert lr_of[id(p)] == pytest.approx(expected[depth], rel=1e-12), name
        assert wd_of[id(p)] == (0.0 if p.ndim < 2 or "norm" in name.lower() else 0.01), name
    assert seen >= {0, 1, 2}
    # every trainable parameter is in exactly one group
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
    # the schedule scales every group alike: after warmup's first step each group is at its own rate x 1/10
    optimizer = build_optimizer(groups, lr)
    scheduler = build_scheduler(optimizer, "linear", total_steps=100, warmup_ratio=0.1)
    optimizer.step()
    scheduler.step()
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["initial_lr"] / 10, rel=1e-12)


def test_decay_one_leaves_groups_alone_and_own_rates_are_scaled(tiny_bert):
    model = load_text_encoder(str(tiny_bert), max_length=32)
    groups = parameter_groups(model.named_parameters(), 0.01)
    assert layerwise_lr_decay(groups, model.named_parameters(), 1e-3, 1.0) is groups
    own = parameter_groups(model.named_parameters(), 0.01, lr_for={"embeddings.": 5e-2})
    decayed = layerwise_lr_decay(own, model.named_parameters(), 1e-3, 0.5)
    word = model.backbone.embeddings.word_embeddings.weight
    assert next(g["lr"] for g in decayed if any(p is word for p in g["params"])) == pytest.approx(5e-2 * 0.5 ** 3)
