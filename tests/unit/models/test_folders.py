"""Saved folders on disk: strict metadata reading and the folder detector's kinds and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from embedtrain.errors import EmbedtrainError
from embedtrain.models import load_text_encoder
from embedtrain.models.folders import (
    DAMAGED,
    MOE_MODULE_TYPE,
    detect_model_kind,
    find_model_kind,
    read_metadata,
    write_metadata,
)
from tests.unit.saved_models import TEXTS, save_text_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ST_TRANSFORMER = "sentence_transformers.base.modules.transformer.Transformer"


@pytest.fixture(scope="module")
def text_folder(tiny_bert, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "model"
    save_text_folder(folder, tiny_bert)
    return folder


def _copy(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / "model")


def test_metadata_round_trip_and_missing_file(tmp_path):
    assert read_metadata(tmp_path) == {}
    write_metadata(tmp_path, {"pooling": "cls", "prompts": {"query": "q: "}})
    assert read_metadata(tmp_path) == {"pooling": "cls", "prompts": {"query": "q: "}}
    assert (tmp_path / "embedtrain.json").read_text() == json.dumps({"pooling": "cls", "prompts": {"query": "q: "}}, indent=2)


@pytest.mark.parametrize("text,problem", [
    ('{\n  "pooling": "cls",\n  "normalize": tru\n}', "not valid JSON (line 3)"),
    ("", "not valid JSON (line 1)"),
    ('["cls"]', "holds a JSON list, not an object"),
])
def test_damaged_metadata_is_an_error_not_defaults(text_folder, tmp_path, text, problem):
    """A damaged embedtrain.json used to be read as {}: the model then loaded with default pooling."""
    folder = _copy(text_folder, tmp_path)
    (folder / "embedtrain.json").write_text(text)
    expected = f"{folder / 'embedtrain.json'}: {problem}; {DAMAGED}"
    assert DAMAGED == "the model folder is damaged, re-save or re-train it"
    for load in (read_metadata, detect_model_kind, load_text_encoder):
        with pytest.raises(EmbedtrainError) as info:
            load(str(folder))
        assert str(info.value) == expected


def test_folder_without_metadata_loads_from_sentence_transformers_config(text_folder, tmp_path):
    """A plain sentence-transformers folder has no embedtrain.json: its own modules give the settings."""
    folder = _copy(text_folder, tmp_path)
    with_metadata = load_text_encoder(str(folder))
    (folder / "embedtrain.json").unlink()
    assert detect_model_kind(folder) == "text"
    plain = load_text_encoder(str(folder))
    assert plain.pooling == "cls"  # from 1_Pooling/config.json
    assert torch.allclose(plain.encode(TEXTS), with_metadata.encode(TEXTS), atol=1e-6)


def _modules(folder, first_type):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": first_type}]))
    return folder


def test_kinds_and_their_marks(tmp_path):
    assert detect_model_kind(_modules(tmp_path / "text", ST_TRANSFORMER)) == "text"
    assert detect_model_kind(_modules(tmp_path / "moe", MOE_MODULE_TYPE)) == "moe"
    decoder = _modules(tmp_path / "decoder", "embedtrain.models.bidirectional.BidirectionalTransformer")
    write_metadata(decoder, {"backbone": "bidirectional_decoder", "pooling": "latent_attention"})
    assert detect_model_kind(decoder) == "decoder"
    vlm = _modules(tmp_path / "vlm", ST_TRANSFORMER)
    write_metadata(vlm, {"kind": "vlm2vec"})
    assert detect_model_kind(vlm) == "vlm2vec"
    clip = tmp_path / "clip"  # as open_clip writes it: no embedtrain.json
    clip.mkdir()
    (clip / "open_clip_config.json").write_text("{}")
    assert detect_model_kind(clip) == "clip"
    dml = tmp_path / "dml"
    dml.mkdir()
    (dml / "dml_config.json").write_text(json.dumps({"format": "embedtrain-dml"}))
    assert detect_model_kind(dml) == "dml"
    # not saved folders: find_model_kind says None, detect_model_kind names the folder and what it expected
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text("{}")  # a transformers checkpoint, not a trained encoder
    assert find_model_kind(tmp_path / "bare") is None and find_model_kind("BAAI/bge-small-en-v1.5") is None
    with pytest.raises(EmbedtrainError, match=r"bare: not a sentence-transformers model folder \(no modules.json\), "
                                              r"nor an open_clip folder \(no open_clip_config.json\) or a "
                                              r"metric-learning folder \(no dml_config.json\)"):
        detect_model_kind(tmp_path / "bare")


@pytest.mark.parametrize("case,expected", [
    ("unknown kind", "embedtrain.json: kind 'sound' is not one embedtrain knows (clip, vlm2vec)"),
    ("clip without config", "embedtrain.json says kind 'clip' but open_clip_config.json is missing"),
    ("vlm without modules", "embedtrain.json says kind 'vlm2vec' but modules.json is missing"),
    ("bad modules.json", "modules.json: not a list of sentence-transformers modules"),
    ("bad dml format", "dml_config.json: format 'other' is not 'embedtrain-dml'"),
])
def test_contradicting_marks_are_one_line_errors(tmp_path, case, expected):
    if case == "unknown kind":
        write_metadata(tmp_path, {"kind": "sound"})
    elif case == "clip without config":
        write_metadata(tmp_path, {"kind": "clip"})
    elif case == "vlm without modules":
        write_metadata(tmp_path, {"kind": "vlm2vec"})
    elif case == "bad modules.json":
        (tmp_path / "modules.json").write_text('{"0": "Transformer"}')
    else:
        (tmp_path / "dml_config.json").write_text('{"format": "other"}')
    with pytest.raises(EmbedtrainError) as info:
        detect_model_kind(tmp_path)
    assert str(info.value).startswith(str(tmp_path)) and expected in str(info.value)
    assert "\n" not in str(info.value)
