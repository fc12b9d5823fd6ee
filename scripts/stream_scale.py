"""Streaming at scale: peak memory, time to the first step and examples/s, streamed vs loaded whole.

    python scripts/stream_scale.py --output benchmarks/streaming_scale.json
    python scripts/stream_scale.py --images --rows 100000 --output benchmarks/streaming_scale_images.json

Runs the quickstart setting (all-MiniLM-L6-v2, batch 64, max_length 128, InfoNCE with one hard negative, length
grouping) for ``--steps`` steps, without evaluation, as separate processes:

- ``loaded_wordnet``: data/wordnet/train.jsonl read whole (the quickstart as it is);
- ``streamed_wordnet``: the same file streamed (one shard, one DataLoader worker tokenizing);
- ``streamed_50k``: 50,000 rows in 50 Parquet shards, streamed;
- ``streamed_5m``: 5,000,000 rows in 50 Parquet shards, streamed.

The generated rows are WordNet's training rows again and again, each text prefixed with its row number so that
no two rows are the same (the texts are one token longer than WordNet's).

``--images`` measures image-text streams instead, on recipes/clip/emoji_clip_webdataset.yaml (a 64-wide CLIP, batch
128, one DataLoader worker) in webdataset shards of 256 samples:

- ``loaded_emoji`` / ``streamed_emoji``: the 1,496 emoji training rows, read whole (every image decoded once
  before training, data.verify_images) or streamed (each image decoded once as its pool is read);
- ``loaded_<N>`` / ``streamed_<N>``: ``--rows`` samples, the emoji rows again and again, each name prefixed with
  its row number (every sample is its own image in the shards, so no two rows are the same);
  ``loaded_<N>_again`` reads them whole a second time, from the table ``datasets`` cached on the first read (the
  shards are new when this script writes them, so the first read builds that cache). They are written once under
``runs/stream_scale/`` and reused. Memory is the proportional set size (PSS: shared pages split between the
processes that share them) of the training process and its DataLoader workers together, sampled every 0.2 s;
time to the first step is from the process start (measured by this script) to the first step's start (a
callback). examples/s is the median over 10-step log windows, the first window left out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import REPO, machine_info, offline_env, watch, write_json  # noqa: E402

WORK = REPO / "runs" / "stream_scale"
RECIPE = "recipes/minilm/wordnet_quickstart.yaml"
IMAGE_RECIPE = "recipes/clip/emoji_clip_webdataset.yaml"

CHILD = r"""
import json, sys, time
import embedtrain
from embedtrain.train.loop import Callback

class FirstStep(Callback):
    seen = False

    def on_step_begin(self, trainer, batch):
        if not self.seen:
            self.seen = True
            with open(sys.argv[1], "w") as f:
                f.write(repr(time.time()))

embedtrain.train(sys.argv[2], overrides=sys.argv[3:], callbacks=[FirstStep()], log=lambda *a: print(*a, flush=True))
"""


def make_shards(rows: int, shards: int) -> Path:
    """``rows`` rows in ``shards`` Parquet files (written once)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = WORK / f"data-{rows}"
    if (folder / "DONE").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    source = [json.loads(l) for l in (REPO / "data" / "wordnet" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    per = rows // shards
    for s in range(shards):
        start = s * per
        batch = [source[i % len(source)] for i in range(start, start + per)]
        table = pa.table({k: [f"{start + j} {r[k]}" for j, r in enumerate(batch)] for k in ("anchor", "positive", "negative")})
        pq.write_table(table, folder / f"part-{s:04d}.parquet", row_group_size=10_000)
        print(f"  shard {s + 1}/{shards}", file=sys.stderr, flush=True)
    (folder / "DONE").write_text("")
    return folder


def make_image_shards(rows: Optional[int]) -> Path:
    """Webdataset shards of the emoji training rows (all of them once when ``rows`` is None, else ``rows`` samples
    of them again and again, each name prefixed with its row number), written once."""
    import importlib.util

    folder = WORK / f"images-{rows or 'emoji'}"
    if (folder / "DONE").is_file():
        return folder
    spec = importlib.util.spec_from_file_location("make_webdataset", REPO / "scripts" / "make_webdataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    emoji = [json.loads(l) for l in (REPO / "data" / "emoji" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    chosen = emoji if rows is None else [{**emoji[i % len(emoji)], "name": f"{i} {emoji[i % len(emoji)]['name']}"}
                                         for i in range(rows)]
    module.write_shards(chosen, folder, "name", "image", REPO / "data" / "emoji", 256)
    (folder / "DONE").write_text("")
    return folder


def run(name: str, overrides: list[str], steps: int, recipe: str = RECIPE) -> dict:
    out = WORK / "runs" / name
    first_file = WORK / f"{name}.first_step"
    first_file.unlink(missing_ok=True)
    argv = [sys.executable, "-c", CHILD, str(first_file), recipe, *overrides, f"train.max_steps={steps}", "eval.tasks=[]",
            "eval.diagnostics.probe_rows=0", "train.log_every=10", "output.plot=false", f"output.dir={out}",
            "output.overwrite=true"]
    load_before = os.getloadavg()
    child = watch(name, argv, dict(os.environ, PYTHONPATH=str(REPO)), interval=0.2)
    start, wall, peak, text = child["start"], child["wall"], child["peak_pss"], child["log"]
    first = float(first_file.read_text())
    speeds = [m["examples_per_s"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if m.get("loss") is not None][1:]
    results = json.loads((out / "results.json").read_text())
    return {"name": name, "overrides": overrides, "steps": steps, "peak_pss_mb": round(peak / 2**20, 1),
            "seconds_to_first_step": round(first - start, 1), "wall_seconds": round(wall, 1),
            "examples_per_s_median": round(statistics.median(speeds), 2) if speeds else None,
            "examples_per_s_windows": speeds, "streams": results.get("streams"),
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "log_lines": [l for l in text.splitlines() if l.startswith(("data:", "engine:"))]}


def run_all(plan: dict[str, list[str]], only, steps: int, recipe: str) -> list[dict]:
    """Each named run of ``plan`` (its overrides) in turn, or only those of ``only``; a line per run on stderr."""
    runs = []
    for name, overrides in plan.items():
        if only and name not in only:
            continue
        print(f"{name} ...", file=sys.stderr, flush=True)
        runs.append(run(name, overrides, steps, recipe))
        print(f"  {runs[-1]['seconds_to_first_step']} s to the first step, peak {runs[-1]['peak_pss_mb']} MB, "
              f"{runs[-1]['examples_per_s_median']} examples/s", file=sys.stderr, flush=True)
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--shards", type=int, default=50)
    parser.add_argument("--only", nargs="*", help="run only these of the four runs")
    parser.add_argument("--images", action="store_true", help="image-text streams (CLIP on webdataset shards)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    offline_env()
    if args.images:
        return images(args, argv)
    small, large = make_shards(50_000, args.shards), make_shards(args.rows, args.shards)
    stream = ["data.train.0.streaming=true", "data.num_workers=1"]
    plan = {
        "loaded_wordnet": [],
        "streamed_wordnet": stream,
        "streamed_50k": [f"data.train.0.path={small}", *stream],
        f"streamed_{args.rows // 1_000_000}m" if args.rows >= 1_000_000 else f"streamed_{args.rows}":
            [f"data.train.0.path={large}", *stream],
    }
    runs = run_all(plan, args.only, args.steps, RECIPE)
    by = {r["name"]: r for r in runs}
    summary = {}
    if "streamed_50k" in by and len(runs) == 4:
        big = runs[-1]
        summary["peak_mb_above_50k"] = round(big["peak_pss_mb"] - by["streamed_50k"]["peak_pss_mb"], 1)
        summary["seconds_to_first_step_large"] = big["seconds_to_first_step"]
    if {"loaded_wordnet", "streamed_wordnet"} <= by.keys():
        summary["streamed_over_loaded_examples_per_s"] = round(
            by["streamed_wordnet"]["examples_per_s_median"] / by["loaded_wordnet"]["examples_per_s_median"], 3)
    doc = {"command": "python scripts/stream_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "recipe": RECIPE, "machine": machine_info(), "summary": summary, "runs": runs,
           "differences": "loaded: data read and tokenized before training, no DataLoader worker (the quickstart's "
                          "num_workers 0); streamed: one DataLoader worker reads and tokenizes pools of 64 batches. "
                          "Both group by length in pools of 64 batches and keep duplicates apart; no evaluation."}
    write_json(doc, args.output)
    return 0


def images(args, argv) -> int:
    emoji, large = make_image_shards(None), make_image_shards(args.rows)
    size = f"{args.rows // 1000}k" if args.rows >= 1000 else str(args.rows)
    stream = ["data.train.0.streaming=true"]
    plan = {"loaded_emoji": [f"data.train.0.path={emoji}"], "streamed_emoji": [f"data.train.0.path={emoji}", *stream],
            f"loaded_{size}": [f"data.train.0.path={large}"], f"loaded_{size}_again": [f"data.train.0.path={large}"],
            f"streamed_{size}": [f"data.train.0.path={large}", *stream]}
    plan = {name: ["eval.before_training=false", "train.log_every=10", *overrides] for name, overrides in plan.items()}
    runs = run_all(plan, args.only, args.steps, IMAGE_RECIPE)
    doc = {"command": "python scripts/stream_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "recipe": IMAGE_RECIPE, "machine": machine_info(), "runs": runs,
           "differences": "loaded: every sample read into a datasets table and every image decoded once before "
                          "training; streamed: pools of data.stream_pool_batches (4) batches read by the one "
                          "DataLoader worker, each image decoded once as read. Both decode each batch's images again "
                          "in that worker and keep duplicates apart; streamed batches are shuffled within a pool and "
                          "by shard order, loaded ones over the whole set; no evaluation."}
    write_json(doc, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
