"""The quickstart recipe under several seeds, with this checkout and with another revision: how far the seeded
held-out figure moves with the seed alone, next to what a change of the code moves it.

    python scripts/quickstart_seeds.py --rev 8a35721 --seeds 1 2 --output benchmarks/quickstart_seeds.json

Each run is `embedtrain train recipes/minilm/wordnet_quickstart.yaml train.seed=S eval.before_training=false`
(the figure before training does not depend on the seed); prints JSON with every run's held-out scores and
the mean and standard deviation of nDCG@10 per side.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import train_recipe, write_json  # noqa: E402
RECIPE = "recipes/minilm/wordnet_quickstart.yaml"


def run(repo: Path, seed: int, out: Path) -> dict:
    results = train_recipe(repo, RECIPE, [f"train.seed={seed}", "eval.before_training=false"], out)
    return {"seed": seed, "final": results["final"], "seconds": round(results["seconds"], 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rev", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--work", default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="quickstart-seeds-"))
    old = work / "revision"
    subprocess.run(["git", "worktree", "add", "--detach", "-f", str(old), args.rev], cwd=REPO, check=True,
                   capture_output=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    report = {"recipe": RECIPE, "revision": args.rev, "checkout": head.strip(), "seeds": args.seeds, "sides": {}}
    try:
        for side, repo in (("revision", old), ("checkout", REPO)):
            runs = [run(repo, seed, work / side / f"seed-{seed}") for seed in args.seeds]
            values = [100 * r["final"]["wordnet/ndcg@10"] for r in runs]
            report["sides"][side] = {"runs": runs, "ndcg@10_mean": round(statistics.mean(values), 2),
                                     "ndcg@10_sd": round(statistics.stdev(values), 2) if len(values) > 1 else None}
            print(side, values, file=sys.stderr, flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, capture_output=True)
    write_json(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
