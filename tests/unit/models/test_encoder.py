import pytest
import torch

from embedtrain.models import load_text_encoder
from embedtrain.models.pooling import POOLERS


def test_last_token_pooling_both_padding_sides():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    pool = POOLERS.get("last_token")
    assert torch.equal(pool(hidden, right), torch.stack([hidden[0, 1], hidden[1, 3]]))
    assert torch.equal(pool(hidden, left), torch.stack([hidden[0, 3], hidden[1, 3]]))


def test_mean_pooling_ignores_padding():
    hidden = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = POOLERS.get("mean")(hidden, mask)
    assert torch.allclose(out[0], hidden[0, :3].mean(0)) and torch.allclose(out[1], hidden[1].mean(0))


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False), ("last_token", True)])
def test_saved_folder_reloads_in_sentence_transformers(tiny_bert, tmp_path, pooling, normalize):
    from sentence_transformers import SentenceTransformer

    enc = load_text_encoder(str(tiny_bert), pooling=pooling, normalize=normalize, max_length=24,
                            query_prompt="query: ", document_prompt="")
    texts = ["a small red tree", "the computer program reads data over a network", "x"]
    ours = enc.encode(texts, role="query")
    enc.save(tmp_path / "m")
    st = SentenceTransformer(str(tmp_path / "m"), device="cpu")
    theirs = st.encode(texts, prompt_name="query", convert_to_tensor=True)
    assert torch.allclose(ours, theirs, atol=1e-5)
    again = load_text_encoder(str(tmp_path / "m"))
    assert (again.pooling, again.normalize, again.prompts["query"]) == (pooling, normalize, "query: ")
    assert torch.allclose(again.encode(texts, role="query"), ours, atol=1e-6)


def test_encode_order_independent_of_batching(tiny_bert):
    enc = load_text_encoder(str(tiny_bert))
    texts = ["one", "a much longer text about water and rivers", "tree", "blue light dark"]
    assert torch.allclose(enc.encode(texts, batch_size=1), enc.encode(texts, batch_size=3), atol=1e-5)


def test_missing_model_is_a_clear_error(tmp_path):
    from embedtrain.errors import EmbedtrainError

    with pytest.raises(EmbedtrainError, match="cannot be loaded"):
        load_text_encoder("no-such-org/no-such-model")


def test_save_with_gathered_state_dict_writes_those_weights(tiny_bert, tmp_path):
    """The trainer saves the state dict gathered across processes (FSDP / ZeRO-3 shards): the folder
    must hold exactly those weights, whatever the live module holds."""
    from embedtrain.errors import EmbedtrainError

    enc = load_text_encoder(str(tiny_bert), max_length=24)
    texts = ["a small red tree", "network data"]
    before = enc.encode(texts)
    gathered = {k: v.clone() for k, v in enc.state_dict().items()}
    with torch.no_grad():  # the live module drifts; the gathered copy is what must be written
        for p in enc.backbone.parameters():
            p.add_(0.5)
    enc.save(tmp_path / "m", state_dict=gathered)
    assert torch.allclose(load_text_encoder(str(tmp_path / "m")).encode(texts), before, atol=1e-6)
    partial = {k: v for k, v in gathered.items() if "embeddings" not in k}
    with pytest.raises(EmbedtrainError, match="lacks .* backbone weights"):
        enc.save(tmp_path / "m2", state_dict=partial)
