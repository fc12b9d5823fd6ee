"""Instructions per evaluation task: the prefix each task's texts are encoded with, NV-Embed's table for decoder
folders (stored in the folder and its card), and one-line errors for names that are no task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedtrain.eval.mteb_run import main
from embedtrain.models.instructions import nv_embed_mteb_instructions

from mteb_eval_support import QUERY_PROMPT, DOCUMENT_PROMPT, graded_beir_dir, make_beir, tiny_model_dir  # noqa: F401

PAPER = {  # two rows of the NV-Embed paper's Table 7 (arXiv:2405.17428, appendix A), full stop left out
    "ArguAna": "Given a claim, find documents that refute the claim",
    "TRECCOVID": "Given a query, retrieve documents that answer the query",
}


@pytest.fixture
def encoded_texts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every text handed to a tokenizer: what the model really encodes (prompt and text together)."""
    from transformers import PreTrainedTokenizerBase

    seen: list[str] = []
    original = PreTrainedTokenizerBase.__call__

    def spy(self, text=None, *args, **kwargs):
        seen.extend([text] if isinstance(text, str) else list(text or []))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", spy)
    return seen


def beir_texts(folder: Path, name: str) -> list[str]:
    return [json.loads(line)["text"] for line in (folder / name).read_text().splitlines()]


def test_instruction_file_sets_the_query_prefix_encoded_and_records_tasks_without_one(
    tiny_model_dir: Path, graded_beir_dir: Path, make_beir, tmp_path: Path, encoded_texts: list[str],
    capsys: pytest.CaptureFixture,
) -> None:
    other = make_beir("other/eval", seed=1)
    table = tmp_path / "instructions.yaml"
    table.write_text("toy: Find the fruit named in the query\n")
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model_dir), "--local-task", str(graded_beir_dir), str(other),
                 "--instructions", str(table), "--output", str(out)]) == 0

    # toy's queries carry the instruction, its documents the saved document prompt; 'other' keeps the saved prompts
    # (the last toy query has no relevant document and is left out of the task)
    toy_queries = beir_texts(graded_beir_dir, "queries.jsonl")[:-1]
    assert {f"Instruct: Find the fruit named in the query\nQuery: {q}" for q in toy_queries} <= set(encoded_texts)
    assert {DOCUMENT_PROMPT + d for d in beir_texts(graded_beir_dir, "corpus.jsonl")} <= set(encoded_texts)
    assert {QUERY_PROMPT + q for q in beir_texts(other, "queries.jsonl")[:-1]} <= set(encoded_texts)
    assert not any(t.startswith("Instruct:") and t.split("Query: ", 1)[1] in beir_texts(other, "queries.jsonl")
                   for t in encoded_texts)

    err = capsys.readouterr().err
    assert "instructions: no instruction for other; they use the model's saved prompts" in err
    [run] = json.loads((out / "results.json").read_text())["models"]
    assert run["instructions"] == {"source": str(table), "query_template": "Instruct: {task}\nQuery: {text}",
                                   "instructions": {"toy": "Find the fruit named in the query"},
                                   "tasks_without_instruction": ["other"]}


def test_unknown_task_name_is_one_line_exit_2(
    tiny_model_dir: Path, graded_beir_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from embedtrain.cli import main as cli

    table = tmp_path / "instructions.json"
    table.write_text(json.dumps({"toy": "Find the fruit", "SciFcat": "Given a claim", "NoSuchTask": "x"}))
    out = tmp_path / "out"
    assert cli(["eval", "--model", str(tiny_model_dir), "--local-task", str(graded_beir_dir),
                "--instructions", str(table), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"error: --instructions {table}: unknown task name(s) SciFcat, NoSuchTask")
    assert not (out / "results.json").exists()  # refused before anything ran


@pytest.mark.parametrize("content, message", [
    ("toy: [a, b]\n", "the instruction of 'toy' must be a non-empty string"),
    ("- toy\n", "must map task names to instructions"),
    ("toy: [unclosed\n", "not valid YAML (line 2)"),
])
def test_bad_instruction_files(content: str, message: str, tiny_model_dir: Path, graded_beir_dir: Path,
                               tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    table = tmp_path / "instructions.yaml"
    table.write_text(content)
    argv = ["--model", str(tiny_model_dir), "--local-task", str(graded_beir_dir), "--output", str(tmp_path / "o")]
    assert main([*argv, "--instructions", str(table)]) == 2
    assert message in capsys.readouterr().err
    assert main([*argv, "--instructions", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such file" in capsys.readouterr().err


def test_nv_embed_table_covers_the_papers_56_tasks() -> None:
    import mteb

    table = nv_embed_mteb_instructions()
    assert set(table) == {t.metadata.name for t in mteb.get_benchmark("MTEB(eng, v1)").tasks}
    assert all(isinstance(v, str) and v.strip() and not v.endswith(".") for v in table.values())
    assert {k: table[k] for k in PAPER} == PAPER


@pytest.fixture(scope="module")
def decoder_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny NV-Embed-style folder (latent attention, instruction masking) saved by embedtrain."""
    from nvembed_support import save_tiny_decoder

    from embedtrain.models.decoder import load_decoder_encoder

    root = tmp_path_factory.mktemp("decoder")
    encoder = load_decoder_encoder(str(save_tiny_decoder(root / "base")), pooling="latent_attention", max_length=48,
                                   latent_attention={"num_latents": 4, "num_heads": 2}, instruction_masking=True)
    encoder.save(root / "model")
    return root / "model"


def test_decoder_folder_stores_nv_embed_table_and_card_lists_it(decoder_folder: Path) -> None:
    from embedtrain.hub.folder_card import card_for_folder
    from embedtrain.hub.model_card import render_model_card
    from embedtrain.models.decoder import load_decoder_encoder
    from embedtrain.models.folders import read_instructions

    assert read_instructions(decoder_folder) == nv_embed_mteb_instructions()
    card = card_for_folder(decoder_folder, "user/tiny-nv-embed")
    assert card.instructions == nv_embed_mteb_instructions()
    text = render_model_card(card)
    assert "### Instructions per task" in text and "56 tasks" in text
    assert f"| `ArguAna` | {PAPER['ArguAna']} |" in text

    # a folder's own table survives loading and saving again
    again = load_decoder_encoder(str(decoder_folder))
    again.eval_instructions = {"SciFact": "Find evidence for the claim"}
    again.save(decoder_folder.parent / "copy")
    assert load_decoder_encoder(str(decoder_folder.parent / "copy")).eval_instructions == {
        "SciFact": "Find evidence for the claim"}


def test_decoder_folder_is_evaluated_with_the_nv_embed_instruction_of_each_task(
    decoder_folder: Path, graded_beir_dir: Path, tmp_path: Path, encoded_texts: list[str],
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:
    """mteb's own SciFact task object with local data, run through the command."""
    import embedtrain.eval.mteb_run as mteb_run

    scifact = scifact_with_local_data(graded_beir_dir)
    monkeypatch.setattr(mteb_run, "select_tasks", lambda args: [scifact])

    out = tmp_path / "out"
    assert main(["--model", str(decoder_folder), "--tasks", "SciFact", "--output", str(out)]) == 0
    instruction = nv_embed_mteb_instructions()["SciFact"]
    split = scifact.dataset["default"][scifact.metadata.eval_splits[0]]
    queries, documents = list(split["queries"]["text"]), list(split["corpus"]["text"])
    assert {f"Instruct: {instruction}\nQuery: {q}" for q in queries} <= set(encoded_texts)
    assert set(documents) <= set(encoded_texts)  # documents carry no instruction
    assert f"instructions: {decoder_folder / 'instructions.json'} (1 evaluated task(s)" in capsys.readouterr().err
    [run] = json.loads((out / "results.json").read_text())["models"]
    assert run["instructions"]["instructions"] == {"SciFact": instruction}
    assert run["instructions"]["tasks_without_instruction"] == []

    # 'none' turns the table off: the saved (empty) query prompt
    encoded_texts.clear()
    assert main(["--model", str(decoder_folder), "--tasks", "SciFact", "--output", str(out), "--instructions",
                 "none"]) == 0
    assert set(queries) <= set(encoded_texts)
    assert json.loads((out / "results.json").read_text())["models"][0]["instructions"] is None


def scifact_with_local_data(folder: Path):
    """mteb's own SciFact task object, filled with a local BEIR folder's data (nothing is downloaded)."""
    import mteb

    from embedtrain.eval.local_tasks import make_local_retrieval_task

    local = make_local_retrieval_task(folder)
    local.load_data()
    scifact = mteb.get_task("SciFact")
    scifact.dataset = {"default": {scifact.metadata.eval_splits[0]: local.dataset["default"]["test"]}}
    scifact.data_loaded = True
    return scifact


def test_results_are_cached_per_table_whichever_of_its_tasks_run(
    tiny_model_dir: Path, graded_beir_dir: Path, make_beir, tmp_path: Path, encoded_texts: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import embedtrain.eval.mteb_run as mteb_run
    from embedtrain.eval.local_tasks import make_local_retrieval_task

    scifact = scifact_with_local_data(make_beir("sci/eval", seed=1))
    selected = [make_local_retrieval_task(graded_beir_dir), scifact]
    monkeypatch.setattr(mteb_run, "select_tasks", lambda args: selected)
    table = tmp_path / "instructions.yaml"
    table.write_text("toy: Find the fruit\nSciFact: Find the evidence\n")
    argv = ["--model", str(tiny_model_dir), "--tasks", "SciFact", "--instructions", str(table), "--output",
            str(tmp_path / "out")]  # the task objects come from the patched select_tasks
    assert main(argv) == 0
    assert any(t.startswith("Instruct: Find the fruit\nQuery: ") for t in encoded_texts)
    assert any(t.startswith("Instruct: Find the evidence\nQuery: ") for t in encoded_texts)
    encoded_texts.clear()
    selected.pop()  # toy alone: its cached result is reused
    assert main(argv) == 0
    assert encoded_texts == []
    table.write_text("toy: Find the fruit, again\nSciFact: Find the evidence\n")  # another table: computed anew
    assert main(argv) == 0
    assert any(t.startswith("Instruct: Find the fruit, again\nQuery: ") for t in encoded_texts)
