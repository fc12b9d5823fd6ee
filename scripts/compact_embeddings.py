"""The quickstart trained for compact serving (Matryoshka prefixes + binary-aware) against the plain quickstart
quantized post hoc: nDCG@10, Recall@10, bytes per document and queries/s at every prefix and precision.

    nice -n 5 python scripts/compact_embeddings.py --work runs/compact_v2 --output benchmarks/compact_embeddings.json \
        --markdown benchmarks/compact_embeddings.md

(``--sides plain`` and ``--sides compact`` train and evaluate one side each, e.g. side by side; a last run
without ``--sides`` reuses both and writes the report. ``--seed N`` trains both with another seed: give it a
--work of its own, as the plain run's folder name does not say its seed; ``--steps N`` likewise trains both for
N steps instead of 310. ``--summarize REPORT...`` trains nothing: it writes the mean and standard deviation of the
acceptance figures over reports of one weighting and budget with different seeds.)

Both runs are `embedtrain train recipes/minilm/wordnet_quickstart.yaml` with the same seed and steps; the
compact one adds COMPACT_OVERRIDE. A third table, ``plain+centre``, is the plain model centred after training (the
centre ``loss.compact.center`` computes, from the same training rows): what centring alone gives. Each saved model is then embedded once and every (prefix, precision) is
searched on a faiss index (see embedtrain/eval/compact.py). A model already trained under --work is reused
(its recipe.yaml must match), so a rerun only evaluates.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import machine_info, offline_env, write_json  # noqa: E402

RECIPE = "recipes/minilm/wordnet_quickstart.yaml"
EVAL = "data/wordnet/eval"
DIMS = [384, 256, 128, 64]
RESCORE_TOP_K = 40
COMPACT_OVERRIDE = ("loss.compact={dims: [384, 256, 128], dim_weights: [0.5, 0.25, 0.25], "
                    "precisions: [float32, binary], precision_weights: [0.5, 0.5], center: true}")
# both runs: no evaluation inside training (this script evaluates every prefix and precision itself), and the
# quickstart's settings the table was measured with, pinned so that a later change to the recipe does not change
# what a rerun measures (310 steps of 128 rows, embedded in length-sorted chunks of at most 1024 tokens)
COMMON = ["eval.before_training=false", "eval.tasks=[]", "output.plot=false", "data.batch_size=128",
          "train.max_steps=310", "train.forward_token_budget=1024"]


def train(side: str, extra: list[str], work: Path, common: list[str]) -> dict:
    out = work / side
    args = [RECIPE, *common, *extra, f"output.dir={out}"]
    record = work / f"{side}.command.json"  # written before training (--overwrite empties the run folder)
    done = (out / "results.json").is_file() and record.is_file() \
        and json.loads(record.read_text())["args"] == args \
        and (out / "results.json").stat().st_mtime > record.stat().st_mtime
    if done:
        print(f"{side}: reusing {out}", file=sys.stderr, flush=True)
    else:
        env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        out.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"args": args}) + "\n")
        t0 = time.time()
        log = work / f"{side}.log"  # beside the run, not in it: --overwrite replaces the run's folder
        with log.open("w") as f:
            proc = subprocess.run([sys.executable, "-m", "embedtrain", "train", *args, "--overwrite"], cwd=REPO,
                                  env=env, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode:
            raise SystemExit(f"{side} training failed:\n{log.read_text()[-3000:]}")
        print(f"{side}: trained in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    results = json.loads((out / "results.json").read_text())
    def shown(text: str) -> str:  # paths relative to the checkout, as a reader would type them
        return text.replace(f"{REPO}/", "")

    return {"command": shown("embedtrain train " + " ".join(args)), "model": shown(str(out / "model")),
            "steps": results["steps"], "train_seconds": round(results["train_seconds"], 1)}


def plain_centred(model: str, log) -> "object":
    """The plain model with a centre computed after training, as ``loss.compact.center`` computes it (the same
    rows of the recipe's training data): what centring alone gives, without training for it."""
    from embedtrain.config import load_recipe
    from embedtrain.models import TextEncoder
    from embedtrain.train.compact import calibrate
    from embedtrain.train.tasks.text import TextTask
    from embedtrain.config.compact import CompactConfig

    task = TextTask(load_recipe(str(REPO / RECIPE)), log=log)
    task.read_training_data()
    encoder = TextEncoder.load(model)
    encoder.set_center(calibrate(encoder, task.datasets, CompactConfig().center_rows, log=log)[0])
    return encoder


def evaluate(side: str, run: dict, work: Path) -> list[dict]:
    """The side's table on the held-out split, cached beside the run (keyed by its results.json); side
    ``plain+centre`` is the plain run's model centred after training (:func:`plain_centred`)."""
    import torch

    from embedtrain.eval.compact import evaluate_compact, table_markdown
    from embedtrain.eval.retrieval import load_beir
    from embedtrain.models import TextEncoder
    from embedtrain.models.compact_record import read_binary_rotations

    stamp = (REPO / run["model"]).parent.joinpath("results.json").stat().st_mtime
    cache = work / f"{side.replace('+', '_')}.table.json"
    if cache.is_file() and json.loads(cache.read_text())["results_mtime"] == stamp:
        return json.loads(cache.read_text())["table"]
    torch.set_num_threads(1)  # embedding on one thread, as faiss searches (compact_table): a shared CPU
    t0 = time.time()
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    encoder = (plain_centred(str(REPO / run["model"]), log) if side == "plain+centre"
               else TextEncoder.load(str(REPO / run["model"])))
    rotations = None if side == "plain+centre" else read_binary_rotations(REPO / run["model"])
    table = evaluate_compact(encoder, load_beir(REPO / EVAL, "wordnet"), DIMS,
                             ("float32", "int8", "binary"), rescore_top_k=RESCORE_TOP_K, binary_rotations=rotations)
    cache.write_text(json.dumps({"results_mtime": stamp, "table": table}) + "\n")
    print(f"\n{side} ({time.time() - t0:.0f} s)\n{table_markdown(table)}", file=sys.stderr, flush=True)
    return table


def side_by_side(tables: dict) -> str:
    """Both models' rows in one Markdown table: nDCG@10 (share of the model's own float32), Recall@10, queries/s."""
    lines = ["| dims | precision | bytes/doc | plain nDCG@10 | plain + centre nDCG@10 | compact nDCG@10 "
             "| plain R@10 | compact R@10 | plain q/s | compact q/s |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p, m, c in zip(tables["plain"], tables["plain+centre"], tables["compact"]):
        assert (p["dims"], p["precision"]) == (c["dims"], c["precision"]) == (m["dims"], m["precision"])
        lines.append(f"| {p['dims']} | {p['precision']} | {p['bytes_per_document']} "
                     f"| {100 * p['ndcg@10']:.2f} ({100 * p['retained']:.0f}%) "
                     f"| {100 * m['ndcg@10']:.2f} ({100 * m['retained']:.0f}%) "
                     f"| {100 * c['ndcg@10']:.2f} ({100 * c['retained']:.0f}%) "
                     f"| {100 * p['recall@10']:.2f} | {100 * c['recall@10']:.2f} "
                     f"| {p['queries_per_second']:,.0f} | {c['queries_per_second']:,.0f} |")
    return "\n".join(lines) + "\n"


def acceptance(models: dict) -> dict:
    """The figures the compact model must reach, each next to the plain model's post-hoc figure."""
    def row(side, dims, precision):
        return next(r for r in models[side] if r["dims"] == dims and r["precision"] == precision)

    out = {}
    for name, dims, precision, target in (("binary_retained", 384, "binary", 0.95),
                                          ("binary_rescore_retained", 384, "binary+rescore", 0.98),
                                          ("binary_float_rescore_retained", 384, "binary+float_rescore", 0.98),
                                          ("dims_128_retained", 128, "float32", 0.97)):
        out[name] = {"compact": round(row("compact", dims, precision)["retained"], 4),
                     "plain_post_hoc": round(row("plain", dims, precision)["retained"], 4),
                     "plain_centred_post_hoc": round(row("plain+centre", dims, precision)["retained"], 4),
                     "target": target}
        out[name]["met"] = out[name]["compact"] >= target
    plain, compact = row("plain", 384, "float32")["ndcg@10"], row("compact", 384, "float32")["ndcg@10"]
    out["float_ndcg@10"] = {"compact": round(100 * compact, 2), "plain": round(100 * plain, 2),
                            "drop": round(100 * (plain - compact), 2), "allowed_drop": 0.5,
                            "met": 100 * (plain - compact) <= 0.5}
    return out


def summarize(paths: list[str]) -> dict:
    """Reports of the same weighting with different seeds (each this script's --output): every acceptance figure
    per report, with mean and sample standard deviation. The reports must share the compact override and the
    settings of both runs (steps, batch), and differ in seed."""
    import statistics

    reports = [json.loads(Path(p).read_text()) for p in paths]
    overrides = {r["compact_override"] for r in reports}
    if len(overrides) != 1:
        raise SystemExit(f"--summarize: the reports train different loss.compact overrides: {sorted(overrides)}")
    budgets = {json.dumps(r["common_overrides"]) for r in reports}
    if len(budgets) != 1:
        raise SystemExit(f"--summarize: the reports train with different settings: {sorted(budgets)}")
    from embedtrain.config.common import TrainConfig  # the seed a run without train.seed= takes

    seeds = [int(next((a.split("=", 1)[1] for a in r["runs"]["compact"]["command"].split()
                       if a.startswith("train.seed=")), TrainConfig.seed)) for r in reports]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--summarize: two reports have the same seed ({seeds}); give one report per seed")
    figures = {}
    for name in ("binary_retained", "binary_rescore_retained", "dims_128_retained"):
        values = [100 * r["acceptance"][name]["compact"] for r in reports]
        figures[name] = {"per_report": values, "target": 100 * reports[0]["acceptance"][name]["target"]}
    figures["float_drop"] = {"per_report": [r["acceptance"]["float_ndcg@10"]["drop"] for r in reports],
                             "allowed": reports[0]["acceptance"]["float_ndcg@10"]["allowed_drop"]}
    for fig in figures.values():
        fig["mean"] = round(statistics.mean(fig["per_report"]), 2)
        fig["sd"] = round(statistics.stdev(fig["per_report"]), 2) if len(fig["per_report"]) > 1 else None
        fig["per_report"] = [round(v, 2) for v in fig["per_report"]]
    return {"compact_override": overrides.pop(), "reports": paths, "seeds": seeds, "figures": figures}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/compact_bench")
    parser.add_argument("--output", default=None)
    parser.add_argument("--markdown", default=None, help="also write both tables as Markdown here")
    parser.add_argument("--compact-override", default=COMPACT_OVERRIDE, help="the compact run's loss.compact")
    parser.add_argument("--compact-name", default="compact", help="folder of the compact run under --work")
    parser.add_argument("--seed", type=int, default=None, help="train.seed of both runs (default: the recipe's)")
    parser.add_argument("--steps", type=int, default=None,
                        help="train.max_steps of both runs instead of the quickstart's 310 (another budget: give it a "
                             "--work of its own)")
    parser.add_argument("--summarize", nargs="+", default=None, metavar="REPORT",
                        help="instead of training: mean and spread of the acceptance figures over these reports "
                             "(one weighting, one seed each), written to --output")
    parser.add_argument("--train-only", action="store_true", help="train (or reuse) the models and stop")
    parser.add_argument("--sides", nargs="+", default=["plain", "compact"], choices=["plain", "compact"],
                        help="train and evaluate only these (runs side by side); the report needs both")
    args = parser.parse_args(argv)
    if args.summarize:
        write_json(summarize(args.summarize), args.output)
        return 0
    offline_env()
    work = (REPO / args.work).resolve()
    seed = [] if args.seed is None else [f"train.seed={args.seed}"]
    common = [f"train.max_steps={args.steps}" if a.startswith("train.max_steps=") and args.steps is not None else a
              for a in COMMON]
    extra = {"plain": seed, "compact": [args.compact_override, *seed]}
    folder = {"plain": "plain", "compact": args.compact_name}
    runs = {side: train(folder[side], extra[side], work, common) for side in args.sides}
    if args.train_only:
        return 0
    tables = {side: evaluate(folder[side], run, work) for side, run in runs.items()}
    if "plain" in runs:
        tables["plain+centre"] = evaluate("plain+centre", runs["plain"], work)
    if set(runs) != {"plain", "compact"}:
        return 0  # one side's table, cached for the run that writes the report
    report = {"recipe": RECIPE, "eval": EVAL, "compact_override": args.compact_override, "common_overrides": common,
              "runs": runs, "rows": "see embedtrain/eval/compact.py for each precision's index and bytes",
              "machine": machine_info(), "models": tables}
    report["acceptance"] = acceptance(report["models"])
    write_json(report, args.output)
    if args.markdown:
        Path(args.markdown).write_text(side_by_side(tables), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
