"""Mixture-of-Experts upcycling: exact equality with the dense model, gradients that stay in the routed
expert, routing by domain / router / domain token, and save → load round trips."""

import pytest
import torch

from embedtrain.errors import EmbedtrainError
from embedtrain.models import load_text_encoder
from embedtrain.models.moe import (
    MoESettings,
    MoETextEncoder,
    _insert_domain_token,
    route,
    upcycle,
    upcycle_encoder,
)

from nvembed_support import build_tiny_decoder, build_tokenizer, FAMILY_TOKENIZER

TEXTS = ["a small red tree", "the computer program reads data over a network", "x", "blue light on the river"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def experts_of(encoder, layer: int = 0):
    return encoder.backbone.encoder.layer[layer].intermediate.experts


@pytest.mark.parametrize("layers", [[], [1], [-1]])
def test_upcycled_encoder_computes_the_dense_model(tiny_bert_no_dropout, layers):
    dense = load_text_encoder(str(tiny_bert_no_dropout), max_length=24)
    expected = dense.encode(TEXTS, role="query")
    moe = upcycle_encoder(load_text_encoder(str(tiny_bert_no_dropout), max_length=24), ["a", "b", "c"], layers=layers)
    assert isinstance(moe, MoETextEncoder)
    converted = [i for i, layer in enumerate(moe.backbone.encoder.layer) if hasattr(layer.intermediate, "experts")]
    assert converted == ([0, 1] if not layers else [1])
    for domain in ("a", "b", "c", ["a", "c", "b", "a"], None):  # None: the (untrained) router decides
        got = moe.encode(TEXTS, role="query", domain=domain)
        assert float((got - expected).abs().max()) <= 1e-6, domain
    # training mode too (what the trainer sees), with a batch whose rows go to different experts
    moe.train()
    enc = moe.tokenize(TEXTS, "query")
    mixed = moe(enc["input_ids"], enc["attention_mask"], domain=torch.tensor([0, 1, 2, 1]))
    assert float((mixed.detach() - expected).abs().max()) <= 1e-6


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
@pytest.mark.parametrize("routing,top_k", [("enforced", 1), ("learned", 2)])
def test_upcycled_decoder_computes_the_dense_model(family, routing, top_k):
    tokenizer = build_tokenizer(FAMILY_TOKENIZER[family])
    dense = build_tiny_decoder(family, len(tokenizer), attn_implementation="eager")
    moe = build_tiny_decoder(family, len(tokenizer), attn_implementation="eager")
    upcycle(moe, MoESettings(domains=["a", "b"], layers=[0, 1], routing=routing, top_k=top_k))
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = dense(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        domain = torch.tensor([0, 1, 1, 0]) if routing == "enforced" else None  # learned: router mixes 2 experts
        inputs = route(moe, enc["input_ids"], enc["attention_mask"], domain)
        got = moe(**inputs).last_hidden_state
    assert type(moe.layers[0].mlp).__name__ == "RoutedExperts"
    real = enc["attention_mask"].bool()
    assert float((got[real] - expected[real]).abs().max()) <= 1e-6


def _expert_grads(encoder, layer=0):
    return [[p.grad for p in expert.parameters()] for expert in experts_of(encoder, layer)]


@pytest.mark.parametrize("k", [0, 1, 2])
def test_example_routed_to_one_expert_changes_only_that_expert(tiny_bert_no_dropout, k):
    moe = upcycle_encoder(load_text_encoder(str(tiny_bert_no_dropout), max_length=24), ["a", "b", "c"])
    moe.train()
    before = {n: p.detach().clone() for n, p in moe.named_parameters()}
    enc = moe.tokenize(TEXTS[:1], "document")
    target = torch.randn(moe.embedding_dim, generator=torch.Generator().manual_seed(0))
    (moe(enc["input_ids"], enc["attention_mask"], domain=torch.tensor([k])) @ target).sum().backward()
    for layer in (0, 1):
        for e, grads in enumerate(_expert_grads(moe, layer)):
            if e == k:
                assert all(g is not None and float(g.abs().sum()) > 0 for g in grads), (layer, e)
            else:
                assert all(g is None for g in grads), (layer, e)
    # shared weights learn from every example
    assert moe.backbone.encoder.layer[0].attention.self.query.weight.grad is not None
    # one optimizer step: the other experts keep their weights exactly
    torch.optim.SGD([p for p in moe.parameters() if p.grad is not None], lr=10.0).step()
    for name, p in moe.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        if ".experts." in name:
            assert changed == (f".experts.{k}." in name), name


def test_mixed_batch_gradients_equal_per_domain_batches(tiny_bert_no_dropout):
    """A batch routed to two experts gives each expert exactly the gradient of its own rows."""
    moe = upcycle_encoder(load_text_encoder(str(tiny_bert_no_dropout), max_length=24), ["a", "b"], router=False)
    moe.train()
    enc = moe.tokenize(TEXTS, "document")
    domain = torch.tensor([0, 1, 1, 0])
    moe(enc["input_ids"], enc["attention_mask"], domain=domain).sum().backward()
    mixed = [[g.clone() for g in grads] for grads in _expert_grads(moe)]
    for e in (0, 1):
        moe.zero_grad(set_to_none=True)
        rows = (domain == e).nonzero().squeeze(1)
        ids, mask = enc["input_ids"][rows], enc["attention_mask"][rows]
        moe(ids, mask, domain=torch.full((len(rows),), e)).sum().backward()
        for a, b in zip(mixed[e], _expert_grads(moe)[e]):
            assert torch.allclose(a, b, atol=1e-6)


def test_router_loss_trains_only_the_router_under_enforced_routing(tiny_bert_no_dropout):
    moe = upcycle_encoder(load_text_encoder(str(tiny_bert_no_dropout), max_length=24), ["a", "b"],
                          router_loss_weight=1.0)
    moe.train()
    enc = moe.tokenize(TEXTS, "document")
    emb = moe(enc["input_ids"], enc["attention_mask"], domain=torch.tensor([0, 0, 1, 1]))
    (0.0 * emb.sum()).backward()  # no gradient from the embeddings: only the router's loss remains
    assert moe.backbone.moe_router.proj.weight.grad.abs().sum() > 0
    assert moe.backbone.embeddings.word_embeddings.weight.grad is None or \
        float(moe.backbone.embeddings.word_embeddings.weight.grad.abs().sum()) == 0.0
    stats = moe.routing_statistics()
    assert stats["moe/share/a"] == stats["moe/share/b"] == 0.5
    assert 0 <= stats["moe/router_accuracy"] <= 1 and stats["moe/auxiliary_loss"] > 0
    assert moe.routing_statistics() == {}  # reset after reading


def test_learned_top2_router_gets_gradient_from_the_task(tiny_bert_no_dropout):
    moe = upcycle_encoder(load_text_encoder(str(tiny_bert_no_dropout), max_length=24), ["a", "b"],
                          routing="learned", top_k=2, router_loss_weight=0.0, load_balancing_weight=0.0)
    moe.train()
    # make the experts differ, so that the mixture weights matter
    with torch.no_grad():
        for p in experts_of(moe)[1].parameters():
            p.add_(0.05)
    enc = moe.tokenize(TEXTS, "document")
    moe(enc["input_ids"], enc["attention_mask"]).pow(3).sum().backward()
    assert float(moe.backbone.moe_router.proj.weight.grad.abs().sum()) > 0
    assert all(g is not None for grads in _expert_grads(moe) for g in grads)


def test_domain_token_is_inserted_after_cls(tiny_bert_no_dropout):
    moe = upcycle_encoder(load_text_encoder(str(tiny_bert_no_dropout), max_length=12), ["wordnet", "foldoc"],
                          domain_tokens=True)
    tok = moe.tokenizer
    ids = moe.settings.domain_token_ids
    assert tok.convert_ids_to_tokens(ids) == ["[wordnet]", "[foldoc]"]
    table = moe.backbone.get_input_embeddings().weight
    name_ids = tok("wordnet", add_special_tokens=False)["input_ids"]
    assert torch.allclose(table[ids[0]], table[name_ids].mean(0))
    assert moe.max_length_for("query") == 11
    enc = moe.tokenize(["small tree", "a much longer text about water and rivers and trees"], "query")
    assert enc["input_ids"].shape[1] <= 11
    inputs = route(moe.backbone, enc["input_ids"], enc["attention_mask"], torch.tensor([1, 0]))
    assert inputs["input_ids"][:, 1].tolist() == [ids[1], ids[0]]
    assert inputs["input_ids"][:, 0].tolist() == [tok.cls_token_id] * 2
    assert torch.equal(inputs["input_ids"][:, 2:], enc["input_ids"][:, 1:])
    assert torch.equal(inputs["attention_mask"].sum(1), enc["attention_mask"].sum(1) + 1)
    # the domain now changes the embedding even before any training
    a = moe.encode(["small tree"], domain="wordnet")
    b = moe.encode(["small tree"], domain="foldoc")
    assert not torch.allclose(a, b)


def test_domain_token_insertion_with_left_padding():
    ids = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    values = {"input_ids": torch.tensor([42, 43]), "attention_mask": torch.tensor([1, 1])}
    out = _insert_domain_token({"input_ids": ids, "attention_mask": mask}, mask, values, offset=1)
    assert out["input_ids"].tolist() == [[0, 0, 5, 42, 6, 7], [5, 43, 6, 7, 8, 9]]
    assert out["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]


@pytest.mark.parametrize("domain_tokens", [False, True])
def test_save_and_load_reproduce_embeddings(tiny_bert_no_dropout, tmp_path, domain_tokens):
    from sentence_transformers import SentenceTransformer

    moe = upcycle_encoder(load_text_encoder(str(tiny_bert_no_dropout), max_length=24, query_prompt="query: "),
                          ["a", "b"], layers=[1], domain_tokens=domain_tokens)
    with torch.no_grad():  # trained experts differ; the saved model must keep them apart
        for p in experts_of(moe, 1)[1].parameters():
            p.add_(0.02 * torch.randn_like(p))
        moe.backbone.moe_router.proj.weight.normal_()
    per_domain = {d: moe.encode(TEXTS, role="query", domain=d) for d in ("a", "b")}
    assert not torch.allclose(per_domain["a"], per_domain["b"])
    routed = moe.encode(TEXTS, role="query")
    moe.save(tmp_path / "m")

    again = load_text_encoder(str(tmp_path / "m"))
    assert isinstance(again, MoETextEncoder) and again.settings == moe.settings
    for d, expected in per_domain.items():
        assert torch.allclose(again.encode(TEXTS, role="query", domain=d), expected, atol=1e-6)
    assert torch.allclose(again.encode(TEXTS, role="query"), routed, atol=1e-6)
    assert again.predict_domains(TEXTS, role="query") == moe.predict_domains(TEXTS, role="query")

    st = SentenceTransformer(str(tmp_path / "m"), device="cpu", trust_remote_code=True)
    for d, expected in per_domain.items():
        theirs = st.encode(TEXTS, prompt_name="query", domain=d, convert_to_tensor=True)
        assert torch.allclose(theirs, expected, atol=1e-5), d
    assert torch.allclose(st.encode(TEXTS, prompt_name="query", convert_to_tensor=True), routed, atol=1e-5)
    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(tmp_path / "m"), device="cpu")


def test_damaged_moe_folder_is_a_clear_error(tiny_bert_no_dropout, tmp_path):
    import json

    moe = upcycle_encoder(load_text_encoder(str(tiny_bert_no_dropout), max_length=24), ["a", "b"])
    moe.save(tmp_path / "m")
    config = tmp_path / "m" / "sentence_bert_config.json"
    data = json.loads(config.read_text())
    data["moe"]["layers"] = [0]  # the weights hold experts in both layers
    config.write_text(json.dumps(data))
    with pytest.raises(EmbedtrainError, match="do not match the MoE settings"):
        load_text_encoder(str(tmp_path / "m"))


def test_routing_errors(tiny_bert_no_dropout):
    moe = upcycle_encoder(load_text_encoder(str(tiny_bert_no_dropout), max_length=24), ["wordnet", "foldoc"],
                          router=False)
    with pytest.raises(EmbedtrainError, match=r"'wordnt' is not a domain of this model \(did you mean 'wordnet'\?\)"):
        moe.encode(TEXTS, domain="wordnt")
    with pytest.raises(EmbedtrainError, match="no router: give each text a domain"):
        moe.encode(TEXTS)
    with pytest.raises(EmbedtrainError, match="3 domains for 4 texts"):
        moe.encode(TEXTS, domain=["wordnet"] * 3)
    with pytest.raises(EmbedtrainError, match="cannot be upcycled twice"):
        upcycle_encoder(moe, ["a", "b"])
    with pytest.raises(EmbedtrainError, match="called without a routing decision"):
        moe.backbone.moe_routing.index = None
        enc = moe.tokenize(TEXTS)
        moe.backbone(**enc)
    with pytest.raises(EmbedtrainError, match="5 is not a layer of this 2-layer model"):
        upcycle_encoder(load_text_encoder(str(tiny_bert_no_dropout)), ["a", "b"], layers=[5])
    with pytest.raises(EmbedtrainError, match="needs routing: learned"):
        upcycle_encoder(load_text_encoder(str(tiny_bert_no_dropout)), ["a", "b"], top_k=2)
    with pytest.raises(EmbedtrainError, match="at least 2 domains"):
        upcycle_encoder(load_text_encoder(str(tiny_bert_no_dropout)), ["a"])


def test_freeze_keeps_every_expert_trainable(tiny_bert_no_dropout):
    moe = upcycle_encoder(load_text_encoder(str(tiny_bert_no_dropout), max_length=24), ["a", "b", "c"])
    frozen = moe.freeze_unused_parameters()
    assert frozen == ["backbone.pooler.dense.weight", "backbone.pooler.dense.bias"]
    assert all(p.requires_grad for n, p in moe.named_parameters() if "experts" in n or "moe_router" in n)
    assert moe.routing_statistics() == {}  # the probes are not counted


def test_routed_step_costs_what_the_dense_step_costs(tiny_bert_no_dropout):
    """Each text runs through its own expert only: the same floating-point work as the dense model
    (plus the router's one small matrix product), whether a batch has one domain or several."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(model, **kwargs):
        enc = model.tokenize(TEXTS, "document")
        with FlopCounterMode(display=False) as counter:
            model(enc["input_ids"], enc["attention_mask"], **kwargs).sum().backward()
        return counter.get_total_flops()

    dense = load_text_encoder(str(tiny_bert_no_dropout), max_length=24)
    moe = upcycle_encoder(load_text_encoder(str(tiny_bert_no_dropout), max_length=24), ["a", "b", "c"], router=False)
    base = flops(dense)
    assert flops(moe, domain=torch.tensor([1, 1, 1, 1])) == base
    assert flops(moe, domain=torch.tensor([0, 2, 1, 0])) == base
    routed = upcycle_encoder(load_text_encoder(str(tiny_bert_no_dropout), max_length=24), ["a", "b", "c"])
    assert base < flops(routed, domain=torch.tensor([0, 2, 1, 0])) <= 1.01 * base


@pytest.mark.parametrize("router_loss,balance,router_trained", [(0.0, 0.01, True), (0.0, 0.0, False)])
def test_freeze_under_learned_routing(tiny_bert_no_dropout, router_loss, balance, router_trained):
    """The router may pick one expert for both probe texts; every expert stays trainable all the same,
    and the router only when a loss reaches it (with top-1 its mixture weight is constant)."""
    moe = upcycle_encoder(load_text_encoder(str(tiny_bert_no_dropout), max_length=24), ["a", "b"], routing="learned",
                          router_loss_weight=router_loss, load_balancing_weight=balance)
    with torch.no_grad():  # a router that sends everything to expert 1
        moe.backbone.moe_router.proj.weight.zero_()
        moe.backbone.moe_router.proj.bias.copy_(torch.tensor([-5.0, 5.0]))
    frozen = moe.freeze_unused_parameters()
    assert all(p.requires_grad for n, p in moe.named_parameters() if ".experts." in n)
    assert moe.backbone.moe_router.proj.weight.requires_grad == router_trained
    assert moe.settings.routing == "learned"
    assert ("backbone.moe_router.proj.weight" in frozen) == (not router_trained)


def test_auxiliary_loss_counts_once_per_step_at_its_weight(tiny_bert_no_dropout):
    """Whatever the forwards a step makes (three roles, or GradCache chunks), the router's loss enters once, as
    the mean over all the step's texts times its weight; and with the fp16 loss scale s its gradient is s times."""
    import torch.nn.functional as F

    moe = upcycle_encoder(load_text_encoder(str(tiny_bert_no_dropout), max_length=24), ["a", "b"],
                          router_loss_weight=0.5)
    moe.train()
    texts = TEXTS + ["green leaves", "data packets", "a long winding road", "binary search tree"]
    domain = torch.tensor([0, 1] * 4)
    router = moe.backbone.moe_router

    def router_grad(parts, scale=1.0):
        moe.zero_grad(set_to_none=True)
        with moe.training_step(len(texts), scale):
            for part in parts:  # each a forward pass, as a role or a GradCache chunk would be
                enc = moe.tokenize([texts[i] for i in part], "document")
                emb = moe(enc["input_ids"], enc["attention_mask"], domain=domain[part])
                (0.0 * emb.sum()).backward()  # only the router's loss sends gradient
        return router.proj.weight.grad.clone()

    enc = moe.tokenize(texts, "document")
    moe.zero_grad(set_to_none=True)
    logits = router(moe.backbone.get_input_embeddings()(enc["input_ids"]), enc["attention_mask"])
    (0.5 * F.cross_entropy(logits, domain)).backward()
    expected = router.proj.weight.grad.clone()
    # 1e-6: the same per-text terms, summed in another grouping
    for parts in ([[0, 1, 2], [3, 4, 5], [6, 7]], [[0, 1], [2, 3], [4, 5], [6, 7]], [list(range(8))]):
        assert torch.allclose(router_grad(parts), expected, atol=1e-6), parts
    assert torch.allclose(router_grad([[0, 1, 2, 3], [4, 5, 6, 7]], scale=8.0), 8.0 * expected, atol=1e-5)


def _two_forward_grads(moe, routing_of_second=None):
    """Gradients of one loss over two forward passes routed differently (a query role then a document role, or
    two GradCache chunks) and one backward pass, the case where a recomputed layer could read the later routing."""
    moe.train()
    moe.zero_grad(set_to_none=True)
    first = moe.tokenize(TEXTS, "query")
    second = moe.tokenize(list(reversed(TEXTS)), "document")
    q = moe(first["input_ids"], first["attention_mask"], domain=torch.tensor([0, 1, 2, 1]))
    d = moe(second["input_ids"], second["attention_mask"], domain=routing_of_second)
    ((q @ d.T) ** 2).sum().backward()
    return {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}


def _distinct_moe(model_dir, checkpointing: bool, **moe_settings):
    moe = upcycle_encoder(load_text_encoder(str(model_dir), max_length=24, gradient_checkpointing=checkpointing),
                          ["a", "b", "c"], **moe_settings)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # experts that differ, so that routing matters
        for p in moe.backbone.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return moe


@pytest.mark.parametrize("routing", ["enforced", "learned"])
def test_gradient_checkpointing_recomputes_each_layer_with_its_own_routing(tiny_bert_no_dropout, routing):
    """With checkpointing, a layer is recomputed in the backward pass, after later forward passes changed the
    shared routing: it must get the routing it ran with. The gradients are those without checkpointing, bit for bit
    (every parameter, experts and router: the recomputation repeats the same float32 operations on the same inputs,
    in one thread, and the backward pass runs the same graph in the same order).
    Checkpointing the layers without the routing kept fails (the bug this guards against): torch stops the
    backward pass where the later routing gives the recomputed tensors other shapes, and the gradients are
    wrong where the shapes happen to agree."""
    from torch.utils.checkpoint import CheckpointError

    from embedtrain.models.checkpointing import checkpoint_activations

    settings = {"routing": routing, "top_k": 2 if routing == "learned" else 1}
    second = torch.tensor([2, 2, 0, 1]) if routing == "enforced" else None  # learned: the router mixes two
    plain = _two_forward_grads(_distinct_moe(tiny_bert_no_dropout, False, **settings), second)
    checkpointed_moe = _distinct_moe(tiny_bert_no_dropout, True, **settings)  # checkpointed, then upcycled
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in checkpointed_moe.backbone.modules())
    checkpointed = _two_forward_grads(checkpointed_moe, second)
    assert plain.keys() == checkpointed.keys() and any("experts.2" in n for n in plain)
    for name, grad in plain.items():
        assert torch.equal(checkpointed[name], grad), name

    naive = _distinct_moe(tiny_bert_no_dropout, False, **settings)
    checkpoint_activations(naive.backbone)  # recomputed layers read whatever routing is current
    try:
        wrong = _two_forward_grads(naive, second)
    except CheckpointError:  # enforced here: the two passes send other numbers of rows to each expert
        assert routing == "enforced"
    else:
        assert max(float((wrong[n] - g).abs().max()) for n, g in plain.items()) > 1e-3


def test_a_saved_moe_loads_with_gradient_checkpointing(tiny_bert_no_dropout, tmp_path):
    """A saved MoE folder loaded with gradient checkpointing (a run continuing an MoE model) keeps each forward
    pass's routing for the recomputation too."""
    moe = _distinct_moe(tiny_bert_no_dropout, False)
    moe.save(tmp_path / "moe")
    plain = _two_forward_grads(load_text_encoder(str(tmp_path / "moe")), torch.tensor([2, 2, 0, 1]))
    loaded = load_text_encoder(str(tmp_path / "moe"), gradient_checkpointing=True)
    assert isinstance(loaded, MoETextEncoder)
    checkpointed = _two_forward_grads(loaded, torch.tensor([2, 2, 0, 1]))
    for name, grad in plain.items():  # bit for bit, as above
        assert torch.equal(checkpointed[name], grad), name
