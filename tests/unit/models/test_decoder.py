"""DecoderEncoder: probe at build, pooling masks against tokenizer offsets, LoRA merged vs adapter, export."""

import contextlib
import json

import pytest
import torch

from embedtrain.data import BatchCollator, PlannedBatch, pretokenize
from embedtrain.data.readers import pair_dataset
from embedtrain.errors import EmbedtrainError
from embedtrain.models import load_text_encoder
from embedtrain.models.bidirectional import probe_bidirectional
from embedtrain.models.decoder import DecoderEncoder, load_adapter_encoder, load_decoder_encoder
from embedtrain.models.instructions import instruction_prefix
from embedtrain.train.nv_embed import prompt_lengths
from helpers_parity import assert_same_sums
from nvembed_support import TASKS, TEXTS, save_tiny_decoder

FAMILIES = ["mistral", "qwen2"]  # sentencepiece-style (BOS, '▁' spaces) and byte-level ('Ġ' spaces) tokenizers
LATENT = {"num_latents": 16, "num_heads": 4}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
PREFIX = instruction_prefix(TASKS[0])


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    return {family: save_tiny_decoder(root / family, family) for family in FAMILIES}


def _encoder(folder, **kwargs) -> DecoderEncoder:
    settings = dict(pooling="latent_attention", latent_attention=LATENT, instruction_masking=True,
                    query_prompt=PREFIX, max_length=64)
    settings.update(kwargs)
    torch.manual_seed(0)
    return load_decoder_encoder(str(folder), **settings)


def _perturb_lora(encoder: DecoderEncoder) -> None:
    # fresh adapters start at B = 0 (no change); give them weights so that merging is really tested
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in encoder.backbone.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.mark.parametrize("family", FAMILIES)
def test_build_runs_the_probe_and_fails_loudly_when_still_causal(decoders, family, monkeypatch):
    encoder = _encoder(decoders[family], lora=LORA)
    assert probe_bidirectional(encoder.backbone, encoder.tokenizer)
    # a transformers version that ignored the switch would leave the decoder causal: building must refuse
    import embedtrain.models.bidirectional as bidirectional

    monkeypatch.setattr(bidirectional, "make_bidirectional", lambda model: model)
    with pytest.raises(EmbedtrainError, match="still attends causally"):
        _encoder(decoders[family])


def _check_pooled_tokens_are_the_text(tokenizer, prefix: str, text: str, ids: list[int], mask: list[int]) -> None:
    """Every pooled token lies in the text (or is the space before it); every text character is pooled."""
    enc = tokenizer(prefix + text, return_offsets_mapping=True, return_special_tokens_mask=True, truncation=True,
                    max_length=64)
    assert ids[: len(enc["input_ids"])] == enc["input_ids"]
    boundary = len(prefix.rstrip())  # the prompt's trailing space is tokenized with the text's first word
    covered = set()
    for (start, end), special, pooled in zip(enc["offset_mapping"], enc["special_tokens_mask"], mask):
        if special:
            assert not pooled or not prefix, "a leading special token of a query was pooled"
            continue
        if start < boundary:
            assert not pooled, f"instruction token {(prefix + text)[start:end]!r} was pooled"
        else:
            assert pooled, f"text token {(prefix + text)[start:end]!r} was left out"
            covered.update(range(start, end))
    assert set(range(len(prefix), len(prefix + text))) <= covered


@pytest.mark.parametrize("family", FAMILIES)
def test_pooling_mask_covers_exactly_the_text_in_training_batches_and_at_inference(decoders, family):
    import datasets

    encoder = _encoder(decoders[family])
    tokenizer = encoder.tokenizer
    rows = {"query": TEXTS, "positive": TEXTS[::-1]}
    ds = pair_dataset(datasets.Dataset.from_dict(rows), "texts", "texts", {"query": "q", "positive": "p"}, PREFIX, "")
    for pretokenized in (True, False):
        if pretokenized:
            pretokenize(ds, tokenizer, encoder.max_length_for)
        collator = BatchCollator([ds], tokenizer, encoder.max_length_for, prompt_lengths(encoder, [ds]))
        batch = collator(PlannedBatch(0, tuple(range(len(TEXTS)))), list(range(len(TEXTS))))
        for i, text in enumerate(TEXTS):
            q = batch["query"]
            _check_pooled_tokens_are_the_text(tokenizer, PREFIX, text, q["input_ids"][i].tolist(),
                                              q["pooling_mask"][i].tolist())
            # documents have no instruction: every real token is pooled
            p = batch["positive"]
            assert torch.equal(p["pooling_mask"][i], p["attention_mask"][i])
    # inference builds the same masks, under right and left padding
    for side in ("right", "left"):
        tokenizer.padding_side = side
        enc = encoder.tokenize(TEXTS, "query", PREFIX)
        for i, text in enumerate(TEXTS):
            real = enc["attention_mask"][i].bool()
            _check_pooled_tokens_are_the_text(tokenizer, PREFIX, text, enc["input_ids"][i][real].tolist(),
                                              enc["pooling_mask"][i][real].tolist())
    tokenizer.padding_side = "right"


def test_instruction_tokens_do_not_enter_the_embedding_but_condition_it(decoders):
    encoder = _encoder(decoders["mistral"]).eval()
    other = instruction_prefix(TASKS[1])
    a = encoder.encode(TEXTS[:2], "query", PREFIX)
    b = encoder.encode(TEXTS[:2], "query", other)
    unmasked = _encoder(decoders["mistral"], instruction_masking=False).eval()
    # the instruction changes the text tokens' states through bidirectional attention ...
    assert not torch.allclose(a, b, atol=1e-4)
    # ... and masking changes what is pooled
    assert not torch.allclose(a, unmasked.encode(TEXTS[:2], "query", PREFIX), atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_merged_adapter_and_sentence_transformers_give_the_same_embeddings(decoders, family, tmp_path):
    from sentence_transformers import SentenceTransformer

    encoder = _encoder(decoders[family], lora=LORA).eval()
    _perturb_lora(encoder)
    queries, documents = encoder.encode(TEXTS, "query"), encoder.encode(TEXTS)
    encoder.save(tmp_path / "model")
    folder = tmp_path / "model"
    meta = json.loads((folder / "embedtrain.json").read_text())
    assert meta["backbone"] == "bidirectional_decoder" and meta["lora_adapter"] == "adapter"
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((folder / "config.json").read_text())["is_causal"] is False
    from safetensors.torch import load_file

    assert not any("lora" in k for k in load_file(str(folder / "model.safetensors")))  # merged weights only

    merged = load_text_encoder(str(folder))  # dispatches to the decoder loader
    assert isinstance(merged, DecoderEncoder) and merged.instruction_masking and merged.pooling == "latent_attention"
    assert torch.allclose(merged.encode(TEXTS, "query"), queries, atol=1e-5)
    adapter = load_adapter_encoder(folder)  # base decoder + adapter/, not the merged weights
    assert type(adapter.backbone).__name__ == "PeftModel"
    assert torch.allclose(adapter.encode(TEXTS, "query"), queries, atol=1e-5)
    assert torch.allclose(adapter.encode(TEXTS), documents, atol=1e-5)

    st = SentenceTransformer(str(folder), device="cpu", trust_remote_code=True)
    assert torch.allclose(st.encode(TEXTS, prompt_name="query", convert_to_tensor=True), queries, atol=1e-5)
    assert torch.allclose(st.encode(TEXTS, convert_to_tensor=True), documents, atol=1e-5)
    assert not torch.allclose(queries, documents, atol=1e-3)


@pytest.mark.parametrize("pooling,masking", [("mean", True), ("last_token", False), ("eos", False)])
def test_other_poolings_export_to_sentence_transformers(decoders, tmp_path, pooling, masking):
    from sentence_transformers import SentenceTransformer

    encoder = _encoder(decoders["qwen2"], pooling=pooling, instruction_masking=masking).eval()
    if pooling == "eos":
        ids = encoder.tokenize(TEXTS, "query", PREFIX)
        last = ids["attention_mask"].sum(1) - 1
        assert (ids["input_ids"][torch.arange(len(TEXTS)), last] == encoder.tokenizer.eos_token_id).all()
    queries = encoder.encode(TEXTS, "query")
    encoder.save(tmp_path / "model")
    st = SentenceTransformer(str(tmp_path / "model"), device="cpu", trust_remote_code=True)
    assert torch.allclose(st.encode(TEXTS, prompt_name="query", convert_to_tensor=True), queries, atol=1e-5)


def test_saved_head_sizes_must_match(decoders, tmp_path):
    _encoder(decoders["mistral"]).save(tmp_path / "model")
    again = load_decoder_encoder(str(tmp_path / "model"), latent_attention=LATENT)
    assert again.head.num_latents == 16
    with pytest.raises(EmbedtrainError, match="num_latents 32 .saved: 16. differ"):
        load_decoder_encoder(str(tmp_path / "model"), latent_attention={"num_latents": 32})


def test_bad_settings_are_one_line_errors(decoders, tiny_bert):
    with pytest.raises(EmbedtrainError, match="target_modules: gate_projj not found"):
        _encoder(decoders["mistral"], lora={**LORA, "target_modules": ["gate_projj"]})
    with pytest.raises(EmbedtrainError, match="not available for decoders"):
        _encoder(decoders["mistral"], pooling="cls")
    with pytest.raises(EmbedtrainError, match="model_type 'bert' is not supported"):
        load_decoder_encoder(str(tiny_bert))
    with pytest.raises(EmbedtrainError, match="does not divide"):
        _encoder(decoders["mistral"], latent_attention={"num_heads": 5})


def _trained_step(encoder):
    """A function (chunk, budget) -> (loss, gradients of the trainable parameters) of one training step of
    ``encoder`` on a fixed batch of three roles: plain, GradCache chunks of ``chunk`` rows, or a token budget."""
    import datasets

    from embedtrain.losses import InfoNCELoss
    from embedtrain.train.step import grad_cache_step, plain_step

    texts = TEXTS * 2
    rows = {"query": [f"{t} {i}" for i, t in enumerate(texts)], "positive": [f"{i} {t}" for i, t in enumerate(texts)],
            "negative_0": [f"not {t} {i}" for i, t in enumerate(texts)]}
    ds = pair_dataset(datasets.Dataset.from_dict(rows), "texts", "texts",
                      {"query": "q", "positive": "p", "negative_0": "n"}, PREFIX, "")
    collator = BatchCollator([ds], encoder.tokenizer, encoder.max_length_for, prompt_lengths(encoder, [ds]))
    batch = collator(PlannedBatch(0, tuple(range(len(texts)))), list(range(len(texts))))
    trainable = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n, _ in trainable) and any(n.startswith("head.") for n, _ in trainable)
    assert not any(n.endswith("embed_tokens.weight") for n, _ in trainable)  # the decoder itself is frozen

    def grads(chunk=None, budget=None):
        encoder.train()
        for _, p in trainable:
            p.grad = None
        torch.manual_seed(5)
        loss_fn = InfoNCELoss(temperature=0.05, gather_across_processes=False)
        backward = lambda loss: loss.backward()  # noqa: E731
        if chunk:
            out = grad_cache_step(encoder, loss_fn, batch, chunk, backward, contextlib.nullcontext)
        else:
            out = plain_step(encoder, loss_fn, batch, backward, token_budget=budget)
        return float(out["loss"]), {n: p.grad.clone() for n, p in trainable}

    return grads


def test_grad_cache_and_token_budget_give_the_plain_step_gradients_with_pooling_masks_and_lora(decoders):
    # the GPU recipes train with GradCache, and train.forward_token_budget regroups rows of every role: every chunk
    # must carry its rows' pooling mask
    encoder = _encoder(decoders["qwen2"], lora=LORA)  # no dropout: plain and chunked steps draw masks differently
    _perturb_lora(encoder)
    encoder.freeze_unused_parameters()
    grads = _trained_step(encoder)
    loss, reference = grads(None)
    cached_loss, cached = grads(5)
    assert cached_loss == pytest.approx(loss, abs=1e-5)
    assert_same_sums(cached, reference)
    regrouped_loss, regrouped = grads(None, budget=40)
    assert regrouped_loss == pytest.approx(loss, abs=1e-5)
    assert_same_sums(regrouped, reference)


def test_gradient_checkpointing_gives_the_same_gradients_with_lora_and_latent_attention(decoders):
    """The NV-Embed recipes checkpoint the decoder's layers under LoRA (their inputs need no gradient: the
    embeddings are frozen). A plain step and a GradCache step give the gradients of the same steps without
    checkpointing (1e-6: the recomputation repeats the same float32 operations), and transformers' deprecated
    entry point, ``gradient_checkpointing_enable``, is not called (its FutureWarning would fill every run's log)."""
    import warnings

    results = {}
    for checkpointing in (False, True):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*gradient_checkpointing_enable", category=FutureWarning)
            encoder = _encoder(decoders["qwen2"], lora=LORA, gradient_checkpointing=checkpointing)
        layers = [m for m in encoder.backbone.modules() if hasattr(m, "gradient_checkpointing")]
        assert layers and all(m.gradient_checkpointing is checkpointing for m in layers)
        _perturb_lora(encoder)
        encoder.freeze_unused_parameters()
        grads = _trained_step(encoder)
        results[checkpointing] = (grads(), grads(chunk=5))
    for (loss, plain), (checkpointed_loss, checkpointed) in zip(results[False], results[True]):
        assert checkpointed_loss == pytest.approx(loss, abs=1e-6)
        for name, grad in plain.items():
            assert torch.allclose(checkpointed[name], grad, rtol=0, atol=1e-6), name
