"""Train the CLIP emoji recipe from its JSONL and image folder and from webdataset shards of the same rows.

    python scripts/compare_webdataset.py --output runs/webdataset_emoji --json benchmarks/webdataset_emoji.json

Writes the shards first (scripts/make_webdataset.py's ``write_shards``, into ``--shards``, default
data/emoji_wds), then runs ``embedtrain train`` on recipes/clip/emoji_clip.yaml (folder form) and
recipes/clip/emoji_clip_webdataset.yaml (shards), each in its own process with the same seed, steps
and overrides (``--set``, e.g. ``--set train.max_steps=30`` for a short run). Reports for each run
Recall@1/5/10 text->image and image->text on the held-out emoji, the final training loss and the
seconds it took, and whether the two runs are bit-identical: every logged loss, every figure and
every weight of the saved model. Prints the JSON and writes it to ``--json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPES = {"folder": "recipes/clip/emoji_clip.yaml", "webdataset": "recipes/clip/emoji_clip_webdataset.yaml"}
FIGURES = [f"emoji/{d}/recall@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)]


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_emoji_shards(shards: Path, rows_per_shard: int) -> dict:
    emoji = REPO / "data" / "emoji"
    rows = [json.loads(line) for line in (emoji / "train.jsonl").read_text(encoding="utf-8").splitlines() if line]
    paths = _load_script("make_webdataset").write_shards(rows, shards, "name", "image", emoji, rows_per_shard)
    where = shards.relative_to(REPO) if shards.is_relative_to(REPO) else shards
    return {"folder": str(where), "rows": len(rows), "rows_per_shard": rows_per_shard, "shards": len(paths),
            "bytes": sum(p.stat().st_size for p in paths),
            "sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}}


def train(recipe: str, out: Path, overrides: list[str]) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    command = [sys.executable, "-m", "embedtrain", "train", recipe, f"output.dir={out}", *overrides]
    start = time.time()
    proc = subprocess.run(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"error: {recipe} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    losses = [e["loss"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in e]
    return {"recipe": recipe, "steps": results["steps"], "figures": {k: results["final"][k] for k in FIGURES},
            "final_loss": losses[-1], "losses": losses, "seconds": round(seconds, 1),
            "rows_read": results["data"][0]["rows_read"], "dropped": results["data"][0]["dropped"]}


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = (load_file(str(run / "model" / "open_clip_model.safetensors")) for run in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/webdataset_emoji", help="one run folder per form under this folder")
    parser.add_argument("--shards", default="data/emoji_wds",
                        help="where to write the shards (the recipe reads data/emoji_wds)")
    parser.add_argument("--rows-per-shard", type=int, default=256)
    parser.add_argument("--json", default=None, help="write the comparison here (default: <output>/comparison.json)")
    parser.add_argument("--set", nargs="+", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="recipe overrides for both runs, e.g. --set train.max_steps=30")
    args = parser.parse_args(argv)
    out = (REPO / args.output).resolve()
    shards = (REPO / args.shards).resolve()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                            capture_output=True).stdout.strip()  # the code the runs use
    shard_info = write_emoji_shards(shards, args.rows_per_shard)
    runs = {}
    for form, recipe in RECIPES.items():
        overrides = list(args.overrides)
        if form == "webdataset" and shards != (REPO / "data" / "emoji_wds").resolve():
            overrides.append(f"data.train.0.path={shards}/train-*.tar")
        runs[form] = train(recipe, out / form, overrides)
        print(f"{form}: {runs[form]['figures']} final loss {runs[form]['final_loss']:.6f} "
              f"({runs[form]['seconds']} s)", file=sys.stderr, flush=True)
    a, b = runs["folder"], runs["webdataset"]
    identical = {"figures": a["figures"] == b["figures"], "losses_every_step": a["losses"] == b["losses"],
                 "final_weights": same_weights(out / "folder", out / "webdataset")}
    doc = {
        "what": "the CLIP emoji recipe trained from the JSONL + image folder and from webdataset shards of its rows",
        "command": "python scripts/compare_webdataset.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": commit,
        "overrides": args.overrides,
        "shards": shard_info,
        "runs": {form: {k: v for k, v in run.items() if k != "losses"} for form, run in runs.items()},
        "bit_identical": identical,
        "all_bit_identical": all(identical.values()),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()},
    }
    text = json.dumps(doc, indent=2)
    print(text)
    path = Path(args.json) if args.json else out / "comparison.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")
    return 0 if doc["all_bit_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
