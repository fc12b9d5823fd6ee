"""Do the label-free diagnostics track held-out quality? Two runs of the quickstart recipe, measured.

    nice -n 5 python scripts/diagnostics_experiment.py --output benchmarks/diagnostics_wordnet.json

1. **Correlation**: `embedtrain train recipes/minilm/wordnet_quickstart.yaml` with a checkpoint, an
   evaluation on data/wordnet/eval and a probe measurement every 25 steps (steps 0, 25, ..., 200: nine
   checkpoints' weights; the loop evaluates each checkpoint's weights as it writes it). Reports the
   Spearman correlation over those steps between RankMe on the probe set and held-out nDCG@10 (and the
   same for the other diagnostics).
2. **Collapse**: the same recipe with a learning rate 25x higher (5e-3) that warms up over 27 of 30 steps,
   the probe measured every step and nDCG@10 every 5 steps. Reports the first step whose diagnostics warn,
   the first evaluated step whose nDCG@10 has fallen more than 10% below its value before training, and
   whether the warning came first.

Both runs go through the command line (``python -m embedtrain train ...``); their metrics.jsonl is read
back. ``--reuse`` re-reads finished runs in --runs without training again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import write_json  # noqa: E402

RECIPE = "recipes/minilm/wordnet_quickstart.yaml"
THREADS = ["train.torch_threads=1"]
"""One intra-op thread: on a shared machine two threads per process mostly wait for each other."""
CORRELATION = ["train.save_every=25", "train.eval_every=25", "eval.diagnostics.every=25", *THREADS]
COLLAPSE = ["train.lr=5e-3", "train.max_steps=30", "train.warmup_ratio=0.9", "train.scheduler=constant",
            "train.eval_every=5", "eval.diagnostics.every=1", "train.log_every=5", *THREADS]
DROP = 0.10
"""nDCG@10 "has dropped" once it is more than this fraction below its value before training."""
NDCG = "eval/wordnet/ndcg@10"


def train(out: Path, overrides: list[str]) -> list[str]:
    command = [sys.executable, "-m", "embedtrain", "train", RECIPE, *overrides, f"output.dir={out}", "--overwrite"]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    print("running:", " ".join(command[1:]), file=sys.stderr, flush=True)
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{out} failed:\n{proc.stderr[-3000:]}")
    return ["embedtrain", *command[3:]]


def by_step(run: Path) -> dict[int, dict]:
    """metrics.jsonl merged per step (evaluation, diagnostics and loss lines of a step together)."""
    steps: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            steps.setdefault(entry["step"], {}).update(entry)
    return steps


def correlation(run: Path, command: list[str]) -> dict:
    from scipy.stats import spearmanr

    steps = by_step(run)
    points = sorted(s for s, e in steps.items() if NDCG in e and "diag/rankme" in e)
    ndcg = [steps[s][NDCG] for s in points]
    out = {"command": " ".join(command), "steps": points, "ndcg@10": ndcg, "spearman": {}}
    for key in ("rankme", "uniformity", "alignment", "random_cosine", "similarity_gap"):
        values = [steps[s][f"diag/{key}"] for s in points]
        out[key] = values
        rho, p = spearmanr(values, ndcg)
        out["spearman"][key] = {"rho": round(float(rho), 4), "p_value": round(float(p), 4)}
    out["probe"] = json.loads((run / "results.json").read_text())["diagnostics_probe"]
    # how far a healthy run moves from step 0: the room the warning thresholds must leave
    out["lowest_fraction_of_step0"] = {"rankme": round(min(out["rankme"]) / out["rankme"][0], 4),
                                       "uniformity": round(min(abs(u) for u in out["uniformity"]) / abs(out["uniformity"][0]), 4)}
    out["warnings_at_default_thresholds"] = warnings_at_defaults(steps)
    return out


def warnings_at_defaults(steps: dict[int, dict]) -> dict:
    """The warnings the default thresholds give on this run's logged diagnostics (a pure function of them and
    of step 0's, so the same as the loop would log: a run made with other thresholds can be re-read)."""
    from embedtrain.config.common import DiagnosticsConfig
    from embedtrain.eval.diagnostics import collapse_warnings

    d = DiagnosticsConfig()
    measured = {s: {k[len("diag/"):]: v for k, v in e.items() if k.startswith("diag/")}
                for s, e in sorted(steps.items()) if "diag/rankme" in e}
    reference = measured[min(measured)]
    found = {s: collapse_warnings(v, reference, d.rank_warning, d.uniformity_warning) for s, v in measured.items()}
    return {"rank_warning": d.rank_warning, "uniformity_warning": d.uniformity_warning,
            "steps": {s: w for s, w in found.items() if w}}


def collapse(run: Path, command: list[str]) -> dict:
    steps = by_step(run)
    evaluated = sorted(s for s, e in steps.items() if NDCG in e)
    baseline = steps[0][NDCG]
    warned = [s for s, e in sorted(steps.items()) if "diag/warning" in e]
    dropped = [s for s in evaluated if steps[s][NDCG] < (1 - DROP) * baseline]
    first_warning = warned[0] if warned else None
    first_drop = dropped[0] if dropped else None
    last_eval_at_warning = max((s for s in evaluated if first_warning is not None and s <= first_warning), default=None)
    return {
        "command": " ".join(command),
        "drop_definition": f"nDCG@10 more than {DROP:.0%} below its value before training ({baseline:.4f})",
        "first_warning_step": first_warning,
        "first_warning": steps[first_warning]["diag/warning"] if warned else None,
        "first_drop_step": first_drop,
        "warning_before_drop": first_warning is not None and (first_drop is None or first_warning < first_drop),
        "ndcg@10_at_last_evaluation_before_warning": (
            None if last_eval_at_warning is None else {"step": last_eval_at_warning,
                                                       "ndcg@10": steps[last_eval_at_warning][NDCG]}),
        "evaluations": {s: steps[s][NDCG] for s in evaluated},
        "diagnostics": {s: {k[len("diag/"):]: v for k, v in e.items() if k.startswith("diag/")}
                        for s, e in sorted(steps.items()) if "diag/rankme" in e},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/diagnostics_experiment", help="folder of the two runs")
    parser.add_argument("--output", default=None, help="write the JSON here (e.g. benchmarks/diagnostics_wordnet.json)")
    parser.add_argument("--part", choices=["both", "correlation", "collapse"], default="both")
    parser.add_argument("--reuse", action="store_true", help="read finished runs in --runs instead of training")
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    doc: dict = {"recipe": RECIPE}
    for part, overrides, analyse in (("correlation", CORRELATION, correlation), ("collapse", COLLAPSE, collapse)):
        if args.part not in ("both", part):
            continue
        out = runs / part
        command = ["embedtrain", "train", RECIPE, *overrides, f"output.dir={out}", "--overwrite"]
        if not args.reuse:
            command = train(out, overrides)
        doc[part] = analyse(out, command)
        doc[part]["seconds"] = round(json.loads((out / "results.json").read_text())["seconds"], 1)
    write_json(doc, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
