"""Zero-shot metric learning on the emoji set: what to train on a frozen CLIP vision tower.

Trains on a seeded half of the Unicode subgroups of data/emoji and evaluates Recall@1/2/4/8 and
MAP@R on the other half (subgroups never seen in training), for four ways of adapting the tiny
open_clip vision tower trained by the emoji CLIP recipe:

  head        frozen backbone, only the embedding head trains
  full        full fine-tuning (every backbone weight and the head)
  vpt         deep visual prompts + head, backbone frozen
  vpt_sp      deep visual prompts + semantic proxies (class prompts, GRU) + head, backbone frozen

plus the tower's own embedding before any training. Every variant uses the same recipe
(recipes/dml/vpt_proxies_emoji.yaml: Proxy-Anchor, batches of 16 subgroups x 4 images, same steps
and seed), changing only what is trained. Results are printed and written as JSON and Markdown.

    python scripts/dml_emoji.py --backbone runs/emoji_clip/model --output runs/dml_emoji \\
        --json benchmarks/dml_emoji.json --markdown benchmarks/dml_emoji.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from embedtrain.errors import EmbedtrainError, print_error  # noqa: E402

VARIANTS = {
    "head": ("frozen backbone + head",
             ["model.tuning.train_backbone=frozen", "model.tuning.prompt_depth=0", "model.proxies.semantic=false"]),
    # a third of the learning rate: every backbone weight moves, not only new parameters
    "full": ("full fine-tuning", ["model.tuning.train_backbone=full", "model.tuning.prompt_depth=0",
                                  "model.proxies.semantic=false", "train.lr=1e-3"]),
    "vpt": ("VPT (deep prompts) + head", ["model.tuning.train_backbone=frozen", "model.proxies.semantic=false"]),
    "vpt_sp": ("VPT + semantic proxies", ["model.tuning.train_backbone=frozen", "model.proxies.semantic=true"]),
}
METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", required=True, help="open_clip folder of the emoji CLIP recipe (<output.dir>/model)")
    parser.add_argument("--recipe", default=str(REPO / "recipes/dml/vpt_proxies_emoji.yaml"))
    parser.add_argument("--output", default="runs/dml_emoji", help="one run folder per variant under this folder")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="training seeds (results are averaged)")
    parser.add_argument("--json", default=None, help="write the results here (default: <output>/results.json)")
    parser.add_argument("--markdown", default=None, help="write the table here (default: <output>/results.md)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep runs that finished before with the same recipe (their results.json) instead of training again")
    parser.add_argument("--set", nargs="+", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="recipe overrides for every variant, e.g. --set train.max_steps=50")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except EmbedtrainError as err:
        return print_error(err)


def run(args) -> int:
    from embedtrain.config import DMLRecipe, load_recipe
    from embedtrain.train.loop import train

    started = time.time()
    out = Path(args.output)
    rows = {}
    baseline = None
    for name in args.variants:
        label, variant_overrides = VARIANTS[name]
        runs = []
        for seed in args.seeds:
            overrides = [f"model.backbone.name_or_path={args.backbone}", f"output.dir={out / f'{name}-seed{seed}'}",
                         "output.overwrite=true", "output.plot=false", f"train.seed={seed}",
                         *variant_overrides, *args.overrides]
            recipe = load_recipe(args.recipe, overrides)
            if not isinstance(recipe, DMLRecipe):
                raise EmbedtrainError(f"{args.recipe}: kind: {recipe.kind}; this script runs metric-learning recipes (kind: dml)")
            print(f"\n== {label} (seed {seed})", flush=True)
            done = finished_run(recipe) if args.reuse else None
            if done is None:
                result = train(recipe)
                if result.stopped:
                    print(f"stopped during {label} (seed {seed}); run again with --reuse to continue", file=sys.stderr)
                    return 1
                done = {"baseline": result.baseline, "final": result.final, "train_seconds": result.train_seconds,
                        "seconds": result.seconds, "steps": result.steps,
                        "trainable_parameters": result.trainable_parameters, "total_parameters": result.total_parameters}
            else:
                print(f"reusing {recipe.output.dir}: recall@1 {100 * done['final']['recall@1']:.2f}")
            runs.append({"seed": seed, "before": done["baseline"], "final": done["final"],
                         "train_seconds": done["train_seconds"], "seconds": done["seconds"], "steps": done["steps"]})
            if name in ("head", "full") and not baseline:  # prompts change the embedding before any training
                baseline = done["baseline"]
            trainable, total = done["trainable_parameters"], done["total_parameters"]
        rows[name] = {"label": label, "overrides": variant_overrides, "runs": runs,
                      "mean": {m: _mean([r["final"][m] for r in runs]) for m in METRICS},
                      "std": {m: _std([r["final"][m] for r in runs]) for m in METRICS},
                      "trainable_parameters": trainable, "total_parameters": total,
                      "train_seconds": _mean([r["train_seconds"] for r in runs])}
    report = {
        "backbone": str(args.backbone), "recipe": str(args.recipe), "overrides": args.overrides, "seeds": args.seeds,
        "before_training": {m: baseline[m] for m in METRICS} if baseline else {},
        "queries": baseline.get("queries") if baseline else None, "singletons": baseline.get("singletons") if baseline else None,
        "rows": rows, "seconds": time.time() - started,
        "run_seconds": sum(r["seconds"] for row in rows.values() for r in row["runs"]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
    }
    table = markdown(report)
    print("\n" + table)
    json_path = Path(args.json or out / "results.json")
    md_path = Path(args.markdown or out / "results.md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(table + "\n", encoding="utf-8")
    print(f"\nwrote {json_path} and {md_path} ({report['seconds'] / 60:.1f} min in all)")
    return 0


def finished_run(recipe) -> dict | None:
    """results.json of a finished run of exactly this recipe, or None."""
    import yaml

    from embedtrain.config import to_dict

    folder = Path(recipe.output.dir)
    try:
        saved = yaml.safe_load((folder / "recipe.yaml").read_text(encoding="utf-8"))
        results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    mine, theirs = to_dict(recipe), dict(saved or {})
    for d in (mine, theirs):
        d.get("output", {}).pop("overwrite", None)
    return results if mine == theirs and results.get("final") else None


def markdown(report: dict) -> str:
    seeds = len(report["seeds"])
    head = "| unseen subgroups | R@1 | R@2 | R@4 | R@8 | MAP@R | trained parameters | train time |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    if report["before_training"]:
        b = report["before_training"]
        lines.append("| CLIP tower's own embedding (no training) | " + " | ".join(f"{100 * b[m]:.2f}" for m in METRICS)
                     + " | 0 | - |")
    for row in report["rows"].values():
        cells = []
        for m in METRICS:
            cell = f"{100 * row['mean'][m]:.2f}"
            if seeds > 1:
                cell += f" ± {100 * row['std'][m]:.2f}"
            cells.append(cell)
        share = 100 * row["trainable_parameters"] / row["total_parameters"]
        lines.append(f"| {row['label']} | " + " | ".join(cells)
                     + f" | {row['trainable_parameters']:,} ({share:.1f}%) | {row['train_seconds']:.0f} s |")
    return "\n".join(lines)


def _mean(values):
    return sum(values) / len(values)


def _std(values):
    m = _mean(values)
    return (sum((v - m) ** 2 for v in values) / len(values)) ** 0.5


if __name__ == "__main__":
    sys.exit(main())
