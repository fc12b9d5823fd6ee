"""Each training option of the quickstart recipe at the quickstart budget, scored on a validation split carved
from the training pairs (never on the held-out split).

    python scripts/quickstart_ablation.py --variants baseline gte ema --seeds 42 \\
        --output benchmarks/quickstart_ablation.json --markdown benchmarks/quickstart_ablation.md

The validation split is 1,000 training rows drawn with a fixed seed; every training row that shares its
anchor or its positive text with one of them is left out of training too (a lemma can name several
definitions). Its corpus holds the 1,000 positives, their sibling-synset negatives and 3,000 negatives of
other training rows as distractors (texts equal to a validation positive excluded), so it is scored as a
local retrieval task like the held-out split. Each run is `embedtrain train recipes/minilm/wordnet_quickstart.yaml`
with the variant's dotted overrides, the split's training file and evaluation folder, and
``eval.before_training=false``. Results accumulate in the JSON (a variant and seed already there is not
run again unless ``--rerun``); the Markdown table is written from the whole JSON.

Runs write a checkpoint every 50 steps; a run that was stopped (Ctrl-C, SIGTERM) continues from its last
checkpoint the next time the script is started, and its record says ``resumed`` (its wall seconds then
cover the last part only; training seconds and seconds per step come from the run's own records). Equal steps
is the primary comparison: every run takes ``STEPS`` (200) steps of ``BATCH`` (64) rows in float32, in batches
grouped by length and embedded one padded batch per role (``PINNED``), unless its variant sets its own (the recipe
itself takes 310 steps of 128 in bf16 since, length-grouped batches embedded in length-sorted chunks of at most 1024
tokens, chosen with this table). For equal wall-clock each run records its training seconds per step (the median over its 10-step log windows) and the load average
of the machine before and after (``os.getloadavg()``; the machine is shared), and the table gives each
variant's time per step relative to the baseline of the same seed; ``--equal-time`` runs a variant for the
steps that fit into the baseline's training time instead.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import markdown_table, write_json  # noqa: E402

RECIPE = "recipes/minilm/wordnet_quickstart.yaml"
TRAIN = REPO / "data" / "wordnet" / "train.jsonl"
VALIDATION_ROWS = 1000
DISTRACTORS = 3000
SPLIT_SEED = 20
STEPS = 200  # the equal-steps budget of the table (the recipe takes 310 bf16 steps of 128 since; "bf16_b128_tokens")
PRECISION = "no"  # float32, as the table began; the bf16 variants set their own
BATCH = 64  # rows per batch, as the table began; the batch variants set their own
# as the table began: batches grouped by length, one padded batch per role; the variants that change them say so
PINNED = ["data.length_grouping=true", "train.forward_token_budget=null"]

# the recipes the later variants build on: bf16 with 420 steps of 64, 230 steps of 128, and 310 steps of 128 with the
# token budget
BF16_420 = ["train.mixed_precision=bf16", "train.max_steps=420"]
BF16_B128 = ["train.mixed_precision=bf16", "train.max_steps=230", "data.batch_size=128"]
BF16_B128_TOKENS = ["train.mixed_precision=bf16", "train.max_steps=310", "data.batch_size=128",
                    "train.forward_token_budget=1024"]

#: name -> (dotted overrides, what it tests)
VARIANTS: dict[str, tuple[list[str], str]] = {
    "baseline": ([], "InfoNCE, τ 0.05, lr 2e-4, float32, 200 steps (the recipe when the table began)"),
    "symmetric": (["loss.symmetric=true"], "InfoNCE plus the document→query term"),
    "gte": (["loss.name=gte"], "GTE's improved contrastive loss (q→d, d→q, q→q, d→d in one partition)"),
    "hardness": (["loss.hardness_weight=5.0"], "InfoNCE with hardness-weighted negatives, β 5"),
    "gte_hardness": (["loss.name=gte", "loss.hardness_weight=5.0"], "GTE loss with hardness-weighted negatives, β 5"),
    "llrd": (["train.layerwise_lr_decay=0.8"], "layer-wise learning-rate decay 0.8"),
    "ema": (["train.ema_decay=0.99"], "final model = EMA of the weights, decay 0.99"),
    "ckpt_avg": (["train.average_last_checkpoints=4", "train.save_every=25", "train.keep_last=3"],
                 "final model = mean of the last 4 checkpoints (steps 125-200, every 25)"),
    "temp_0.03": (["loss.temperature=0.03"], "InfoNCE τ 0.03"),
    "lr_1e-4": (["train.lr=1.0e-4"], "lr 1e-4"),
    "steps_260": (["train.max_steps=260"], "260 steps instead of 200 (what the 10-minute budget still holds; the recipe's since)"),
    "bf16": (["train.mixed_precision=bf16"], "bf16 autocast (the CPU's AVX-512 BF16 instructions)"),
    "bf16_steps_420": (BF16_420,
                       "bf16 autocast, 420 steps: less training time than 260 float32 steps"),
    # options on top of the recipe as it was then (bf16, 420 steps of 64)
    "bf16_420_lr_3e-4": ([*BF16_420, "train.lr=3.0e-4"],
                         "the recipe (bf16, 420 steps) with lr 3e-4"),
    "bf16_420_ckpt_avg": ([*BF16_420, "train.average_last_checkpoints=4", "train.save_every=25", "train.keep_last=3"],
                          "the recipe (bf16, 420 steps), final model = mean of the checkpoints of steps 350, 375, 400 and 420"),
    "bf16_b128": (BF16_B128,
                  "bf16, batch 128 for 230 steps (about the training time of 420 steps of 64)"),
    "bf16_b128_symmetric": ([*BF16_B128, "loss.symmetric=true"],
                            "the recipe (bf16, 230 steps of 128) plus the document→query InfoNCE term"),
    "bf16_b128_tokens": (BF16_B128_TOKENS,
                         "the recipe's batches embedded in length-sorted chunks of ≤ 1024 tokens (less padding), "
                         "310 steps of 128 in about the training time of 230"),
    "bf16_b128_tokens_random": ([*BF16_B128_TOKENS, "data.length_grouping=false"],
                                "as bf16_b128_tokens, with batches drawn at random instead of grouped by length"),
    "bf16_b128_tokens_mined_155": ([*BF16_B128_TOKENS, "data.mined_negatives={num_negatives: 1, every: 155}"],
                                   "the recipe plus one hard negative per row mined by the model being trained, at "
                                   "steps 0 and 155 (data.mined_negatives)"),
    "bf16_b128_tokens_mined_once": ([*BF16_B128_TOKENS, "data.mined_negatives={num_negatives: 1, every: null}"],
                                    "the recipe plus one hard negative per row mined by the starting model, once "
                                    "(data.mined_negatives without refreshing)"),
    "bf16_b128_tokens_steps_500": ([*BF16_B128_TOKENS, "train.max_steps=500"],
                                   "the recipe for 500 steps: less training time than bf16_b128_tokens_mined_155 "
                                   "(its 310 steps embed a fourth text per row, and it mines twice)"),
    "bf16_b256": (["train.mixed_precision=bf16", "train.max_steps=115", "data.batch_size=256"],
                  "bf16, batch 256 for 115 steps (about the training time of 420 steps of 64)"),
}


# -- the validation split -----------------------------------------------------------------------


def prepare_split(folder: Path) -> dict:
    """Write ``folder/train.jsonl`` (training rows minus the validation rows and their look-alikes) and the BEIR
    folder ``folder/valid``; returns counts. Deterministic: the same files every time."""
    rows = [json.loads(line) for line in TRAIN.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(SPLIT_SEED)
    picked = sorted(rng.sample(range(len(rows)), VALIDATION_ROWS))
    valid = [rows[i] for i in picked]
    anchors = {r["anchor"] for r in valid}
    positives = {r["positive"] for r in valid}
    train = [r for i, r in enumerate(rows) if r["anchor"] not in anchors and r["positive"] not in positives]

    corpus: dict[str, str] = {}  # text -> id
    def doc_id(text: str) -> str:
        return corpus.setdefault(text, f"d{len(corpus)}")
    qrels = [(f"q{n}", doc_id(r["positive"])) for n, r in enumerate(valid)]
    for r in valid:
        if r["negative"] not in positives:
            doc_id(r["negative"])
    distractors = [r["negative"] for r in train if r["negative"] not in positives]
    for text in random.Random(SPLIT_SEED + 1).sample(distractors, DISTRACTORS):
        doc_id(text)

    out = folder / "valid"
    out.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train), encoding="utf-8")
    (out / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{n}", "text": r["anchor"]}, ensure_ascii=False) + "\n"
                                               for n, r in enumerate(valid)), encoding="utf-8")
    (out / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": "", "text": t}, ensure_ascii=False) + "\n"
                                              for t, i in corpus.items()), encoding="utf-8")
    (out / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, d in qrels),
                                   encoding="utf-8")
    return {"training_rows": len(train), "left_out_rows": len(rows) - len(train), "validation_queries": len(valid),
            "validation_corpus": len(corpus), "split_seed": SPLIT_SEED}


# -- one run --------------------------------------------------------------------------------------


def step_seconds(metrics: Path, batch_size: int) -> float | None:
    """Median seconds per step over the run's 10-step log windows (``examples_per_s`` of ``batch_size``-row
    batches)."""
    per_step = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if entry.get("examples_per_s") and entry.get("loss") is not None:
            per_step.append(batch_size / entry["examples_per_s"])
    return statistics.median(per_step) if per_step else None


def batch_of(variant: str) -> int:
    """The batch size a variant trains with: its own ``data.batch_size`` override, else ``BATCH``."""
    for o in VARIANTS[variant][0]:
        if o.startswith("data.batch_size="):
            return int(o.split("=", 1)[1])
    return BATCH


def refresh_step_seconds(report: dict, work: Path) -> None:
    """Recompute each recorded run's seconds per step from its own folder when the folder still holds that run
    (same steps, same validation score): the figure once assumed 64-row batches for every run."""
    for r in report["runs"]:
        out = work / f"{r['variant']}-s{r['seed']}"
        if not (out / "results.json").is_file():
            continue
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
        same = results.get("steps") == r["steps"] and abs(
            100 * results["final"]["valid/ndcg@10"] - r["valid_ndcg@10"]) < 1e-9
        if same:
            r["seconds_per_step"] = step_seconds(out / "metrics.jsonl", batch_of(r["variant"]))


def run(variant: str, seed: int, split: Path, work: Path, extra: list[str]) -> dict:
    overrides, _ = VARIANTS[variant]
    out = work / f"{variant}-s{seed}"
    # checkpoints every 50 steps (unless the variant sets its own), so that a run stopped on a busy machine
    # continues where it was (`--resume auto`, exact) the next time the script runs
    saving = [] if any(o.startswith("train.save_every=") for o in overrides) else ["train.save_every=50"]
    resume = (out / "checkpoints").is_dir() and not (out / "results.json").is_file()
    argv = [sys.executable, "-m", "embedtrain", "train", RECIPE, f"train.max_steps={STEPS}",
            f"train.mixed_precision={PRECISION}", f"data.batch_size={BATCH}", *PINNED, *overrides, *saving, *extra,
            f"data.train.0.path={split / 'train.jsonl'}", f"eval.tasks.0.path={split / 'valid'}",
            "eval.tasks.0.name=valid", "eval.before_training=false", "output.plot=false", f"train.seed={seed}",
            f"output.dir={out}", *(["--resume", "auto"] if resume else ["--overwrite"])]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    load_before, start = list(os.getloadavg()), time.time()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    wall, load_after = time.time() - start, list(os.getloadavg())
    if proc.returncode:
        raise SystemExit(f"{variant} seed {seed} failed:\n{proc.stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return {"variant": variant, "seed": seed, "overrides": overrides + extra, "steps": results["steps"],
            "resumed": resume, "final_weights": results.get("final_weights"),
            "valid_ndcg@10": 100 * results["final"]["valid/ndcg@10"],
            "valid_mrr@10": 100 * results["final"]["valid/mrr@10"],
            "valid_recall@10": 100 * results["final"]["valid/recall@10"],
            "train_seconds": round(results["train_seconds"], 1), "wall_seconds": round(wall, 1),
            "seconds_per_step": step_seconds(out / "metrics.jsonl", batch_of(variant)),
            "load_average_before": load_before, "load_average_after": load_after,
            # data.mined_negatives: each mining's step, seconds and figures
            **({"mined_negatives": results["mined_negatives"]} if "mined_negatives" in results else {})}


# -- the table -------------------------------------------------------------------------------------


def summarise(report: dict) -> list[dict]:
    """One row per variant: the score per seed, mean ± sd over seeds, time per step relative to the baseline."""
    runs = report["runs"]
    base_time = {r["seed"]: r["seconds_per_step"] for r in runs if r["variant"] == "baseline" and not r.get("equal_time")}
    base_score = {r["seed"]: r["valid_ndcg@10"] for r in runs if r["variant"] == "baseline" and not r.get("equal_time")}
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in runs):
        for equal_time in (False, True):
            mine = [r for r in runs if r["variant"] == variant and r.get("equal_time", False) == equal_time]
            if not mine:
                continue
            scores = [r["valid_ndcg@10"] for r in mine]
            first = next((r for r in mine if r["seed"] == 42), mine[0])
            ratios = [r["seconds_per_step"] / base_time[r["seed"]] for r in mine
                      if r["seed"] in base_time and r["seconds_per_step"]]
            deltas = [r["valid_ndcg@10"] - base_score[r["seed"]] for r in mine if r["seed"] in base_score]
            rows.append({
                "variant": variant + (" (equal time)" if equal_time else ""), "what": VARIANTS[variant][1],
                "steps": first["steps"], "batch": batch_of(variant),
                "train_seconds": statistics.mean(r["train_seconds"] for r in mine),
                "seed_42": first["valid_ndcg@10"] if first["seed"] == 42 else None,
                "seeds": len(mine), "mean": statistics.mean(scores),
                "sd": statistics.stdev(scores) if len(scores) > 1 else None,
                "delta": statistics.mean(deltas) if deltas else None,
                "time_ratio": statistics.mean(ratios) if ratios else None,
                "load": statistics.mean(sum(r["load_average_before"][:1] + r["load_average_after"][:1]) / 2 for r in mine),
            })
    return rows


def markdown(report: dict) -> str:
    rows = summarise(report)
    table = markdown_table(rows, [("variant", "variant", 0), ("what", "what", 0), ("steps", "steps", 0),
                                  ("batch", "batch", 0), ("train_seconds", "training s (mean)", 0),
                                  ("seed_42", "nDCG@10 seed 42", 2), ("seeds", "seeds", 0), ("mean", "mean", 2),
                                  ("sd", "sd", 2), ("delta", "Δ vs baseline (same seeds)", 2),
                                  ("time_ratio", "time/step vs baseline", 2), ("load", "load avg (1 min)", 1)])
    split = report.get("split", {})
    return (f"# Quickstart ablation (validation split)\n\nCommand: `{report['command']}`\n\n"
            f"Validation split carved from data/wordnet/train.jsonl: {split.get('validation_queries')} queries, "
            f"{split.get('validation_corpus')} documents; {split.get('training_rows')} rows left for training. "
            "Scores are nDCG@10 × 100 on that split after the steps of the steps column (200, the equal-steps "
            "budget, unless the variant sets its own; marked equal time: the steps that fit into the baseline's "
            "training time). Training seconds exclude loading and evaluation. Time per step is the median over "
            "10-step windows, relative to the baseline run of the same seed (a step of a larger batch holds more "
            "rows); the machine is shared, see the load averages.\n\n" + table + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--work", default=str(REPO / "runs" / "quickstart_ablation"))
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "quickstart_ablation.json"))
    parser.add_argument("--markdown", default=str(REPO / "benchmarks" / "quickstart_ablation.md"))
    parser.add_argument("--rerun", action="store_true", help="run a variant and seed again even if the JSON has it")
    parser.add_argument("--equal-time", action="store_true",
                        help="run for the steps that fit into the baseline's training time (same seed)")
    args = parser.parse_args(argv)
    work = Path(args.work)
    split = work / "split"
    output = Path(args.output)
    report = json.loads(output.read_text(encoding="utf-8")) if output.is_file() else {"runs": []}
    report["recipe"] = RECIPE
    command = " ".join(["python", "scripts/quickstart_ablation.py", *(argv if argv is not None else sys.argv[1:])])
    report["command"] = "python scripts/quickstart_ablation.py --variants NAME ... --seeds S ... (once per set of runs)"
    report["split"] = prepare_split(split)
    refresh_step_seconds(report, work)
    for seed in args.seeds:
        for variant in args.variants:
            done = [r for r in report["runs"] if r["variant"] == variant and r["seed"] == seed
                    and r.get("equal_time", False) == args.equal_time]
            if done and not args.rerun:
                print(f"{variant} seed {seed}: in the JSON already", file=sys.stderr)
                continue
            extra = []
            if args.equal_time:
                base = next(r for r in report["runs"] if r["variant"] == "baseline" and r["seed"] == seed)
                mine = next(r for r in report["runs"] if r["variant"] == variant and r["seed"] == seed
                            and not r.get("equal_time"))
                extra = [f"train.max_steps={round(base['steps'] * base['seconds_per_step'] / mine['seconds_per_step'])}"]
            print(f"{variant} seed {seed} {extra} ...", file=sys.stderr, flush=True)
            result = run(variant, seed, split, work, extra)
            result["equal_time"] = args.equal_time
            result["command"] = command
            print(f"  valid nDCG@10 {result['valid_ndcg@10']:.2f}, {result['seconds_per_step']:.2f} s/step, "
                  f"load {result['load_average_before'][0]:.1f}", file=sys.stderr, flush=True)
            report["runs"] = [r for r in report["runs"] if not (r["variant"] == variant and r["seed"] == seed
                                                                and r.get("equal_time", False) == args.equal_time)]
            report["runs"].append(result)
            report["table"] = summarise(report)
            write_json(report, str(output))
            Path(args.markdown).write_text(markdown(report), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
