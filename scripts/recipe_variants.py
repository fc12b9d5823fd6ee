"""A recipe under named variants (sets of overrides) and several seeds: each run's final figures, and the mean and
standard deviation of the chosen metrics per variant.

    python scripts/recipe_variants.py recipes/clip/emoji_clip.yaml --seeds 0 1 2 \\
        --variant probe= --variant no_probe=eval.diagnostics.probe_rows=0 \\
        --metrics emoji/t2i/recall@10 emoji/i2t/recall@10 --output benchmarks/emoji_clip_probe.json

A variant is ``NAME=KEY=VALUE,KEY=VALUE`` (nothing after the first ``=``: the recipe as it is). Each run is
``embedtrain train RECIPE OVERRIDES train.seed=S`` in its own process, one after the other; prints and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import REPO, machine_info, train_recipe, write_json  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    if not name:
        raise SystemExit(f"--variant {text!r}: give NAME=OVERRIDES (NAME= for the recipe as it is)")
    return name, [o for o in overrides.split(",") if o]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=OVERRIDES")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--metrics", nargs="+", required=True, help="keys of results.json's final figures")
    parser.add_argument("--work", default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="recipe-variants-"))
    report = {"command": "python scripts/recipe_variants.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "recipe": args.recipe, "seeds": args.seeds, "variants": {}, "machine": machine_info()}
    for name, overrides in map(parse_variant, args.variant):
        runs = []
        for seed in args.seeds:
            results = train_recipe(REPO, args.recipe, [*overrides, f"train.seed={seed}"], work / name / f"seed-{seed}")
            runs.append({"seed": seed, "final": results["final"], "seconds": round(results["seconds"], 1),
                         "diagnostics_probe": results.get("diagnostics_probe")})
            print(name, seed, {m: round(100 * results["final"][m], 2) for m in args.metrics}, file=sys.stderr, flush=True)
        summary = {}
        for metric in args.metrics:
            values = [100 * r["final"][metric] for r in runs]
            summary[metric] = {"values": [round(v, 2) for v in values], "mean": round(statistics.mean(values), 2),
                               "sd": round(statistics.stdev(values), 2) if len(values) > 1 else None}
        report["variants"][name] = {"overrides": overrides, "runs": runs, "summary": summary}
    write_json(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
