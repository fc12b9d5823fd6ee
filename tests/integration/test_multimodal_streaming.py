"""Streaming image-text datasets (``streaming: true`` on CLIP / VLM2Vec data), read from webdataset shards.

- readers split the samples across processes and workers: none read twice, none skipped; a reader's position
  (with rows carried between pools, their image bytes included) gives the same batches after a round trip
  through JSON, as a checkpoint keeps it;
- a bad image stops the run with one line naming its shard and sample, or under ``bad_images: skip`` leaves its
  row out, counted in results.json;
- a streamed CLIP run, and a streamed VLM2Vec run, killed (SIGKILL) and resumed train the same rows at every step
  to the same weights;
- ``embedtrain plan`` plans a streamed recipe without reading it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from embedtrain.cli import main
from embedtrain.data.streaming import ImageRows, ImageStreamReader, open_stream

from conftest import REPO
from multimodal_support import tiny_vlm, write_image_text_rows, write_image_text_shards  # noqa: F401  (a fixture)
from stream_runner import rows_by_step

CLIP_TINY = REPO / "recipes" / "clip" / "emoji_clip_tiny.yaml"
ROWS = 48
STEPS = 10


def _with_repeats(jsonl: Path, every: int = 7) -> Path:
    """Every ``every``-th row takes the previous row's name: texts that must not share a batch, so that rows wait
    in one pool for the next (the rows a position carries)."""
    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    for i in range(every - 1, len(rows), every):
        rows[i]["name"] = rows[i - 1]["name"]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return jsonl


def _shards(root: Path, broken=None) -> Path:
    jsonl = _with_repeats(write_image_text_rows(root / "rows", n=ROWS, broken=broken))
    return write_image_text_shards(root / "shards", jsonl, rows_per_shard=8)  # 6 shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return _shards(tmp_path_factory.mktemp("mm-stream"))


def _source(shards: Path, bad_images: str = "stop"):
    roles = {"query": ("txt", None), "positive": (None, "png")}
    return open_stream("data.train[0]", "emoji", str(shards), {"query.text": "txt", "positive.image": "png"},
                       images=ImageRows(roles, str(shards), bad_images=bad_images))


def _reader(source, g: int, readers: int, position=None) -> ImageStreamReader:
    return ImageStreamReader(source, 0, g, readers, 5, 4, 8, None, False, True, False, position=position)


@pytest.mark.parametrize("readers", [1, 4, 9])  # 9 > 6 shards: every reader reads all shards, keeps every 9th row
def test_image_readers_split_the_samples_none_twice_none_skipped(shards, readers):
    source = _source(shards)
    assert source.num_shards == 6 and source.images.webdataset and source.num_negatives == 0
    seen: list[str] = []
    for g in range(readers):
        reader = _reader(source, g, readers)
        mine: list[str] = []
        while reader.pass_ == 0:
            (pool, rows), keys = reader.next_batch()
            assert [k for k in keys] == [pool.row_keys[r] for r in rows]
            mine += [pool.samples[r][1] for r in rows]  # the samples' keys (their row numbers)
        pool = reader.pool.tokens
        carried = [pool.samples[i][1] for i in range(len(reader.pool.rows) - reader.fresh)]
        part = mine[:-len(rows)] + carried
        assert len(part) == len(set(part))
        seen += part
    assert sorted(seen) == [f"{i:06d}" for i in range(ROWS)]


def test_a_position_with_carried_images_round_trips_through_json(shards):
    """Stop a reader after each batch, write its position as a checkpoint does (JSON), start a new reader from it:
    the batches that follow are the same. Rows that repeat a name wait between pools, images and all."""
    source = _source(shards)
    reference = _reader(source, 0, 1)
    batches = []
    carried_images = 0
    for _ in range(14):  # more than one pass of 48 rows in batches of 4
        (pool, rows), _ = reference.next_batch()
        batches.append([pool.samples[r][1] for r in rows])
        position = reference.position()
        carried_images += sum(isinstance(v, dict) and "base64" in json.dumps(v) for row in position["carry"] for v in row)
    assert carried_images, "no image was carried between pools; the test data should make some wait"
    for stop in (3, 7, 11):
        reader = _reader(source, 0, 1)
        for _ in range(stop):
            reader.next_batch()
        resumed = _reader(source, 0, 1, position=json.loads(json.dumps(reader.position())))
        after = []
        for _ in range(14 - stop):
            (pool, rows), _ = resumed.next_batch()
            after.append([pool.samples[r][1] for r in rows])
        assert after == batches[stop:]


def _recipe(shards: Path, out: Path, workers: int = 0, **data) -> dict:
    recipe = yaml.safe_load(CLIP_TINY.read_text())
    ds = recipe["data"]["train"][0]
    ds.update(path=str(shards), query_text_column="txt", positive_image_column="png", streaming=True)
    ds.pop("max_rows")
    recipe["data"].update(batch_size=8, num_workers=workers, stream_pool_batches=2, **data)
    recipe["train"].update(max_steps=STEPS, save_every=3, keep_last=2)
    recipe["eval"]["tasks"] = []
    recipe["output"]["dir"] = str(out)
    return recipe


def _write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_a_bad_image_stops_the_stream_in_one_line_or_is_left_out_and_counted(tmp_path, capsys):
    bad = _shards(tmp_path / "bad", broken={20: "garbage"})
    recipe = _write(tmp_path / "stop.yaml", _recipe(bad, tmp_path / "stop"))
    assert main(["train", str(recipe)]) == 2
    # a stream meets the row when it reads it: the run stops at that step, its last checkpoint kept
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: training stopped at step ")
    assert "train-00002.tar sample 000020: image 000020.png" in line and "data.bad_images: skip" in line

    recipe = _write(tmp_path / "skip.yaml", _recipe(bad, tmp_path / "skip", bad_images="skip"))
    assert main(["train", str(recipe)]) == 0
    assert "skipped: " in capsys.readouterr().out
    (stream,) = json.loads((tmp_path / "skip" / "results.json").read_text())["streams"]
    # 80 rows trained from 47 good ones: the bad row is read, and left out, in each of the two passes
    assert (stream["rows_bad_images"], stream["passes"], stream["rows_trained"]) == (2, 2, 8 * STEPS)


@pytest.mark.parametrize("processes,workers", [(1, 2), (2, 1)])
def test_a_killed_streamed_clip_run_resumes_to_the_same_rows_and_weights(shards, tmp_path, processes, workers):
    """Uninterrupted vs killed at a random step after the step-3 checkpoint and resumed, on 1 process with 2
    DataLoader workers and on 2 processes: every step of every process trains the same samples, and the weights
    are equal (1e-6: the same operations in the same order on one thread per process)."""
    from test_streaming import _finish, _kill_at, _launch

    ref_out, ref_rows = tmp_path / "reference", tmp_path / "reference-rows"
    proc, log = _launch(_write(tmp_path / "ref.yaml", _recipe(shards, ref_out, workers)), ref_rows,
                        tmp_path / "ref.txt", processes)
    _finish(proc, log, tmp_path / "ref.txt")

    out, rows = tmp_path / "run", tmp_path / "rows"
    recipe = _write(tmp_path / "run.yaml", _recipe(shards, out, workers))
    proc, log = _launch(recipe, rows, tmp_path / "log1.txt", processes, "--step-seconds", "0.4")
    _kill_at(proc, log, out, random.Random(processes).randint(4, 6))
    proc, log = _launch(recipe, rows, tmp_path / "log2.txt", processes, "--resume", "auto")
    _finish(proc, log, tmp_path / "log2.txt")
    assert "streams continue where the checkpoint left them" in (tmp_path / "log2.txt").read_text()

    reference = rows_by_step(ref_rows)
    assert len(reference) == processes * STEPS and rows_by_step(rows) == reference
    a = load_file(str(ref_out / "model" / "open_clip_model.safetensors"))
    b = load_file(str(out / "model" / "open_clip_model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    (stream,) = json.loads((out / "results.json").read_text())["streams"]
    assert stream["rows_trained"] == 8 * STEPS * processes and stream["rows_bad_images"] == 0 and stream["shards"] == 6
    assert stream["rows_in_shards_estimated"] and abs(stream["rows_in_shards"] - ROWS) <= 0.2 * ROWS


def test_plan_plans_a_streamed_image_text_recipe_without_reading_it(shards, tmp_path, capsys):
    recipe = _write(tmp_path / "plan.yaml", _recipe(shards, tmp_path / "run"))
    assert main(["plan", str(recipe), "--output", str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    (stream,) = plan["data"]["streams"]
    assert stream["format"] == "webdataset" and stream["shards"] == 6 and plan["problems"] == []
    # the first shard's samples (from its tar headers) scaled by bytes: 48 samples in 6 shards of 8
    assert stream["rows_estimated"] and abs(stream["rows"] - ROWS) <= 0.2 * ROWS
    assert "about " in capsys.readouterr().out
    works = plan["memory_per_device"]
    assert "streaming datasets are not read ahead" in works["token_lengths"]
    assert plan["compute"]["flops_per_step_per_device"] > 0


def test_vlm2vec_streams_two_datasets_from_shards(tiny_vlm, shards, tmp_path):  # noqa: F811
    """The tiny Qwen2-VL recipe with both its datasets streamed from the shards (images as queries, then as
    documents, one dataset per batch in turn): each trains its steps, and the plan reads neither."""
    overrides = [f"model.name_or_path={tiny_vlm}", "eval.tasks=[]", "train.max_steps=4", "data.num_workers=1",
                 f"output.dir={tmp_path / 'run'}"]
    for i, (query, positive) in enumerate((("query_image_column=png", "positive_text_column=txt"),
                                           ("query_text_column=txt", "positive_image_column=png"))):
        overrides += [f"data.train.{i}.path={shards}", f"data.train.{i}.{query}", f"data.train.{i}.{positive}",
                      f"data.train.{i}.max_rows=null", f"data.train.{i}.streaming=true"]
    vlm = str(REPO / "recipes" / "qwen2-vl-2b" / "vlm2vec_tiny_cpu.yaml")
    assert main(["plan", vlm, *overrides]) == 0
    assert main(["train", vlm, *overrides]) == 0
    streams = json.loads((tmp_path / "run" / "results.json").read_text())["streams"]
    assert [s["rows_trained"] for s in streams] == [16, 16]  # round robin: two batches of 8 each
    losses = [e["loss"] for e in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if "loss" in e]
    assert len(losses) == 4 and all(v == v for v in losses)


def test_a_killed_streamed_vlm2vec_run_resumes_to_the_same_rows_and_weights(tiny_vlm, shards, tmp_path):  # noqa: F811
    """The same for the tiny VLM2Vec recipe with its two datasets streamed in turn (round robin), GradCache on,
    1 process with 2 DataLoader workers."""
    from kinds_support import saved_weights
    from test_streaming import _finish, _kill_at, _launch

    def recipe(out: Path) -> dict:
        r = yaml.safe_load((REPO / "recipes" / "qwen2-vl-2b" / "vlm2vec_tiny_cpu.yaml").read_text())
        r["model"]["name_or_path"] = str(tiny_vlm)
        for ds, columns in zip(r["data"]["train"], (("query_image_column", "positive_text_column"),
                                                     ("query_text_column", "positive_image_column"))):
            for key in ("query_image_column", "query_text_column", "positive_image_column", "positive_text_column",
                        "max_rows"):
                ds.pop(key, None)
            ds.update({columns[0]: "png" if "image" in columns[0] else "txt",
                       columns[1]: "png" if "image" in columns[1] else "txt", "path": str(shards), "streaming": True})
        r["data"].update(num_workers=2, stream_pool_batches=2)
        r["train"].update(max_steps=8, save_every=3, keep_last=2)
        r["eval"]["tasks"] = []
        r["output"]["dir"] = str(out)
        return r

    ref_out, ref_rows = tmp_path / "reference", tmp_path / "reference-rows"
    proc, log = _launch(_write(tmp_path / "ref.yaml", recipe(ref_out)), ref_rows, tmp_path / "ref.txt", 1)
    _finish(proc, log, tmp_path / "ref.txt")
    out, rows = tmp_path / "run", tmp_path / "rows"
    path = _write(tmp_path / "run.yaml", recipe(out))
    proc, log = _launch(path, rows, tmp_path / "log1.txt", 1, "--step-seconds", "0.4")
    _kill_at(proc, log, out, 4)
    proc, log = _launch(path, rows, tmp_path / "log2.txt", 1, "--resume", "auto")
    _finish(proc, log, tmp_path / "log2.txt")
    assert "streams continue where the checkpoint left them" in (tmp_path / "log2.txt").read_text()
    reference = rows_by_step(ref_rows)
    assert len(reference) == 8 and rows_by_step(rows) == reference
    a, b = saved_weights(ref_out / "model"), saved_weights(out / "model")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert [s["rows_trained"] for s in json.loads((out / "results.json").read_text())["streams"]] == [32, 32]


def test_a_json_lines_stream_reads_image_paths_from_the_files_folder(tmp_path, capsys):
    """Image paths in a JSON-lines stream are read from the file's folder (or image_root); a missing one stops the
    run with the row of the reader's pass that names it."""
    jsonl = write_image_text_rows(tmp_path / "rows", n=ROWS, broken={30: "missing"})
    recipe = _recipe(jsonl, tmp_path / "run")
    recipe["data"]["train"][0].update(query_text_column="name", positive_image_column="image")
    recipe["train"]["max_steps"] = 2  # the first pool: rows 1-16
    assert main(["train", str(_write(tmp_path / "ok.yaml", recipe))]) == 0
    (stream,) = json.loads((tmp_path / "run" / "results.json").read_text())["streams"]
    assert (stream["path"], stream["rows_read"], stream["rows_trained"]) == (str(jsonl), 16, 16)
    recipe["train"]["max_steps"] = STEPS
    recipe["output"]["dir"] = str(tmp_path / "stopped")
    assert main(["train", str(_write(tmp_path / "stop.yaml", recipe))]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{jsonl} (reader 1 of 1, pass 1) row 31: image " in line and "missing-" in line and "not found" in line
