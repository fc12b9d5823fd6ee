import json

import pytest
import torch
import torch.nn.functional as F

from embedtrain.models.bidirectional import BidirectionalTransformer, probe_bidirectional
from embedtrain.models.instructions import instruction_prefix, pooling_mask, tokenize_with_instructions
from embedtrain.models.latent_attention import LatentAttentionPooling, LatentAttentionPoolingModule
from nvembed_support import TASKS, TEXTS, save_tiny_decoder


def _pooler(**kwargs) -> LatentAttentionPooling:
    torch.manual_seed(0)
    return LatentAttentionPooling(32, num_latents=16, num_heads=4, **kwargs)


def test_shapes_and_sizes():
    pooler = _pooler()
    assert pooler(torch.randn(3, 7, 32), torch.ones(3, 7)).shape == (3, 32)
    assert pooler.token_states(torch.randn(3, 7, 32)).shape == (3, 7, 32)
    assert pooler.latents.shape == (16, 32) and pooler.intermediate_size == 128
    assert _pooler(intermediate_size=40).mlp[0].out_features == 40
    assert _pooler(mlp_ratio=2.0).intermediate_size == 64
    with pytest.raises(ValueError, match="must divide"):
        LatentAttentionPooling(32, num_heads=5)


def test_gradients_reach_every_parameter_and_the_input():
    pooler = _pooler()
    hidden = torch.randn(2, 5, 32, requires_grad=True)
    pooler(hidden, torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])).pow(2).sum().backward()
    for name, p in pooler.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert hidden.grad[0, :3].abs().sum() > 0 and hidden.grad[0, 3:].abs().sum() == 0


def test_masked_tokens_do_not_change_the_output():
    pooler = _pooler().eval()
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    hidden = torch.randn(2, 5, 32)
    changed = torch.where(mask.bool().unsqueeze(-1), hidden, torch.randn(2, 5, 32) * 100)
    out = pooler(hidden, mask)
    assert torch.allclose(out, pooler(changed, mask), atol=1e-6)
    # the mean runs over the pooled tokens' latent-attention states
    states = pooler.token_states(hidden)
    assert torch.allclose(out[0], states[0, 1:4].mean(0), atol=1e-6)
    assert torch.allclose(out[1], states[1, :2].mean(0), atol=1e-6)
    # and a token outside the mask would have changed it
    assert not torch.allclose(out, pooler(hidden, torch.ones(2, 5)), atol=1e-4)


def test_sentence_transformers_module_leaves_the_prompt_out_like_pooling():
    from sentence_transformers.sentence_transformer.modules import Pooling

    module = LatentAttentionPoolingModule(32, num_latents=16, num_heads=4)
    hidden = torch.randn(2, 6, 32)
    right = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    for attention in (right, right.flip(1)):
        features = {"token_embeddings": hidden, "attention_mask": attention, "prompt_length": 2}
        out = module(dict(features))["sentence_embedding"]
        assert torch.allclose(out, module.latent_attention(hidden, pooling_mask(attention, attention, 2)))
        # the same tokens that sentence-transformers' own Pooling(include_prompt=False) leaves out
        mean = Pooling(32, "mean", include_prompt=False)(dict(features))["sentence_embedding"]
        kept = pooling_mask(attention, attention, 2).unsqueeze(-1)
        assert torch.allclose(mean, (hidden * kept).sum(1) / kept.sum(1), atol=1e-6)
        # a training batch carries prompt_length as a tensor
        tensor_length = module(dict(features, prompt_length=torch.tensor([2, 2])))["sentence_embedding"]
        assert torch.allclose(tensor_length, out)
    keep = LatentAttentionPoolingModule(32, num_latents=16, num_heads=4, include_prompt=True)
    keep.load_state_dict(module.state_dict())
    features = {"token_embeddings": hidden, "attention_mask": torch.ones(2, 6), "prompt_length": 2}
    assert torch.allclose(keep(features)["sentence_embedding"], module.latent_attention(hidden, torch.ones(2, 6)))


@pytest.fixture(scope="module")
def nv_embed_folder(tmp_path_factory):
    """A tiny NV-Embed folder: bidirectional Mistral + latent attention + normalize, with prompts."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize

    root = tmp_path_factory.mktemp("nv-embed")
    decoder = save_tiny_decoder(root / "mistral")
    backbone = BidirectionalTransformer(str(decoder), model_kwargs={"attn_implementation": "sdpa"})
    torch.manual_seed(1)
    pooling = LatentAttentionPoolingModule(32, num_latents=16, num_heads=4)
    model = SentenceTransformer(modules=[backbone, pooling, Normalize()], device="cpu")
    model.prompts = {"query": instruction_prefix(TASKS[0]), "document": ""}
    queries = model.encode(TEXTS, prompt_name="query", convert_to_tensor=True)
    documents = model.encode(TEXTS, convert_to_tensor=True)
    model.save(str(root / "model"))
    return root / "model", model, queries, documents


def test_saved_folder_reloads_with_the_same_embeddings(nv_embed_folder):
    from sentence_transformers import SentenceTransformer

    path, _, queries, documents = nv_embed_folder
    types = [m["type"] for m in json.loads((path / "modules.json").read_text())]
    assert types == [
        "embedtrain.models.bidirectional.BidirectionalTransformer",
        "embedtrain.models.latent_attention.LatentAttentionPoolingModule",
        "sentence_transformers.base.modules.normalize.Normalize",
    ]
    assert (path / "1_LatentAttentionPoolingModule" / "model.safetensors").is_file()
    assert json.loads((path / "config.json").read_text())["is_causal"] is False
    # sentence-transformers 6 imports classes from outside its own package only when trusted, even
    # from an installed package; nothing is imported from the folder (the class paths have dots)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        SentenceTransformer(str(path), device="cpu")
    reloaded = SentenceTransformer(str(path), device="cpu", trust_remote_code=True)
    assert probe_bidirectional(reloaded[0].model, reloaded.tokenizer)
    assert torch.allclose(reloaded.encode(TEXTS, prompt_name="query", convert_to_tensor=True), queries, atol=1e-5)
    assert torch.allclose(reloaded.encode(TEXTS, convert_to_tensor=True), documents, atol=1e-5)
    assert not torch.allclose(queries, documents, atol=1e-3)


def test_sentence_transformers_pools_exactly_the_text_tokens(nv_embed_folder):
    # the folder's query embeddings equal a direct computation that pools the text tokens only
    _, model, queries, _ = nv_embed_folder
    backbone, pooling = model[0], model[1]
    batch = tokenize_with_instructions(model.tokenizer, TEXTS, instruction_prefix(TASKS[0]), max_length=64)
    with torch.no_grad():
        hidden = backbone.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        direct = F.normalize(pooling.latent_attention(hidden, batch["pooling_mask"]), dim=-1)
    assert torch.allclose(direct, queries, atol=1e-5)
    prompt = model.prompts["query"]
    assert backbone.preprocess(TEXTS, prompt=prompt)["prompt_length"] == len(model.tokenizer(prompt)["input_ids"]) - 1
