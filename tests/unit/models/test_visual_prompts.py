"""Visual prompt tuning on open_clip, timm and transformers ViTs; semantic proxies; save and reload."""

import pytest
import torch
import torch.nn.functional as F

from embedtrain.errors import EmbedtrainError
from embedtrain.losses import ProxyAnchorLoss
from embedtrain.models.semantic_proxies import DMLModel, ProxyBank, load_dml_model, save_dml_model
from embedtrain.models.visual_prompts import PromptedViT, encode_with_prompts, prompt_layout
from embedtrain.models.vit_backbones import TimmViT, TransformersViT, load_vit_backbone

from vpt_support import build_tiny_open_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory):
    return build_tiny_open_clip(tmp_path_factory.mktemp("open-clip"))


@pytest.fixture
def tower(open_clip_dir):
    return load_vit_backbone("open_clip", str(open_clip_dir)).eval()


def images(n=4, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_open_clip_folder_loads_and_matches_the_tower(tower):
    assert (tower.width, tower.num_layers, tower.image_size) == (32, 2, (32, 32))
    assert tower.mean == (0.5, 0.5, 0.5)  # the folder's preprocess_cfg
    x = images()
    reference = tower.model(x)  # open_clip's own forward
    assert torch.allclose(encode_with_prompts(tower, x, []) @ tower.projection(), reference, atol=1e-6)
    encoder = PromptedViT(tower, [], train_backbone="frozen").eval()
    assert encoder.head_from_projection and encoder.embed_dim == 16
    # before training the embedding is the tower's own (normalised) image embedding
    assert torch.allclose(encoder(x), F.normalize(reference, dim=-1), atol=1e-5)


def test_bad_open_clip_folder_is_one_line(tmp_path):
    with pytest.raises(EmbedtrainError, match="has no open_clip_config.json"):
        load_vit_backbone("open_clip", str(tmp_path))
    with pytest.raises(EmbedtrainError, match="does not exist"):
        load_vit_backbone("open_clip", str(tmp_path / "missing"))


def test_timm_vit_matches_its_own_features():
    timm_vit = load_vit_backbone("timm", "vit_tiny_patch16_224", pretrained=False,
                                 timm_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2})
    assert isinstance(timm_vit, TimmViT)
    timm_vit.eval()
    x = images()
    m = timm_vit.model
    assert torch.allclose(encode_with_prompts(timm_vit, x, []), m.forward_head(m.forward_features(x), pre_logits=True), atol=1e-6)
    out = encode_with_prompts(timm_vit, x, [torch.randn(3, 32), torch.randn(2, 32)])
    assert out.shape == (4, 32)


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_transformers_vits_match_their_own_outputs(kind, tmp_path):
    import transformers

    if kind == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                             intermediate_size=37, image_size=32, patch_size=8),
                                      add_pooling_layer=False)
    else:
        model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=32,
            patch_size=8, projection_dim=16))
    model.save_pretrained(tmp_path)
    vit = load_vit_backbone("transformers", str(tmp_path))
    assert isinstance(vit, TransformersViT)
    vit.eval()
    x = images()
    with torch.no_grad():
        if kind == "vit":
            reference = model.eval()(x).last_hidden_state[:, 0]
        else:
            reference = model.eval()(x).image_embeds
        ours = encode_with_prompts(vit, x, [])
        if kind == "clip":
            ours = ours @ vit.projection()
    assert torch.allclose(ours, reference, atol=1e-5)
    encoder = PromptedViT(vit, prompt_layout(2, 2, 3))
    assert encoder(x).shape == (4, 16 if kind == "clip" else 32)


def test_prompt_layout():
    assert prompt_layout(4, 0, 5) == [0, 0, 0, 0]
    assert prompt_layout(4, 1, 5) == [5, 0, 0, 0]  # shallow
    assert prompt_layout(4, 4, 5) == [5, 5, 5, 5]  # deep
    assert prompt_layout(4, per_layer=[3, 0, 2]) == [3, 0, 2, 0]
    with pytest.raises(EmbedtrainError, match="depth 5 is more than"):
        prompt_layout(4, 5, 1)


def test_shallow_prompts_travel_and_deep_prompts_are_replaced(tower):
    x = images()
    shallow = torch.randn(3, 32)
    deep_second = torch.randn(2, 32)
    base = encode_with_prompts(tower, x, [shallow])
    # a prompt before block 1 replaces the shallow ones: the result depends on block 0's prompts only
    # through the image tokens, and changes when the block-1 prompts change
    replaced = encode_with_prompts(tower, x, [shallow, deep_second])
    assert not torch.allclose(base, replaced)
    other = encode_with_prompts(tower, x, [shallow, torch.randn(2, 32)])
    assert not torch.allclose(replaced, other)
    # replacing means the same sequence as feeding block 1 the image tokens with the new prompts
    tokens = tower.embed(x)
    seq = torch.cat([tokens[:, :1], shallow.expand(4, -1, -1), tokens[:, 1:]], dim=1)
    seq = tower.run_block(0, seq)
    seq = torch.cat([seq[:, :1], deep_second.expand(4, -1, -1), seq[:, 4:]], dim=1)
    seq = tower.run_block(1, seq)
    expected = tower.pool(torch.cat([seq[:, :1], seq[:, 3:]], dim=1))
    assert torch.allclose(replaced, expected, atol=1e-6)


def test_per_image_prompts_equal_shared_prompts_image_by_image(tower):
    x = images(3)
    per_image = torch.randn(3, 2, 32)
    together = encode_with_prompts(tower, x, [per_image])
    one_by_one = torch.cat([encode_with_prompts(tower, x[i:i + 1], [per_image[i]]) for i in range(3)])
    assert torch.allclose(together, one_by_one, atol=1e-5)


def _train_steps(model: DMLModel, steps=3, num_classes=4):
    loss_fn = ProxyAnchorLoss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    grads = {}
    for step in range(steps):
        out = model(images(8, seed=step), labels)
        loss = loss_fn(out["embeddings"], labels, out["proxies"])["loss"]
        opt.zero_grad()
        loss.backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
        opt.step()
    return grads


@pytest.mark.parametrize("semantic", [False, True])
def test_vpt_leaves_the_backbone_bitwise_unchanged(tower, semantic):
    encoder = PromptedViT(tower, prompt_layout(2, 2, 3), train_backbone="frozen")
    proxies = ProxyBank(4, encoder.embed_dim, semantic=semantic, accumulate="gru", class_prompt_depth=1, class_prompts=2,
                        width=32, num_layers=2, semantic_head=encoder.head)
    model = DMLModel(encoder, proxies).train()
    backbone_before = {k: v.clone() for k, v in tower.state_dict().items()}
    proxies_before = proxies.learnable.detach().clone()
    prompts_before = encoder.prompts["0"].detach().clone()
    grads = _train_steps(model)
    for k, v in tower.state_dict().items():
        assert torch.equal(v, backbone_before[k]), f"backbone tensor {k} changed"
    intended = {"encoder.prompts.0", "encoder.prompts.1", "encoder.head.weight", "encoder.head.bias", "proxies.learnable"}
    if semantic:
        intended |= {"proxies.class_prompts", "proxies.semantic_head.weight", "proxies.semantic_head.bias"} | {
            f"proxies.gru.{n}" for n, _ in proxies.gru.named_parameters()}
    assert grads == intended
    assert set(model.trainable_parameter_names()) == intended
    assert not torch.allclose(proxies.learnable, proxies_before)  # proxies move
    assert not torch.allclose(encoder.prompts["0"], prompts_before)


def test_bias_tuning_changes_only_the_backbone_biases(tower):
    encoder = PromptedViT(tower, prompt_layout(2, 1, 2), train_backbone="biases")
    model = DMLModel(encoder, ProxyBank(4, encoder.embed_dim)).train()
    before = {k: v.clone() for k, v in tower.named_parameters()}
    grads = _train_steps(model)
    changed = {k for k, v in tower.named_parameters() if not torch.equal(v, before[k])}
    assert changed and all(k.rsplit(".", 1)[-1].endswith("bias") for k in changed)
    assert {f"encoder.backbone.{k}" for k in changed} <= grads
    assert all(not k.endswith("weight") or k.startswith(("encoder.head", "proxies")) for k in grads)


def test_full_fine_tuning_trains_the_backbone(tower):
    encoder = PromptedViT(tower, [], train_backbone="full")
    model = DMLModel(encoder, ProxyBank(4, encoder.embed_dim)).train()
    before = tower.model.conv1.weight.detach().clone()
    _train_steps(model, steps=1)
    assert not torch.equal(tower.model.conv1.weight, before)


def test_ema_memory_follows_its_equation(tower):
    encoder = PromptedViT(tower, [], train_backbone="frozen").eval()
    bank = ProxyBank(3, encoder.embed_dim, semantic=True, alpha=0.25, accumulate="ema", momentum=0.5,
                     class_prompt_depth=1, class_prompts=2, width=32, num_layers=2, semantic_head=encoder.head)
    x, labels = images(4), torch.tensor([0, 0, 2, 2])

    def reps():
        prompts = [bank.class_prompts[0][labels]]
        return F.normalize(bank.semantic_head(encoder.features(x, prompts)), dim=-1)

    with torch.no_grad():
        r = reps()
        first = bank(encoder, x, labels)
        mean0, mean2 = F.normalize(r[:2].mean(0), dim=0), F.normalize(r[2:].mean(0), dim=0)
        assert torch.allclose(bank.memory[0], mean0, atol=1e-5) and torch.allclose(bank.memory[2], mean2, atol=1e-5)
        assert bank.seen.tolist() == [True, False, True]
        assert torch.allclose(first[1], F.normalize(bank.learnable[1], dim=0))  # not seen yet: the learnable proxy alone
        # the learnable part is a small correction, not normalised before the combination
        assert bank.learnable.norm(dim=1).max() < 0.3
        assert torch.allclose(first[0], F.normalize(0.25 * bank.learnable[0] + 0.75 * mean0, dim=0), atol=1e-5)
        bank(encoder, x, labels)  # second time: m = normalize(0.5 m + 0.5 mean)
        assert torch.allclose(bank.memory[0], F.normalize(0.5 * mean0 + 0.5 * mean0, dim=0), atol=1e-5)


def test_semantic_proxies_pass_gradients_to_class_prompts_of_the_batch_only(tower):
    encoder = PromptedViT(tower, [], train_backbone="frozen")
    bank = ProxyBank(3, encoder.embed_dim, semantic=True, accumulate="gru", class_prompt_depth=2, class_prompts=2,
                     width=32, num_layers=2, semantic_head=encoder.head)
    labels = torch.tensor([0, 0, 1, 1])
    proxies = bank(encoder, images(4), labels)
    proxies[:2].sum().backward()
    grad = bank.class_prompts.grad
    assert grad[:, :2].abs().sum() > 0 and grad[:, 2].abs().sum() == 0  # class 2 was not in the batch
    assert bank.memory.requires_grad is False


@pytest.mark.parametrize("accumulate", ["ema", "gru"])
def test_semantic_proxies_under_bf16_autocast(tower, accumulate):
    encoder = PromptedViT(tower, prompt_layout(2, 2, 2))
    bank = ProxyBank(3, encoder.embed_dim, semantic=True, accumulate=accumulate, class_prompt_depth=1, class_prompts=2,
                     width=32, num_layers=2, semantic_head=encoder.head)
    model = DMLModel(encoder, bank)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(4), torch.tensor([0, 0, 1, 1]))
        loss = ProxyAnchorLoss()(out["embeddings"].float(), torch.tensor([0, 0, 1, 1]), out["proxies"].float())["loss"]
    loss.backward()
    assert bank.memory.dtype == torch.float32 and torch.isfinite(loss)
    assert bank.class_prompts.grad is not None


def test_saved_model_reloads_to_the_same_embeddings(tower, tmp_path):
    encoder = PromptedViT(tower, prompt_layout(2, 2, 3), embed_dim=8, train_backbone="biases")
    model = DMLModel(encoder, ProxyBank(4, 8, semantic=True, class_prompt_depth=1, class_prompts=2, width=32,
                                        num_layers=2, semantic_head=encoder.head)).train()
    _train_steps(model, steps=2)
    save_dml_model(model, tmp_path / "m", {"train_classes": ["a", "b", "c", "d"]})
    loaded, config = load_dml_model(tmp_path / "m")
    assert config["train_classes"] == ["a", "b", "c", "d"]
    x = images(5, seed=9)
    assert torch.equal(loaded.eval().encoder(x), model.eval().encoder(x))
    assert torch.equal(loaded.proxies.memory, model.proxies.memory)
