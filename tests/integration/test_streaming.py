"""Streaming datasets (``streaming: true``) on the tiny BERT, read from local Parquet shards.

- readers split the rows across processes and workers: no row read twice, none skipped (shard split and row split);
- a streamed run equals itself when killed (SIGKILL, at random steps) and resumed: the same rows at every step
  and the same final weights, on 1 process with 2 DataLoader workers and on 2 processes;
- several streams mix by their weights, one dataset per batch; a bad row is one line naming the column and row;
- resuming with another number of workers is one line that says what to do.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from safetensors.torch import load_file

from embedtrain.cli import main
from embedtrain.data.readers import text_hash
from embedtrain.data.streaming import StreamReader, TokenizeRoles, open_stream

from conftest import REPO, WORDS, accelerate_launch, kill_tree, logged_steps, subprocess_env, tiny_recipe
from stream_runner import rows_by_step

STEPS = 14


def _rows(n: int, start: int = 0, tag: str = "") -> list[dict]:
    rng = random.Random(start)
    rows = []
    for i in range(start, start + n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9)))
        rows.append({"anchor": f"{tag}query {i} {words}", "positive": f"{tag}answer {i} {words}",
                     "negative": f"{tag}other {i} {rng.choice(WORDS)}"})
    return rows


def _shards(folder: Path, shards: int, per_shard: int, tag: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        pq.write_table(pa.Table.from_pylist(_rows(per_shard, s * per_shard, tag)), folder / f"part-{s:03d}.parquet",
                       row_group_size=17)  # row groups that do not line up with pools
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return _shards(tmp_path_factory.mktemp("stream") / "shards", 6, 60)


def _recipe(model: Path, data: Path, out: Path, workers: int = 0, **train) -> dict:
    recipe = tiny_recipe(model, data, out, train={"max_steps": STEPS, "save_every": 4, "keep_last": 2,
                                                  "torch_threads": 1, **train})
    recipe["data"]["train"][0]["streaming"] = True
    recipe["data"].update({"num_workers": workers, "length_grouping_window": 3})
    return recipe


def _write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def _weights(run: Path) -> dict:
    return load_file(str(run / "model" / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# -- readers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("readers", [1, 4, 9])  # 9 > 6 shards: every reader reads all shards, keeps every 9th row
def test_readers_split_the_rows_none_twice_none_skipped(tiny_bert, shards, readers):
    from transformers import AutoTokenizer

    tokenize = TokenizeRoles(AutoTokenizer.from_pretrained(str(tiny_bert)), 32, 32)
    source = open_stream("data.train[0]", "pairs", str(shards),
                         {"query": "anchor", "positive": "positive", "negative_0": "negative"})
    assert (source.num_shards, source.rows) == (6, 360)
    seen: list[int] = []
    for g in range(readers):
        reader = StreamReader(source, 0, g, readers, seed=5, batch_size=4, pool_rows=12, tokenize=tokenize,
                              group_by_length=True, no_duplicates=True, repeat_documents=True)
        mine: list[int] = []
        while reader.pass_ == 0:  # every batch of the first pass, then what waits in the pools
            _, keys = reader.next_batch()
            mine += [k[1] for k in keys]
        # the batch just taken came from the next pass's first pool, which starts with the rows this pass's
        # last pool could not place: those and the batches before are this reader's part
        carried = [text_hash(r[1]) for r in reader.pool.rows[: len(reader.pool.rows) - reader.fresh]]
        part = mine[:-4] + carried
        assert len(part) == len(set(part))  # no row twice within a reader's pass
        seen += part
    every = {text_hash(r["positive"]) for s in range(6) for r in _rows(60, s * 60)}
    assert len(seen) == len(set(seen)) == 360 and set(seen) == every


# -- runs -------------------------------------------------------------------------------------------


def _env(**extra) -> dict:
    return subprocess_env(**extra)


def _launch(recipe: Path, rows: Path, log: Path, processes: int, *args, **env):
    import subprocess

    runner = [str(REPO / "tests" / "stream_runner.py"), str(recipe), str(rows), *args]
    if processes == 1:
        cmd = [sys.executable, *runner]
    else:
        cmd = accelerate_launch("multi_cpu.yaml") + runner
    f = log.open("w")
    return subprocess.Popen(cmd, cwd=REPO, env=_env(**env), stdout=f, stderr=subprocess.STDOUT,
                            start_new_session=True), f


def _kill_at(proc, log, run: Path, step: int, timeout: float = 300) -> None:
    """SIGKILL the run's process group once metrics.jsonl shows ``step`` (a resumed run's lines, not the old ones:
    resuming cuts the file back to the checkpoint's step first)."""
    end = time.time() + timeout
    while not (logged_steps(run) and max(logged_steps(run)) >= step):
        assert proc.poll() is None, f"exited with {proc.returncode} before step {step}:\n{log.name}"
        assert time.time() < end, f"step {step} not reached in {timeout}s"
        time.sleep(0.02)
    time.sleep(random.Random(step).uniform(0, 0.3))
    kill_tree(proc.pid)
    proc.wait(timeout=60)
    log.close()


def _finish(proc, log, path: Path, timeout: float = 400) -> None:
    code = proc.wait(timeout=timeout)
    log.close()
    assert code == 0, path.read_text()[-3000:]


@pytest.mark.parametrize("processes,workers", [(1, 2), pytest.param(2, 1, marks=pytest.mark.slow)])
def test_sigkill_then_resume_trains_the_same_rows_to_the_same_weights(tiny_bert, shards, tmp_path, processes, workers):
    """Uninterrupted vs killed twice at random steps (after the step-4 and step-8 checkpoints) and resumed:
    every step of every process trains the same rows, and the final weights are equal (1e-6: the resumed run
    repeats the same operations in the same order on one thread per process)."""
    rng = random.Random(processes * 10 + workers)
    ref_out, ref_rows = tmp_path / "reference", tmp_path / "reference-rows"
    recipe = _write(tmp_path / "ref.yaml", _recipe(tiny_bert, shards, ref_out, workers))
    proc, log = _launch(recipe, ref_rows, tmp_path / "ref.txt", processes)
    _finish(proc, log, tmp_path / "ref.txt")

    out, rows = tmp_path / "run", tmp_path / "rows"
    recipe = _write(tmp_path / "run.yaml", _recipe(tiny_bert, shards, out, workers))
    slow = ["--step-seconds", "0.4"]  # time to kill the run at the step drawn
    proc, log = _launch(recipe, rows, tmp_path / "log1.txt", processes, *slow)
    _kill_at(proc, log, out, rng.randint(5, 7))
    proc, log = _launch(recipe, rows, tmp_path / "log2.txt", processes, "--resume", "auto", *slow)
    _kill_at(proc, log, out, rng.randint(9, 11))
    assert "streams continue where the checkpoint left them" in (tmp_path / "log2.txt").read_text()
    proc, log = _launch(recipe, rows, tmp_path / "log3.txt", processes, "--resume", "auto")
    _finish(proc, log, tmp_path / "log3.txt")

    reference, resumed = rows_by_step(ref_rows), rows_by_step(rows)
    assert len(reference) == processes * STEPS and resumed == reference
    trained = [i for ids in reference.values() for i in ids]
    assert len(trained) == len(set(trained))  # 14 steps x 8 x processes rows: fewer than one pass, none twice
    assert _max_diff(_weights(out), _weights(ref_out)) <= 1e-6
    results = json.loads((out / "results.json").read_text())
    (stream,) = results["streams"]
    assert stream["rows_trained"] == 8 * STEPS * processes and stream["rows_dropped"] == 0
    assert stream["rows_in_shards"] == 360 and not stream["rows_in_shards_estimated"] and stream["shards"] == 6


def test_streams_mix_by_weight_one_dataset_per_batch(tiny_bert, tmp_path):
    a = _shards(tmp_path / "a", 2, 40, tag="alpha ")
    b = _shards(tmp_path / "b", 3, 40, tag="beta ")
    recipe = _recipe(tiny_bert, a, tmp_path / "out", 0, max_steps=20, save_every=None)
    recipe["data"]["train"] = [
        {"path": str(a), "name": "a", "negative_columns": ["negative"], "streaming": True, "weight": 3.0},
        {"path": str(b), "name": "b", "negative_columns": ["negative"], "streaming": True},
    ]
    alpha = {text_hash(r["positive"]) for s in range(2) for r in _rows(40, s * 40, "alpha ")}
    beta = {text_hash(r["positive"]) for s in range(3) for r in _rows(40, s * 40, "beta ")}
    from embedtrain.train.loop import Callback

    kinds = []

    class Kinds(Callback):
        def on_step_begin(self, trainer, batch):
            ids = set(batch["positive_ids"].tolist())
            kinds.append("a" if ids <= alpha else "b" if ids <= beta else "mixed")
            assert batch["dataset"] == (0 if kinds[-1] == "a" else 1)

    import embedtrain

    result = embedtrain.train(str(_write(tmp_path / "r.yaml", recipe)), callbacks=[Kinds()], log=lambda *_: None)
    assert "mixed" not in kinds and len(kinds) == 20
    # 80 x 3 : 120 x 1 rows x weight: a's share is 2/3 of the steps (drawn per step, seeded)
    assert 9 <= kinds.count("a") <= 17 and kinds.count("b") >= 3
    figures = {s["name"]: s for s in result.details["streams"]}
    assert figures["a"]["rows_trained"] == 8 * kinds.count("a")


def test_bad_row_in_a_stream_is_one_line(tiny_bert, tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    rows = _rows(40)
    rows[13]["positive"] = "   "
    pq.write_table(pa.Table.from_pylist(rows), folder / "part-000.parquet")
    recipe = _recipe(tiny_bert, folder, tmp_path / "out", 0, max_steps=4, save_every=None)
    code = main(["train", str(_write(tmp_path / "r.yaml", recipe))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"error: training stopped at step 1: data.train[0]: {folder}: column 'positive' "
                              "is empty in row 14 that reader 0 of 1 reads in pass 1; fix or remove the row")


def test_resume_with_other_workers_is_one_line(tiny_bert, shards, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = _recipe(tiny_bert, shards, out, 0, max_steps=6, save_every=2)
    path = _write(tmp_path / "r.yaml", recipe)
    assert main(["train", str(path), "train.max_steps=2"]) == 0
    capsys.readouterr()
    assert main(["train", str(path), "data.num_workers=2", "--resume", "auto"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: resume: the checkpoint's stream positions belong to 1 process(es) x 1 worker(s), this run has "
        "1 x 2; resume with the same numbers (data.num_workers, processes), or start again with --overwrite")


def test_recipe_checks_for_streams(tiny_bert, shards, tmp_path):
    from embedtrain.config import recipe_from_dict
    from embedtrain.errors import ConfigError

    recipe = _recipe(tiny_bert, shards, tmp_path / "out")
    recipe["train"].pop("max_steps")
    recipe["data"]["train"].append({"path": str(shards), "name": "whole"})
    recipe["data"]["train"][0]["max_rows"] = 10
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(recipe)
    text = str(err.value)
    assert "data.train[1].streaming: false while other datasets stream" in text
    assert "train.max_steps: a streaming dataset has no epochs to count; set train.max_steps" in text
    assert "data.train[0].max_rows: a stream is not cut by rows" in text


def test_plan_reports_a_streams_shards_and_rows(tiny_bert, shards, tmp_path, capsys):
    """embedtrain plan reads no row of a stream: its shards and rows (Parquet footers; JSON lines estimated from
    bytes per line), and memory at the token limit."""
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    for s in range(3):
        (jsonl / f"part-{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(50, s * 50)))
    recipe = _recipe(tiny_bert, shards, tmp_path / "out", 2)
    recipe["data"]["train"].append({"path": str(jsonl), "name": "lines", "negative_columns": ["negative"],
                                    "streaming": True})
    path = _write(tmp_path / "r.yaml", recipe)
    assert main(["plan", str(path), "--output", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "data: global batch 8, streamed by 2 reader(s) (processes x workers)" in out
    assert f"  pairs: {shards}, parquet, 6 shard(s), 360 rows" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    (parquet, lines) = plan["data"]["streams"]
    assert lines["rows_estimated"] and 120 <= lines["rows"] <= 180  # 150 rows of uneven length
    assert "streaming datasets are not read ahead" in plan["memory_per_device"]["token_lengths"]
