"""MtebEncoder: mteb's encoder protocol, prompts per task and role, metadata and revision."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import mteb
import numpy as np
import pytest
import torch
from mteb.mocks.mock_tasks import (
    MockClassificationTask,
    MockInstructionRetrieval,
    MockPairClassificationTask,
    MockRerankingTask,
    MockRetrievalTask,
    MockSTSTask,
)
from mteb.mocks.mock_tasks.clustering import MockClusteringTask
from mteb.types import PromptType
from torch.utils.data import DataLoader

from embedtrain.errors import EmbedtrainError
from embedtrain.eval.mteb_adapter import MtebEncoder, content_revision, default_model_name
from embedtrain.models import TextEncoder, load_text_encoder

from mteb_eval_support import prompts, tiny_model_dir  # noqa: F401 (fixtures)

TEXTS = ["apple banana", "the red river runs", "a king", "golden castle tower bridge"]


@pytest.fixture(scope="module")
def adapter(tiny_model_dir: Path) -> MtebEncoder:
    return MtebEncoder.from_pretrained(str(tiny_model_dir))


def loader(texts: list[str], batch_size: int = 2) -> DataLoader:
    return DataLoader([{"text": t} for t in texts], batch_size=batch_size)


def test_implements_mteb_encoder_protocol(adapter: MtebEncoder) -> None:
    assert isinstance(adapter, mteb.EncoderProtocol)


def test_model_meta_is_filled_from_the_folder(adapter: MtebEncoder, tiny_model_dir: Path) -> None:
    meta = adapter.mteb_model_meta
    encoder = adapter.encoder
    assert meta.name == f"local/{tiny_model_dir.parent.name}--model"
    assert meta.revision == content_revision(encoder, tiny_model_dir)
    assert len(meta.revision) == 12 and int(meta.revision, 16) >= 0
    assert meta.embed_dim == 32
    assert meta.max_tokens == 64
    assert meta.n_parameters == sum(p.numel() for p in encoder.parameters())
    assert meta.similarity_fn_name.value == "cosine"
    assert meta.framework == ["Sentence Transformers", "PyTorch"]
    assert meta.release_date is None and meta.modalities == ["text"]
    assert meta.use_instructions is True  # the model has saved prompts
    assert meta.experiment_kwargs is None


def test_default_model_name() -> None:
    assert default_model_name("BAAI/bge-small-en-v1.5") == "BAAI/bge-small-en-v1.5"
    assert default_model_name("bert-base-uncased") == "hub/bert-base-uncased"
    assert default_model_name("/runs/wordnet/final") == "local/wordnet--final"


def test_revision_is_stable_and_changes_with_the_weights(adapter: MtebEncoder, tiny_model_dir: Path, tmp_path: Path) -> None:
    again = MtebEncoder.from_pretrained(str(tiny_model_dir))
    assert again.mteb_model_meta.revision == adapter.mteb_model_meta.revision

    changed = load_text_encoder(str(tiny_model_dir))
    with torch.no_grad():
        next(changed.backbone.parameters()).add_(0.01)
    changed.save(tmp_path / "model")
    other = MtebEncoder.from_pretrained(str(tmp_path / "model"))
    assert other.mteb_model_meta.revision != adapter.mteb_model_meta.revision

    given = MtebEncoder(adapter.encoder, name="org/x", revision="v1")
    assert given.mteb_model_meta.revision == "v1"


def test_revision_changes_with_saved_prompts(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    before = content_revision(load_text_encoder(str(copy)), copy)
    load_text_encoder(str(copy), query_prompt="question: ").save(copy)
    assert content_revision(load_text_encoder(str(copy)), copy) != before


def test_revision_of_a_model_without_folder_hashes_the_tensors(adapter: MtebEncoder) -> None:
    assert content_revision(adapter.encoder) == content_revision(adapter.encoder, None)
    assert len(content_revision(adapter.encoder)) == 12


def test_prompts_saved_overridden_and_instructions(adapter: MtebEncoder, prompts: dict[str, str]) -> None:
    query_prompt, document_prompt = prompts["query"], prompts["document"]
    retrieval = MockRetrievalTask().metadata
    sts = MockSTSTask().metadata
    assert adapter.prompt_for(retrieval, PromptType.query) == query_prompt
    assert adapter.prompt_for(retrieval, PromptType.document) == document_prompt
    assert adapter.prompt_for(sts, None) == query_prompt  # symmetric tasks use the query side

    def instruction(task_metadata, prompt_type):
        if prompt_type == PromptType.query:
            return f"Instruct: {task_metadata.description[:10]}\nQuery: "
        return None

    custom = MtebEncoder(
        adapter.encoder,
        name="org/custom",
        revision="r",
        task_prompts={"MockRetrievalTask": {"query": "find: "}},
        instruction_for=instruction,
        symmetric_role="document",
    )
    assert custom.prompt_for(retrieval, PromptType.query) == "find: "
    assert custom.prompt_for(retrieval, PromptType.document) == document_prompt
    assert custom.prompt_for(sts, PromptType.query) == f"Instruct: {sts.description[:10]}\nQuery: "
    assert custom.prompt_for(sts, None) == document_prompt
    experiment = custom.mteb_model_meta.experiment_kwargs
    assert experiment is not None and len(experiment["prompts"]) == 12

    with pytest.raises(EmbedtrainError, match="unknown key"):
        MtebEncoder(adapter.encoder, name="org/x", revision="r", task_prompts={"T": {"passage": "p: "}})


def test_encode_matches_text_encoder_per_role(adapter: MtebEncoder) -> None:
    task = MockRetrievalTask().metadata
    for prompt_type, role in ((PromptType.query, "query"), (PromptType.document, "document")):
        got = adapter.encode(
            loader(TEXTS), task_metadata=task, hf_split="test", hf_subset="default", prompt_type=prompt_type, batch_size=3
        )
        assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (len(TEXTS), 32)
        want = adapter.encoder.encode(TEXTS, role=role, batch_size=3)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-6)
    query = adapter.encode(loader(TEXTS), task_metadata=task, hf_split="test", hf_subset="default", prompt_type=PromptType.query)
    document = adapter.encode(loader(TEXTS), task_metadata=task, hf_split="test", hf_subset="default", prompt_type=PromptType.document)
    assert not np.allclose(query, document)  # the prompts differ


def test_similarity_is_cosine(adapter: MtebEncoder) -> None:
    a = np.array([[3.0, 4.0], [1.0, 0.0]], dtype=np.float32)
    b = np.array([[6.0, 8.0], [0.0, 2.0]], dtype=np.float32)
    np.testing.assert_allclose(np.asarray(adapter.similarity(a, b)), [[1.0, 0.8], [0.6, 0.0]], atol=1e-6)
    np.testing.assert_allclose(np.asarray(adapter.similarity_pairwise(a, b)), [1.0, 0.0], atol=1e-6)


@pytest.mark.filterwarnings("ignore:Precision is ill-defined")
def test_mteb_mock_tasks_run_with_the_right_prompts(
    adapter: MtebEncoder, prompts: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    original = TextEncoder.encode

    def spy(self, texts, role="document", prompt=None, **kwargs):
        calls.append((role, prompt))
        return original(self, texts, role=role, prompt=prompt, **kwargs)

    monkeypatch.setattr(TextEncoder, "encode", spy)
    tasks = [
        MockRetrievalTask(),
        MockInstructionRetrieval(),
        MockRerankingTask(),
        MockClassificationTask(),
        MockClusteringTask(),
        MockPairClassificationTask(),
        MockSTSTask(),
    ]
    results = mteb.evaluate(adapter, tasks, cache=None, show_progress_bar=False, co2_tracker=False)
    assert not results.exceptions
    assert sorted(r.task_name for r in results.task_results) == sorted(t.metadata.name for t in tasks)
    for result in results.task_results:
        assert math.isfinite(result.get_score())
    assert {role for role, _ in calls} == {"query", "document"}
    assert all(prompt == prompts[role] for role, prompt in calls)
