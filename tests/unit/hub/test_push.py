"""push_model against a fake Hub on 127.0.0.1: what is uploaded, and one-line errors without the token."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from huggingface_hub import constants

from embedtrain.errors import EmbedtrainError
from embedtrain.hub import ModelCardData, push_model, write_model_card
from tests.unit.hub.hub_server import FakeHub, closed_port_url

TOKEN = "hf_testtoken_SECRET123"
REPO = "alice/tiny-encoder"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny sentence-transformers folder (2-layer BERT, 32 dims) with an embedtrain card."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from embedtrain.models import load_text_encoder

    root = tmp_path_factory.mktemp("tiny")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"how do plants make food from sun light and water".split()]
    (root / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    backbone = root / "bert"
    BertModel(config).save_pretrained(backbone)
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(backbone)
    folder = root / "model"
    load_text_encoder(str(backbone)).save(folder)
    write_model_card(folder, ModelCardData(model_name="tiny-encoder", repo_id=REPO, embedding_dim=32))
    return folder


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """Online mode for 127.0.0.1 only, no telemetry or Xet, and no token from the environment or disk.

    huggingface_hub reads these settings into ``huggingface_hub.constants`` at import, so the
    constants are patched as well as the environment.
    """
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))


def _assert_no_token(capsys, caplog, *texts: str) -> None:
    captured = capsys.readouterr()
    for text in (captured.out, captured.err, caplog.text, *texts):
        assert "SECRET123" not in text


def test_push_uploads_every_file_in_one_commit(model_dir, hub_env, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    before = _snapshot(model_dir)
    with FakeHub() as hub:
        url = push_model(model_dir, REPO, token=TOKEN, endpoint=hub.url)

    assert hub.repos == {REPO: {"private": True, "type": "model"}}
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert (commit.repo_id, commit.revision, commit.summary) == (REPO, "main", "Upload model trained with embedtrain")
    assert commit.files == before
    assert {"modules.json", "model.safetensors", "README.md", "1_Pooling/config.json"} <= set(commit.files)
    assert url.startswith(f"{hub.url}/{REPO}/commit/")
    assert hub.authorizations and set(hub.authorizations) == {f"Bearer {TOKEN}"}
    assert _snapshot(model_dir) == before
    _assert_no_token(capsys, caplog, url)


def test_push_to_a_revision_creates_the_branch(model_dir, hub_env, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the token may come from the environment
    with FakeHub() as hub:
        push_model(model_dir, REPO, private=False, revision="v1", endpoint=hub.url, commit_message="first")

    assert hub.repos[REPO]["private"] is False
    assert hub.branches == [(REPO, "v1")]
    assert [(c.revision, c.summary) for c in hub.commits] == [("v1", "first")]
    assert set(hub.authorizations) == {f"Bearer {TOKEN}"}


def test_pushing_again_to_an_existing_repo(model_dir, hub_env):
    with FakeHub() as hub:
        push_model(model_dir, REPO, token=TOKEN, endpoint=hub.url)
        push_model(model_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert len(hub.commits) == 2


def test_unreachable_endpoint(model_dir, hub_env, capsys, caplog):
    endpoint = closed_port_url()
    with pytest.raises(EmbedtrainError) as info:
        push_model(model_dir, REPO, token=TOKEN, endpoint=endpoint)
    message = str(info.value)
    assert message.startswith(f"cannot reach the Hub at {endpoint}")
    assert "check the network or HF_ENDPOINT" in message
    assert "\n" not in message
    _assert_no_token(capsys, caplog, message, repr(info.value))


def test_offline_mode(model_dir, hub_env, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with FakeHub() as hub, pytest.raises(EmbedtrainError, match="offline mode is on; unset HF_HUB_OFFLINE"):
        push_model(model_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


@pytest.mark.parametrize("status", [401, 403])
def test_rejected_token(model_dir, hub_env, status, capsys, caplog):
    with FakeHub(status=status) as hub, pytest.raises(EmbedtrainError) as info:
        push_model(model_dir, REPO, token=TOKEN, endpoint=hub.url)
    message = str(info.value)
    assert message.startswith(f"not authenticated for {REPO} (HTTP {status})")
    assert "`hf auth login`" in message and "HF_TOKEN" in message
    assert "\n" not in message
    assert hub.commits == []
    _assert_no_token(capsys, caplog, message)


def test_no_token_anywhere(model_dir, hub_env):
    expected = f"not authenticated for {REPO}: run `hf auth login`"
    with FakeHub() as hub, pytest.raises(EmbedtrainError, match=re.escape(expected)):
        push_model(model_dir, REPO, endpoint=hub.url)
    assert hub.requests == []


def test_other_http_errors_name_the_status(model_dir, hub_env):
    with FakeHub(status=404) as hub, pytest.raises(EmbedtrainError) as info:
        push_model(model_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert str(info.value).startswith(f"pushing to {REPO} at {hub.url} failed: HTTP 404")


def test_rejected_card_metadata(model_dir, hub_env):
    with FakeHub(yaml_error='"license" must be a valid license id') as hub, pytest.raises(EmbedtrainError) as info:
        push_model(model_dir, REPO, token=TOKEN, endpoint=hub.url)
    message = str(info.value)
    assert message.startswith(f"{model_dir / 'README.md'}: the Hub rejected the model card metadata")
    assert "must be a valid license id" in message
    assert hub.commits == []


def test_missing_folder(tmp_path, hub_env):
    missing = tmp_path / "runs" / "model"
    with pytest.raises(EmbedtrainError, match=re.escape(f"{missing}: model folder not found")):
        push_model(missing, REPO, token=TOKEN)


def test_a_folder_that_is_no_model_is_refused(tmp_path, hub_env):
    (tmp_path / "config.json").write_text("{}")  # a transformers checkpoint is not a trained encoder
    with FakeHub() as hub, pytest.raises(EmbedtrainError) as info:
        push_model(tmp_path, REPO, token=TOKEN, endpoint=hub.url)
    message = str(info.value)
    assert message.startswith(f"{tmp_path}: not a sentence-transformers model folder (no modules.json), nor an "
                              "open_clip folder (no open_clip_config.json) or a metric-learning folder")
    assert "\n" not in message
    assert hub.requests == []
    assert _snapshot(tmp_path) == {"config.json": b"{}"}


def test_a_damaged_folder_is_refused(model_dir, tmp_path, hub_env):
    import shutil

    folder = shutil.copytree(model_dir, tmp_path / "model")
    (folder / "embedtrain.json").write_text("{not json")
    with FakeHub() as hub, pytest.raises(EmbedtrainError, match="embedtrain.json: not valid JSON .line 1.; the model "
                                                                "folder is damaged"):
        push_model(folder, REPO, token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


@pytest.mark.parametrize("kind", ["clip", "dml"])
def test_push_clip_and_metric_learning_folders(kind, tmp_path, hub_env):
    """Folders that are not sentence-transformers folders are pushed as they are (no card is made up)."""
    from tests.unit.saved_models import save_clip_folder, save_dml_folder
    from vpt_support import build_tiny_open_clip

    folder = tmp_path / "model"
    if kind == "clip":
        save_clip_folder(folder)
        expected = {"open_clip_config.json", "open_clip_model.safetensors", "embedtrain.json"}
    else:
        save_dml_folder(folder, build_tiny_open_clip(tmp_path / "tower"))
        expected = {"dml_config.json", "model.safetensors"}
    before = _snapshot(folder)
    with FakeHub() as hub:
        push_model(folder, REPO, token=TOKEN, endpoint=hub.url)
    assert [c.files for c in hub.commits] == [before]
    assert set(before) == expected
    assert _snapshot(folder) == before


def test_text_folder_without_a_card_gets_one_from_its_files(model_dir, tmp_path, hub_env):
    import shutil

    from huggingface_hub import ModelCard

    folder = shutil.copytree(model_dir, tmp_path / "model")
    (folder / "README.md").unlink()
    before = _snapshot(folder)
    with FakeHub() as hub:
        push_model(folder, REPO, token=TOKEN, endpoint=hub.url)
    files = hub.commits[0].files
    assert {k: v for k, v in files.items() if k != "README.md"} == before
    assert _snapshot(folder) == before  # the card goes to the Hub only
    card = ModelCard(files["README.md"].decode("utf-8"))
    assert card.data.library_name == "sentence-transformers" and card.data.get("model-index") is None
    assert "# tiny-encoder" in card.text and "| Embedding dimension | 32 |" in card.text
    assert f'SentenceTransformer("{REPO}")' in card.text and "## Evaluation" not in card.text


@pytest.mark.parametrize("repo_id", ["tiny-encoder", "a/b/c", "alice/bad name", "alice/x--y", ""])
def test_bad_repo_id(model_dir, hub_env, repo_id):
    with pytest.raises(EmbedtrainError, match="is not a Hub repo id; use user/name"):
        push_model(model_dir, repo_id, token=TOKEN)
