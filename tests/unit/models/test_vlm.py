"""VLM2Vec on a tiny Qwen2-VL: last-token pooling under both padding sides, GradCache parity, LoRA training,
and a sentence-transformers folder that reproduces the embeddings."""

import contextlib

import pytest
import torch

from embedtrain.data.multimodal import split_inputs
from embedtrain.losses import InfoNCELoss
from embedtrain.models.images import load_images
from embedtrain.models.vlm import load_vlm_encoder
from embedtrain.train.step import grad_cache_step, plain_step

from helpers_parity import assert_same_sums
from multimodal_support import EMOJI, emoji_rows, tiny_vlm  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEMPLATES = {"query": "{image}Instruct: name the emoji\nQuery: {text}", "document": "{image}{text}"}


def _encoder(path, **kwargs):
    torch.manual_seed(0)
    encoder = load_vlm_encoder(str(path), templates=TEMPLATES, lora_r=4, lora_dropout=0.0, **kwargs)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # LoRA starts as a no-op; make it matter
    return encoder


def _batch(encoder, n=6, start=0):
    rows = emoji_rows(n, start)
    images = load_images([str(EMOJI / r["image"]) for r in rows])
    return {
        "query": encoder.inputs([r["group"] for r in rows], images, TEMPLATES["query"]),
        "positive": encoder.inputs([r["name"] for r in rows], None, TEMPLATES["document"]),
        "negative": encoder.inputs([r["subgroup"] for r in rows], None, TEMPLATES["document"]),
        "positive_ids": torch.arange(n), "negative_ids": torch.arange(100, 100 + n),
    }


def test_last_token_pooling_is_the_same_under_left_and_right_padding(tiny_vlm):
    encoder = _encoder(tiny_vlm)
    rows = emoji_rows(5, 20)
    texts = [r["name"] for r in rows]  # different lengths, so the batch is padded
    images = [str(EMOJI / r["image"]) for r in rows]
    alone = torch.cat([encoder.encode_items(texts=[t], images=[i], role="query") for t, i in zip(texts, images)])
    for side in ("left", "right"):
        encoder.processor.tokenizer.padding_side = side
        inputs = encoder.inputs(texts, load_images(images), TEMPLATES["query"])
        mask = inputs["attention_mask"]
        assert not bool(mask.all()), "the batch must contain padding"
        assert bool((mask[:, 0] == 0).any()) == (side == "left")
        torch.testing.assert_close(encoder.encode_items(texts=texts, images=images, role="query"), alone,
                                   atol=1e-5, rtol=1e-4)


def test_grad_cache_matches_plain_step(tiny_vlm):
    encoder = _encoder(tiny_vlm)
    encoder.train()
    batch = _batch(encoder)
    loss_fn = InfoNCELoss(temperature=0.02)

    def grads(run):
        encoder.zero_grad(set_to_none=True)
        loss = run()["loss"]
        return loss, {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}

    plain_loss, plain = grads(lambda: plain_step(encoder, loss_fn, batch, lambda l: l.backward()))
    chunks = {"query": 2, "positive": 4, "negative": 4}  # separate query and document chunk sizes
    cached_loss, cached = grads(lambda: grad_cache_step(encoder, loss_fn, batch, chunks, lambda l: l.backward(),
                                                        contextlib.nullcontext, split=split_inputs))
    assert plain and set(plain) == set(cached) and all("lora_" in n for n in plain)
    torch.testing.assert_close(cached_loss, plain_loss, atol=1e-5, rtol=1e-5)
    assert_same_sums(cached, plain)


def test_lora_with_grad_cache_learns(tiny_vlm):
    encoder = _encoder(tiny_vlm)
    encoder.train()
    batch = _batch(encoder, n=8)
    loss_fn = InfoNCELoss(temperature=0.02)
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-3)
    losses = []
    for _ in range(6):
        out = grad_cache_step(encoder, loss_fn, batch, {"query": 3, "positive": 4, "negative": 4},
                              lambda l: l.backward(), contextlib.nullcontext, split=split_inputs)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses


def test_sentence_transformers_folder_reproduces_embeddings(tiny_vlm, tmp_path):
    from PIL import Image
    from sentence_transformers import SentenceTransformer

    encoder = _encoder(tiny_vlm)
    rows = emoji_rows(3, 40)
    paths = [str(EMOJI / r["image"]) for r in rows]
    texts = [r["name"] for r in rows]
    queries = encoder.encode_items(texts=texts, images=paths, role="query")
    documents = encoder.encode_items(texts=texts, role="document")
    image_documents = encoder.encode_items(images=paths, role="document")
    encoder.save(tmp_path / "model")

    st = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    images = [Image.open(p) for p in paths]
    got_queries = st.encode_query([{"image": i, "text": t} for i, t in zip(images, texts)], convert_to_tensor=True)
    got_documents = st.encode_document(texts, convert_to_tensor=True)
    got_images = st.encode_document(images, convert_to_tensor=True)
    torch.testing.assert_close(got_queries.cpu(), queries, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_documents.cpu(), documents, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_images.cpu(), image_documents, atol=1e-5, rtol=1e-4)

    # embedtrain reloads the folder it wrote (templates included) to the same embeddings
    again = load_vlm_encoder(str(tmp_path / "model"), finetune="full")
    torch.testing.assert_close(again.encode_items(texts=texts, images=paths, role="query"), queries,
                               atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_the_plain_step_gradients(tiny_vlm):
    """The VLM2Vec GPU recipe checkpoints the language model's layers under LoRA: a plain step's gradients are those
    without checkpointing (1e-6: the recomputation repeats the same float32 operations)."""
    results = []
    loss_fn = InfoNCELoss(temperature=0.02)
    for checkpointing in (False, True):
        encoder = _encoder(tiny_vlm, gradient_checkpointing=checkpointing)
        layers = [m for m in encoder.modules() if hasattr(m, "gradient_checkpointing")]
        assert layers and any(m.gradient_checkpointing is True for m in layers) == checkpointing
        encoder.train()
        encoder.zero_grad(set_to_none=True)
        loss = plain_step(encoder, loss_fn, _batch(encoder), lambda l: l.backward())["loss"]
        results.append((float(loss), {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}))
    (loss, plain), (checkpointed_loss, checkpointed) = results
    assert plain and plain.keys() == checkpointed.keys()
    assert checkpointed_loss == pytest.approx(loss, abs=1e-6)
    for name, grad in plain.items():
        assert torch.allclose(checkpointed[name], grad, rtol=0, atol=1e-6), name
