"""The model-merging experiment: train the WordNet and FOLDOC task models, merge them, compare.

Example::

    python scripts/merge_experiment.py             # trains what is missing, then merges
    python scripts/merge_experiment.py --overwrite # run the merges again into the same folder

1. Trains each task model with ``embedtrain train RECIPE`` (recipes/minilm/wordnet.yaml and
   recipes/minilm/foldoc.yaml by default). A model whose ``<output.dir>/model`` already exists is
   reused; an interrupted run with a checkpoint is resumed.
2. Runs the merge recipe (recipes/merge/wordnet_foldoc_self_positioning.yaml) into
   ``<output>/merge`` (models, report.json, report.md).
3. Writes ``<output>/results.json`` and ``<output>/results.md`` (the comparison table, the Self
   Positioning coefficients and how each task model was trained) and prints the table.

The merge recipe's ``models`` must point at the training recipes' ``<output.dir>/model`` folders.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from embedtrain.errors import ConfigError, EmbedtrainError  # noqa: E402

TRAIN_RECIPES = ["recipes/minilm/wordnet.yaml", "recipes/minilm/foldoc.yaml"]
MERGE_RECIPE = "recipes/merge/wordnet_foldoc_self_positioning.yaml"


def train_task_model(recipe_path: str, retrain: bool, log=print) -> dict:
    """Train one task model through the command line unless its model folder exists."""
    from embedtrain import cli
    from embedtrain.config import load_recipe
    from embedtrain.train.checkpoint import list_checkpoints

    recipe = load_recipe(recipe_path)
    run_dir = Path(recipe.output.dir)
    model_dir = run_dir / "model"
    info = {"recipe": recipe_path, "model": str(model_dir)}
    if (model_dir / "modules.json").is_file() and not retrain:
        log(f"{model_dir} exists: not training {recipe_path} again (--retrain to do so)")
        info["trained_now"] = False
    else:
        resume = run_dir.is_dir() and not retrain and bool(list_checkpoints(run_dir))
        flags = ["--resume", "auto"] if resume else ["--overwrite"]
        log(f"training {recipe_path}" + (" (resuming)" if resume else ""))
        code = cli.main(["train", recipe_path, *flags])
        if code != 0:
            raise EmbedtrainError(f"training {recipe_path} failed (exit status {code}); see the messages above")
        if not (model_dir / "modules.json").is_file():
            raise EmbedtrainError(f"training {recipe_path} stopped before saving {model_dir}; run the script again to resume")
        info["trained_now"] = True
    results = run_dir / "results.json"
    if results.is_file():
        saved = json.loads(results.read_text(encoding="utf-8"))
        info.update(steps=saved.get("steps"), seconds=saved.get("seconds"), final=saved.get("final", {}))
    return info


def render(results: dict) -> str:
    from embedtrain.train.merge_run import render_markdown

    parts = [render_markdown(results["merge"])]
    parts.append("\n## Task models\n\n| recipe | model | steps | training time |\n|---|---|---|---|\n")
    for t in results["task_models"]:
        minutes = f"{t['seconds'] / 60:.1f} min" if t.get("seconds") is not None else "?"
        parts.append(f"| {t['recipe']} | {t['model']} | {t.get('steps', '?')} | {minutes} |\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-recipes", nargs="+", default=TRAIN_RECIPES, help="task model training recipes")
    parser.add_argument("--merge-recipe", default=MERGE_RECIPE, help="merge recipe")
    parser.add_argument("--output", default="runs/merge_experiment", help="folder for the merges and the results")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override in the merge recipe, e.g. --set search.steps=20 (repeatable)")
    parser.add_argument("--retrain", action="store_true", help="train the task models even if they exist")
    parser.add_argument("--overwrite", action="store_true", help="replace <output>/merge")
    args = parser.parse_args(argv)

    from embedtrain.config import load_merge_recipe
    from embedtrain.train.merge_run import merge_methods, render_table, run_merge

    out = Path(args.output)
    try:
        task_models = [train_task_model(path, args.retrain) for path in args.train_recipes]
        overrides = [f"output.dir={out / 'merge'}", *args.overrides]
        recipe = load_merge_recipe(args.merge_recipe, overrides + (["output.overwrite=true"] if args.overwrite else []),
                                   methods=merge_methods())
        trained = {str(Path(t["model"]).resolve()) for t in task_models}
        for m in recipe.models:
            if str(Path(m.path).resolve()) not in trained:
                print(f"note: merge model {m.path} is not one of the task models trained here", file=sys.stderr)
        report = run_merge(recipe)
    except ConfigError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        return err.exit_code
    except EmbedtrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code

    results = {"task_models": task_models, "merge": asdict(report)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    (out / "results.md").write_text(render(results), encoding="utf-8")
    print(render_table(report), end="")
    for label, sp in report.self_positioning.items():
        alphas = ", ".join(f"{name} {a:.3f}" for name, a in sp["alphas"].items())
        print(f"{label}: alphas {alphas}; lambda {sp['lambda']:.3f}")
    print(f"results: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
